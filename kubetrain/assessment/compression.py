"""The compress stage: ONNX export, pruning, int8 quantization and distillation, measured.

From a trained model bundle this builds the candidate ONNX files,

* ``fp32``         the model exported as is;
* ``pruned``       global L1 magnitude pruning of all Linear/Conv weights, exported;
* ``int8``         ONNX Runtime dynamic quantization (int8 weights) of ``fp32``;
* ``pruned-int8``  the same quantization of ``pruned``;

and, when training rows are given (`Extras.train`; the stage passes the training split):

* ``int8-static``  static int8 quantization of ``fp32`` (QDQ format, weights per
  channel, activation ranges calibrated on `CALIBRATION_ROWS` training rows). Dynamic
  quantization leaves Conv layers float in effect (ConvInteger re-quantizes every
  activation at run time and was 5x slower than fp32 at batch 64 on the digits CNN);
  static ranges let ONNX Runtime fuse QDQ pairs into int8 Conv/MatMul kernels;
* ``student``      a smaller network distilled from the model on the training rows
  (`kubetrain.assessment.distill`);
* ``student-int8`` the student, statically quantized like ``int8-static``;

measures each one (file size, gzip size, test accuracy with ONNX Runtime, CPU latency
at batch 1 and 64, largest probability difference from PyTorch) and keeps one of those
whose accuracy stays within ``accuracy_budget`` of the PyTorch model's own accuracy,
by ``objective`` (`kubetrain.assessment.tradeoff.choose`): the smallest gzip size
(``size``), the fastest (``latency``), or the smallest that is no slower than fp32 at
either batch size (``balanced``, the default). Gzip size is the figure that matters
for shipping and object storage, and the only one where pruning pays off: the
zeroed weights still take 4 (or 1) bytes each in the raw file.

Graph contract, the same for every variant: one input ``features`` (float32,
``(batch, num_features)``, dynamic batch) and one output ``logits`` (float32,
``(batch, num_classes)``). Softmax is *not* in the graph, so servers get the raw
scores and apply softmax themselves when they need probabilities (`onnx_predict`
does).

The test split is scored in memory when it fits the memory budget, else batch by
batch from its shards (`compress_split`); one pass scores PyTorch and every
variant, so only running totals (correct answers, largest difference) are kept.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kubetrain.assessment.distill import MAX_VAL_ROWS, distill, read_rows
from kubetrain.assessment.tradeoff import (
    BATCH_SIZES,
    LATENCY_TOLERANCE,
    OBJECTIVES,
    batch_of,
    choose,
    measure_latencies,
    pareto,
    quality,
)
from kubetrain.core import progress
from kubetrain.core.errors import KubetrainError
from kubetrain.data import batches
from kubetrain.data.batches import Batches
from kubetrain.data.datasets import Schema, atomic_dir, write_json
from kubetrain.training.models import ModelSpec, load_model, predict_proba

INPUT_NAME = "features"
OUTPUT_NAME = "logits"
OPSET = 18  # the lowest opset the dynamo exporter targets; fine for the legacy one too
VARIANTS = ("fp32", "pruned", "int8", "pruned-int8")
#: The variants that need training rows (static calibration, distillation), in order.
TRAINED_VARIANTS = ("int8-static", "student", "student-int8")
#: Training rows that calibrate static int8 activation ranges (drawn at random).
CALIBRATION_ROWS = 256
MATCH_ATOL = 1e-4  # fp32 ONNX vs PyTorch, on probabilities
MAX_PRUNE = 0.99
#: Rows per ONNX Runtime call when scoring. Dynamic int8 quantization scales the
#: activations per input tensor, so an int8 variant's scores depend on which rows are
#: scored together: a split is always scored in these chunks, counted from its first
#: row, in memory or streamed (`_compress` aligns streamed batches to them).
ONNX_BATCH = 1024
#: Bytes per class score that scoring a batch holds: PyTorch's probabilities, each
#: variant's logits (float64) and probabilities, and the float64 copies compared.
SCORE_BYTES = 48

__all__ = [
    "compress",
    "compress_split",
    "mark_within_budget",
    "within_budget",
    "export_onnx",
    "prune_model",
    "quantize_int8",
    "quantize_static_int8",
    "Extras",
    "onnx_predict",
    "verify_export",
    "gzip_size",
]


# --------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module, num_features: int, path: str | os.PathLike, exporter: str = "auto"
) -> str:
    """Export `model` (eval mode) to a single self-contained ONNX file.

    `exporter` is ``"auto"``, ``"torchscript"`` or ``"dynamo"``; returns the one used.

    torch 2.13 defaults to the dynamo exporter. Measured on 2 shared CPU cores
    (MLP width 128 / SmallCNN on 8x8 digits, same graphs, both give Gemm/Conv):
    legacy TorchScript exporter 0.02-0.07 s per export, dynamo 0.85-1.2 s per
    export plus ~2 s the first time in a process. So the legacy exporter is used
    while torch still ships it, and dynamo only when it fails (it is deprecated
    and may disappear); the caller checks either result against PyTorch.
    """
    model = model.eval()
    # batch 2: torch.export specialises size-0/1 dims, which would pin the batch.
    example = (torch.zeros(2, int(num_features), dtype=torch.float32),)
    path = Path(path)
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"unknown exporter {exporter!r}")
    if exporter in ("auto", "torchscript"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning
                torch.onnx.export(
                    model,
                    example,
                    str(path),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )
            return "torchscript"
        except Exception:  # legacy exporter gone or failing: dynamo, unless forced
            path.unlink(missing_ok=True)
            if exporter == "torchscript":
                raise
    # report=False and a throwaway artifacts_dir: nothing written to the cwd;
    # external_data=False: weights inside the .onnx, no sidecar .data file.
    with (
        tempfile.TemporaryDirectory(prefix="kubetrain-onnx-") as artifacts,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            report=False,
            verify=False,
            artifacts_dir=artifacts,
            verbose=False,
        )
    return "dynamo"


def prune_model(model: nn.Module, amount: float) -> nn.Module:
    """A pruned copy of `model`: the `amount` share of smallest-|w| weights, pooled
    over all Linear/Conv layers (global L1 unstructured), set to zero for good.
    Biases are kept. `model` itself is not modified."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model)
    params = [
        (m, "weight")
        for m in pruned.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    if params and amount > 0:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(amount))
        for module, name in params:
            prune.remove(module, name)  # bake the mask into the weight
    return pruned.eval()


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Dynamic int8 quantization (int8 weights, activations quantized at run time).

    Gemm is rewritten to MatMul by the quantizer, Conv becomes ConvInteger; the
    CPU execution provider of onnxruntime 1.31 runs ConvInteger with int8
    weights (checked on SmallCNN), so no op types are excluded.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():  # "Please consider to run pre-processing..." on root
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def quantize_static_int8(
    src: str | os.PathLike, dst: str | os.PathLike, calibration: np.ndarray
) -> None:
    """Static int8 quantization in QDQ format: int8 weights per output channel and uint8
    activations whose ranges come from running ``calibration`` rows (min/max).

    QDQ (QuantizeLinear/DequantizeLinear pairs around float ops) is the format ONNX
    Runtime recommends for the CPU: it fuses each pair with its Conv/MatMul into an
    int8 kernel, and the file stays readable by any runtime. Unsigned activations with
    signed weights (U8S8) are what its x86 kernels run fastest. Measured, one thread,
    ms per batch of 1 / 64 (shared 2-core AVX-512 VNNI CPU):

    =======================  =============  =============  ==============  ===========
    network                  fp32           dynamic int8   QDQ S8S8        QDQ U8S8
    =======================  =============  =============  ==============  ===========
    SmallCNN, 8x8 digits     0.016 / 0.44   0.053 / 2.46   0.016 / 0.30    0.018 / 0.33
    ResNet-8, 32x32 RGB      0.97 / 62.2    5.3 / 370      0.88 / 57.0     0.37 / 20.4
    =======================  =============  =============  ==============  ===========

    (QOperator U8S8 ran as fast as QDQ U8S8: 0.36 / 19.5 on the ResNet.)
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rows = np.ascontiguousarray(calibration, dtype=np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter(range(0, len(rows), 64))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.chunks, None)
            return None if start is None else {INPUT_NAME: rows[start : start + 64]}

    with _quiet_root_logger():  # its calibration model goes to a temporary folder of its own
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)


# ------------------------------------------------------------------ measuring


def _session(path: str | os.PathLike):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # stable latency, and polite on shared nodes
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_predict(
    path: str | os.PathLike, X: np.ndarray, batch_size: int | None = None, session: Any = None
) -> np.ndarray:
    """Class probabilities from an ONNX file of this module's graph contract
    (softmax applied here to the ``logits`` output), run `ONNX_BATCH` rows at a time."""
    session = session or _session(path)
    batch_size = batch_size or ONNX_BATCH
    X = np.ascontiguousarray(X, dtype=np.float32)
    logits = np.empty((0, 0))
    for i in range(0, len(X), batch_size):  # into one array: a list of chunks fragments the heap
        chunk = session.run([OUTPUT_NAME], {INPUT_NAME: X[i : i + batch_size]})[0]
        if i == 0:
            logits = np.empty((len(X), int(np.prod(chunk.shape[1:]))), np.float64)
        logits[i : i + len(chunk)] = chunk.reshape(len(chunk), -1)
    if logits.shape[1] == 1:  # a regressor's output: the predicted values themselves
        return logits.astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def gzip_size(path: str | os.PathLike) -> int:
    """Bytes after gzip -9 (what the file costs in transit and object storage)."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9, mtime=0))


def verify_export(reference: np.ndarray, candidate: np.ndarray, atol: float = MATCH_ATOL) -> float:
    """Check ONNX probabilities against PyTorch's; return the max |difference|.

    Raises `KubetrainError` if any probability differs by more than `atol` or a
    predicted class differs. A class flip is only counted where PyTorch's top
    two probabilities are more than ``2 * atol`` apart: closer than that, a
    flip is within the tolerance and not an export fault.
    """
    diff, flips = compare_export(reference, candidate, atol)
    check_export(diff, flips, len(reference), atol)
    return diff


def compare_export(
    reference: np.ndarray, candidate: np.ndarray, atol: float = MATCH_ATOL
) -> tuple[float, int]:
    """``(max |prob difference|, clear-margin class flips)`` of ONNX against PyTorch on
    some rows; separate from `check_export` so a split can be compared batch by batch."""
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise KubetrainError(
            f"ONNX output shape {candidate.shape} differs from PyTorch's "
            f"{reference.shape}; the export is broken, report it with the "
            "model bundle"
        )
    diff = float(np.abs(reference - candidate).max()) if reference.size else 0.0
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else None
    clear = (
        (top2[:, 1] - top2[:, 0] > 2 * atol) if top2 is not None else np.ones(len(reference), bool)
    )
    flips = int(np.sum((reference.argmax(1) != candidate.argmax(1)) & clear))
    return diff, flips


def check_export(diff: float, flips: int, rows: int, atol: float = MATCH_ATOL) -> None:
    """Raise `KubetrainError` when `compare_export`'s totals over ``rows`` rows show a
    broken export."""
    if diff > atol or flips:
        raise KubetrainError(
            f"fp32 ONNX export does not match PyTorch: max |prob diff| {diff:.2e} "
            f"(allowed {atol:.0e}), {flips} of {rows} predicted classes differ; "
            "this is an exporter fault, not a data problem: report it with the model "
            "bundle, or skip the compress stage and serve the PyTorch model"
        )


# ------------------------------------------------------------------ selection


def within_budget(accuracy: float, baseline: float, budget: float) -> bool:
    return accuracy >= baseline - budget - 1e-9  # 1e-9: float noise in baseline - budget


def mark_within_budget(variants: Sequence[dict[str, Any]], base: float, allowed: float) -> None:
    """Set each variant's ``within_budget``: its quality (`tradeoff.quality`: accuracy,
    or minus RMSE) at most ``allowed`` below ``base``; fp32 (the model itself) always is.
    `tradeoff.choose` then keeps one of those by objective."""
    for v in variants:
        v["within_budget"] = v["name"] == "fp32" or within_budget(quality(v), base, allowed)


# ------------------------------------------------------------------- the stage


def _validate(
    X: np.ndarray,
    y: np.ndarray,
    num_features: int,
    num_classes: int,
    accuracy_budget: float,
    prune_amount: float,
) -> None:
    """Every check of in-memory test arrays, before anything is written."""
    _check_settings(accuracy_budget, prune_amount)
    if X.ndim != 2:
        raise KubetrainError(
            f"test features must be a 2-D array (rows, features), got shape "
            f"{X.shape}; pass the test split's X as saved by the clean stage"
        )
    _check_shape(len(X), X.shape[1], num_features)
    if y.ndim != 1 or len(y) != len(X):
        raise KubetrainError(
            f"test labels have shape {y.shape} but features have {len(X)} "
            "rows; pass X and y from the same split"
        )
    _check_batch(X, y, num_classes)


def _check_settings(accuracy_budget: float, prune_amount: float) -> None:
    if not (
        isinstance(accuracy_budget, (int, float))
        and math.isfinite(accuracy_budget)
        and 0.0 <= accuracy_budget <= 1.0
    ):
        raise KubetrainError(
            f"accuracy_budget={accuracy_budget!r} is out of range; use a "
            "fraction in [0, 1], e.g. 0.01 for at most 1 accuracy point lost"
        )
    if not (
        isinstance(prune_amount, (int, float))
        and math.isfinite(prune_amount)
        and 0.0 <= prune_amount <= MAX_PRUNE
    ):
        raise KubetrainError(
            f"prune_amount={prune_amount!r} is out of range; use a share of "
            f"weights in [0, {MAX_PRUNE}], e.g. 0.5 (0 turns pruning off)"
        )


def _check_shape(rows: int, features: int, num_features: int) -> None:
    if rows == 0:
        raise KubetrainError(
            "the test set is empty; compression needs labelled test rows "
            "to measure accuracy, pass a non-empty test split"
        )
    if features != num_features:
        raise KubetrainError(
            f"test features have {features} columns but the model expects "
            f"{num_features}; pass the test split produced by the same "
            "clean/augment stages as the model's training data"
        )


def _correct(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(probs.argmax(1) == y))


def _squared_error(values: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((values[:, 0].astype(np.float64) - y) ** 2))


def _check_batch(X: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """The checks on values: done per batch, as a streamed split is only read once
    (``num_classes`` 0: a regression's targets, any number)."""
    if not np.isfinite(X).all():
        raise KubetrainError(
            "test features contain NaN or infinite values; pass the cleaned test split"
        )
    if num_classes and len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise KubetrainError(
            f"test labels range over [{int(y.min())}, {int(y.max())}] but the "
            f"model has {num_classes} classes (0..{num_classes - 1}); pass the "
            "test split encoded like the model's training data"
        )


def _weight_sparsity(path: Path) -> float:
    """Share of exact zeros among the weight matrices/kernels (rank >= 2 initializers)."""
    import onnx
    from onnx import numpy_helper

    zeros = total = 0
    for init in onnx.load(str(path)).graph.initializer:
        if len(init.dims) >= 2:
            values = numpy_helper.to_array(init)
            zeros += int(values.size - np.count_nonzero(values))
            total += int(values.size)
    return zeros / total if total else 0.0


def compress(
    model_dir: str | os.PathLike,
    X: np.ndarray,
    y: np.ndarray,
    accuracy_budget: float = 0.01,
    prune_amount: float = 0.5,
    *,
    out_dir: str | os.PathLike,
    extras: Extras | None = None,
) -> dict[str, Any]:
    """Build, measure and choose among the compressed variants of a model bundle,
    scored on test arrays in memory.

    Writes ``<variant>.onnx`` for each variant, ``model.onnx`` (a copy of the
    chosen one) and ``compression.json`` (the returned dict) into `out_dir`,
    atomically: on any failure `out_dir` is not created (or left as it was).
    With ``prune_amount == 0`` the pruned variants are skipped; without training
    rows (`Extras.train`) the static-int8 and distilled ones.
    """
    model, spec, _ = load_model(model_dir)
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise KubetrainError(
            f"test labels must be integer class indices, got {y.dtype}; pass the split's y (int64)"
        )
    y = y.astype(np.int64)
    _validate(X, y, spec.num_features, spec.num_classes, accuracy_budget, prune_amount)
    extras = extras or Extras()
    _check_extras(extras, spec.num_features)
    return _compress(
        model, spec, batches.of(X, y), accuracy_budget, prune_amount, out_dir, extras=extras
    )


@dataclass(frozen=True)
class Extras:
    """What the compress stage adds to the four size variants: how it chooses, and the
    training rows (with their schema) that calibrate static int8 and teach a student."""

    objective: str = "balanced"  # `kubetrain.assessment.tradeoff.OBJECTIVES`
    train: tuple[np.ndarray, np.ndarray, Schema] | None = None
    #: Scores the student's epochs (early stopping); None: the training rows do.
    validation: tuple[np.ndarray, np.ndarray] | None = None
    distill_epochs: int = 0  # 0: no student
    temperature: float = 4.0
    seed: int = 0


def _check_extras(extras: Extras, num_features: int) -> None:
    if extras.objective not in OBJECTIVES:
        raise KubetrainError(
            f"compress_objective={extras.objective!r}; use one of {', '.join(OBJECTIVES)}"
        )
    if extras.distill_epochs < 0 or not extras.temperature > 0:
        raise KubetrainError(
            f"distill_epochs={extras.distill_epochs}, distill_temperature={extras.temperature}; "
            "use epochs >= 0 (0: no student) and a temperature > 0 (e.g. 4)"
        )
    for name, rows in (("training", extras.train), ("validation", extras.validation)):
        if rows is None:
            continue
        features = np.asarray(rows[0]).reshape(len(rows[0]), -1).shape[1]
        if len(rows[0]) == 0 or features != num_features:
            raise KubetrainError(
                f"the {name} rows have {len(rows[0])} rows of {features} features but the "
                f"model takes {num_features}; pass the {name} split of the same clean stage"
            )
        if not np.isfinite(rows[0]).all():
            raise KubetrainError(
                f"the {name} rows contain NaN or infinite values; pass the cleaned split"
            )


def compress_split(
    model_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    accuracy_budget: float = 0.01,
    prune_amount: float = 0.5,
    *,
    out_dir: str | os.PathLike,
    budget: int | None = None,
    error_budget: float = 0.05,
    train_path: str | os.PathLike | None = None,
    val_path: str | os.PathLike | None = None,
    extras: Extras | None = None,
) -> dict[str, Any]:
    """`compress`, scored on the split at ``test_path``: in memory when it fits the
    memory budget, else batch by batch from its shards (one pass scores every variant).

    With ``train_path`` (and ``val_path``) up to `distill.MAX_ROWS` of their rows are
    read (a class-stratified sample of a bigger split, streamed) for static int8
    calibration and the student. A streamed split's values (NaN, labels out of range)
    are checked as they are read, after the variants are built: a bad split still
    writes nothing.
    """
    model, spec, _ = load_model(model_dir)
    _check_settings(accuracy_budget, prune_amount)
    extras = extras or Extras()
    split = batches.open_split(test_path, lambda s: held_bytes(s, spec.num_classes), budget)
    _check_shape(split.rows, split.features, spec.num_features)
    if train_path is not None:
        train = read_rows(train_path, extras.seed)
        val = read_rows(val_path, extras.seed, MAX_VAL_ROWS)[:2] if val_path else None
        extras = replace(extras, train=train, validation=val)
    _check_extras(extras, spec.num_features)
    if split.streamed:
        progress.log(
            "compress", f"streaming: the test split ({split.rows:,} rows) is over the memory budget"
        )
    return _compress(
        model, spec, split, accuracy_budget, prune_amount, out_dir, error_budget, extras
    )


def held_bytes(split: Batches, num_classes: int) -> int:
    """What scoring ``split`` in memory (as one batch) holds: the split, its labels and
    the scores of one variant at a time (`SCORE_BYTES`)."""
    return split.nbytes + split.rows * (8 + num_classes * SCORE_BYTES)


@dataclass
class _Score:
    """One variant's running totals over the test batches."""

    correct: float = 0  # right classes; a regression's summed squared error
    max_diff: float = 0.0  # largest |probability difference| from PyTorch
    flips: int = 0  # clear-margin class flips (`compare_export`; checked for fp32 only)


def _score(
    model: nn.Module, sessions: dict[Path, Any], split: Batches, spec: ModelSpec
) -> tuple[float, dict[Path, _Score], np.ndarray]:
    """Score PyTorch and every ONNX variant (its file and session) on each batch of
    ``split``, in one pass, so a streamed split is read once and no scores are held;
    returns (PyTorch's correct answers, each variant's totals, the first rows: up to 64,
    what latency is measured on). A
    regression sums squared errors instead, and compares the export in units of the
    target's standard deviation."""
    regression = spec.task == "regression"
    right = _squared_error if regression else _correct
    scores = {path: _Score() for path in sessions}
    correct, first = 0.0, None
    for X, y in batches.logged(split, "compress", "scored"):
        _check_batch(X, y, 0 if regression else spec.num_classes)
        X = np.ascontiguousarray(X, dtype=np.float32)
        first = X[: max(BATCH_SIZES)].copy() if first is None and len(X) else first
        reference = predict_proba(model, X).numpy()
        correct += right(reference, y)
        for path, session in sessions.items():
            probs = onnx_predict(path, X, session=session)
            score = scores[path]
            score.correct += right(probs, y)
            if regression:
                std = float(spec.target.get("std") or 1.0)
                diff, flips = float(np.abs(reference - probs).max(initial=0.0)) / std, 0
                if path.stem != "fp32":
                    diff = 0.0  # only the fp32 export must match; others are scored
            elif path.stem == "fp32":
                diff, flips = compare_export(reference, probs)
                score.flips += flips
            else:
                diff = float(np.abs(reference - probs).max())
            score.max_diff = max(score.max_diff, diff)
    assert first is not None  # `_check_shape` refused an empty split
    return correct, scores, first


def _build_trained(
    model: nn.Module, spec: ModelSpec, extras: Extras, tmp: Path
) -> tuple[list[str], dict[str, Any]]:
    """The variants that need training rows, written into ``tmp``: their names, and what
    the record says about them (calibration rows, the student's training)."""
    if extras.train is None:
        return [], {}
    X, y, _ = extras.train
    rng = np.random.default_rng(extras.seed)
    calibration = X[np.sort(rng.permutation(len(X))[:CALIBRATION_ROWS])]
    names: list[str] = []
    record: dict[str, Any] = {"calibration_rows": int(len(calibration)), "not_built": {}}

    def static(src: str, dst: str) -> None:
        why = _try_static(tmp / f"{src}.onnx", tmp / f"{dst}.onnx", calibration)
        if why is None:
            names.append(dst)
        else:
            record["not_built"][dst] = why
            progress.log("compress", f"{dst} left out: {why}")

    static("fp32", "int8-static")
    if extras.distill_epochs > 0:
        validation = extras.validation or (X[:MAX_VAL_ROWS], y[:MAX_VAL_ROWS])
        made = distill(
            model,
            spec,
            extras.train,
            validation,
            epochs=extras.distill_epochs,
            temperature=extras.temperature,
            seed=extras.seed,
        )
        export_onnx(made.model, spec.num_features, tmp / "student.onnx")
        if spec.task != "regression":  # the student's own export must match it too
            probe = np.ascontiguousarray(calibration[:64], np.float32)
            student = onnx_predict(tmp / "student.onnx", probe)
            verify_export(predict_proba(made.model, probe).numpy(), student)
        names.append("student")
        static("student", "student-int8")
        record["distillation"] = {
            "student": {"arch": made.spec.arch, "width": made.spec.width},
            "teacher": {"arch": spec.arch, "width": spec.width},
            "rows": made.rows,
            "epochs": made.epochs,
            "best_epoch": made.best_epoch,
            "temperature": float(extras.temperature),
            "validation": made.validation,
            "seconds": round(made.seconds, 2),
        }
    return names, record


def _try_static(src: Path, dst: Path, calibration: np.ndarray) -> str | None:
    """`quantize_static_int8`, then one run of the result: None when it works, else why
    not in one line (and no file). ONNX Runtime's quantizer writes graphs its own CPU
    kernels refuse: per-channel weights of a batched MatMul (the tabular network's
    per-column embeddings) fail in QLinearMatMul; such a variant is left out, not fatal."""
    try:
        quantize_static_int8(src, dst, calibration)
        onnx_predict(dst, calibration[:8])
    except Exception as exc:  # the quantizer's and runtime's errors have no common type
        dst.unlink(missing_ok=True)
        text = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {text[:200]}"
    return None


def _latencies(sessions: dict[str, Any], rows: np.ndarray) -> dict[str, dict[str, float]]:
    """Per variant: ms per call at each of `BATCH_SIZES` (interleaved medians), ms per
    row at the largest, and the speed-ups over fp32 (above 1: faster)."""
    by_size = {
        size: measure_latencies(
            sessions, batch_of(rows, size), input_name=INPUT_NAME, output_name=OUTPUT_NAME
        )
        for size in BATCH_SIZES
    }
    big = max(BATCH_SIZES)
    out = {}
    for name in sessions:
        b1, b64 = by_size[1][name], by_size[big][name]
        out[name] = {
            "cpu_latency_ms": round(b1, 4),  # batch 1: ms per row (the field's old meaning)
            "latency_b1_ms": round(b1, 4),
            f"latency_b{big}_ms": round(b64, 4),
            f"ms_per_row_b{big}": round(b64 / big, 5),
            "speedup_b1": round(by_size[1]["fp32"] / b1, 3),
            f"speedup_b{big}": round(by_size[big]["fp32"] / b64, 3),
        }
    return out


def _compress(
    model: nn.Module,
    spec: ModelSpec,
    split: Batches,
    accuracy_budget: float,
    prune_amount: float,
    out_dir: str | os.PathLike,
    error_budget: float = 0.05,
    extras: Extras = Extras(),
) -> dict[str, Any]:
    """Export the variants, score them on ``split`` and keep one within budget
    (``accuracy_budget`` points of test accuracy, or for a regression a relative
    test-RMSE increase of ``error_budget``) by ``extras.objective``."""
    regression = spec.task == "regression"
    names = [n for n in VARIANTS if prune_amount > 0 or not n.startswith("pruned")]
    if split.streamed:  # whole ONNX_BATCH chunks per batch, as in memory (see ONNX_BATCH)
        split = replace(split, batch_rows=-(-split.batch_rows // ONNX_BATCH) * ONNX_BATCH)
    with atomic_dir(out_dir) as tmp:
        exporter = export_onnx(model, spec.num_features, tmp / "fp32.onnx")
        if prune_amount > 0:
            export_onnx(prune_model(model, prune_amount), spec.num_features, tmp / "pruned.onnx")
        quantize_int8(tmp / "fp32.onnx", tmp / "int8.onnx")
        if prune_amount > 0:
            quantize_int8(tmp / "pruned.onnx", tmp / "pruned-int8.onnx")
        trained, trained_record = _build_trained(model, spec, extras, tmp)
        names += trained

        paths = [tmp / f"{name}.onnx" for name in names]
        sessions = {path: _session(path) for path in paths}
        correct, scores, first = _score(model, sessions, split, spec)
        check_export(scores[paths[0]].max_diff, scores[paths[0]].flips, split.rows)  # fp32
        progress.log("compress", f"timing {len(names)} variants at batch sizes 1 and 64")
        speed = _latencies({p.stem: sessions[p] for p in paths}, first)

        def quality(total: float) -> dict[str, float]:
            if regression:
                return {"rmse": float(np.sqrt(total / split.rows))}
            return {"accuracy": total / split.rows}

        baseline = quality(correct)
        variants = []
        for name, path in zip(names, paths, strict=True):
            variants.append(
                {
                    "name": name,
                    "file": path.name,
                    "bytes": path.stat().st_size,
                    "gzip_bytes": gzip_size(path),
                    **quality(scores[path].correct),
                    **speed[name],
                    "max_abs_diff": scores[path].max_diff,
                    "weight_sparsity": round(_weight_sparsity(path), 4),
                }
            )
        if regression:  # lower RMSE is better: judged on -RMSE, budget in RMSE units
            mark_within_budget(variants, -baseline["rmse"], baseline["rmse"] * error_budget)
        else:
            mark_within_budget(variants, baseline["accuracy"], accuracy_budget)
        for v, optimal in zip(variants, pareto(variants), strict=True):
            v["pareto"] = optimal
        chosen = choose(variants, extras.objective)
        shutil.copyfile(tmp / f"{chosen}.onnx", tmp / "model.onnx")

        result = {
            **{f"baseline_{k}": v for k, v in baseline.items()},
            **(
                {"error_budget": float(error_budget)}
                if regression
                else {"accuracy_budget": float(accuracy_budget)}
            ),
            "prune_amount": float(prune_amount),
            "objective": extras.objective,
            "latency_tolerance": LATENCY_TOLERANCE,
            "chosen": chosen,
            "chosen_file": "model.onnx",
            "variants": variants,
            **trained_record,
            "num_test": int(split.rows),
            "onnx_opset": OPSET,
            "exporter": exporter,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "output_kind": (
                "predicted values (the target's units)"
                if regression
                else "logits (apply softmax for probabilities)"
            ),
            "num_features": spec.num_features,
            "class_names": list(spec.class_names),
        }
        write_json(tmp / "compression.json", result)
    return result
