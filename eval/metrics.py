"""Offline metrics: AUC, UAUC (mean per-user AUC) and ranking metrics inside each user's rows.

AUC and NDCG come from scikit-learn. HR@k and MAP@k are written here because scikit-learn has no
cut-off variant of either (``average_precision_score`` ranks every row, ``top_k_accuracy_score`` is
for multi-class labels); both are a few lines over one shared ranking, so all three ranking metrics
see the same order of a user's rows.

Ranking convention: a user's rows are sorted by score, highest first; ties keep the input order
(a stable sort), so results are deterministic. Only users with at least one positive row are ranked
(HR, NDCG and AP are undefined without a relevant item); the count of such users is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import ndcg_score, roc_auc_score


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC over all rows; nan when the labels hold only one class (AUC is undefined there)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def _groups(user_ids: np.ndarray) -> list[np.ndarray]:
    """Row indices of each user, users in ascending id order, rows in input order."""
    order = np.argsort(user_ids, kind="stable")
    uniq, start = np.unique(user_ids[order], return_index=True)
    return np.split(order, start[1:]) if len(uniq) else []


def _arrays(
    user_ids: Sequence[Any] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, y, s = np.asarray(user_ids), np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if not (u.shape == y.shape == s.shape) or u.ndim != 1:
        raise ValueError(
            f"user_ids {u.shape}, labels {y.shape} and scores {s.shape} must be equal 1-d shapes"
        )
    return u, y, s


def uauc(
    user_ids: Sequence[Any] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
) -> tuple[float, int]:
    """(mean per-user AUC over users whose rows hold both classes, number of such users).
    nan and 0 when no user has both classes."""
    u, y, s = _arrays(user_ids, labels, scores)
    per_user = [auc(y[idx], s[idx]) for idx in _groups(u)]
    counted = [a for a in per_user if not math.isnan(a)]
    return (float(np.mean(counted)) if counted else float("nan")), len(counted)


def _user_ranking(y: np.ndarray, s: np.ndarray, k: int) -> tuple[float, float, float]:
    """(HR@k, NDCG@k, AP@k) of one user's rows (y binary, at least one positive)."""
    order = np.argsort(-s, kind="stable")  # best first, ties in input order
    rel = (y[order] > 0).astype(np.float64)  # relevance in ranked order
    top = rel[:k]
    hr = float(top.any())
    # AP@k = (1 / min(k, #positives)) * sum over ranks i <= k of precision@i at each relevant rank.
    hits = np.cumsum(top)
    ranks = np.arange(1, len(top) + 1)
    ap = float(np.sum(top * hits / ranks) / min(k, rel.sum()))
    # sklearn's NDCG averages over tied scores; rank-derived scores (strictly decreasing in our
    # order) make it score exactly the stable order used for HR and AP. A single row has NDCG 1
    # when relevant, which sklearn refuses to compute (it needs >= 2 documents).
    if len(rel) == 1:
        ndcg = 1.0
    else:
        ndcg = float(ndcg_score(rel[None, :], np.arange(len(rel), 0, -1, dtype=np.float64)[None, :], k=k))
    return hr, ndcg, ap


def ranking_metrics(
    user_ids: Sequence[Any] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    k_values: Sequence[int] = (1, 3, 5, 10),
) -> dict[str, float | int]:
    """HR@k, NDCG@k and MAP@k averaged over users with at least one positive row, plus
    ``ranking_users`` (that count). Keys: ``hr@1``, ``ndcg@1``, ``map@1``, ... (nan when no user counts)."""
    u, y, s = _arrays(user_ids, labels, scores)
    if any(int(k) < 1 for k in k_values):
        raise ValueError(f"k_values must be >= 1, got {list(k_values)}")
    sums = {f"{m}@{k}": 0.0 for k in k_values for m in ("hr", "ndcg", "map")}
    n = 0
    for idx in _groups(u):
        if not (y[idx] > 0).any():
            continue
        n += 1
        for k in k_values:
            hr, ndcg, ap = _user_ranking(y[idx], s[idx], int(k))
            sums[f"hr@{k}"] += hr
            sums[f"ndcg@{k}"] += ndcg
            sums[f"map@{k}"] += ap
    out: dict[str, float | int] = {key: (v / n if n else float("nan")) for key, v in sums.items()}
    out["ranking_users"] = n
    return out


def all_metrics(
    user_ids: Sequence[Any] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    k_values: Sequence[int] = (1, 3, 5, 10),
) -> dict[str, float | int]:
    """AUC, UAUC, users counted by UAUC, rows, and the ranking metrics, in one flat dict."""
    u, y, s = _arrays(user_ids, labels, scores)
    ua, n_users = uauc(u, y, s)
    return {
        "rows": len(y),
        "positives": int((y > 0).sum()),
        "auc": auc(y, s),
        "uauc": ua,
        "uauc_users": n_users,
        **ranking_metrics(u, y, s, k_values),
    }
