"""KFP component: ingest."""

from kfp.dsl import Dataset, Markdown, Output

from kubetrain.components.common import component


@component
def ingest(source: str, label_column: str, fingerprint: str, dataset: Output[Dataset],
           profile: Output[Markdown]):
    """Read a built-in dataset, CSV/Parquet/NPZ file or s3:// URI into a validated table."""
    from kubetrain.stages import ingest_stage

    dataset.metadata.update(ingest_stage(source, label_column, dataset.path, profile.path,
                                         fingerprint))
