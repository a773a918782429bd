"""Speed, size and accuracy of the compressed variants: measured, compared, chosen.

Latency is measured with ONNX Runtime on the CPU at two batch sizes: 1 (an online
request) and 64 (a batch job, or a server batching requests). Every session runs with
one intra-op and one inter-op thread (`kubetrain.assessment.compression._session`), so
the figures compare the graphs, not the thread pools, and do not depend on how many
cores a node has. The variants are timed *interleaved*, one run of each in turn, and each
figure is the median of its runs: on a shared machine a burst of load then slows every
variant alike instead of whichever happened to be measured during it.

The kept variant depends on ``objective`` (`choose`), among the variants within the
accuracy (or error) budget, fp32 always among them:

* ``size``: the smallest gzip size (the compress stage's rule before latency counted);
* ``latency``: the fastest, judged by the worse of its two speed ratios to fp32 (batch 1
  and batch 64), so a variant that wins at 64 rows but loses at one is not "fast";
* ``balanced`` (default): the smallest among those no slower than fp32 at batch 1 *and*
  at batch 64, within `LATENCY_TOLERANCE`. Dynamic int8 on a small network is the case
  it is for: on digits 3.5x smaller but 3.8x slower at batch 1 (runtime quantization
  of the activations costs more than the tiny matrix products it speeds up).

`pareto` marks the variants no other variant beats on every axis at once: gzip size,
both latencies (within `LATENCY_TOLERANCE`), and accuracy (or RMSE).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

OBJECTIVES = ("size", "latency", "balanced")
BATCH_SIZES = (1, 64)
#: A variant this much slower than fp32 still counts as "no slower": the median of
#: interleaved runs still moves a few percent between runs on a shared machine, and a
#: pruned graph (the same ops as fp32) must not be rejected by noise.
LATENCY_TOLERANCE = 0.10

__all__ = [
    "BATCH_SIZES",
    "LATENCY_TOLERANCE",
    "OBJECTIVES",
    "batch_of",
    "choose",
    "measure_latencies",
    "pareto",
    "quality",
]


def batch_of(rows: np.ndarray, size: int) -> np.ndarray:
    """``size`` rows from ``rows`` (repeated when there are fewer), float32, contiguous."""
    rows = np.asarray(rows, np.float32)
    reps = -(-size // max(1, len(rows)))
    return np.ascontiguousarray(np.concatenate([rows] * reps)[:size])


def measure_latencies(
    sessions: Mapping[str, Any],
    batch: np.ndarray,
    *,
    input_name: str,
    output_name: str,
    warmup: int = 3,
    min_runs: int = 5,
    max_runs: int = 200,
    max_seconds: float = 0.25,
) -> dict[str, float]:
    """Median ms per call of each session on ``batch``, timed interleaved (one run of each
    in turn). Bounded: ``warmup`` untimed runs each, then rounds until ``max_runs`` or
    until about ``max_seconds`` per session were spent, at least ``min_runs``."""
    feed = {input_name: batch}
    for session in sessions.values():
        for _ in range(warmup):
            session.run([output_name], feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    deadline = time.perf_counter() + max_seconds * len(sessions)
    for done in range(max_runs):
        if done >= min_runs and time.perf_counter() > deadline:
            break
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run([output_name], feed)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000.0 for name, t in times.items()}


def quality(v: Mapping[str, Any]) -> float:
    """Higher is better: accuracy, or minus a regression's RMSE."""
    return float(v["accuracy"]) if "accuracy" in v else -float(v["rmse"])


def pareto(variants: Sequence[Mapping[str, Any]]) -> list[bool]:
    """For each variant: True unless another one dominates it, i.e. is at least as small
    (gzip), as accurate (or low in RMSE) and as fast at batch 1 and at batch 64, and
    strictly better on one of them. Latencies count as equal within
    `LATENCY_TOLERANCE`: without it a pruned graph (fp32's ops, fewer distinct
    weights) and fp32 would each stay on the front by a few percent of timing noise."""
    tol = 1 + LATENCY_TOLERANCE
    points = [
        (
            float(v["gzip_bytes"]),
            quality(v),
            (float(v["latency_b1_ms"]), float(v["latency_b64_ms"])),
        )
        for v in variants
    ]

    def dominates(o: tuple, p: tuple) -> bool:
        (o_size, o_q, o_lat), (p_size, p_q, p_lat) = o, p
        weakly = (
            o_size <= p_size
            and o_q >= p_q
            and all(a <= b * tol for a, b in zip(o_lat, p_lat, strict=True))
        )
        strictly = (
            o_size < p_size
            or o_q > p_q
            or any(a * tol < b for a, b in zip(o_lat, p_lat, strict=True))
        )
        return weakly and strictly

    return [not any(dominates(o, p) for o in points if o is not p) for p in points]


def slowdown(v: Mapping[str, Any], fp32: Mapping[str, Any]) -> float:
    """The worse of a variant's two latency ratios to fp32 (batch 1, batch 64)."""
    return max(
        float(v["latency_b1_ms"]) / max(float(fp32["latency_b1_ms"]), 1e-12),
        float(v["latency_b64_ms"]) / max(float(fp32["latency_b64_ms"]), 1e-12),
    )


def choose(variants: Sequence[Mapping[str, Any]], objective: str = "balanced") -> str:
    """Name of the kept variant (module docstring), among those with ``within_budget``
    (fp32 always qualifies). Ties go to the smaller gzip size, then the earlier variant."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    fp32 = next((v for v in variants if v["name"] == "fp32"), None)
    if fp32 is None:
        raise ValueError("no fp32 variant: it is the reference every other is measured against")
    ok = [(i, v) for i, v in enumerate(variants) if v["name"] == "fp32" or v["within_budget"]]
    if objective == "balanced":
        ok = [(i, v) for i, v in ok if slowdown(v, fp32) <= 1 + LATENCY_TOLERANCE]
    if objective == "latency":
        return min(ok, key=lambda iv: (slowdown(iv[1], fp32), iv[1]["gzip_bytes"], iv[0]))[1][
            "name"
        ]
    return min(ok, key=lambda iv: (iv[1]["gzip_bytes"], iv[0]))[1]["name"]
