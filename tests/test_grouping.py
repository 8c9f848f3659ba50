"""User grouping: k chosen by silhouette, k-means/Ward agreement, Cohen's d, prototypes, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from thinkrec.cf.grouping import NO_GROUP, cohens_d, group_train_users, group_users, prototypes


def _blobs(k: int, n_per: int = 25, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k tight, well separated Gaussian blobs (sd 1, centres drawn in a box of side 60)."""
    x, y = make_blobs(
        n_samples=[n_per] * k, n_features=dim, cluster_std=1.0, center_box=(-30, 30), random_state=seed
    )
    return x, y


@pytest.mark.parametrize("method", ["kmeans", "ward"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_silhouette_chooses_true_k(method, k):
    x, y = _blobs(k, seed=k)
    labels, report = group_users(x, method, None, seed=0)
    assert report["n_groups"] == k
    assert report["chosen_by"] == "silhouette"
    assert adjusted_rand_score(y, labels) == 1.0
    # Every k in 2..10 that fits 25k points was tried; the chosen one has the best score.
    assert sorted(int(kk) for kk in report["silhouette"]) == list(range(2, 11))
    assert max(report["silhouette"], key=report["silhouette"].get) == str(k)
    assert report["sizes"] == [25] * k


@pytest.mark.parametrize("k", [2, 4])
def test_kmeans_and_ward_agree_on_separable_data(k):
    x, _ = _blobs(k, seed=10 + k)
    a, _ = group_users(x, "kmeans", k, seed=0)
    b, _ = group_users(x, "ward", k, seed=0)
    assert adjusted_rand_score(a, b) == 1.0


@pytest.mark.parametrize(
    ("case", "low", "high"),
    [
        # Two blobs far apart: groups are many pooled sds apart on the first principal component.
        ("separated", 10.0, math.inf),
        # One isotropic blob cut in two: at most ~2.65 (a 1-d Gaussian split at its median).
        ("one blob split", 0.0, 3.0),
    ],
)
@pytest.mark.parametrize("method", ["kmeans", "ward"])
def test_cohens_d(case, low, high, method):
    if case == "separated":
        x, _ = _blobs(2, n_per=40, seed=3)
    else:
        x = np.random.default_rng(0).normal(size=(80, 8))
    _, report = group_users(x, method, 2, seed=0)
    assert low < report["cohens_d_mean"] < high
    assert list(report["cohens_d_pairs"]) == ["0-1"]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0.0, 2.0], [4.0, 6.0], 4.0 / math.sqrt(2.0)),  # pooled var = 2
        ([1.0, 3.0, 5.0], [1.0, 3.0, 5.0], 0.0),
        ([1.0], [2.0, 3.0], math.nan),  # a group of one has no variance estimate
        ([1.0, 1.0], [2.0, 2.0], math.nan),  # zero pooled sd
    ],
)
def test_cohens_d_values(a, b, expected):
    got = cohens_d(np.array(a), np.array(b))
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_groups_ordered_by_size_and_one_group():
    x = np.concatenate([_blobs(1, n_per=10, seed=1)[0], _blobs(1, n_per=30, seed=2)[0] + 100])
    labels, report = group_users(x, "kmeans", 2, seed=0)
    assert report["sizes"] == [30, 10]
    assert (labels[10:] == 0).all() and (labels[:10] == 1).all()
    labels, report = group_users(x, "ward", 1, seed=0)
    assert (labels == 0).all() and report["sizes"] == [40]
    assert math.isnan(report["cohens_d_mean"]) and report["cohens_d_pairs"] == {}


def test_prototypes_are_raw_means():
    rng = np.random.default_rng(0)
    # Very different scales per dimension: standardised means would differ from raw means.
    raw = rng.normal(size=(9, 3)) * np.array([1.0, 100.0, 0.01]) + np.array([5.0, -50.0, 0.0])
    labels = np.array([0, 1, 0, NO_GROUP, 2, 1, 2, 0, NO_GROUP])
    protos = prototypes(raw, labels)
    assert protos.shape == (3, 3)
    for g in range(3):
        np.testing.assert_allclose(protos[g], raw[labels == g].mean(0), rtol=1e-12)


def test_group_train_users_leaves_others_ungrouped():
    x, y = _blobs(2, n_per=10, dim=4, seed=5)
    table = np.zeros((1 + 20 + 5, 4))  # padding, 20 train users, 5 users seen only after train
    table[1:21] = x
    table[21:] = 1e3  # would form their own group if they were (wrongly) clustered
    train_ids = np.arange(1, 21)
    groups, protos, report = group_train_users(
        table, np.concatenate([train_ids, train_ids[:3]]), "ward", None
    )
    assert groups[0] == NO_GROUP and (groups[21:] == NO_GROUP).all()
    assert adjusted_rand_score(y, groups[1:21]) == 1.0
    assert report["train_users"] == 20 and report["n_groups"] == 2
    np.testing.assert_allclose(protos, prototypes(table[1:21], groups[1:21]))


@pytest.mark.parametrize(
    ("emb", "kwargs", "match"),
    [
        (np.zeros((0, 4)), {}, "non-empty"),
        (np.zeros(5), {}, r"\(n, d\)"),
        (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]), {}, "NaN"),
        (np.ones((4, 2)), {"n_groups": 5}, "n_groups=5"),
        (np.ones((4, 2)), {"n_groups": 0}, "n_groups=0"),
        (np.ones((4, 2)), {"method": "dbscan"}, "dbscan"),
        (np.ones((6, 2)), {}, "too few"),  # identical points: no k to choose by silhouette
        (np.arange(4.0).reshape(2, 2), {}, "too few"),
    ],
)
def test_group_users_errors(emb, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_users(emb, **kwargs)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([0, 2, 0]), r"groups \[1\] have no member"),
        (np.array([NO_GROUP] * 3), "no row has a group"),
        (np.array([0, 1]), "do not match"),
    ],
)
def test_prototypes_errors(labels, match):
    with pytest.raises(ValueError, match=match):
        prototypes(np.ones((3, 2)), labels)


def test_group_train_users_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        group_train_users(np.ones((4, 2)), np.array([0, 1, 2]))
