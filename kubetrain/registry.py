"""The one list of pipeline stages: everything that needs to know the stages reads it.

The pipeline wires its tasks from it, the per-stage CLI builds one subcommand
per entry, the local runner names and orders its table by it, cluster
compilation places each task by it (CPU or GPU pool), and the tests check each
component against it. A stage's settings are not listed here: they are the
config sections its stage function takes as parameters (`sections`), so a
stage's `--help`, its KFP component's parameters and what the function reads
cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetrain import stages
from kubetrain.config.settings import SECTIONS, SEED, fields_of


@dataclass(frozen=True)
class Stage:
    """One KFP component and the library function it maps its artifacts to."""

    task: str  #: the KFP task/component name (kfp.local logs it, the YAML holds it)
    stage: str  #: the pipeline stage it belongs to (the run table shows this name)
    function: Callable[..., Any]
    display: str  #: display name in the Kubeflow UI
    placement: str = "cpu"  #: "cpu" or "gpu": which node pool the task's pod goes to
    alternative: bool = False  #: the Else branch standing in for the stage (skipped)
    description: str = ""

    @property
    def sections(self) -> tuple[str, ...]:
        """The config sections (and `seed`) the stage function takes, in signature order."""
        params = inspect.signature(self.function).parameters
        return tuple(p for p in params if p in SECTIONS or p == SEED)

    @property
    def settings(self) -> tuple[dataclasses.Field, ...]:
        """The setting fields of those sections: its CLI flags and component parameters
        (none for a stage without sections, such as skip-compression)."""
        return tuple(fields_of(*self.sections)) if self.sections else ()

    @property
    def component(self) -> Any:
        """The KFP component (imported on demand: kfp is not needed to read the registry)."""
        module = importlib.import_module(f"kubetrain.components.{self.stage}")
        return getattr(module, self.task.replace("-", "_"))


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        "ingest",
        stages.ingest_stage,
        "ingest",
        description="Read a dataset into a validated table (writes --dataset-path, "
        "--profile-path).",
    ),
    Stage(
        "clean",
        "clean",
        stages.clean_stage,
        "clean",
        description="Impute, handle outliers, scale and split --table-path into "
        "--train-path, --val-path, --test-path.",
    ),
    Stage(
        "augment",
        "augment",
        stages.augment_stage,
        "augment",
        description="Augment the training split --train-path into --out-path.",
    ),
    Stage(
        "tune",
        "tune",
        stages.tune_stage,
        "tune",
        description="Search hyperparameters on --train-path / --val-path; prints "
        "best_hyperparameters for `train --hyperparameters`.",
    ),
    Stage(
        "default-hyperparameters",
        "tune",
        stages.default_hyperparameters_stage,
        "tune (skipped)",
        alternative=True,
        description="The configured hyperparameters, when tune_trials=0.",
    ),
    Stage(
        "train",
        "train",
        stages.train_stage,
        "train",
        placement="gpu",
        description="Train on --train-path with early stopping on --val-path; writes "
        "--model-path and --metrics-path.",
    ),
    Stage(
        "evaluate",
        "evaluate",
        stages.evaluate_stage,
        "evaluate",
        description="Score --model-path on --test-path and apply the --min-accuracy quality gate.",
    ),
    Stage(
        "compress",
        "compress",
        stages.compress_stage,
        "compress",
        description="Prune, quantize and export --model-path to ONNX under --out-path; "
        "keep the smallest within budget.",
    ),
    Stage(
        "skip-compression",
        "compress",
        stages.skip_compression_stage,
        "compress (skipped: quality gate)",
        alternative=True,
        description="Record why nothing was compressed (quality gate failed).",
    ),
    Stage(
        "publish",
        "publish",
        stages.publish_stage,
        "publish",
        description="Publish the model bundle to --publish-uri.",
    ),
    Stage(
        "deploy",
        "deploy",
        stages.deploy_stage,
        "deploy",
        description="Champion/challenger on the test split, then the KServe InferenceService.",
    ),
)
#: Stage names in pipeline order (publish runs only when publish_uri is set, deploy only
#: when deploy is set too).
STAGE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(s.stage for s in STAGES))
#: What a person can run by hand with `python -m kubetrain.cli.stage` (publish needs the
#: upstream artifacts' metadata, which only the pipeline hands over).
CLI_STAGES: tuple[Stage, ...] = tuple(
    s for s in STAGES if not s.alternative and s.stage not in ("publish", "deploy")
)


def by_task(task: str) -> Stage:
    return next(s for s in STAGES if s.task == task)


def task_stage() -> dict[str, str]:
    """KFP task name -> stage name (what the local runner's log lines are mapped by)."""
    return {s.task: s.stage for s in STAGES}


def gpu_tasks() -> frozenset[str]:
    return frozenset(s.task for s in STAGES if s.placement == "gpu")
