"""KFP component: ingest."""

from kfp.dsl import Dataset, Markdown, Output

from kubetrain.components.common import component


@component
def ingest(
    dataset: str,
    label_column: str,
    image_size: int,
    bad_images: str,
    task: str,
    fingerprint: str,
    table: Output[Dataset],
    profile: Output[Markdown],
):
    """Read a built-in dataset, CSV/Parquet/NPZ file, image folder or manifest, or s3:// URI
    into a validated table."""
    from kubetrain.config import RunConfig
    from kubetrain.stages import compact, ingest_stage

    cfg = RunConfig.pick(locals())
    table.metadata.update(compact(ingest_stage(table.path, profile.path, cfg.data, fingerprint)))
