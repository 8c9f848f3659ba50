"""User grouping on CF embeddings (ThinkRec stage 3) and the group prototypes used by the gate.

Pure functions over numpy arrays; the train stage calls them on the train users' MF embeddings.

- ``group_users``: standardise (``StandardScaler``), then k-means or Ward agglomerative clustering.
  With ``n_groups=None`` the number of groups is the k in 2..10 with the best silhouette (computed on
  the standardised embeddings), for either method. Group ids are ordered by size (largest first,
  ties by the smallest member index), so they do not depend on the clustering's internal numbering.
- The report holds the group sizes, the silhouette of every k tried, and Cohen's d between every
  pair of groups **on the first principal component** of the standardised embeddings (the axis of
  largest spread, so one number per pair; d = |mean_a - mean_b| / pooled standard deviation), plus
  their mean. The paper finds more separated groups (larger d) help the experts.
- ``prototypes``: the mean RAW (not standardised) CF embedding of each group's users, which is what
  the gate in thinkrec/model/fusion.py compares a user's raw embedding with.
- ``group_train_users``: the above on a full CF user table, fitted on train users only; every other
  user (cold, padding) gets group -1 (no group).
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

Method = Literal["kmeans", "ward"]
K_RANGE = range(2, 11)
"""Group counts tried when ``n_groups`` is None (the paper's 2..10)."""
NO_GROUP = -1


def _cluster(x: np.ndarray, method: Method, k: int, seed: int) -> np.ndarray:
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Group ids by size, largest first; ties broken by the group's first member index."""
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(ids)), key=lambda j: (-counts[j], first[j]))
    mapping = np.empty(ids.max() + 1, dtype=np.int64)
    for new, j in enumerate(order):
        mapping[ids[j]] = new
    return mapping[labels]


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """|mean(a) - mean(b)| / pooled sd of two 1-d samples; nan when a group has < 2 members or the
    pooled sd is 0."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return float("nan")
    pooled = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
    if pooled <= 0:
        return float("nan")
    return float(abs(a.mean() - b.mean()) / np.sqrt(pooled))


def _separation(x: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Cohen's d between each pair of groups on the first principal component of x (standardised)."""
    groups = sorted(set(labels.tolist()))
    if len(groups) < 2:
        return {"cohens_d_pairs": {}, "cohens_d_mean": float("nan")}
    pc1 = PCA(n_components=1).fit_transform(x)[:, 0]  # (n,)
    pairs = {
        f"{a}-{b}": cohens_d(pc1[labels == a], pc1[labels == b]) for a, b in itertools.combinations(groups, 2)
    }
    finite = [d for d in pairs.values() if np.isfinite(d)]
    return {"cohens_d_pairs": pairs, "cohens_d_mean": float(np.mean(finite)) if finite else float("nan")}


def group_users(
    emb: np.ndarray, method: Method = "kmeans", n_groups: int | None = None, seed: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Cluster users by their CF embeddings.

    emb: (n, d) embeddings of the users to group (train users only). Returns (labels (n,) int64 in
    0..k-1, report). The report: method, n_groups, chosen_by ("given" or "silhouette"), sizes (list,
    per group id), silhouette (dict k -> score, every k tried; the chosen k's only when given),
    cohens_d_pairs ("a-b" -> d on PC1), cohens_d_mean."""
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"group_users: emb must be a non-empty (n, d) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("group_users: emb holds NaN or infinite values")
    if method not in ("kmeans", "ward"):
        raise ValueError(f"group_users: method must be 'kmeans' or 'ward', got {method!r}")
    n = x.shape[0]
    if n_groups is not None and not 1 <= n_groups <= n:
        raise ValueError(f"group_users: n_groups={n_groups} must be in 1..{n} (the number of users)")
    z = StandardScaler().fit_transform(x)  # (n, d); constant dims become 0

    silhouette: dict[int, float] = {}
    if n_groups is None:
        # Silhouette needs 2 <= k <= n - 1; distinct points bound k too (k-means cannot make more
        # non-empty clusters than there are distinct points).
        distinct = len(np.unique(z, axis=0))
        ks = [k for k in K_RANGE if k <= min(n - 1, distinct)]
        if not ks:
            raise ValueError(
                f"group_users: {n} users ({distinct} distinct embeddings) are too few to choose a group "
                "count by silhouette; give n_groups"
            )
        fits = {}
        for k in ks:
            fits[k] = _cluster(z, method, k, seed)
            silhouette[k] = float(silhouette_score(z, fits[k]))
        # Best silhouette; ties go to the smaller k (fewer, larger groups).
        k = max(ks, key=lambda kk: (silhouette[kk], -kk))
        labels = fits[k]
        chosen_by = "silhouette"
    else:
        k = n_groups
        labels = np.zeros(n, dtype=np.int64) if k == 1 else _cluster(z, method, k, seed)
        if 1 < k < n:
            silhouette[k] = float(silhouette_score(z, labels))
        chosen_by = "given"
    labels = _relabel(np.asarray(labels, dtype=np.int64))
    report = {
        "method": method,
        "n_groups": int(labels.max()) + 1,
        "chosen_by": chosen_by,
        "sizes": np.bincount(labels).tolist(),
        "silhouette": {str(kk): v for kk, v in silhouette.items()},
        **_separation(z, labels),
    }
    return labels, report


def prototypes(raw_emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean RAW CF embedding of each group: (n, d), (n,) -> (G, d), G = max label + 1. Rows with a
    negative label (no group) are ignored; a group id with no member is an error."""
    x = np.asarray(raw_emb, dtype=np.float64)
    lab = np.asarray(labels)
    if x.ndim != 2 or lab.shape != (x.shape[0],):
        raise ValueError(f"prototypes: raw_emb {x.shape} and labels {lab.shape} do not match")
    keep = lab >= 0
    if not keep.any():
        raise ValueError("prototypes: no row has a group")
    G = int(lab[keep].max()) + 1
    counts = np.bincount(lab[keep], minlength=G)
    if (counts == 0).any():
        raise ValueError(f"prototypes: groups {np.flatnonzero(counts == 0).tolist()} have no member")
    sums = np.zeros((G, x.shape[1]))
    np.add.at(sums, lab[keep], x[keep])
    return sums / counts[:, None]


def group_train_users(
    user_table: np.ndarray,
    train_user_ids: np.ndarray,
    method: Method = "kmeans",
    n_groups: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Group the train users of a CF user table.

    user_table: (U+1, d) raw CF embeddings indexed by user id (row 0 padding). train_user_ids: the
    ids seen in train. Returns (group per user id (U+1,), -1 for users not in train; prototypes
    (G, d) of the raw embeddings; report with ``train_users`` added)."""
    table = np.asarray(user_table)
    ids = np.unique(np.asarray(train_user_ids, dtype=np.int64))
    bad = ids[(ids <= 0) | (ids >= len(table))]
    if len(bad):
        raise ValueError(f"group_train_users: user ids {bad[:5].tolist()} outside 1..{len(table) - 1}")
    labels, report = group_users(table[ids], method, n_groups, seed)
    groups = np.full(len(table), NO_GROUP, dtype=np.int64)
    groups[ids] = labels
    report["train_users"] = len(ids)
    return groups, prototypes(table[ids], labels), report
