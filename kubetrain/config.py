"""The one typed settings object of a training run.

Every knob of every stage lives here once, with its default, its help text and
its allowed values. The CLI flags, the KFP pipeline parameters (and their
descriptions in the Kubeflow UI) and the stage functions are all derived from
this class, so a setting cannot drift between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from kubetrain.errors import KubetrainError

BUILTIN_DATASETS = ("digits", "breast_cancer", "wine")
TUNE_ALGORITHMS = (
    "random",
    "grid",
    "tpe",
    "multivariate-tpe",
    "cmaes",
    "sobol",
    "bayesianoptimization",
)


def _opt(default: Any, help: str, choices: tuple | None = None, low: float | None = None,
         high: float | None = None, stage: str = "") -> Any:
    return field(default=default, metadata={
        "help": help, "choices": choices, "low": low, "high": high, "stage": stage})


@dataclass(frozen=True)
class RunConfig:
    """Settings of one pipeline run; defaults train digits to >=0.97 accuracy in ~1 minute on 2 CPUs."""

    # ingest
    dataset: str = _opt("digits", "Built-in dataset (digits, breast_cancer, wine), a local "
                        ".csv/.parquet/.npz file, or an s3:// URI.", stage="ingest")
    label_column: str = _opt("", "Label column of a CSV/Parquet table; empty picks 'label', "
                             "'target' or 'class'.", stage="ingest")
    # clean
    impute: str = _opt("median", "How missing feature values are filled.",
                       ("mean", "median", "most_frequent", "drop"), stage="clean")
    outliers: str = _opt("none", "Outlier detection on numeric features.",
                         ("none", "zscore", "iqr"), stage="clean")
    outlier_action: str = _opt("clip", "What happens to outliers.", ("clip", "drop"),
                               stage="clean")
    outlier_threshold: float = _opt(3.0, "z-score limit, or IQR multiplier for 'iqr'.",
                                    low=0.1, stage="clean")
    scaling: str = _opt("standard", "Feature scaling fitted on the training split only.",
                        ("standard", "minmax", "none"), stage="clean")
    test_fraction: float = _opt(0.2, "Share of rows held out for the final test.",
                                low=0.05, high=0.5, stage="clean")
    val_fraction: float = _opt(0.15, "Share of rows held out for validation (early "
                               "stopping, tuning).", low=0.05, high=0.5, stage="clean")
    # augment
    augment_copies: int = _opt(1, "Augmented copies added per training example "
                               "(0 disables augmentation).", low=0, high=20, stage="augment")
    max_shift: int = _opt(1, "Images: largest random shift in pixels.", low=0, high=8,
                          stage="augment")
    max_rotation: float = _opt(10.0, "Images: largest random rotation in degrees.",
                               low=0, high=180, stage="augment")
    flip_horizontal: bool = _opt(False, "Images: random left-right flips (off: digits "
                                 "must not be mirrored).", stage="augment")
    flip_vertical: bool = _opt(False, "Images: random up-down flips.", stage="augment")
    noise_std: float = _opt(0.05, "Gaussian noise std (scaled units) for images and "
                            "table jitter.", low=0, high=2, stage="augment")
    brightness: float = _opt(0.1, "Images: largest relative brightness change.",
                             low=0, high=1, stage="augment")
    oversample: bool = _opt(True, "Tables: oversample minority classes up to the "
                            "majority count.", stage="augment")
    # train
    model: str = _opt("auto", "Network: 'cnn' for images, 'mlp' for tables; 'auto' "
                      "picks from the data.", ("auto", "mlp", "cnn"), stage="train")
    epochs: int = _opt(30, "Most epochs of the final training (early stopping may end "
                       "sooner).", low=1, high=10_000, stage="train")
    batch_size: int = _opt(64, "Mini-batch size.", low=1, high=65_536, stage="train")
    learning_rate: float = _opt(2e-3, "Peak learning rate.", low=1e-7, high=10,
                                stage="train")
    optimizer: str = _opt("adamw", "Optimizer.", ("sgd", "adam", "adamw"), stage="train")
    momentum: float = _opt(0.9, "SGD momentum.", low=0, high=0.999, stage="train")
    weight_decay: float = _opt(1e-4, "L2 weight decay.", low=0, high=1, stage="train")
    l1: float = _opt(0.0, "L1 penalty on weights (0 disables).", low=0, high=1,
                     stage="train")
    dropout: float = _opt(0.1, "Dropout probability.", low=0, high=0.9, stage="train")
    width: int = _opt(128, "Hidden width of the network.", low=4, high=8192, stage="train")
    lr_schedule: str = _opt("cosine", "Learning-rate schedule.", ("cosine", "step", "none"),
                            stage="train")
    patience: int = _opt(6, "Early stopping: epochs without validation-loss improvement.",
                         low=1, high=1000, stage="train")
    seed: int = _opt(42, "Random seed for splits, augmentation, init and tuning.",
                     stage="train")
    device: str = _opt("auto", "Where to train: 'auto' uses CUDA when present.",
                       ("auto", "cpu", "cuda"), stage="train")
    nproc: int = _opt(1, "Data-parallel training processes in the train step (DDP: gloo on "
                         "CPU, NCCL on GPUs); on a cluster --num-nodes/--gpus decide.",
                      low=1, high=512, stage="train")
    # tune
    tune_trials: int = _opt(8, "Katib maxTrialCount; 0 skips tuning and trains with the "
                            "values above.", low=0, high=10_000, stage="tune")
    tune_parallel: int = _opt(1, "Katib parallelTrialCount.", low=1, high=1000, stage="tune")
    tune_algorithm: str = _opt("tpe", "Katib search algorithm.", TUNE_ALGORITHMS,
                               stage="tune")
    tune_early_stopping: str = _opt("medianstop", "Katib early stopping of weak trials.",
                                    ("medianstop", "none"), stage="tune")
    tune_epochs: int = _opt(10, "Epochs per tuning trial.", low=1, high=10_000,
                            stage="tune")
    tune_max_failed: int = _opt(3, "Katib maxFailedTrialCount.", low=0, high=10_000,
                                stage="tune")
    tune_objective: str = _opt("validation-accuracy", "Objective metric (Katib "
                               "objectiveMetricName).", ("validation-accuracy",
                                                         "validation-loss"), stage="tune")
    # evaluate
    min_accuracy: float = _opt(0.9, "Quality gate: test accuracy needed before the model "
                               "is compressed.", low=0, high=1, stage="evaluate")
    # compress
    accuracy_budget: float = _opt(0.01, "Largest test-accuracy drop a compressed variant "
                                  "may have (0.01 = 1 point).", low=0, high=1,
                                  stage="compress")
    prune_amount: float = _opt(0.5, "Share of smallest-magnitude weights pruned.",
                               low=0, high=0.99, stage="compress")
    # publish
    publish_uri: str = _opt("", "Where the model bundle is published (s3://bucket/models or a "
                            "local folder); empty skips publishing.", stage="publish")
    model_name: str = _opt("kubetrain-model", "Model name: the bundle goes to "
                           "<publish_uri>/<model_name>/<version>/.", stage="publish")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if self.test_fraction + self.val_fraction >= 0.8:
            raise KubetrainError(
                f"test_fraction + val_fraction is {self.test_fraction + self.val_fraction:.2f};"
                " keep it below 0.8 so enough rows remain for training")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?", self.model_name):
            raise KubetrainError(f"model_name={self.model_name!r} must be lower-case letters, "
                                 "digits, '.', '_' or '-' (it becomes an object-store path)")
        if self.tune_parallel > max(self.tune_trials, 1):
            raise KubetrainError(
                f"tune_parallel ({self.tune_parallel}) exceeds tune_trials "
                f"({self.tune_trials}); Katib requires parallelTrialCount <= maxTrialCount")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Build from loosely typed values (KFP parameters, JSON) with clear errors."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise KubetrainError(f"unknown setting(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(known)}")
        return cls(**{k: _coerce(known[k], v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage(self, name: str) -> dict[str, Any]:
        """The settings one stage reads (what its KFP component takes as parameters)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("stage") == name}


def fields_of(stage: str | None = None) -> Iterator[dataclasses.Field]:
    for f in dataclasses.fields(RunConfig):
        if stage is None or f.metadata.get("stage") == stage:
            yield f


def _type_of(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = _type_of(f)
    if kind is bool and isinstance(value, str):
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise KubetrainError(f"{f.name} must be true or false, got {value!r}")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise KubetrainError(f"{f.name} must be a whole number, got {value!r}")
        return int(value)  # KFP hands ints inside dicts back as floats
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise KubetrainError(f"{f.name} must be a {kind.__name__}, got {value!r}") from None


def _check_field(f: dataclasses.Field, value: Any) -> None:
    kind = _type_of(f)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KubetrainError(f"{f.name} must be a {kind.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise KubetrainError(f"{f.name}={value!r} is not supported; use one of: "
                             f"{', '.join(map(str, choices))}")
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if kind in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            raise KubetrainError(f"{f.name} must be a finite number, got {value!r}")
        if low is not None and value < low or high is not None and value > high:
            raise KubetrainError(f"{f.name}={value} is out of range; use a value between "
                                 f"{low} and {high}")


def add_argument(parser, f: dataclasses.Field, flag: str = "") -> None:
    """The `--flag` of one setting (named like the field with dashes unless `flag` is given).

    Values stay strings (None when absent): `RunConfig.from_dict` types and checks them,
    so a flag and a pipeline parameter fail with the same message.
    """
    flag = flag or "--" + f.name.replace("_", "-")
    choices = f.metadata.get("choices")
    help_ = (f"{f.metadata['help']}{' One of: ' + ', '.join(choices) + '.' if choices else ''}"
             f" (default: {f.default})")
    kind = _type_of(f)
    if kind is bool:
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                            default=None, help=help_)
    else:
        parser.add_argument(flag, dest=f.name, type=str, default=None,
                            metavar=kind.__name__.upper(), help=help_)


def add_arguments(parser: argparse.ArgumentParser, stage: str | None = None) -> None:
    """One `--flag` per setting (of one stage, or all)."""
    for f in fields_of(stage):
        add_argument(parser, f)


def json_object(text: str, flag: str) -> dict[str, Any]:
    """A JSON object given on the command line, with a one-line error naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KubetrainError(f"{flag} is not valid JSON ({exc.msg}); pass an object such as "
                             "'{\"width\": 64}'") from None
    if not isinstance(value, dict):
        raise KubetrainError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def from_arguments(args: argparse.Namespace) -> RunConfig:
    given = {f.name: getattr(args, f.name) for f in fields_of()
             if getattr(args, f.name, None) is not None}
    return RunConfig.from_dict(given)
