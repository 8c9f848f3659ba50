"""Offline metrics: AUC, UAUC (mean per-user AUC) and ranking metrics inside each user's rows.

AUC and NDCG come from scikit-learn. HR@k and MAP@k are written here because scikit-learn has no
cut-off variant of either (``average_precision_score`` ranks every row, ``top_k_accuracy_score`` is
for multi-class labels); both are a few lines over one shared ranking, so all three ranking metrics
see the same order of a user's rows.

Ranking convention: a user's rows are sorted by score, highest first; ties keep the input order
(a stable sort), so results are deterministic. Only users with at least one positive row are ranked
(HR, NDCG and AP are undefined without a relevant item); the count of such users is reported.

Explanation text metrics (BLEU-4, ROUGE-L) come from torchmetrics; see ``explanation_text_metrics``.
"""

from __future__ import annotations

import math
import re
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


def normalize_text(text: str) -> str:
    """Lower-cased, every run of characters other than letters and digits made one space, stripped."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def explanation_text_metrics(
    explanations: Sequence[str | None], references: Sequence[str | None]
) -> dict[str, float | int | None]:
    """Word overlap of generated explanations with their reference reasoning, pair by pair.

    Both texts go through ``normalize_text`` first (lower-case; punctuation and other non-alphanumeric
    characters become word breaks), and tokens are the whitespace-separated words of the result, so
    BLEU and ROUGE see the same tokens. A pair is used only when both texts keep at least one word;
    the others are skipped and counted by reason (a missing reference is checked first).

    - ``bleu4``: corpus BLEU-4 (torchmetrics ``bleu_score``, n_gram=4, no smoothing): clipped n-gram
      matches and candidate n-grams summed over all used pairs, geometric mean of the 1..4-gram
      precisions with equal weights, times the brevity penalty of the summed lengths. It is 0 when the
      corpus has no matching 4-gram (for example when every pair is shorter than 4 words).
    - ``rouge_l_f``: mean over used pairs of ROUGE-L F-measure (torchmetrics ``rouge_score``,
      ``rougeL``, no stemmer): LCS length over explanation length (P) and over reference length (R),
      F = 2PR / (P + R).
    - ``rows``: pairs used; ``skipped_no_reference``, ``skipped_no_explanation``: pairs skipped.

    ``bleu4`` and ``rouge_l_f`` are None when no pair is used.
    """
    if len(explanations) != len(references):
        raise ValueError(f"{len(explanations)} explanations but {len(references)} references")
    preds: list[str] = []
    refs: list[str] = []
    no_ref = no_expl = 0
    for expl, ref in zip(explanations, references, strict=True):
        # A missing string is NaN under pandas' str dtype and None under object dtype.
        ref_words = normalize_text(ref) if isinstance(ref, str) else ""
        expl_words = normalize_text(expl) if isinstance(expl, str) else ""
        if not ref_words:
            no_ref += 1
        elif not expl_words:
            no_expl += 1
        else:
            preds.append(expl_words)
            refs.append(ref_words)
    out: dict[str, float | int | None] = {
        "bleu4": None,
        "rouge_l_f": None,
        "rows": len(preds),
        "skipped_no_reference": no_ref,
        "skipped_no_explanation": no_expl,
    }
    if preds:
        # Imported here: torchmetrics takes seconds to import and most callers of this module never
        # need it.
        from torchmetrics.functional.text.bleu import bleu_score
        from torchmetrics.functional.text.rouge import rouge_score

        out["bleu4"] = float(bleu_score(preds, [[r] for r in refs], n_gram=4, smooth=False))
        rouge = rouge_score(preds, refs, rouge_keys=("rougeL",), use_stemmer=False, normalizer=normalize_text)
        out["rouge_l_f"] = float(rouge["rougeL_fmeasure"])
    return out
