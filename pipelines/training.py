"""The kubetrain training pipeline: ingest, clean, augment, tune, train, evaluate, compress.

The pipeline's parameters are the run settings (`kubetrain.config.settings`),
generated with their defaults and descriptions: a setting is written once, and
the Kubeflow UI, the CLI and the library agree. Each task gets exactly the
settings of its stage's config sections (`kubetrain.registry`). Branches:
tuning runs only when ``tune_trials > 0`` (else the configured values are
used), and compression only when the evaluation passes the quality gate; the
`dsl.OneOf` outputs let the pipeline return one value whichever branch ran.
"""

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model

from kubetrain import registry
from kubetrain.config.settings import RunConfig, fields_of, kfp_type

PIPELINE_NAME = "kubetrain-training"


class Outputs(NamedTuple):
    dataset: Dataset
    train_split: Dataset
    augmented: Dataset
    tuning: dict
    best_hyperparameters: dict
    trained_model: Model
    evaluation: Artifact
    compression: dict


def code_version() -> str:
    """Hash of the library, component and pipeline sources: part of every task's cache key.

    KFP keys its cache on the component's command, which holds only the thin
    component body; without this, a change in the library behind it would be
    served stale results. Each package is found through its own module, so an
    editable checkout and an installed image hash the same sources alike.
    """
    import importlib

    digest = hashlib.sha256()
    for package in ("kubetrain", "kubetrain.components", "kubetrain.pipelines"):
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root)}".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TaskPolicy:
    """How tasks are decorated for a target: retries, caching, and a per-stage hook."""

    retries: int = 0
    backoff_seconds: int = 10
    configure: Callable[[dsl.PipelineTask, str], None] | None = None
    #: Seconds the finished run's Argo Workflow is kept (PipelineConfig); None keeps it.
    ttl_seconds: int | None = None
    #: ClusterConfig (as a dict) handed to the stages whose backend it chooses (Katib, TrainJob).
    cluster: dict | None = None


def _task(
    task: dsl.PipelineTask, stage: str, policy: TaskPolicy, version: str, display: str = ""
) -> dsl.PipelineTask:
    task.set_display_name(display or stage)
    task.set_env_variable("KUBETRAIN_CODE_VERSION", version)
    if policy.retries:
        task.set_retry(
            num_retries=policy.retries,
            backoff_duration=f"{policy.backoff_seconds}s",
            backoff_factor=2.0,
            backoff_max_duration="600s",
        )
    if policy.configure:
        policy.configure(task, stage)
    return task


def _parameters() -> list[inspect.Parameter]:
    """The pipeline's signature: every setting with its type and default, then `fingerprint`."""
    defaults = RunConfig().flat()
    params = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=defaults[f.name],
            annotation=kfp_type(f),
        )
        for f in fields_of()
    ]
    params.append(
        inspect.Parameter(
            "fingerprint", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="", annotation=str
        )
    )
    return params


def _settings(p: dict[str, Any], task: str) -> dict[str, Any]:
    """The pipeline parameters a task takes: the fields of its stage's config sections."""
    return {f.name: p[f.name] for f in registry.by_task(task).settings}


def build_pipeline(policy: TaskPolicy = TaskPolicy()) -> Callable:
    """The pipeline function for one target (local runs retry nothing: errors are ours)."""
    version = code_version()
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER if policy.cluster else ""
    cluster = policy.cluster or {}

    def step(task: str, **inputs: Any) -> dsl.PipelineTask:
        entry = registry.by_task(task)
        made = entry.component(**inputs, **_settings(p, task))
        return _task(made, entry.task, policy, version, entry.display)

    p: dict[str, Any] = {}

    signature = inspect.Signature(
        _parameters(), return_annotation=None if policy.cluster else Outputs
    )

    def training_pipeline(*args: Any, **kwargs: Any) -> Outputs | None:
        # KFP calls this with one channel per parameter of `signature`, in order.
        params = signature.bind(*args, **kwargs).arguments
        p.clear()
        p.update(params)
        if not policy.cluster:  # kfp.local runs no exit handlers; nothing to clean there
            return _body(params)
        from kubetrain.components.cleanup import cleanup

        exit_task = _task(
            cleanup(cluster=cluster, run_id=run_id),
            "cleanup",
            policy,
            version,
            "clean up and notify",
        )
        with dsl.ExitHandler(exit_task, name="run"):
            _body(params)
        return None  # KFP returns no outputs from inside an exit handler; the UI has them

    def _body(params: dict[str, Any]) -> Outputs:
        raw = step("ingest", fingerprint=params["fingerprint"])
        splits = step("clean", table=raw.outputs["table"], cluster=cluster, run_id=run_id)
        aug = step("augment", train=splits.outputs["train"])
        with dsl.If(params["tune_trials"] > 0, name="tuning-requested"):
            tuned = step(
                "tune",
                train=aug.outputs["augmented"],
                validation=splits.outputs["validation"],
                cluster=cluster,
                run_id=run_id,
            )
        with dsl.Else(name="tuning-skipped"):
            defaults = step("default-hyperparameters")
        best = dsl.OneOf(
            tuned.outputs["best_hyperparameters"], defaults.outputs["best_hyperparameters"]
        )
        # kfp.local selects only parameters with OneOf, so the branch results the
        # run report needs travel as dicts; the artifacts stay on each task for the UI.
        tuning = dsl.OneOf(tuned.outputs["tuning"], defaults.outputs["tuning"])
        trained = step(
            "train",
            train=aug.outputs["augmented"],
            validation=splits.outputs["validation"],
            hyperparameters=best,
            cluster=cluster,
            run_id=run_id,
        )
        judged = step(
            "evaluate",
            trained_model=trained.outputs["trained_model"],
            test=splits.outputs["test"],
            tuning=tuning,  # the best trial's K-fold figures, shown beside the test's
        )
        with dsl.If(judged.outputs["gate"] == "pass", name="quality-gate-passed"):
            small = step(
                "compress",
                trained_model=trained.outputs["trained_model"],
                test=splits.outputs["test"],
                train=splits.outputs["train"],  # static int8 calibration, distillation
                validation=splits.outputs["validation"],
            )
            with dsl.If(params["publish_uri"] != "", name="publish-requested"):
                published = step(
                    "publish",
                    trained_model=trained.outputs["trained_model"],
                    compressed_model=small.outputs["compressed_model"],
                    evaluation=judged.outputs["evaluation"],
                    table=raw.outputs["table"],
                    run_id=run_id,
                )
                with dsl.If(params["deploy"] == True, name="deploy-requested"):  # noqa: E712
                    step(
                        "deploy",
                        bundle_uri=published.output,
                        table=raw.outputs["table"],
                        test=splits.outputs["test"],
                        cluster=cluster,
                        run_id=run_id,
                    )
        with dsl.Else(name="quality-gate-failed"):
            skipped = step("skip-compression", evaluation=judged.outputs["evaluation"])
        return Outputs(
            dataset=raw.outputs["table"],
            train_split=splits.outputs["train"],
            augmented=aug.outputs["augmented"],
            tuning=tuning,
            best_hyperparameters=best,
            trained_model=trained.outputs["trained_model"],
            evaluation=judged.outputs["evaluation"],
            compression=dsl.OneOf(small.outputs["summary"], skipped.outputs["summary"]),
        )

    training_pipeline.__signature__ = signature
    training_pipeline.__doc__ = _docstring()
    config = (
        dsl.PipelineConfig(ttl_seconds_after_finished=policy.ttl_seconds)
        if policy.ttl_seconds
        else None
    )
    return dsl.pipeline(
        name=PIPELINE_NAME,
        pipeline_config=config,
        description=(
            "Train, tune (Katib semantics), evaluate, compress and publish a classifier: "
            "ingest -> clean -> augment -> tune -> train -> evaluate -> compress -> "
            "publish."
        ),
    )(training_pipeline)


def _docstring() -> str:
    """Google-style Args, which KFP turns into parameter descriptions in the UI."""
    lines = ["Kubetrain training pipeline.", "", "Args:"]
    for f in fields_of():
        lines.append(f"    {f.name}: {f.metadata['help']}")
        if f.name == "label_column":
            lines.append(
                "    fingerprint: Content hash of a local dataset file, so the "
                "cache notices edits (set by the CLI; leave empty)."
            )
    return "\n".join(lines)


training_pipeline = build_pipeline()
