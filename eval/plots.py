"""The report's figures as PNG bytes (matplotlib, Agg backend), one function per figure."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


CURVE_POINTS = 501
CURVE_THRESHOLDS = 2000
"""ROC and PR points are exact at up to this many thresholds (the score's quantiles): the rows are
counted per threshold bin (a histogram), so a curve costs a few arrays of bins, not a sort of every
row (sklearn's ``roc_curve`` keeps one point per distinct score: millions at 10M rows)."""


def curve_counts(y: np.ndarray, s: np.ndarray, thresholds: int = CURVE_THRESHOLDS) -> tuple[np.ndarray, ...]:
    """(fpr, tpr, precision) at each threshold t of the score's quantiles, for "score >= t" decided
    positive; thresholds from high to low, so fpr and tpr rise from 0 to 1."""
    s = np.asarray(s)
    # Quantiles that are scores ("lower"), so each threshold is a real score, as in sklearn.
    edges = np.unique(np.quantile(s, np.linspace(0, 1, thresholds + 1), method="lower"))  # (T,) ascending
    b = np.searchsorted(edges, s, side="right") - 1  # (n,) the highest edge <= score: 0..T-1
    yb = np.asarray(y) > 0
    pos = np.bincount(b, weights=yb, minlength=len(edges))[::-1]  # (T,) high thresholds first
    neg = np.bincount(b, minlength=len(edges))[::-1] - pos
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    P, N = max(tp[-1], 1), max(fp[-1], 1)
    fpr, tpr = np.r_[0.0, fp / N], np.r_[0.0, tp / P]
    prec = np.r_[1.0, tp / np.maximum(tp + fp, 1)]
    return fpr, tpr, prec


def roc_pr(y: np.ndarray, scores: Iterable[tuple[str, np.ndarray]]) -> bytes:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.5))
    grid = np.linspace(0, 1, CURVE_POINTS)
    for name, s in scores:
        fpr, tpr, prec = curve_counts(y, s)
        a.plot(grid, np.interp(grid, fpr, tpr), label=name, lw=1.2)
        b.plot(grid, np.interp(grid, tpr, prec), label=name, lw=1.2)
    a.plot([0, 1], [0, 1], "k:", lw=1)
    a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    b.axhline(float(np.mean(y)), color="k", ls=":", lw=1)
    b.set(xlabel="recall", ylabel="precision", title="precision-recall")
    a.legend(fontsize=7, loc="lower right")
    return _save(fig)


def reliability(y: np.ndarray, probs: Iterable[tuple[str, np.ndarray]], bins: int = 10) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    edges = np.linspace(0, 1, bins + 1)
    for name, p in probs:
        b = np.minimum((p * bins).astype(int), bins - 1)
        n = np.bincount(b, minlength=bins)
        ok = n > 0
        mp = np.bincount(b, weights=p, minlength=bins)[ok] / n[ok]
        my = np.bincount(b, weights=y, minlength=bins)[ok] / n[ok]
        ax.plot(mp, my, marker="o", ms=3, label=name)
    ax.plot(edges[[0, -1]], edges[[0, -1]], "k:", lw=1)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate", title="reliability")
    ax.legend(fontsize=7)
    return _save(fig)


def histograms(y: np.ndarray, scores: dict[str, np.ndarray]) -> bytes:
    """Score histograms by label, one panel per model (30 bins over the model's score range)."""
    plt = _plt()
    n = len(scores)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, scores.items(), strict=False):
        for label, color in ((0, "tab:red"), (1, "tab:green")):
            v = s[y == label]
            if len(v):
                counts, edges = np.histogram(v, bins=30, range=(float(np.min(s)), float(np.max(s))))
                ax.stairs(counts, edges, fill=True, alpha=0.55, color=color, label=f"label {label}")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig)


def slices(rows: list[tuple[str, float | None, float | None, float | None]], metric: str) -> bytes:
    """rows: (slice label, value, lo, hi) of ThinkRec's metric."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    ys = np.arange(len(rows))
    vals = [r[1] if r[1] is not None else np.nan for r in rows]
    lo = [v - r[2] if r[2] is not None else 0 for v, r in zip(vals, rows, strict=True)]
    hi = [r[3] - v if r[3] is not None else 0 for v, r in zip(vals, rows, strict=True)]
    ax.errorbar(vals, ys, xerr=[np.nan_to_num(lo), np.nan_to_num(hi)], fmt="o", ms=4, capsize=2)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel=f"ThinkRec {metric} (95% interval)", title="slices")
    return _save(fig)


def bars(counts: dict[str, float], title: str, ylabel: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(counts), list(counts.values()), color="tab:blue")
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    return _save(fig)


def hist(values: np.ndarray, title: str, xlabel: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(values, bins=20, range=(0, 1), color="tab:purple")
    ax.set(title=title, xlabel=xlabel, ylabel="rows")
    return _save(fig)


CURVE_PANELS = {"loss": "train loss", "valid": "validation", "grad_norm": "gradient norm (before clipping)"}


def curve_panels(names: Iterable[str]) -> dict[str, list[str]]:
    """The training curves' series by panel (``CURVE_PANELS``, in that order; empty ones left out): a
    series' last name part says its kind, ``loss`` or ``grad_norm``, anything else is validation."""
    out: dict[str, list[str]] = {k: [] for k in CURVE_PANELS}
    for name in names:
        last = name.rsplit(".", 1)[-1]
        out[last if last in ("loss", "grad_norm") else "valid"].append(name)
    return {k: v for k, v in out.items() if v}


def curves(series: dict[str, tuple[list[float], list[float]]]) -> bytes:
    """One panel per kind on a shared step axis. Gradient norms on a log scale: a spike is hundreds
    of times the median, and on the losses' axis it would flatten every other curve."""
    plt = _plt()
    panels = curve_panels(series)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (kind, names) in zip(axes[:, 0], panels.items(), strict=True):
        for name in names:
            xs, ys = series[name]
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
        ax.set(title=CURVE_PANELS[kind], yscale="log" if kind == "grad_norm" else "linear")
        ax.legend(fontsize=7)
    axes[-1, 0].set(xlabel="step")
    return _save(fig)
