"""KFP component: clean."""

from kfp.dsl import Dataset, Input, Markdown, Output

from kubetrain.components.common import component


@component
def clean(
    table: Input[Dataset],
    impute: str,
    outliers: str,
    outlier_action: str,
    outlier_threshold: float,
    scaling: str,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    train: Output[Dataset],
    validation: Output[Dataset],
    test: Output[Dataset],
    report: Output[Markdown],
):
    """Deduplicate, impute, handle outliers, encode, split (stratified) and scale."""
    from kubetrain.config import RunConfig
    from kubetrain.stages import clean_stage, compact

    cfg = RunConfig.pick(locals())
    meta = clean_stage(
        table.path, train.path, validation.path, test.path, report.path, cfg.clean, cfg.seed
    )
    for artifact, name in ((train, "train"), (validation, "validation"), (test, "test")):
        artifact.metadata.update(compact(meta["splits"][name]))
    train.metadata.update(compact({k: v for k, v in meta.items() if k != "splits"}))
