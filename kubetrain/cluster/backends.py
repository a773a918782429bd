"""Where tuning and training run, chosen once per process from the config.

Tuning: Optuna trials in the step's own process (`stages.tune_here`), or a
Katib Experiment whose trials run as pods (on a cluster). Training: in the
step's own process (`stages.train_here`), over `nproc` local torchrun
processes (DDP), or as a Kubeflow Trainer TrainJob (a cluster placement with
several nodes or GPUs). The stage functions take the chosen backend and never
look at strings or dicts to decide.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from kubetrain import stages
from kubetrain.config.cluster import ClusterConfig
from kubetrain.config.settings import CleanConfig, FinalConfig, RunConfig
from kubetrain.stages import (
    Cleaner,
    CleanRequest,
    Deployer,
    DeployRequest,
    Trainer,
    TrainRequest,
    Tuner,
    TuneRequest,
)


def _placement(cluster: ClusterConfig | Mapping[str, Any] | None) -> ClusterConfig | None:
    """The compiled placement (a dict inside a KFP component), parsed once; None locally."""
    if not cluster:
        return None
    return cluster if isinstance(cluster, ClusterConfig) else ClusterConfig.from_dict(cluster)


def cleaner_for(
    clean: CleanConfig, cluster: ClusterConfig | Mapping[str, Any] | None = None, run_id: str = ""
) -> Cleaner:
    """PySpark for engine=spark (a SparkApplication on a cluster, local mode here), else here."""
    if clean.engine != "spark":
        return stages.clean_here
    placement = _placement(cluster)
    if placement is None:
        return clean_with_local_spark
    return functools.partial(clean_on_spark, placement, run_id)


def clean_with_local_spark(req: CleanRequest) -> dict[str, Any]:
    from kubetrain.data.clean_spark import clean_spark

    return clean_spark(
        req.table_path, req.train_path, req.val_path, req.test_path, req.clean, req.seed
    )


def clean_on_spark(placement: ClusterConfig, run_id: str, req: CleanRequest) -> dict[str, Any]:
    """A SparkApplication on the cluster runs `kubetrain.cli.spark_clean`; this pod follows it
    and copies the splits it wrote (under the pipeline root) into the step's outputs."""
    from kubetrain.cluster import spark

    return spark.clean_on_cluster(
        placement,
        run_id or req.run_id,
        req.clean,
        req.seed,
        req.table_uri,
        req.train_path,
        req.val_path,
        req.test_path,
    )


def tuner_for(cluster: ClusterConfig | Mapping[str, Any] | None = None, run_id: str = "") -> Tuner:
    """Katib on a cluster, Optuna here."""
    placement = _placement(cluster)
    if placement is None:
        return stages.tune_here
    return functools.partial(tune_on_katib, placement, run_id)


def trainer_for(
    final: FinalConfig, cluster: ClusterConfig | Mapping[str, Any] | None = None, run_id: str = ""
) -> Trainer:
    """A TrainJob for multi-node/multi-GPU placements, torchrun for nproc > 1, else in process."""
    placement = _placement(cluster)
    if placement is not None and placement.trainjob:
        return functools.partial(train_on_trainjob, placement, run_id)
    from kubetrain.training import distributed  # torch: imported by the stages that train

    if distributed.should_launch(final.nproc):
        return train_with_torchrun
    return stages.train_here


def deployer_for(
    cluster: ClusterConfig | Mapping[str, Any] | None = None, run_id: str = ""
) -> Deployer:
    """A KServe InferenceService on a cluster; here, the champion/challenger decision only."""
    placement = _placement(cluster)
    if placement is None:
        return stages.deploy_here
    return functools.partial(deploy_on_kserve, placement, run_id)


def deploy_on_kserve(placement: ClusterConfig, run_id: str, req: DeployRequest) -> dict[str, Any]:
    from kubetrain.cluster import inference

    return inference.deploy(placement, run_id or req.run_id, req)


#: Where the local runner keeps checkpoints (set for its kfp.local task processes).
CHECKPOINT_ROOT_ENV = "KUBETRAIN_CHECKPOINT_ROOT"


def checkpoint_root(cluster: ClusterConfig | Mapping[str, Any] | None = None) -> str:
    """The stable checkpoint place: beside the pipeline root on a cluster, else the runs folder."""
    import os

    placement = _placement(cluster)
    if placement is not None:
        return placement.checkpoint_root
    return os.environ.get(CHECKPOINT_ROOT_ENV, "")


def tune_on_katib(
    placement: ClusterConfig, run_id: str, req: TuneRequest
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    from kubetrain.cluster import katib
    from kubetrain.core import storage

    return katib.tune(
        req.train,
        req.tune,
        req.seed,
        placement,
        storage.object_uri(req.train_uri),
        storage.object_uri(req.val_uri),
        katib.experiment_name(run_id),
        **_split_facts(req.train_path, req.train.model),
        timeout_s=placement.wait_timeout,
        keep=placement.finished_jobs == "keep",
    )


def _split_facts(path: str, model: str) -> dict[str, Any]:
    """What the Experiment needs of the training split, from its manifest (read once):
    its rows (the time budget's trial estimate), whether it is a regression, and whether
    its network has a width to search. With no split to read: 0 rows (the estimate then
    counts only a trial's start), a classifier, a width."""
    from kubetrain.data import shards
    from kubetrain.data.datasets import Schema
    from kubetrain.training.models import uses_width

    if not path or not shards.is_sharded(path):
        return {"train_rows": 0, "regression": False, "width": True}
    manifest = shards.read_manifest(path)
    schema, rows = Schema.from_json(manifest["schema"]), int(manifest["rows"])
    return {
        "train_rows": rows,
        "regression": schema.regression,
        "width": uses_width(model, schema, rows),
    }


def train_on_trainjob(placement: ClusterConfig, run_id: str, req: TrainRequest) -> dict[str, Any]:
    from kubetrain.cluster import k8s
    from kubetrain.cluster.trainjob import MAX_NAME, train_on_cluster

    return train_on_cluster(
        req.train,
        req.hyper,
        req.final,
        req.seed,
        placement,
        req.train_uri,
        req.val_uri,
        req.output_uri,
        req.model_path,
        req.metrics_path,
        req.report_path,
        name=k8s.run_name(run_id, "kubetrain-train", MAX_NAME),
    )


def train_with_torchrun(req: TrainRequest) -> dict[str, Any]:
    """`final.nproc` local DDP processes; rank 0 runs `stages.train_here` and writes the outputs."""
    from kubetrain.training import distributed

    cfg = RunConfig(seed=req.seed, train=req.train, hyper=req.hyper, final=req.final)
    return distributed.train_distributed(
        req.train_path,
        req.val_path,
        {},
        req.model_path,
        req.metrics_path,
        req.report_path,
        cfg.flat("seed", "train", "hyper", "final"),
        req.final.nproc,
        checkpoint_dir=req.checkpoint_dir,
    )
