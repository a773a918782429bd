"""The typed settings of a training run, grouped by the concern that reads them.

Each setting is written once, here: its default, help text, allowed values and
range. A `RunConfig` is the shared seed plus one small frozen section per
concern (data, clean, augment, train, hyper, final, tune, gate, compress,
publish). Setting names are unique across sections, so the CLI flags and the
Kubeflow UI parameters stay flat (`--epochs`, `epochs`) while the library
receives only the section a function needs.

Values are parsed and validated once, at each process boundary (`from_flat`:
CLI, component body, trial and train entrypoints); below it only typed objects
travel.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kubetrain.core.errors import KubetrainError, require

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
#: Feature column types (`kubetrain.data.column_types` infers them; `--column-types`
#: overrides). Defined here so the setting is checked where it is parsed.
COLUMN_TYPES = (
    "numeric",
    "numeric_text",
    "boolean",
    "categorical",
    "high_cardinality",
    "text",
    "datetime",
    "identifier",
    "constant",
    "empty",
)
#: Short names accepted in `--column-types` (``caseid=id``).
COLUMN_TYPE_ALIASES = {
    "id": "identifier",
    "num": "numeric",
    "number": "numeric",
    "bool": "boolean",
    "cat": "categorical",
    "category": "categorical",
    "date": "datetime",
    "time": "datetime",
    "highcard": "high_cardinality",
}
#: Katib objective metrics (maximized: accuracy, r2; minimized: loss, rmse).
TUNE_OBJECTIVES = (
    "auto",
    "validation-accuracy",
    "validation-loss",
    "validation-r2",
    "validation-rmse",
)
TASKS = ("auto", "classification", "regression")
#: `task="auto"` calls a numeric label with more distinct values than this, and than
#: `CONTINUOUS_SHARE` of the rows, a measurement (regression), not classes: stratifying
#: 350 "classes" of one row each is what a salary column would otherwise become.
CONTINUOUS_CLASSES = 20
CONTINUOUS_SHARE = 0.05
SEED_HELP = "Random seed for splits, augmentation, init and tuning."
SEED_RANGE = (0, 2**32 - 1)


def _opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    return field(
        default=default, metadata={"help": help, "choices": choices, "low": low, "high": high}
    )


class Section:
    """Validation and typed construction shared by every settings section."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Section:
        """Loosely typed values (strings, KFP floats) to a checked section."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise KubetrainError(
                f"unknown {cls.name} setting(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return cls(**{k: coerce(known[k], v) for k, v in values.items()})

    def replace(self, values: Mapping[str, Any]):
        """This section with `values` applied (coerced and validated): one replace."""
        return self.from_values({**dataclasses.asdict(self), **values})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the examples come from."""

    name: ClassVar[str] = "data"
    dataset: str = _opt(
        "digits",
        "Built-in dataset (digits, breast_cancer, wine), a local "
        ".csv/.parquet/.npz file, an image folder (one subfolder per class) or manifest "
        "(CSV/Parquet with path,label), or the same under s3://.",
    )
    label_column: str = _opt(
        "", "Label column of a CSV/Parquet table; empty picks 'label', 'target' or 'class'."
    )
    image_size: int = _opt(
        0,
        "Image folders and manifests: resize every image to N x N (shorter side, then a "
        "centre crop); 0 keeps the images' size, which must then be the same for all.",
        low=0,
        high=4096,
    )
    bad_images: str = _opt(
        "skip",
        "Image folders and manifests: corrupt or unreadable images, greyscale among colour "
        "ones (or the reverse) and tiny ones are reported and left out ('skip'), or the "
        "first of them stops the run ('fail').",
        ("skip", "fail"),
    )
    task: str = _opt(
        "auto",
        "What the label is: 'classification' (classes), 'regression' (a number to "
        "predict), or 'auto': regression when the label is numeric with more than "
        f"{CONTINUOUS_CLASSES} distinct values and more than "
        f"{CONTINUOUS_SHARE} of the rows distinct, else classification.",
        TASKS,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset in BUILTIN_DATASETS and self.label_column:
            raise KubetrainError(
                f"label_column={self.label_column!r} does not apply to the built-in dataset "
                f"{self.dataset!r}, which has its own labels; drop --label-column or point "
                "--dataset at your CSV/Parquet file"
            )


@dataclass(frozen=True)
class CleanConfig(Section):
    """Imputation, outliers, scaling and the split."""

    name: ClassVar[str] = "clean"
    engine: str = _opt(
        "local",
        "Where clean runs: 'local' (this process; streams batches when the table is over "
        "the memory budget) or 'spark' (PySpark: local mode here, a SparkApplication on a "
        "cluster).",
        ("local", "spark"),
    )
    impute: str = _opt(
        "median",
        "How missing feature values are filled.",
        ("mean", "median", "most_frequent", "drop"),
    )
    outliers: str = _opt(
        "none", "Outlier detection on numeric features.", ("none", "zscore", "iqr")
    )
    outlier_action: str = _opt("clip", "What happens to outliers.", ("clip", "drop"))
    outlier_threshold: float = _opt(3.0, "z-score limit, or IQR multiplier for 'iqr'.", low=0.1)
    scaling: str = _opt(
        "standard",
        "Feature scaling fitted on the training split only: 'standard' (mean, std), "
        "'minmax', 'robust' (continuous columns centred on their median and divided by "
        "their interquartile range, which skewed money-like columns and outliers do not "
        "stretch; the other columns standardized) or 'none'.",
        ("standard", "minmax", "robust", "none"),
    )
    test_fraction: float = _opt(
        0.2, "Share of rows held out for the final test.", low=0.05, high=0.5
    )
    val_fraction: float = _opt(
        0.15, "Share of rows held out for validation (early stopping, tuning).", low=0.05, high=0.5
    )
    column_types: str = _opt(
        "",
        "Feature column types that override the inferred ones, as 'name=type,...' "
        f"(e.g. 'name=text,caseid=id'); types: {', '.join(COLUMN_TYPES)} "
        f"(or {', '.join(f'{k}={v}' for k, v in COLUMN_TYPE_ALIASES.items())}).",
    )
    drop_columns: str = _opt("", "Feature columns left out of the model, as 'a,b'.")
    feature_selection: bool = _opt(
        True,
        "Drop constant and near-constant encoded features (one value in over 999 of 1000 "
        "training rows) and duplicate or highly correlated ones (|r| > 0.98: the later one).",
    )
    max_features: int = _opt(
        0,
        "Keep the N feature columns with the highest mutual information with the label "
        "(a categorical column's one-hot group, a date's parts or a text column's hashed "
        "features count as one column); 0 keeps all.",
        low=0,
        high=1_000_000,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_fraction + self.val_fraction >= 0.8:
            raise KubetrainError(
                f"test_fraction + val_fraction is {self.test_fraction + self.val_fraction:.2f};"
                " keep it below 0.8 so enough rows remain for training"
            )
        overridden = parse_column_types(self.column_types)  # checks the syntax and types
        both = sorted(set(overridden) & set(parse_drop_columns(self.drop_columns)))
        if both:
            raise KubetrainError(
                f"column {both[0]!r} is in both --column-types and --drop-columns; "
                "keep it in one of them"
            )

    @property
    def type_overrides(self) -> dict[str, str]:
        """``column_types`` as {column: canonical type} (the value stays a string setting)."""
        return parse_column_types(self.column_types)

    @property
    def dropped_columns(self) -> list[str]:
        """``drop_columns`` as a list of column names."""
        return parse_drop_columns(self.drop_columns)


def parse_column_types(text: str) -> dict[str, str]:
    """'a=text, b=id' -> {'a': 'text', 'b': 'identifier'}; one-line errors for bad entries.

    Column names are checked against the table later (the config does not know
    the table); here the syntax and the type names are.
    """
    out: dict[str, str] = {}
    valid = f"valid types: {', '.join(COLUMN_TYPES)} (short: {', '.join(COLUMN_TYPE_ALIASES)})"
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, kind = (part.strip() for part in entry.rpartition("="))
        if not sep or not name:
            raise KubetrainError(
                f"column_types entry {entry!r} is not 'column=type'; write e.g. "
                f"'name=text,caseid=id' ({valid})"
            )
        canonical = COLUMN_TYPE_ALIASES.get(kind.lower(), kind.lower())
        if canonical not in COLUMN_TYPES:
            raise KubetrainError(
                f"column_types: unknown type {kind!r} for column {name!r}; {valid}"
            )
        if name in out and out[name] != canonical:
            raise KubetrainError(
                f"column_types gives column {name!r} two types ({out[name]}, {canonical}); keep one"
            )
        out[name] = canonical
    return out


def parse_drop_columns(text: str) -> list[str]:
    """'a, b' -> ['a', 'b'] (order kept, repeats once)."""
    return list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))


@dataclass(frozen=True)
class AugmentConfig(Section):
    """Augmentation of the training split."""

    name: ClassVar[str] = "augment"
    augment_copies: int = _opt(
        -1,
        "Tables: jittered copies added per training row (-1: one copy for training splits up "
        "to 200,000 rows, none beyond). Images are never copied: each batch is augmented "
        "afresh on the training device (the options below), and 0 turns that off.",
        low=-1,
        high=20,
    )
    crop_area: float = _opt(
        -1.0,
        "Images: random resized crop, the smallest share of the image's area kept (1: no "
        "crop; -1: auto, 0.8 for images under 64 px, 0.35 from 64 px).",
        low=-1,
        high=1,
    )
    max_rotation: float = _opt(
        -1.0,
        "Images: largest random rotation in degrees (-1: auto, 10 for one-channel images, "
        "none for colour ones).",
        low=-1,
        high=180,
    )
    flip: str = _opt(
        "auto",
        "Images: random left-right flips: 'on', 'off', or 'auto': on for colour images, off "
        "for one-channel ones (digits, glyphs, scans: a mirrored 2 or R is no 2 or R).",
        ("auto", "on", "off"),
    )
    flip_vertical: bool = _opt(False, "Images: random up-down flips.")
    brightness: float = _opt(
        0.1,
        "Images: largest brightness shift, in standard deviations of the pixels.",
        low=0,
        high=2,
    )
    contrast: float = _opt(0.1, "Images: largest relative contrast change.", low=0, high=1)
    saturation: float = _opt(
        0.1, "Colour images: largest relative saturation change.", low=0, high=1
    )
    cutout: float = _opt(
        0.0,
        "Images: side of the square erased from each image, as a share of its side (0: off).",
        low=0,
        high=0.9,
    )
    mixup: float = _opt(
        0.0,
        "Images: mixup of pairs with a Beta(a, a) weight, a given here (0: off; 0.2 to 0.4 is "
        "usual); the targets become class probabilities. With cutmix too, each batch takes one.",
        low=0,
        high=10,
    )
    cutmix: float = _opt(
        0.0,
        "Images: cutmix with a Beta(a, a) box share, a given here (0: off; 1 is usual).",
        low=0,
        high=10,
    )
    noise_std: float = _opt(
        0.05, "Tables: Gaussian jitter std (scaled units) of the copied rows.", low=0, high=2
    )
    oversample: bool = _opt(
        False,
        "Tables: oversample minority classes up to the majority count (each at most 4x its "
        "rows). Off by default: balancing trades accuracy for minority recall (a table whose "
        "minority is a sixth of the rows: test accuracy 0.59 with it, 0.75 without).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_area != -1 and self.crop_area < 0.05:
            raise KubetrainError(
                f"crop_area={self.crop_area}: use -1 (auto) or a share between 0.05 and 1"
            )
        if self.max_rotation != -1 and self.max_rotation < 0:
            raise KubetrainError(
                f"max_rotation={self.max_rotation}: use -1 (auto) or degrees from 0 to 180"
            )


@dataclass(frozen=True)
class TrainConfig(Section):
    """The training recipe every tuning trial and the final training share."""

    name: ClassVar[str] = "train"
    model: str = _opt(
        "auto",
        "Network: 'cnn' for images, 'mlp' for tables, 'tabular' for tables with "
        "periodic embeddings and a k-member ensemble (~9x the MLP's CPU time, more "
        "accurate on small and on large nonlinear tables); 'resnet' for images of 16 px "
        "and more (depth and width by image size; resnet8/14/20/32 fix the depth); 'auto' "
        "picks 'tabular' for tables of up to 100,000 training rows and 'mlp' beyond, "
        "'resnet' or 'cnn' (smaller images) for images.",
        ("auto", "mlp", "cnn", "tabular", "resnet", "resnet8", "resnet14", "resnet20", "resnet32"),
    )
    regression_loss: str = _opt(
        "mse",
        "Regression loss on the standardized target: 'mse', or 'huber' (squared within "
        "one training standard deviation, linear beyond: outlying targets pull less).",
        ("mse", "huber"),
    )
    optimizer: str = _opt("adamw", "Optimizer.", ("sgd", "adam", "adamw"))
    momentum: float = _opt(0.9, "SGD momentum.", low=0, high=0.999)
    l1: float = _opt(0.0, "L1 penalty on weights (0 disables).", low=0, high=1)
    lr_schedule: str = _opt("cosine", "Learning-rate schedule.", ("cosine", "step", "none"))
    patience: int = _opt(
        6, "Early stopping: epochs without validation-loss improvement.", low=1, high=1000
    )
    device: str = _opt(
        "auto", "Where to train: 'auto' uses CUDA when present.", ("auto", "cpu", "cuda")
    )
    torch_compile: str = _opt(
        "auto",
        "torch.compile the network: 'on', 'off', or 'auto' (on when training on CUDA); if "
        "compiling fails the run logs one line and trains uncompiled.",
        ("auto", "on", "off"),
    )
    initial_weights: str = _opt(
        "",
        "Start the network from this state dict (a local file or s3:// URI, read with "
        "torch.load(weights_only=True)); tensors of another shape, such as a head for "
        "another number of classes, keep their random start. Empty: random start.",
    )


#: The learning rate and batch size by kind of data when their setting is 0 (auto). A
#: ResNet from scratch on a few thousand images needs more and bigger steps than an MLP
#: on a table: on 2,000 generated 32x32 images (60 epochs, same split) lr 2e-3 at batch
#: 64 tested 0.80, 6e-3 at 64 0.905, 2e-3 at 32 0.91, and 6e-3 at 32 0.9575.
AUTO_HYPER: dict[str, dict[str, float]] = {
    "table": {"learning_rate": 2e-3, "batch_size": 64},
    "image": {"learning_rate": 6e-3, "batch_size": 32},
}


@dataclass(frozen=True)
class HyperConfig(Section):
    """The values a tuner searches; tuned values replace these."""

    name: ClassVar[str] = "hyper"
    learning_rate: float = _opt(
        0.0,
        "Peak learning rate; 0: auto, "
        f"{AUTO_HYPER['table']['learning_rate']:g} for tables and "
        f"{AUTO_HYPER['image']['learning_rate']:g} for images.",
        low=0,
        high=10,
    )
    weight_decay: float = _opt(1e-4, "L2 weight decay.", low=0, high=1)
    dropout: float = _opt(0.1, "Dropout probability.", low=0, high=0.9)
    width: int = _opt(128, "Hidden width of the network.", low=4, high=8192)
    batch_size: int = _opt(
        0,
        "Mini-batch size up to 16,384 training rows; bigger splits double it per doubling "
        "of rows (up to 4,096), so large tables do not crawl at small steps; 0: auto, "
        f"{AUTO_HYPER['table']['batch_size']:g} for tables and "
        f"{AUTO_HYPER['image']['batch_size']:g} for images.",
        low=0,
        high=65_536,
    )

    def for_kind(self, kind: str) -> HyperConfig:
        """These values with each 0 (auto) resolved by the kind of data ("table" or
        "image"); resolving twice changes nothing."""
        auto = {k: v for k, v in AUTO_HYPER[kind].items() if not getattr(self, k)}
        return self.replace(auto) if auto else self


#: The final training's epochs by kind of data when `FinalConfig.epochs` is 0. A conv net
#: on a few thousand images is still learning after 30 (2,000 generated 32x32 images,
#: ResNet-8 with the tuned values: validation accuracy 0.79 after 30 epochs of a 30-epoch
#: schedule, 0.93 at epoch 42 of a 60-epoch one).
AUTO_EPOCHS = {"table": 30, "image": 60}


@dataclass(frozen=True)
class FinalConfig(Section):
    """What only the final training reads: its length and its processes."""

    name: ClassVar[str] = "final"
    epochs: int = _opt(
        0,
        "Most epochs of the final training (early stopping may end sooner); 0: auto, "
        f"{AUTO_EPOCHS['table']} for tables and {AUTO_EPOCHS['image']} for images.",
        low=0,
        high=10_000,
    )
    nproc: int = _opt(
        1,
        "Data-parallel training processes in the train step (DDP: gloo on "
        "CPU, NCCL on GPUs); on a cluster --num-nodes/--gpus decide.",
        low=1,
        high=512,
    )
    challenger: bool = _opt(
        True, "Also train a gradient-boosting challenger on the same splits (tables only)."
    )

    def epochs_for(self, kind: str) -> int:
        """`epochs`, its 0 (auto) resolved by the kind of data ("table" or "image")."""
        return self.epochs or AUTO_EPOCHS[kind]


@dataclass(frozen=True)
class TuneConfig(Section):
    """The search: Katib's semantics, Optuna locally."""

    name: ClassVar[str] = "tune"
    tune_trials: int = _opt(
        8,
        "Katib maxTrialCount; 0 skips tuning and trains with the values above.",
        low=0,
        high=10_000,
    )
    tune_time_budget: float = _opt(
        120.0,
        "Seconds tuning may take; 0 or less: no limit. Locally Optuna's timeout: no trial "
        "starts after it, running ones stop at their next epoch once one trial has "
        "completed, and tuning goes on until one has. On Katib, which has no time limit, "
        "it caps maxTrialCount at parallel trials x budget / estimated trial time "
        "(--wait-timeout stays the hard stop).",
    )
    tune_parallel: int = _opt(1, "Katib parallelTrialCount.", low=1, high=1000)
    tune_algorithm: str = _opt("tpe", "Katib search algorithm.", TUNE_ALGORITHMS)
    tune_early_stopping: str = _opt(
        "medianstop", "Katib early stopping of weak trials.", ("medianstop", "none")
    )
    tune_epochs: int = _opt(10, "Epochs per tuning trial.", low=1, high=10_000)
    cv_folds: int = _opt(
        -1,
        "K-fold cross-validation in tuning: each trial trains K times on the training and "
        "validation rows, one fold held out each time, and scores the mean; -1 (auto): 5 "
        "folds up to 20,000 rows (images: up to 1,024 values each), none beyond; 0: one "
        "validation split.",
        low=-1,
        high=20,
    )
    tune_max_failed: int = _opt(3, "Katib maxFailedTrialCount.", low=0, high=10_000)
    tune_objective: str = _opt(
        "auto",
        "Objective metric (Katib objectiveMetricName); 'auto': validation-accuracy for "
        "classification, validation-r2 for regression.",
        TUNE_OBJECTIVES,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tune_parallel > max(self.tune_trials, 1):
            raise KubetrainError(
                f"tune_parallel ({self.tune_parallel}) exceeds tune_trials "
                f"({self.tune_trials}); Katib requires parallelTrialCount <= maxTrialCount"
            )


@dataclass(frozen=True)
class GateConfig(Section):
    """The quality gate between evaluation and compression."""

    name: ClassVar[str] = "gate"
    min_accuracy: float = _opt(
        0.9,
        "Quality gate of a classifier: test accuracy needed before the model is compressed.",
        low=0,
        high=1,
    )
    min_r2: float = _opt(
        0.5,
        "Quality gate of a regression: test R^2 needed before the model is compressed "
        "(0: no better than predicting the training mean).",
        low=-1e9,
        high=1,
    )
    max_gap_to_baseline: float = _opt(
        -1.0,
        "Fail the quality gate when the gradient-boosting challenger beats the network's test "
        "accuracy (R^2 for a regression) by more than this (e.g. 0.02); negative: off.",
        low=-1,
        high=1,
    )


@dataclass(frozen=True)
class CompressConfig(Section):
    """Which compressed variants are tried and how much accuracy they may lose."""

    name: ClassVar[str] = "compress"
    accuracy_budget: float = _opt(
        0.01,
        "Largest test-accuracy drop a compressed variant may have (0.01 = 1 point).",
        low=0,
        high=1,
    )
    error_budget: float = _opt(
        0.05,
        "Regression: largest relative test-RMSE increase a compressed variant may have "
        "(0.05: five percent).",
        low=0,
        high=10,
    )
    prune_amount: float = _opt(0.5, "Share of smallest-magnitude weights pruned.", low=0, high=0.99)
    compress_objective: str = _opt(
        "balanced",
        "Which variant within the budget is kept: size (smallest gzip), latency (fastest "
        "at batch 1 and 64, by the worse of its two speed-ups over fp32) or balanced (the "
        "smallest that is no slower than fp32 at batch 1 and at batch 64).",
        ("size", "latency", "balanced"),
    )
    distill_epochs: int = _opt(
        10,
        "Epochs of the distilled student (a narrower MLP, or a smaller CNN for images) "
        "trained on the model's softened outputs; 0: no student.",
        low=0,
        high=1000,
    )
    distill_temperature: float = _opt(
        4.0, "Softmax temperature of the distillation targets.", low=0.1, high=100
    )


@dataclass(frozen=True)
class PublishConfig(Section):
    """Where the model bundle goes."""

    name: ClassVar[str] = "publish"
    publish_uri: str = _opt(
        "",
        "Where the model bundle is published (s3://bucket/models or a "
        "local folder); empty skips publishing.",
    )
    model_name: str = _opt(
        "kubetrain-model", "Model name: the bundle goes to <publish_uri>/<model_name>/<version>/."
    )
    registry_url: str = _opt(
        "",
        "Kubeflow Model Registry REST address (http://model-registry-service.kubeflow:8080); "
        "set, publish registers each version there (name, version, URI, format, metrics, "
        "run id); empty skips it.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not re.fullmatch(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?", self.model_name):
            raise KubetrainError(
                f"model_name={self.model_name!r} must be lower-case letters, "
                "digits, '.', '_' or '-' (it becomes an object-store path)"
            )


@dataclass(frozen=True)
class DeployConfig(Section):
    """Whether and how the published bundle goes live (KServe on a cluster)."""

    name: ClassVar[str] = "deploy"
    deploy: bool = _opt(
        False,
        "After publish, deploy the bundle if it beats the served model on the test split "
        "(accuracy, or R^2 for a regression): on a cluster a KServe InferenceService is "
        "created or updated; locally the decision against the previously published "
        "version is only recorded.",
    )
    deploy_margin: float = _opt(
        0.0, "How much the new model must beat the served one by to replace it (0: any gain)."
    )
    serving_runtime: str = _opt(
        "pytorch",
        "What the InferenceService serves: pytorch (the network the quality gate passed) "
        "or onnx (the variant compress kept).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.serving_runtime in ("pytorch", "onnx"),
            f"serving_runtime={self.serving_runtime!r}; use pytorch or onnx",
        )
        require(self.deploy_margin >= 0, f"deploy_margin={self.deploy_margin}; use 0 or more")


SECTIONS: dict[str, type[Section]] = {
    s.name: s
    for s in (
        DataConfig,
        CleanConfig,
        AugmentConfig,
        TrainConfig,
        HyperConfig,
        FinalConfig,
        TuneConfig,
        GateConfig,
        CompressConfig,
        PublishConfig,
        DeployConfig,
    )
}
#: The one setting outside every section: every stage that draws random numbers reads it.
SEED = "seed"
_SEED_FIELD = field(
    default=42,
    metadata={"help": SEED_HELP, "choices": None, "low": SEED_RANGE[0], "high": SEED_RANGE[1]},
)


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run; defaults train digits to >=0.97 accuracy in ~1 minute on 2 CPUs."""

    seed: int = _SEED_FIELD
    data: DataConfig = field(default_factory=DataConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def __post_init__(self) -> None:
        check_value(seed_field(), self.seed)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RunConfig:
        """Parse flat settings (CLI flags, KFP parameters, JSON) into sections, clearly."""
        owner = section_of_setting()
        unknown = sorted(k for k in values if k not in owner)
        if unknown:
            raise KubetrainError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(owner)}"
            )
        grouped: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            grouped.setdefault(owner[key], {})[key] = value
        seed = coerce(seed_field(), grouped.pop(SEED, {}).get(SEED, 42))
        return cls(
            seed=seed, **{name: SECTIONS[name].from_values(v) for name, v in grouped.items()}
        )

    @classmethod
    def pick(cls, values: Mapping[str, Any]) -> RunConfig:
        """`from_flat` of the entries of `values` that are settings (a component's locals)."""
        owner = section_of_setting()
        return cls.from_flat({k: v for k, v in values.items() if k in owner})

    def flat(self, *sections: str) -> dict[str, Any]:
        """Flat name -> value of the given sections (all when none), `seed` included if named."""
        out: dict[str, Any] = {}
        for name in sections or (SEED, *SECTIONS):
            out.update({SEED: self.seed} if name == SEED else getattr(self, name).to_dict())
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.flat()


def section_of_setting() -> dict[str, str]:
    """Flat setting name -> the section that owns it (`seed` owns itself)."""
    owner = {SEED: SEED}
    for name, section in SECTIONS.items():
        owner.update({f.name: name for f in dataclasses.fields(section)})
    return owner


def seed_field() -> dataclasses.Field:
    return next(f for f in dataclasses.fields(RunConfig) if f.name == SEED)


def fields_of(*sections: str) -> Iterator[dataclasses.Field]:
    """The setting fields of the given sections (`seed` may be named), in order; all when none."""
    for name in sections or (SEED, *SECTIONS):
        if name == SEED:
            yield seed_field()
        else:
            yield from dataclasses.fields(SECTIONS[name])


def _type_of(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """A loosely typed value (string flag, KFP float) as the field's type, or a one-line error."""
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


def check_value(f: dataclasses.Field, value: Any) -> None:
    kind = _type_of(f)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KubetrainError(f"{f.name} must be a {kind.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise KubetrainError(
            f"{f.name}={value!r} is not supported; use one of: {', '.join(map(str, choices))}"
        )
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if kind in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            raise KubetrainError(f"{f.name} must be a finite number, got {value!r}")
        if low is not None and value < low or high is not None and value > high:
            raise KubetrainError(
                f"{f.name}={value} is out of range; use a value between {low} and {high}"
            )


def kfp_type(f: dataclasses.Field) -> type:
    """The Python type KFP maps a setting to (a pipeline or component parameter)."""
    return _type_of(f)
