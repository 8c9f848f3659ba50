"""eval/metrics.py (the sklearn-based reference implementations) against hand-computed values.
The vectorised engine and the evaluate stage are tested in tests/test_eval_stage.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from eval import metrics as M

L3 = math.log2(3)  # DCG discount at rank 2
L5 = math.log2(5)  # DCG discount at rank 4


@pytest.mark.parametrize(
    "labels, scores, expected",
    [
        ([0, 1], [0.1, 0.9], 1.0),
        ([1, 0], [0.1, 0.9], 0.0),
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1], [0.5, 0.5], 0.5),  # a tie counts half
        ([1, 1, 1], [0.1, 0.2, 0.3], math.nan),  # one class: undefined
        ([0], [0.3], math.nan),
    ],
)
def test_auc(labels, scores, expected):
    got = M.auc(labels, scores)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "users, labels, scores, expected, n",
    [
        # a: perfect (1.0), b: reversed (0.0), c: one class only (not counted)
        ([1, 1, 2, 2, 3, 3], [0, 1, 1, 0, 1, 1], [0.2, 0.8, 0.3, 0.7, 0.1, 0.9], 0.5, 2),
        # rows of one user need not be contiguous: user 1 is [0, 0, 1, 1] vs [.1, .4, .35, .8] = 0.75
        ([1, 2, 1, 1, 1], [0, 1, 0, 1, 1], [0.1, 0.5, 0.4, 0.35, 0.8], 0.75, 1),
        ([1, 2], [1, 0], [0.1, 0.2], math.nan, 0),
    ],
)
def test_uauc(users, labels, scores, expected, n):
    got, counted = M.uauc(users, labels, scores)
    assert counted == n
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        M.auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="shapes"):
        M.uauc([1, 1], [0, 1], [0.2])


# One user, ranked order of labels [0, 1, 0, 1] (scores already descending), 2 positives.
RANKED = ([0, 1, 0, 1], [0.9, 0.8, 0.7, 0.1])


@pytest.mark.parametrize(
    "labels, scores, k, hr, ndcg, ap",
    [
        (*RANKED, 1, 0.0, 0.0, 0.0),
        # DCG@3 = 1/log2(3); IDCG@3 = 1 + 1/log2(3); AP@3 = (1/2) / min(3, 2)
        (*RANKED, 3, 1.0, (1 / L3) / (1 + 1 / L3), 0.25),
        # k beyond the rows: DCG = 1/log2(3) + 1/log2(5); AP = (1/2 + 2/4) / 2
        (*RANKED, 5, 1.0, (1 / L3 + 1 / L5) / (1 + 1 / L3), 0.5),
        # the same rows shuffled give the same numbers (ranking is by score, not input order)
        ([1, 0, 1, 0], [0.1, 0.9, 0.8, 0.7], 3, 1.0, (1 / L3) / (1 + 1 / L3), 0.25),
        # perfect ranking
        ([1, 1, 0], [0.9, 0.8, 0.1], 1, 1.0, 1.0, 1.0),
        ([1, 1, 0], [0.9, 0.8, 0.1], 3, 1.0, 1.0, 1.0),
        # ties keep the input order (stable sort): the first row ranks first
        ([1, 0], [0.5, 0.5], 1, 1.0, 1.0, 1.0),
        ([0, 1], [0.5, 0.5], 1, 0.0, 0.0, 0.0),
        # a single relevant row
        ([1], [0.2], 1, 1.0, 1.0, 1.0),
        # the last of three: DCG = 1/log2(4) = 0.5, IDCG = 1; AP@3 = (1/3) / 1
        ([1, 0, 0], [0.1, 0.5, 0.9], 3, 1.0, 0.5, 1 / 3),
    ],
)
def test_ranking_one_user(labels, scores, k, hr, ndcg, ap):
    got = M.ranking_metrics([7] * len(labels), labels, scores, k_values=(k,))
    assert got["ranking_users"] == 1
    assert got[f"hr@{k}"] == pytest.approx(hr, abs=1e-12)
    assert got[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12)
    assert got[f"map@{k}"] == pytest.approx(ap, abs=1e-12)


def test_ranking_averages_users_with_a_positive():
    # user 1: positive first (all 1.0); user 2: positive last of 2 (hr@1 0, ndcg@3 1/log2(3), ap@3 1/2);
    # user 3: no positive (not counted)
    users = [1, 1, 2, 2, 3, 3]
    labels = [1, 0, 0, 1, 0, 0]
    scores = [0.9, 0.1, 0.9, 0.1, 0.5, 0.4]
    got = M.ranking_metrics(users, labels, scores, k_values=(1, 3))
    assert got["ranking_users"] == 2
    assert got["hr@1"] == pytest.approx(0.5)
    assert got["hr@3"] == pytest.approx(1.0)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / L3) / 2)
    assert got["map@1"] == pytest.approx(0.5)
    assert got["map@3"] == pytest.approx(0.75)


def test_ranking_no_positive_user_is_nan_and_bad_k():
    got = M.ranking_metrics([1, 1], [0, 0], [0.1, 0.2], k_values=(1,))
    assert got["ranking_users"] == 0 and math.isnan(got["hr@1"])
    with pytest.raises(ValueError, match="k_values"):
        M.ranking_metrics([1], [1], [0.1], k_values=(0,))


def test_all_metrics_matches_sklearn_on_random_rows():
    rng = np.random.default_rng(0)
    users = rng.integers(1, 30, size=600)
    labels = rng.integers(0, 2, size=600)
    scores = rng.normal(size=600) + labels * 0.5
    got = M.all_metrics(users, labels, scores)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    per_user = [
        roc_auc_score(labels[users == u], scores[users == u])
        for u in np.unique(users)
        if len(np.unique(labels[users == u])) == 2
    ]
    assert got["uauc"] == pytest.approx(float(np.mean(per_user)), abs=1e-12)
    assert got["uauc_users"] == len(per_user)
    assert got["rows"] == 600 and got["positives"] == int(labels.sum())
    assert set(got) >= {f"{m}@{k}" for m in ("hr", "ndcg", "map") for k in (1, 3, 5, 10)}
    json.dumps(got)  # plain Python numbers only


# -- explanation text metrics ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "explanation, reference, bleu4, rouge_l_f",
    [
        # LCS "the cat on the mat" = 5 of 6 words each: P = R = F = 5/6; no 4-gram in common
        ("the cat sat on the mat", "the cat lay on the mat", 0.0, 5 / 6),
        # p1..p4 = 4/5, 3/4, 2/3, 1/2, equal lengths: BLEU-4 = (1/5) ** (1/4); LCS 4 of 5
        ("a b c d e", "a b c d f", 0.2**0.25, 0.8),
        ("likes long dramas from the nineties", "likes long dramas from the nineties", 1.0, 1.0),
        # case and punctuation are normalised away before both metrics
        ("Likes long dramas, from the NINETIES!", "likes long dramas from the nineties", 1.0, 1.0),
        ("likes long dramas from the nineties", "hates short cartoons of today", 0.0, 0.0),
        # fewer than 4 words: no 4-gram, so BLEU-4 = 0; ROUGE-L P = 1, R = 3/6, F = 2/3
        ("the cat sat", "the cat sat on the mat", 0.0, 2 / 3),
        # every n-gram matches but the explanation is short: brevity penalty exp(1 - 8/5);
        # ROUGE-L P = 1, R = 5/8, F = 10/13
        ("a b c d e", "a b c d e f g h", math.exp(1 - 8 / 5), 10 / 13),
    ],
)
def test_explanation_text_metrics_one_pair(explanation, reference, bleu4, rouge_l_f):
    got = M.explanation_text_metrics([explanation], [reference])
    assert got["rows"] == 1 and got["skipped_no_reference"] == got["skipped_no_explanation"] == 0
    assert got["bleu4"] == pytest.approx(bleu4, abs=1e-6)
    assert got["rouge_l_f"] == pytest.approx(rouge_l_f, abs=1e-6)


def test_explanation_text_metrics_corpus_bleu_and_mean_rouge():
    # BLEU sums n-gram counts over the corpus before dividing: p1..p4 = (6+4)/(6+5), (5+3)/(5+4),
    # (4+2)/(4+3), (3+1)/(3+2), equal total lengths. The mean of the two sentence BLEUs would be
    # (1 + 0.2 ** 0.25) / 2 instead. ROUGE-L is the mean of the per-row F (1 and 4/5).
    got = M.explanation_text_metrics(["u v w x y z", "a b c d e"], ["u v w x y z", "a b c d f"])
    assert got["rows"] == 2
    assert got["bleu4"] == pytest.approx((10 / 11 * 8 / 9 * 6 / 7 * 4 / 5) ** 0.25, abs=1e-6)
    assert got["rouge_l_f"] == pytest.approx((1 + 0.8) / 2, abs=1e-6)


@pytest.mark.parametrize(
    "explanations, references, rows, no_ref, no_expl",
    [
        (["a b c d", "e f g h", "i j k l"], ["a b c d", None, "i j k l"], 2, 1, 0),
        (["a b c d", "e f g h"], [math.nan, "  ,. "], 0, 2, 0),  # NaN and punctuation-only: no reference
        (["a b c d", None, "?!", ""], ["a b c d", "x y", "x y", "x y"], 1, 0, 3),
        ([None, "a b"], [None, ""], 0, 2, 0),  # a missing reference is counted first
    ],
)
def test_explanation_text_metrics_skips_rows_without_both(explanations, references, rows, no_ref, no_expl):
    got = M.explanation_text_metrics(explanations, references)
    assert (got["rows"], got["skipped_no_reference"], got["skipped_no_explanation"]) == (
        rows,
        no_ref,
        no_expl,
    )
    if rows:
        assert got["bleu4"] == pytest.approx(1.0) and got["rouge_l_f"] == pytest.approx(1.0)
    else:
        assert got["bleu4"] is None and got["rouge_l_f"] is None
    json.dumps(got)  # plain Python values only


def test_explanation_text_metrics_empty_input_and_length_mismatch():
    assert M.explanation_text_metrics([], []) == {
        "bleu4": None,
        "rouge_l_f": None,
        "rows": 0,
        "skipped_no_reference": 0,
        "skipped_no_explanation": 0,
    }
    with pytest.raises(ValueError, match="2 explanations but 1 references"):
        M.explanation_text_metrics(["a", "b"], ["a"])


@pytest.mark.parametrize(
    ("texts", "want"),
    [
        (["Yes. the user liked it", "No. the user liked none"], 6 / 8),  # "the user", "user liked" twice
        (["No No No No No"], 1 / 4),
        (["Yes", None, ""], None),  # no bigram at all
    ],
)
def test_distinct_2_by_hand(texts, want):
    from eval.text import distinct_n

    got = distinct_n(texts, 2)
    assert got == (pytest.approx(want) if want is not None else None)
