"""Vectorised metrics over many models on the same rows, with 95% bootstrap intervals over users.

Every metric is computed from numpy arrays in a few sorts (no Python loop over users), so 10M rows
fit in memory as a handful of columns. ``eval/metrics.py`` keeps the small sklearn-based reference
implementations the tests compare this module with.

Exact AUC: rows sorted by score, equal scores form one tie group, and a positive earns one per
negative below it and 1/2 per negative tied with it (the Mann-Whitney statistic, as sklearn). The
scores are the stored float32/float64 values, so the result is exact up to float64 summation
(error bound < n * 2**-52 relative, far below 1e-9 at 10M rows); there is no binning.

Bootstrap: each resample draws users with replacement (seeded, ``numpy.random.default_rng``); a user
drawn c times weighs c in every metric. Per-user metrics (UAUC, GAUC, HR/NDCG/MAP@k) become weighted
means over users; row metrics (AUC, log-loss, ECE) weight the user's rows by c. The same draws serve
every model, so the difference of ThinkRec to a model in each resample is a paired bootstrap. The
interval is the 2.5 and 97.5 percentiles of the resampled values (nan-aware: a resample where a
metric is undefined, e.g. one class only, is left out of that metric's percentiles).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Probability = np.ndarray | Callable[[np.ndarray], np.ndarray] | None
"""A model's probability: an array (n,), a function of its score array, or None."""

ECE_BINS = 10
"""Equal-width probability bins of the expected calibration error."""


@dataclass(frozen=True)
class Rows:
    """The evaluated rows, grouped by user. ``uidx`` (n,) maps each row to its user 0..U-1."""

    uidx: np.ndarray
    y: np.ndarray  # (n,) int8 0/1
    n_users: int

    @classmethod
    def build(cls, user_ids: np.ndarray, labels: np.ndarray) -> Rows:
        uniq, uidx = np.unique(np.asarray(user_ids), return_inverse=True)
        idx_t = np.int32 if len(uniq) < 2**31 else np.int64
        return cls(uidx.astype(idx_t).ravel(), (np.asarray(labels) > 0).astype(np.int8), len(uniq))

    def take(self, mask: np.ndarray) -> Rows:
        return Rows.build(self.uidx[mask], self.y[mask])


def metric_names(k_values: Sequence[int], probability: bool = True) -> list[str]:
    names = ["auc", "uauc", "gauc"] + (["logloss", "ece"] if probability else [])
    return names + [f"{m}@{k}" for m in ("hr", "ndcg", "map") for k in k_values]


def midranks_within(uidx: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Each row's 1-based rank of ``s`` among its user's rows, tied scores sharing their mean rank
    (midranks), in row order: per-user AUC and the within-user Spearman both rank this way."""
    order = np.lexsort((s, uidx))  # (n,) by user, then score
    us, ss = uidx[order], s[order]
    n = len(s)
    new_user = np.r_[True, us[1:] != us[:-1]]
    new_tie = new_user | np.r_[True, ss[1:] != ss[:-1]]
    del ss
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    tie_start = np.flatnonzero(new_tie)
    tie_end = np.r_[tie_start[1:], n] - 1
    tie_of = np.cumsum(new_tie) - 1
    out = np.empty(n)
    out[order] = (tie_start[tie_of] + tie_end[tie_of]) / 2.0 - user_start + 1
    return out


class ModelStats:
    """Per-user sufficient statistics of one model's scores on ``Rows``; ``value(weights)`` gives every
    metric for user weights (all ones: the point estimate)."""

    def __init__(self, rows: Rows, score: np.ndarray, prob: Probability, k_values: Sequence[int]):
        s = np.asarray(score, dtype=np.float64)  # (n,)
        y, u, U = rows.y, rows.uidx, rows.n_users
        n = len(s)
        idx_t = np.int32 if n < 2**31 else np.int64
        self.rows, self.k_values = rows, tuple(int(k) for k in k_values)
        self.pos = np.bincount(u, weights=y, minlength=U)  # (U,)
        self.cnt = np.bincount(u, minlength=U).astype(np.float64)  # (U,)
        self.neg = self.cnt - self.pos
        # The temporaries below are deleted as soon as they are used: at 10M rows each is 40-80 MB.

        # Global AUC: tie groups of the score order; a row's group and the label counts per group.
        order = np.argsort(s, kind="stable")  # (n,)
        ss = s[order]
        # Kept compact (4 + 1 + 4 bytes a row): every bootstrap resample re-reads them.
        self._starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]]).astype(idx_t)
        del ss
        self._ysorted = y[order].astype(np.int8)
        self._usorted = u[order].astype(idx_t)
        del order

        # Per-user AUC (Mann-Whitney within each user): midranks of the score within the user.
        midrank = midranks_within(u, s)  # (n,)
        midrank *= y
        rsum = np.bincount(u, weights=midrank, minlength=U)
        del midrank
        ustart = np.r_[0, np.cumsum(self.cnt)][:-1].astype(np.int64)  # (U,) first sorted row of each user
        both = (self.pos > 0) & (self.neg > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.user_auc = np.where(
                both, (rsum - self.pos * (self.pos + 1) / 2) / (self.pos * self.neg), 0.0
            )
        self.both = both

        # Ranking inside each user: best first, ties in input order (stable), as eval/metrics.py.
        o3 = np.lexsort((np.arange(n), -s, u))  # (n,)
        u3, rel = u[o3], y[o3].astype(np.float64)
        del o3
        pos_in_user = np.arange(n) - ustart[u3]  # (n,) 0-based rank
        hits = np.cumsum(rel)
        first_of_user = np.r_[True, u3[1:] != u3[:-1]]
        hits_before_user = (hits - rel)[np.flatnonzero(first_of_user)]
        hits -= hits_before_user[np.cumsum(first_of_user) - 1]  # now: hits within the user so far
        del hits_before_user, first_of_user
        # Only the top max(k) rows of each user matter from here on.
        top_rows = pos_in_user < max(self.k_values, default=0)
        u3, rel, rank0, hits = u3[top_rows], rel[top_rows], pos_in_user[top_rows], hits[top_rows]
        del pos_in_user, top_rows
        self.ranked = self.pos > 0
        self.rank: dict[str, np.ndarray] = {}
        for k in self.k_values:
            top = (rank0 < k) * rel
            hr = np.bincount(u3, weights=top, minlength=U) > 0
            dcg = np.bincount(u3, weights=top / np.log2(rank0 + 2), minlength=U)
            ideal_n = np.minimum(self.pos, k).astype(np.int64)
            disc = np.r_[0.0, np.cumsum(1 / np.log2(np.arange(k) + 2))]
            idcg = disc[ideal_n]
            ap = np.bincount(u3, weights=top * hits / (rank0 + 1), minlength=U)
            with np.errstate(invalid="ignore", divide="ignore"):
                self.rank[f"hr@{k}"] = hr.astype(np.float64)
                self.rank[f"ndcg@{k}"] = np.where(self.ranked, dcg / np.where(idcg > 0, idcg, 1), 0.0)
                self.rank[f"map@{k}"] = np.where(self.ranked, ap / np.maximum(ideal_n, 1), 0.0)
        del u3, rel, rank0, hits

        if callable(prob):
            prob = prob(np.asarray(score, dtype=np.float64))
        self.probability = prob is not None
        if prob is not None:
            eps = np.finfo(np.float64).eps
            p = np.clip(np.asarray(prob, dtype=np.float64), eps, 1 - eps)  # (n,)
            ll = -(y * np.log(p) + (1 - y) * np.log1p(-p))
            self.ll_sum = np.bincount(u, weights=ll, minlength=U)
            del ll
            # ECE by (user, bin) cell, kept sparse: only the cells that hold rows (at most n, at most
            # U * ECE_BINS), so many users with few rows each cost no U x ECE_BINS matrix.
            cell = u.astype(np.int64) * ECE_BINS + np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)
            cells, inv = np.unique(cell, return_inverse=True)
            del cell
            self.ece_user = (cells // ECE_BINS).astype(idx_t)  # (C,)
            self.ece_bin = (cells % ECE_BINS).astype(np.int8)  # (C,)
            self.ece_y = np.bincount(inv, weights=y, minlength=len(cells))  # (C,)
            self.ece_p = np.bincount(inv, weights=p, minlength=len(cells))  # (C,)

    def names(self) -> list[str]:
        return metric_names(self.k_values, self.probability)

    def _auc(self, w_rows_sorted: np.ndarray | None) -> float:
        ys = self._ysorted.astype(np.float64)
        yp = ys if w_rows_sorted is None else ys * w_rows_sorted
        yn = (1 - ys) if w_rows_sorted is None else (1 - ys) * w_rows_sorted
        gp, gn = np.add.reduceat(yp, self._starts), np.add.reduceat(yn, self._starts)
        P, N = gp.sum(), gn.sum()
        if P == 0 or N == 0:
            return float("nan")
        below = np.cumsum(gn) - gn
        return float((gp * (below + 0.5 * gn)).sum() / (P * N))

    def value(self, w: np.ndarray | None = None) -> dict[str, float]:
        """Every metric under user weights ``w`` (U,) (None: each user once)."""
        ones = w is None
        w = np.ones(self.rows.n_users) if ones else w
        out: dict[str, float] = {}
        out["auc"] = self._auc(None if ones else w[self._usorted])

        def wmean(vals: np.ndarray, mask: np.ndarray, extra: np.ndarray | None = None) -> float:
            ww = w * mask * (1 if extra is None else extra)
            tot = ww.sum()
            return float((ww * vals).sum() / tot) if tot > 0 else float("nan")

        out["uauc"] = wmean(self.user_auc, self.both)
        out["gauc"] = wmean(self.user_auc, self.both, self.cnt)
        if self.probability:
            n = (w * self.cnt).sum()
            out["logloss"] = float((w * self.ll_sum).sum() / n) if n > 0 else float("nan")
            wc = w[self.ece_user]
            ey = np.bincount(self.ece_bin, weights=wc * self.ece_y, minlength=ECE_BINS)
            ep = np.bincount(self.ece_bin, weights=wc * self.ece_p, minlength=ECE_BINS)
            out["ece"] = float(np.abs(ey - ep).sum() / n) if n > 0 else float("nan")
        for name, vals in self.rank.items():
            out[name] = wmean(vals, self.ranked)
        return out

    def counts(self) -> dict[str, int]:
        return {
            "rows": int(self.cnt.sum()),
            "positives": int(self.pos.sum()),
            "users": int((self.cnt > 0).sum()),
            "uauc_users": int(self.both.sum()),
            "ranking_users": int(self.ranked.sum()),
        }


def _interval(vals: np.ndarray) -> tuple[float | None, float | None]:
    finite = vals[np.isfinite(vals)]
    if len(finite) == 0:
        return None, None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def _resample_weights(rng: np.random.Generator, n_users: int) -> np.ndarray:
    """One bootstrap resample as user weights (U,): how often each user was drawn."""
    return np.bincount(rng.integers(0, n_users, n_users), minlength=n_users).astype(np.float64)


def evaluate_models(
    rows: Rows,
    models: Mapping[str, tuple[np.ndarray, Probability]],
    k_values: Sequence[int],
    resamples: int,
    seed: int,
    reference: str | None = None,
) -> dict[str, dict[str, object]]:
    """{model: {"counts": ..., "metrics": {name: {"value", "lo", "hi"}}, "vs_reference": {name: {"diff",
    "lo", "hi", "p_le_0"}}}} for models given as name -> (score, probability), all on ``rows``. The
    probability is an array, a function of the score (e.g. a sigmoid, so no second array is held), or
    None (no calibration metrics).

    ``reference`` (ThinkRec) is compared with each other model by a paired bootstrap: the difference
    reference - model in every resample, its percentiles and the share of resamples where it is <= 0.
    Models are done one at a time (one model's statistics in memory, not all of them: at 10M rows each
    is a few hundred MB); the generator is re-seeded for each, so every model sees the same resamples."""
    point: dict[str, dict[str, float]] = {}
    draws: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, dict[str, int]] = {}
    for name, (score, prob) in models.items():
        st = ModelStats(rows, score, prob, k_values)
        point[name], counts[name] = st.value(), st.counts()
        rng = np.random.default_rng(seed)
        d = {m: np.empty(resamples) for m in st.names()}
        for i in range(resamples):
            for m, v in st.value(_resample_weights(rng, rows.n_users)).items():
                d[m][i] = v
        draws[name] = d
        del st
    out: dict[str, dict[str, object]] = {}
    for name in models:
        metrics = {}
        for m, vals in draws[name].items():
            lo, hi = _interval(vals) if resamples else (None, None)
            metrics[m] = {"value": point[name][m], "lo": lo, "hi": hi}
        entry: dict[str, object] = {"counts": counts[name], "metrics": metrics}
        if reference is not None and name != reference and reference in draws:
            diffs = {}
            for m in draws[name]:
                if m not in draws[reference]:
                    continue
                dd = draws[reference][m] - draws[name][m]
                lo, hi = _interval(dd) if resamples else (None, None)
                fin = dd[np.isfinite(dd)]
                diffs[m] = {
                    "diff": point[reference][m] - point[name][m],
                    "lo": lo,
                    "hi": hi,
                    "p_le_0": float((fin <= 0).mean()) if len(fin) else None,
                }
            entry["vs_reference"] = diffs
        out[name] = entry
    return out


def _pearson_by_user(x: np.ndarray, y: np.ndarray, uidx: np.ndarray, n_users: int) -> np.ndarray:
    """Pearson correlation of x and y within each user (NaN where either is constant)."""
    cnt = np.bincount(uidx, minlength=n_users).astype(np.float64)
    sx, sy = np.bincount(uidx, x, n_users), np.bincount(uidx, y, n_users)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = np.bincount(uidx, x * y, n_users) - sx * sy / cnt
        vx = np.bincount(uidx, x * x, n_users) - sx * sx / cnt
        vy = np.bincount(uidx, y * y, n_users) - sy * sy / cnt
        ok = (vx > 1e-12 * np.maximum(cnt, 1) ** 3) & (vy > 1e-12 * np.maximum(cnt, 1) ** 3)
        return np.where(ok, cov / np.sqrt(vx * vy), np.nan)


def score_agreement(
    rows: Rows, reference: np.ndarray, models: Mapping[str, np.ndarray]
) -> dict[str, dict[str, float | int | None]]:
    """Which signals the reference score follows: per model, the Spearman rank correlation of its
    score with the reference's over all rows, and the mean within-user Spearman over the users
    whose rows vary in both scores (None where none do: a score constant within each user ranks no
    user's candidates). Vectorised like the metrics above; equal to ``scipy.stats.spearmanr`` over
    all rows and per user (tests/test_eval_stage.py)."""
    from scipy.stats import rankdata

    ref = np.asarray(reference, np.float64)
    ref_all, ref_user = rankdata(ref), midranks_within(rows.uidx, ref)
    out: dict[str, dict[str, float | int | None]] = {}
    for name, score in models.items():
        s = np.asarray(score, np.float64)
        overall = np.corrcoef(ref_all, rankdata(s))[0, 1] if np.ptp(s) > 0 and np.ptp(ref) > 0 else np.nan
        per_user = _pearson_by_user(ref_user, midranks_within(rows.uidx, s), rows.uidx, rows.n_users)
        fin = per_user[np.isfinite(per_user)]
        out[name] = {
            "spearman": float(overall) if np.isfinite(overall) else None,
            "spearman_within_user": float(fin.mean()) if len(fin) else None,
            "users": int(len(fin)),
        }
    return out
