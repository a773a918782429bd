"""KFP component: clean."""

from kfp.dsl import Dataset, Input, Markdown, Output

from kubetrain.components.common import component


@component
def clean(
    table: Input[Dataset],
    engine: str,
    impute: str,
    outliers: str,
    outlier_action: str,
    outlier_threshold: float,
    scaling: str,
    test_fraction: float,
    val_fraction: float,
    column_types: str,
    drop_columns: str,
    feature_selection: bool,
    max_features: int,
    seed: int,
    cluster: dict,
    run_id: str,
    train: Output[Dataset],
    validation: Output[Dataset],
    test: Output[Dataset],
    report: Output[Markdown],
):
    """Type the columns, deduplicate, impute, handle outliers, encode, split (stratified),
    select features and scale.

    Here, or with `engine=spark` on PySpark: local mode in this pod, or a
    SparkApplication that this pod follows when the run is on a cluster.
    """
    from kubetrain.cluster.backends import cleaner_for
    from kubetrain.config import RunConfig
    from kubetrain.stages import clean_stage, compact

    cfg = RunConfig.pick(locals())
    meta = clean_stage(
        table.path,
        train.path,
        validation.path,
        test.path,
        report.path,
        cfg.clean,
        cfg.seed,
        cleaner=cleaner_for(cfg.clean, cluster, run_id),
        table_uri=table.uri,
        run_id=run_id,
    )
    for artifact, name in ((train, "train"), (validation, "validation"), (test, "test")):
        artifact.metadata.update(compact(meta["splits"][name]))
    train.metadata.update(compact({k: v for k, v in meta.items() if k != "splits"}))
