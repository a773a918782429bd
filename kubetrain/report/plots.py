"""Figures for the stage reports, each returned as PNG bytes.

Every function takes plain JSON-like data (what the stages write to their JSON
artifacts) and returns the bytes of a small PNG, ready to embed in an HTML
report (`kubetrain.report.html`). Nothing here touches pyplot or the global
matplotlib state: each figure is a `matplotlib.figure.Figure` drawn by its own
Agg canvas, so plotting is safe from worker threads and never opens a window.

Bad or missing data never raises: `None`, NaN and non-numeric values are
skipped, and an empty input gives a figure that says "no data", so a report
always renders. Labels that come from user data (class names, variant names)
are shown literally: a ``$`` in a name does not switch matplotlib into math
mode.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # matplotlib loads when a figure is drawn, not with every stage
    from matplotlib.figure import Figure

__all__ = [
    "class_balance",
    "class_balance_compare",
    "learning_curves",
    "tuning_trials",
    "confusion_matrix",
    "roc_curves",
    "compression_tradeoff",
    "compression_pareto",
    "image_grid",
    "PNG_MAGIC",
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

DPI = 100
WIDTH, HEIGHT = 5.0, 3.5  # inches, one panel
WIDE = 9.0  # inches, two panels side by side

_BLUE, _ORANGE, _GREEN, _RED, _GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#7f7f7f"
_STATE_COLORS = {"COMPLETE": _BLUE, "PRUNED": _ORANGE, "FAIL": _RED}
_MAX_ROC_CURVES = 10  # per-class curves in one ROC figure (aggregates come on top)
_MAX_ANNOTATED_CLASSES = 20  # confusion-matrix cells get numbers up to this size
_MAX_TICK_LABELS = 40  # above this many classes, tick labels are unreadable


# --------------------------------------------------------------------------- helpers


def _figure(width: float = WIDTH, height: float = HEIGHT) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" tag: the same data gives byte-identical PNGs.
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def _style(ax, integer_x: bool = False) -> None:
    if integer_x:  # epochs, trial numbers
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)


def _text(value: Any, limit: int = 24) -> str:
    """A user-supplied label made safe to draw: literal `$`, bounded length."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")


def _num(value: Any) -> float:
    """`value` as a finite float, or NaN for None, NaN, inf and non-numbers."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _nums(values: Iterable[Any] | None) -> np.ndarray:
    if values is None or isinstance(values, (str, bytes)):
        return np.array([], dtype=float)
    try:
        return np.array([_num(v) for v in values], dtype=float)
    except TypeError:  # not iterable
        return np.array([], dtype=float)


def _no_data(title: str, message: str = "no data", width: float = WIDTH) -> bytes:
    fig = _figure(width)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(_text(title, 60), fontsize=11)
    ax.text(
        0.5,
        0.5,
        message,
        ha="center",
        va="center",
        fontsize=12,
        color=_GREY,
        transform=ax.transAxes,
    )
    return _png(fig)


def _empty_panel(ax, title: str, message: str) -> None:
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    ax.text(
        0.5,
        0.5,
        message,
        ha="center",
        va="center",
        fontsize=10,
        color=_GREY,
        transform=ax.transAxes,
    )


def _category_axis(ax, names: Sequence[str], axis: str = "x") -> None:
    """Tick labels for categories, rotated when long, dropped when too many."""
    positions = np.arange(len(names))
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    if len(names) > _MAX_TICK_LABELS:
        set_ticks([])
        (ax.set_xlabel if axis == "x" else ax.set_ylabel)(
            f"{len(names)} classes (labels omitted)", fontsize=9
        )
        return
    labels = [_text(n, 18) for n in names]
    set_ticks(positions)
    if axis == "x":
        long = len(names) > 8 or max((len(s) for s in labels), default=0) > 6
        ax.set_xticklabels(
            labels,
            rotation=45 if long else 0,
            ha="right" if long else "center",
            fontsize=8 if len(names) <= 20 else 6,
        )
    else:
        ax.set_yticklabels(labels, fontsize=8 if len(names) <= 20 else 6)


def _counts(counts: Mapping[Any, Any] | None) -> tuple[list[str], np.ndarray]:
    if not isinstance(counts, Mapping):
        return [], np.array([], dtype=float)
    names = [str(k) for k in counts]
    values = np.nan_to_num(_nums(counts.values()), nan=0.0)
    return names, values


def _bar_labels(ax, bars, values: np.ndarray, fontsize: int = 7) -> None:
    ax.bar_label(
        bars,
        labels=[f"{int(v):,}" if float(v).is_integer() else f"{v:.3g}" for v in values],
        fontsize=fontsize,
        padding=1,
    )


# --------------------------------------------------------------------------- class balance


def class_balance(counts: Mapping[str, int], title: str = "Class balance") -> bytes:
    """Bar chart of examples per class; the title notes the max/min imbalance ratio."""
    names, values = _counts(counts)
    if not names:
        return _no_data(title)
    fig = _figure()
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(False, axis="x")
    x = np.arange(len(names))
    bars = ax.bar(x, values, color=_BLUE, width=0.7)
    if len(names) <= 30:
        _bar_labels(ax, bars, values)
    _category_axis(ax, names)
    ax.set_ylabel("examples", fontsize=9)
    ax.margins(y=0.12)
    positive = values[values > 0]
    note = ""
    if len(names) > 1 and positive.size:
        ratio = values.max() / positive.min()
        note = f"  (n={int(values.sum()):,}, max/min {ratio:.1f}\u00d7)"
    ax.set_title(_text(title, 50) + note, fontsize=11)
    return _png(fig)


def class_balance_compare(
    before: Mapping[str, int],
    after: Mapping[str, int],
    labels: Sequence[str] = ("before", "after"),
    title: str = "Class balance",
) -> bytes:
    """Grouped bars per class, e.g. before and after oversampling/augmentation."""
    before = before if isinstance(before, Mapping) else {}
    after = after if isinstance(after, Mapping) else {}
    names: list[str] = list(dict.fromkeys([str(k) for k in before] + [str(k) for k in after]))
    if not names:
        return _no_data(title)
    b = {str(k): v for k, v in before.items()}
    a = {str(k): v for k, v in after.items()}
    vb = np.nan_to_num(_nums(b.get(n) for n in names), nan=0.0)
    va = np.nan_to_num(_nums(a.get(n) for n in names), nan=0.0)
    lb, la = (list(labels) + ["before", "after"])[:2]
    fig = _figure()
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(False, axis="x")
    x = np.arange(len(names))
    width = 0.4
    bars_b = ax.bar(x - width / 2, vb, width, color=_GREY, label=_text(lb))
    bars_a = ax.bar(x + width / 2, va, width, color=_BLUE, label=_text(la))
    if len(names) <= 12:
        _bar_labels(ax, bars_b, vb, fontsize=6)
        _bar_labels(ax, bars_a, va, fontsize=6)
    _category_axis(ax, names)
    ax.set_ylabel("examples", fontsize=9)
    ax.margins(y=0.15)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    ax.set_title(
        f"{_text(title, 40)}  (n: {int(vb.sum()):,} \u2192 {int(va.sum()):,})", fontsize=11
    )
    return _png(fig)


def image_grid(
    rows: Sequence[np.ndarray], row_titles: Sequence[str], title: str = "Images"
) -> bytes:
    """Rows of images, each an array ``(n, channels, height, width)`` of standardized
    pixels (one or three channels), e.g. originals and augmented versions of them.

    All rows share one grey scale, the originals' 1st to 99th percentile, so brightness
    and contrast changes stay visible (each image scaled on its own would hide them)."""
    arrays = [np.asarray(r, dtype=float) for r in rows if np.ndim(r) == 4 and len(r)]
    if not arrays:
        return _no_data(title)
    cols = min(len(a) for a in arrays)
    finite = arrays[0][np.isfinite(arrays[0])]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    scale = hi - lo if hi > lo else 1.0
    side = 1.0
    fig = _figure(1.2 + side * cols, 0.35 + side * len(arrays))
    axes = fig.subplots(len(arrays), cols, squeeze=False)
    for i, images in enumerate(arrays):
        for j in range(cols):
            ax = axes[i][j]
            img = np.clip((np.nan_to_num(images[j]) - lo) / scale, 0.0, 1.0)
            if img.shape[0] == 3:
                ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
            else:
                ax.imshow(img[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0 and i < len(row_titles):
                ax.set_ylabel(_text(row_titles[i], 14), fontsize=8)
    fig.suptitle(_text(title, 60), fontsize=10)
    return _png(fig)


# --------------------------------------------------------------------------- training


def learning_curves(history: Sequence[Mapping[str, Any]], title: str = "Learning curves") -> bytes:
    """Train/validation loss and validation accuracy per epoch, best epoch marked.

    The best epoch is the one with the lowest validation loss. A learning rate
    that changes over training is drawn on a second axis of the accuracy panel.
    """
    rows = [r for r in (history or []) if isinstance(r, Mapping)]
    if not rows:
        return _no_data(title, "no training history")
    epochs = _nums(r.get("epoch") for r in rows)
    if np.isnan(epochs).any():
        epochs = np.arange(1, len(rows) + 1, dtype=float)
    order = np.argsort(epochs, kind="stable")
    rows = [rows[i] for i in order]
    epochs = epochs[order]
    series = {
        key: _nums(r.get(key) for r in rows)
        for key in ("train_loss", "val_loss", "val_accuracy", "val_r2", "lr")
    }
    has = {key: bool(np.isfinite(v).any()) for key, v in series.items()}
    # the validation score: accuracy, or a regression's R^2
    score, score_name = ("val_r2", "R^2") if has["val_r2"] else ("val_accuracy", "accuracy")

    fig = _figure(WIDE)
    ax_loss, ax_acc = fig.subplots(1, 2)
    marker = "o" if len(rows) <= 30 else None

    best = None
    if has["val_loss"]:
        best = int(np.nanargmin(series["val_loss"]))
    if has["train_loss"] or has["val_loss"]:
        _style(ax_loss, integer_x=True)
        for key, color, label in (
            ("train_loss", _BLUE, "train"),
            ("val_loss", _ORANGE, "validation"),
        ):
            if has[key]:
                ok = np.isfinite(series[key])
                ax_loss.plot(
                    epochs[ok],
                    series[key][ok],
                    color=color,
                    marker=marker,
                    markersize=3,
                    linewidth=1.5,
                    label=label,
                )
        if best is not None:
            ax_loss.axvline(epochs[best], color=_GREEN, linestyle="--", linewidth=1)
            ax_loss.plot(
                epochs[best],
                series["val_loss"][best],
                marker="*",
                markersize=12,
                color=_GREEN,
                linestyle="none",
                label=f"best epoch {epochs[best]:g} ({series['val_loss'][best]:.4g})",
            )
        ax_loss.set_xlabel("epoch", fontsize=9)
        ax_loss.set_ylabel("loss", fontsize=9)
        ax_loss.set_title("Loss", fontsize=10)
        ax_loss.legend(fontsize=8, frameon=False)
    else:
        _empty_panel(ax_loss, "Loss", "no loss values")

    if has[score]:
        _style(ax_acc, integer_x=True)
        acc = series[score]
        ok = np.isfinite(acc)
        ax_acc.plot(
            epochs[ok],
            acc[ok],
            color=_GREEN,
            marker=marker,
            markersize=3,
            linewidth=1.5,
            label=f"val {score_name}",
        )
        top = int(np.nanargmax(acc))
        ax_acc.annotate(
            f"max {acc[top]:.4g}",
            (epochs[top], acc[top]),
            xytext=(0, 6),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
        if best is not None:
            ax_acc.axvline(epochs[best], color=_GREEN, linestyle="--", linewidth=1)
        ax_acc.set_xlabel("epoch", fontsize=9)
        ax_acc.set_ylabel(score_name, fontsize=9)
        ax_acc.margins(y=0.15)
        ax_acc.set_title(f"Validation {score_name}", fontsize=10)
        lr = series["lr"]
        finite_lr = lr[np.isfinite(lr)]
        if finite_lr.size > 1 and np.ptp(finite_lr) > 0:
            ax_lr = ax_acc.twinx()
            ok = np.isfinite(lr)
            ax_lr.plot(epochs[ok], lr[ok], color=_GREY, linewidth=1, linestyle=":", label="lr")
            if finite_lr.min() > 0 and finite_lr.max() / finite_lr.min() > 20:
                ax_lr.set_yscale("log")
            ax_lr.set_ylabel("learning rate", fontsize=8, color=_GREY)
            ax_lr.tick_params(labelsize=7, colors=_GREY)
            ax_lr.spines["top"].set_visible(False)
            handles = ax_acc.get_legend_handles_labels()[0] + ax_lr.get_legend_handles_labels()[0]
            ax_acc.legend(handles=handles, fontsize=8, frameon=False, loc="lower right")
    else:
        _empty_panel(ax_acc, "Validation accuracy", "no accuracy values")

    fig.suptitle(_text(title, 60), fontsize=11)
    return _png(fig)


def tuning_trials(
    trials: Sequence[Mapping[str, Any]],
    objective: str = "objective",
    goal: str = "maximize",
    title: str = "Hyperparameter search",
) -> bytes:
    """Objective per trial (by state) with the best-so-far line, and per-epoch curves.

    `goal` is "maximize" or "minimize" (anything starting with "max"/"min").
    The right panel draws each trial's intermediate values; pruned trials are
    dashed, so early stopping shows as curves that end early.
    """
    rows = [t for t in (trials or []) if isinstance(t, Mapping)]
    if not rows:
        return _no_data(title, "no trials")
    maximize = not str(goal).strip().lower().startswith("min")
    numbers = _nums(t.get("number") for t in rows)
    if np.isnan(numbers).any():
        numbers = np.arange(len(rows), dtype=float)
    order = np.argsort(numbers, kind="stable")
    rows = [rows[i] for i in order]
    numbers = numbers[order]
    values = _nums(t.get("value") for t in rows)
    states = [str(t.get("state") or "COMPLETE").upper() for t in rows]
    obj = _text(objective, 30)

    fig = _figure(WIDE)
    ax_val, ax_int = fig.subplots(1, 2)
    _style(ax_val, integer_x=True)
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    for state in dict.fromkeys(states):
        in_state = np.array([s == state for s in states])
        mask = in_state & np.isfinite(values)
        missing = in_state & ~np.isfinite(values)
        color = _STATE_COLORS.get(state, _GREY)
        label = f"{_text(state.lower(), 12)} ({counts[state]})"
        if mask.any():
            ax_val.scatter(
                numbers[mask], values[mask], s=22, color=color, alpha=0.85, label=label, zorder=3
            )
        if missing.any():  # no final value (failed, pruned): a cross on the x axis
            ax_val.scatter(
                numbers[missing],
                np.full(missing.sum(), 0.02),
                marker="x",
                s=25,
                color=color,
                transform=ax_val.get_xaxis_transform(),
                zorder=3,
                label=f"{label}, no value" if mask.any() else label,
            )
    complete = np.array([s == "COMPLETE" for s in states]) & np.isfinite(values)
    if complete.any():
        vals = np.where(complete, values, -np.inf if maximize else np.inf)
        best_so_far = np.maximum.accumulate(vals) if maximize else np.minimum.accumulate(vals)
        shown = np.isfinite(best_so_far)
        ax_val.step(
            numbers[shown],
            best_so_far[shown],
            where="post",
            color=_GREEN,
            linewidth=1.5,
            label="best so far",
        )
        best = int(np.nanargmax(vals) if maximize else np.nanargmin(vals))
        ax_val.scatter(
            [numbers[best]],
            [values[best]],
            marker="*",
            s=160,
            color=_GREEN,
            edgecolor="black",
            linewidth=0.5,
            zorder=4,
            label=f"best: trial {numbers[best]:g} ({values[best]:.4g})",
        )
    else:
        best = None
    ax_val.set_xlabel("trial", fontsize=9)
    ax_val.set_ylabel(obj, fontsize=9)
    ax_val.set_title(f"{obj} per trial ({'max' if maximize else 'min'}imize)", fontsize=10)
    ax_val.legend(fontsize=7, frameon=False)

    pairs = enumerate(zip(rows, states, strict=False))
    curves = [(_nums(t.get("intermediate")), s, i) for i, (t, s) in pairs]
    curves = [(c, s, i) for c, s, i in curves if np.isfinite(c).any()]
    if curves:
        _style(ax_int, integer_x=True)
        styles = {"COMPLETE": "-", "PRUNED": "--", "FAIL": ":"}
        for curve, state, i in curves:
            steps = np.arange(1, len(curve) + 1)
            ok = np.isfinite(curve)
            is_best = i == best
            ax_int.plot(
                steps[ok],
                curve[ok],
                linestyle=styles.get(state, "-."),
                color=_GREEN if is_best else _STATE_COLORS.get(state, _GREY),
                linewidth=2.2 if is_best else 1.0,
                alpha=1.0 if is_best else 0.6,
                zorder=3 if is_best else 2,
            )
            if state == "PRUNED" and ok.any():
                last = np.flatnonzero(ok)[-1]
                ax_int.plot(steps[last], curve[last], marker="x", color=_ORANGE, markersize=5)
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=_STATE_COLORS[s], linestyle=styles[s], label=s.lower())
            for s in ("COMPLETE", "PRUNED", "FAIL")
            if s in {c[1] for c in curves}
        ]
        if best is not None and any(c[2] == best for c in curves):
            handles.append(Line2D([], [], color=_GREEN, linewidth=2.2, label="best trial"))
        ax_int.legend(handles=handles, fontsize=7, frameon=False)
        ax_int.set_xlabel("epoch", fontsize=9)
        ax_int.set_ylabel(obj, fontsize=9)
        ax_int.set_title("Intermediate values (pruned: dashed)", fontsize=10)
    else:
        _empty_panel(ax_int, "Intermediate values", "no intermediate values reported")

    fig.suptitle(f"{_text(title, 50)}: {len(rows)} trials", fontsize=11)
    return _png(fig)


# --------------------------------------------------------------------------- evaluation


def confusion_matrix(
    matrix: Sequence[Sequence[int]],
    class_names: Sequence[str],
    normalize: bool = True,
    title: str = "Confusion matrix",
) -> bytes:
    """Heatmap of true (rows) vs predicted (columns) classes.

    With `normalize`, colors are row fractions (recall per class) and cells
    show the count with its percentage; up to 20 classes get numbers in cells.
    """
    try:
        counts = np.array([[_num(v) for v in row] for row in (matrix or [])], dtype=float)
    except (TypeError, ValueError):  # ragged or non-iterable rows
        counts = np.zeros((0, 0))
    if counts.ndim != 2 or counts.size == 0:
        return _no_data(title)
    counts = np.nan_to_num(counts, nan=0.0)
    n_rows, n_cols = counts.shape
    names = [str(c) for c in (class_names or [])]
    row_names = names[:n_rows] + [str(i) for i in range(len(names), n_rows)]
    col_names = names[:n_cols] + [str(i) for i in range(len(names), n_cols)]
    if normalize:
        sums = counts.sum(axis=1, keepdims=True)
        shown = np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)
        vmax = 1.0
    else:
        shown = counts
        vmax = max(float(counts.max()), 1.0)

    n = max(n_rows, n_cols)
    side = min(max(4.2 + 0.22 * n, 4.8), 9.0)
    fig = _figure(side + 0.8, side)
    ax = fig.add_subplot()
    image = ax.imshow(
        shown, cmap="Blues", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
    )
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    cbar.ax.tick_params(labelsize=7)
    cbar.set_label("fraction of true class" if normalize else "count", fontsize=8)
    if n <= _MAX_ANNOTATED_CLASSES:
        size = 8 if n <= 10 else 6
        for i in range(n_rows):
            for j in range(n_cols):
                count = int(round(counts[i, j]))
                label = f"{count:,}"
                if normalize and n <= 10:
                    label += f"\n{100 * shown[i, j]:.0f}%"
                ax.text(
                    j,
                    i,
                    label,
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if shown[i, j] > 0.55 * vmax else "black",
                )
    _category_axis(ax, col_names, "x")
    _category_axis(ax, row_names, "y")
    if n <= _MAX_TICK_LABELS:
        ax.set_xlabel("predicted", fontsize=9)
        ax.set_ylabel("true", fontsize=9)
    total = counts.sum()
    k = min(n_rows, n_cols)
    note = f"  (accuracy {np.trace(counts[:k, :k]) / total:.4g})" if total > 0 else ""
    ax.set_title(_text(title, 40) + note, fontsize=11)
    return _png(fig)


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    order = np.argsort(fpr, kind="stable")
    return float(np.trapezoid(tpr[order], fpr[order])) if fpr.size > 1 else math.nan


def roc_curves(curves: Mapping[str, Mapping[str, Any]], title: str = "ROC curves") -> bytes:
    """One ROC curve per class (at most 10) plus aggregates ("micro", "macro").

    A missing "auc" is computed from the curve. Classes beyond the first ten
    are left out, which the legend says.
    """
    if not isinstance(curves, Mapping):
        return _no_data(title)
    aggregate_names = {"micro", "macro", "weighted", "micro-average", "macro-average"}
    parsed = []
    for name, curve in curves.items():
        if not isinstance(curve, Mapping):
            continue
        fpr, tpr = _nums(curve.get("fpr")), _nums(curve.get("tpr"))
        size = min(fpr.size, tpr.size)
        fpr, tpr = fpr[:size], tpr[:size]
        ok = np.isfinite(fpr) & np.isfinite(tpr)
        fpr, tpr = fpr[ok], tpr[ok]
        if fpr.size == 0:
            continue
        auc = _num(curve.get("auc"))
        if math.isnan(auc):
            auc = _auc(fpr, tpr)
        parsed.append((str(name), fpr, tpr, auc, str(name).strip().lower() in aggregate_names))
    if not parsed:
        return _no_data(title)
    per_class = [p for p in parsed if not p[4]]
    aggregates = [p for p in parsed if p[4]]
    hidden = max(len(per_class) - _MAX_ROC_CURVES, 0)

    crowded = min(len(per_class), _MAX_ROC_CURVES) + len(aggregates) > 6
    fig = _figure(WIDTH + 1.6 if crowded else WIDTH)  # a long legend goes beside the axes
    ax = fig.add_subplot()
    _style(ax)
    ax.plot([0, 1], [0, 1], color=_GREY, linestyle=":", linewidth=1, label="chance")
    colors = [f"C{i}" for i in range(10)]
    for k, (name, fpr, tpr, auc, _) in enumerate(per_class[:_MAX_ROC_CURVES]):
        ax.plot(
            fpr,
            tpr,
            color=colors[k % 10],
            linewidth=1.3,
            drawstyle="default",
            label=f"{_text(name, 16)} (AUC {auc:.3f})",
        )
    for k, (name, fpr, tpr, auc, _) in enumerate(aggregates):
        ax.plot(
            fpr,
            tpr,
            color="black",
            linestyle=["--", "-.", ":"][k % 3],
            linewidth=2,
            label=f"{_text(name, 16)} (AUC {auc:.3f})",
        )
    if hidden:
        ax.plot([], [], " ", label=f"+{hidden} more classes not shown")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.02)
    ax.set_xlabel("false positive rate", fontsize=9)
    ax.set_ylabel("true positive rate", fontsize=9)
    ax.set_title(_text(title, 50), fontsize=11)
    if crowded:
        fig.legend(fontsize=7, frameon=False, loc="outside right upper")
    else:
        ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _png(fig)


# --------------------------------------------------------------------------- compression


def compression_tradeoff(
    variants: Sequence[Mapping[str, Any]],
    baseline_accuracy: float | None,
    budget: float | None,
    title: str = "Compression: size vs accuracy",
) -> bytes:
    """Model size (gzip KiB, else raw) vs accuracy for each compressed variant.

    Points are colored by CPU latency; the dashed line is the accuracy floor
    (`baseline_accuracy - budget`) below which a variant is rejected, and the
    chosen variant is ringed in red.
    """
    rows = [v for v in (variants or []) if isinstance(v, Mapping)]
    use_gzip = any(math.isfinite(_num(v.get("gzip_bytes"))) for v in rows)
    sizes = _nums((v.get("gzip_bytes") if use_gzip else v.get("bytes")) for v in rows) / 1024.0
    accuracy = _nums(v.get("accuracy") for v in rows)
    latency = _nums(v.get("cpu_latency_ms") for v in rows)
    ok = np.isfinite(sizes) & np.isfinite(accuracy) & (sizes > 0)
    if not ok.any():
        return _no_data(title)
    names = [str(v.get("name", f"variant {i}")) for i, v in enumerate(rows)]
    chosen = np.array([bool(v.get("chosen")) for v in rows])
    base = _num(baseline_accuracy)
    floor = base - _num(budget)

    fig = _figure()
    ax = fig.add_subplot()
    _style(ax)
    timed = ok & np.isfinite(latency)
    if timed.any():
        points = ax.scatter(
            sizes[timed],
            accuracy[timed],
            c=latency[timed],
            cmap="viridis",
            s=45,
            edgecolor="black",
            linewidth=0.4,
            zorder=3,
        )
        cbar = fig.colorbar(points, ax=ax, pad=0.02)
        cbar.set_label("CPU latency (ms)", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    untimed = ok & ~np.isfinite(latency)
    if untimed.any():
        ax.scatter(
            sizes[untimed],
            accuracy[untimed],
            color="white" if timed.any() else _BLUE,
            s=45,
            edgecolor="black",
            linewidth=0.6,
            zorder=3,
            label="latency not measured" if timed.any() else None,
        )
    for i in np.flatnonzero(ok):
        ax.annotate(
            _text(names[i], 18),
            (sizes[i], accuracy[i]),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=7,
        )
    pick = ok & chosen
    if pick.any():
        ax.scatter(
            sizes[pick],
            accuracy[pick],
            s=220,
            facecolor="none",
            edgecolor=_RED,
            linewidth=2,
            zorder=4,
            label="chosen",
        )
    if math.isfinite(base):
        ax.axhline(base, color=_GREY, linestyle=":", linewidth=1, label=f"baseline {base:.4g}")
    if math.isfinite(floor):
        ax.axhline(
            floor,
            color=_RED,
            linestyle="--",
            linewidth=1,
            label=f"floor (baseline \u2212 {_num(budget):.3g}) {floor:.4g}",
        )
        ax.axhspan(min(floor, np.nanmin(accuracy[ok])) - 1.0, floor, color=_RED, alpha=0.06)
    shown = sizes[ok]
    if shown.size > 1 and shown.max() / shown.min() > 20:
        ax.set_xscale("log")
    accs = accuracy[ok]
    ref = [a for a in (base, floor) if math.isfinite(a)]
    low, high = min([accs.min()] + ref), max([accs.max()] + ref)
    pad = max((high - low) * 0.12, 0.005)
    ax.set_ylim(low - pad, high + pad)
    ax.margins(x=0.15)
    ax.set_xlabel(("gzip size" if use_gzip else "size") + " (KiB)", fontsize=9)
    ax.set_ylabel("accuracy", fontsize=9)
    ax.set_title(_text(title, 50), fontsize=11)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False, loc="best")
    return _png(fig)


def compression_pareto(
    variants: Sequence[Mapping[str, Any]],
    floor: float | None = None,
    title: str = "Compression: latency vs accuracy",
) -> bytes:
    """The size/latency/accuracy trade-off of the compressed variants, in two panels:
    CPU ms per row at batch 1 and at batch 64 against accuracy (RMSE for a regression,
    then lower is better), each point's area proportional to its gzip size.

    Pareto-optimal variants (``pareto``: none beats them on size, both latencies and
    accuracy at once, a front in four dimensions, so no line joins them) are filled
    orange, the others hollow; the chosen one is ringed in red; ``floor`` (the accuracy
    a variant needs, or the RMSE it may not exceed) is dashed."""
    rows = [v for v in (variants or []) if isinstance(v, Mapping)]
    rmse = not any(math.isfinite(_num(v.get("accuracy"))) for v in rows)
    quality = _nums(v.get("rmse" if rmse else "accuracy") for v in rows)
    sizes = _nums(v.get("gzip_bytes") for v in rows)
    big = max(
        (int(k[len("latency_b") : -3]) for v in rows for k in v if _is_batch_key(k)), default=0
    )
    panels = [("batch 1", _nums(v.get("latency_b1_ms") for v in rows))]
    if big > 1:
        per_row = _nums(v.get(f"latency_b{big}_ms") for v in rows) / big
        panels.append((f"batch {big}", per_row))
    if not rows or not any((np.isfinite(x) & np.isfinite(quality)).any() for _, x in panels):
        return _no_data(title)
    names = [str(v.get("name", f"variant {i}")) for i, v in enumerate(rows)]
    front = np.array([bool(v.get("pareto")) for v in rows])
    chosen = np.array([bool(v.get("chosen")) for v in rows])
    finite_sizes = sizes[np.isfinite(sizes) & (sizes > 0)]
    area = (
        30 + 220 * np.sqrt(np.nan_to_num(sizes, nan=0.0) / finite_sizes.max())
        if finite_sizes.size
        else np.full(len(rows), 45.0)
    )
    fig = _figure(WIDE)
    for ax, (label, latency) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=False
    ):
        _style(ax)
        ok = np.isfinite(latency) & np.isfinite(quality) & (latency > 0)
        for mask, face, legend in (
            (ok & ~front, "white", "dominated"),
            (ok & front, _ORANGE, "Pareto-optimal"),
        ):
            if mask.any():
                ax.scatter(
                    latency[mask],
                    quality[mask],
                    s=area[mask],
                    color=face,
                    edgecolor="black",
                    linewidth=0.6,
                    zorder=3,
                    label=legend,
                )
        pick = ok & chosen
        if pick.any():
            ax.scatter(
                latency[pick],
                quality[pick],
                s=area[pick] + 160,
                facecolor="none",
                edgecolor=_RED,
                linewidth=2,
                zorder=4,
                label="chosen",
            )
        for i in np.flatnonzero(ok):
            ax.annotate(
                _text(names[i], 18),
                (latency[i], quality[i]),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize=7,
            )
        if floor is not None and math.isfinite(_num(floor)):
            ax.axhline(_num(floor), color=_RED, linestyle="--", linewidth=1, label="budget")
        shown = latency[ok]
        if shown.size > 1 and shown.max() / shown.min() > 20:
            ax.set_xscale("log")
        ax.margins(x=0.15, y=0.15)
        ax.set_xlabel(f"CPU ms per row, {label} (one thread)", fontsize=9)
        ax.set_ylabel("test RMSE (lower is better)" if rmse else "test accuracy", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False, loc="best")
    fig.suptitle(_text(title + " (point area: gzip size)", 70), fontsize=10)
    return _png(fig)


def _is_batch_key(key: str) -> bool:
    """``latency_b<N>_ms``: a variant's ms per call at batch size N."""
    middle = key[len("latency_b") : -3]
    return key.startswith("latency_b") and key.endswith("_ms") and middle.isdigit()


def regression_fit(
    points: Mapping[str, Sequence[float]], title: str = "Predicted vs actual"
) -> bytes:
    """A regression's test fit: predicted against actual (the diagonal is a perfect model)
    and the residuals against the prediction (a trend or a funnel says what it misses)."""
    actual, predicted = _nums(points.get("actual")), _nums(points.get("predicted"))
    ok = np.isfinite(actual) & np.isfinite(predicted)
    if len(actual) != len(predicted) or not ok.any():
        return _no_data(title, "no predictions")
    actual, predicted = actual[ok], predicted[ok]
    fig = _figure(WIDE)
    ax_fit, ax_res = fig.subplots(1, 2)
    for ax in (ax_fit, ax_res):
        _style(ax)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax_fit.scatter(actual, predicted, s=6, alpha=0.5, color=_BLUE, linewidths=0)
    ax_fit.plot([low, high], [low, high], color=_GREY, linestyle="--", linewidth=1)
    ax_fit.set_xlabel("actual", fontsize=9)
    ax_fit.set_ylabel("predicted", fontsize=9)
    ax_fit.set_title(title, fontsize=10)
    residual = actual - predicted
    ax_res.scatter(predicted, residual, s=6, alpha=0.5, color=_ORANGE, linewidths=0)
    ax_res.axhline(0, color=_GREY, linestyle="--", linewidth=1)
    ax_res.set_xlabel("predicted", fontsize=9)
    ax_res.set_ylabel("actual - predicted", fontsize=9)
    ax_res.set_title("Residuals", fontsize=10)
    return _png(fig)
