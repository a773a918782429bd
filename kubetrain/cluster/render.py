"""`kubetrain render`: the cluster resources a run would create, for review or `kubectl apply`.

Writes the SparkApplication the clean step creates (with --engine spark), the
Katib Experiment the tune step creates, the TrainJob the train step creates
(with --num-nodes > 1 or --gpus > 1) and the InferenceService the deploy step
creates (with --deploy), from the same `RunConfig` and
`ClusterConfig` as `compile --target cluster`. On a real run the data URIs are
the upstream artifacts' URIs; here they default to a path under the pipeline
root that you can point at real data with --table-uri/--train-uri/--validation-uri.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kubetrain.config import cluster as cluster_config
from kubetrain.config import flags
from kubetrain.config.settings import RunConfig
from kubetrain.core import progress

COMPILED_DIR = Path("pipelines/compiled")


def render(
    cfg: RunConfig,
    cluster: cluster_config.ClusterConfig,
    train_uri: str,
    val_uri: str,
    out_dir: Path,
    run_id: str = "rendered",
    table_uri: str = "",
) -> dict[str, Path]:
    """Build, validate and write the three manifests; returns their paths.

    The TrainJob trains with ``cfg.hyper`` as given: what a run with
    ``tune_trials=0`` would train (tuned values are only known on the cluster).
    The SparkApplication cleans ``table_uri`` (default: under the pipeline root)
    into the run's staging folder, as `kubetrain.cluster.spark` does.
    """
    import yaml

    from kubetrain.cluster import inference, katib, spark, trainjob

    exp = katib.experiment(
        cfg.train, cfg.tune, cfg.seed, cluster, train_uri, val_uri, katib.experiment_name(run_id)
    )
    katib.validate(exp)
    exp["metadata"]["namespace"] = cluster.namespace
    job = trainjob.trainjob(
        cfg.train,
        cfg.hyper,
        cfg.final,
        cfg.seed,
        cluster,
        train_uri,
        val_uri,
        f"{cluster.pipeline_root.rstrip('/')}/{run_id}/trainjob-output",
        cluster.num_nodes,
        name=f"kubetrain-train-{run_id}",
    )
    job["metadata"]["namespace"] = cluster.namespace
    place = spark.staging(cluster, run_id)
    app = spark.spark_application(
        f"{spark.NAME_PREFIX}-{run_id}",
        cluster,
        cfg.clean,
        cfg.seed,
        table_uri or f"{cluster.pipeline_root.rstrip('/')}/{run_id}/ingest/table",
        place.splits,
        place.meta,
        run_id=run_id,
    )
    isvc = inference.inference_service(
        cluster,
        inference.service_name(cfg.publish.model_name),
        _bundle_uri(cfg, cluster, run_id),
        cfg.deploy.serving_runtime,
        run_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "experiment": out_dir / "katib-experiment.yaml",
        "trainjob": out_dir / "trainjob.yaml",
        "sparkapplication": out_dir / "sparkapplication.yaml",
        "inferenceservice": out_dir / "inferenceservice.yaml",
    }
    paths["inferenceservice"].write_text(inference.to_yaml(isvc))
    paths["experiment"].write_text(katib.to_yaml(exp))
    paths["trainjob"].write_text(yaml.safe_dump(job, sort_keys=False))
    paths["sparkapplication"].write_text(yaml.safe_dump(app, sort_keys=False))
    return paths


def _bundle_uri(cfg: RunConfig, cluster: cluster_config.ClusterConfig, run_id: str) -> str:
    """The version a run publishes (`publish_uri`, else under the pipeline root)."""
    from kubetrain.assessment.publish import version_for_run

    root = cfg.publish.publish_uri or f"{cluster.pipeline_root.rstrip('/')}/models"
    return f"{root.rstrip('/')}/{cfg.publish.model_name}/{version_for_run(run_id)}/"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "render",
        help="write the SparkApplication, Katib Experiment, TrainJob and InferenceService a "
        "cluster run would create",
    )
    flags.add_arguments(parser.add_argument_group("run settings"))
    cluster_config.add_arguments(parser.add_argument_group("cluster placement"))
    parser.add_argument(
        "--table-uri", default="", help="raw table URI to clean (default: under --pipeline-root)"
    )
    parser.add_argument(
        "--train-uri", default="", help="training split URI (default: under --pipeline-root)"
    )
    parser.add_argument("--validation-uri", default="", help="validation split URI")
    parser.add_argument("--output-dir", default=str(COMPILED_DIR))
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = flags.from_arguments(args)
    cluster = cluster_config.from_arguments(args)
    root = cluster.pipeline_root.rstrip("/")
    paths = render(
        cfg,
        cluster,
        args.train_uri or f"{root}/rendered/augment/augmented",
        args.validation_uri or f"{root}/rendered/clean/validation",
        Path(args.output_dir),
        table_uri=args.table_uri,
    )
    for path in paths.values():
        progress.log("render", f"wrote {path}")
    if not cluster.trainjob:
        progress.log(
            "render",
            "note: with num_nodes=1 and gpus<=1 the train step trains in "
            "its own pod; the TrainJob is what --num-nodes N would create",
        )
    if cfg.clean.engine != "spark":
        progress.log(
            "render",
            "note: with engine=local the clean step cleans in its own pod; the "
            "SparkApplication is what --engine spark would create",
        )
    return 0
