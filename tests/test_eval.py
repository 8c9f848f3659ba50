"""eval/metrics.py against hand-computed values, and the evaluate stage on synthetic committed tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from eval import metrics as M
from eval import report
from thinkrec import config as C
from thinkrec.data import schema as S
from thinkrec.io.commit import TableWriter
from thinkrec.io.fs import Storage

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


# -- the evaluate stage on synthetic committed tables ---------------------------------------------
def _write(storage: Storage, rel: str, rows: dict, schema: pa.Schema, extra: dict | None = None) -> None:
    w = TableWriter(storage, storage.uri(rel), num_shards=2, schema=schema, meta={"stage": "test"})
    w.write([pa.table(rows, schema=schema)])
    w.commit(rows_in=len(rows[S.USER_ID]), extra=extra)


def _synthetic_run(root: str, *, seed: int = 0) -> tuple[C.Config, dict]:
    """A committed prepare/interactions, cf/scores, score/scores and reason/traces under ``root``.
    Score has 2 pairs MF lacks and MF has 1 pair score lacks, so the common rows are a strict subset."""
    cfg = C.load("configs/demo.yaml", {"storage.output_root": root, "data.max_users": 12})
    storage = Storage.from_config(cfg)
    rng = np.random.default_rng(seed)
    n_users, per_user = 12, 6
    users = np.repeat(np.arange(1, n_users + 1), per_user).astype(np.int64)
    items = np.tile(np.arange(1, per_user + 1), n_users).astype(np.int64) + users % 3
    labels = rng.integers(0, 2, len(users)).astype(np.int8)
    not_cold = rng.random(len(users)) < 0.7
    n = len(users)
    train_rows = 10
    _write(
        storage,
        "prepare/interactions",
        {
            S.USER_ID: np.concatenate([users, users[:train_rows]]),
            S.ITEM_ID: np.concatenate([items, items[:train_rows] + 100]),
            S.RATING: np.full(n + train_rows, 4.0, np.float32),
            S.LABEL: np.concatenate([labels, labels[:train_rows]]),
            S.TIMESTAMP: np.arange(n + train_rows, dtype=np.int64) + 1_000_000_000,
            S.SPLIT: ["test"] * n + ["train"] * train_rows,
            S.HISTORY_ITEMS: [[1, 2]] * (n + train_rows),
            S.HISTORY_LABELS: [[1, 0]] * (n + train_rows),
            S.NOT_COLD: np.concatenate([not_cold, np.ones(train_rows, bool)]),
        },
        S.INTERACTIONS,
        extra={
            "split_rows": {"train": train_rows, "valid": 0, "test": n},
            "split_cut_timestamps": [1_000_000_000, 1_000_000_010],
        },
    )
    mf = rng.normal(size=n).astype(np.float32) + labels
    cf_keep = np.arange(n) != 5  # MF lacks pair 5
    _write(
        storage,
        "cf/scores",
        {
            S.USER_ID: np.concatenate([users[cf_keep], users[:3]]),
            S.ITEM_ID: np.concatenate([items[cf_keep], items[:3] + 200]),
            S.LABEL: np.concatenate([labels[cf_keep], labels[:3]]),
            S.SPLIT: ["test"] * int(cf_keep.sum()) + ["valid"] * 3,
            S.CF_SCORE: np.concatenate([mf[cf_keep], np.zeros(3, np.float32)]),
        },
        S.CF_SCORES,
    )
    tr = rng.normal(size=n).astype(np.float32) + 1.5 * labels
    gates = np.array(["global", "expert-0", "expert-1", "mix"])[rng.integers(0, 4, n)]
    sc_keep = ~np.isin(np.arange(n), [7, 11])  # ThinkRec lacks pairs 7 and 11
    _write(
        storage,
        "score/scores",
        {
            S.USER_ID: users[sc_keep],
            S.ITEM_ID: items[sc_keep],
            S.LABEL: labels[sc_keep],
            S.SCORE: tr[sc_keep],
            S.P_YES: (1 / (1 + np.exp(-tr[sc_keep]))).astype(np.float32),
            S.GATE: gates[sc_keep],
            S.VERSION: ["v1"] * int(sc_keep.sum()),
        },
        S.SCORES,
    )
    _write(
        storage,
        "reason/traces",
        {
            S.USER_ID: users[:4],
            S.ITEM_ID: items[:4],
            S.TIMESTAMP: np.arange(4, dtype=np.int64),
            S.LABEL: labels[:4],
            S.REASONING: ["because"] * 4,
            S.TEACHER: ["grounded"] * 4,
        },
        S.REASONING_TABLE,
    )
    both = cf_keep & sc_keep
    truth = {
        "users": users[both],
        "labels": labels[both],
        "thinkrec": tr[both],
        "mf": mf[both],
        "not_cold": not_cold[both],
        "gates": gates[sc_keep],
    }
    return cfg, truth


def _per_user_auc(users, labels, scores) -> tuple[float, int]:
    vals = [
        roc_auc_score(labels[users == u], scores[users == u])
        for u in np.unique(users)
        if len(np.unique(labels[users == u])) == 2
    ]
    return float(np.mean(vals)), len(vals)


def test_report_metrics_equal_sklearn_on_common_rows(tmp_path):
    cfg, t = _synthetic_run(str(tmp_path / "run"))
    doc = report.run(cfg)
    out = tmp_path / "run" / "report"
    assert {
        "metrics.json",
        "report.md",
        "report.html",
        "roc.png",
        "score_hist.png",
        "gate_usage.png",
        "_manifest.json",
        "_SUCCESS",
        "_config.json",
    } <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rows"] == {
        "thinkrec": 70,
        "mf_test": 71,
        "common": 69,
        "not_cold": int(t["not_cold"].sum()),
    }
    for subset, mask in (("all", np.ones(len(t["labels"]), bool)), ("not_cold", t["not_cold"])):
        u, y = t["users"][mask], t["labels"][mask]
        for model in ("thinkrec", "mf"):
            m = saved["metrics"][subset][model]
            s = t[model][mask].astype(np.float64)
            assert m["rows"] == int(mask.sum())
            assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
            ua, n = _per_user_auc(u, y, s)
            assert m["uauc"] == pytest.approx(ua, abs=1e-9) and m["uauc_users"] == n
            rank = M.ranking_metrics(u, y, s, (1, 3, 5, 10))
            assert m["ndcg@3"] == pytest.approx(rank["ndcg@3"], abs=1e-9)
    # gate usage counts every scored row
    vals, counts = np.unique(t["gates"], return_counts=True)
    assert saved["gate_usage"]["counts"] == {str(v): int(c) for v, c in zip(vals, counts, strict=True)}
    assert saved["quarantine"]["score/scores"]["rows_quarantined"] == 0
    assert saved["teacher"]["by_teacher"] == {"grounded": 4}
    assert saved["data"]["split_rows"] == {"train": 10, "valid": 0, "test": 72}
    assert saved["config_hash"] == cfg.hash() and doc["config_hash"] == cfg.hash()
    md = (out / "report.md").read_text()
    assert "`grounded` (4)" in md
    assert "tiny random-init" in md
    assert cfg.hash() in md
    assert "not this run" in md and "0.7764" in md  # the paper's numbers, labelled as such
    assert "explain/explanations is absent" in md  # optional input missing: said, not failed
    assert "train/curves.json is absent" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="roc.png"' in html
    # a rerun with the same config and inputs skips itself (report unchanged)
    before = (out / "_manifest.json").read_text()
    assert report.run(cfg)["generated_at"] == saved["generated_at"]
    assert (out / "_manifest.json").read_text() == before


def test_report_with_curves_and_explanations(tmp_path):
    cfg, _ = _synthetic_run(str(tmp_path / "run"), seed=1)
    storage = Storage.from_config(cfg)
    storage.write_json(
        storage.uri("train/curves.json"), {"global": [{"step": i, "loss": 1 / (i + 1)} for i in range(5)]}
    )
    _write(
        storage,
        "explain/explanations",
        {
            S.USER_ID: np.array([1, 2], np.int64),
            S.ITEM_ID: np.array([3, 4], np.int64),
            S.LABEL: np.array([1, 0], np.int8),
            S.EXPLANATION: ["the cat sat on the mat", "dislikes horror"],
            S.REASONING: ["The cat lay on the mat.", None],
            **{c: ["x", "y"] for c in (S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH, S.PROMPT_HASH)},
        },
        S.EXPLANATIONS,
    )
    report.run(cfg)
    out = tmp_path / "run" / "report"
    assert (out / "curves.png").stat().st_size > 1000
    saved = json.loads((out / "metrics.json").read_text())["explanations"]
    assert saved == {
        "rows": 2,
        "with_reference": 1,
        "text_metrics": {
            "bleu4": 0.0,  # one pair, no 4-gram in common
            "rouge_l_f": pytest.approx(5 / 6, abs=1e-6),
            "rows": 1,
            "skipped_no_reference": 1,
            "skipped_no_explanation": 0,
        },
        "not_computed": report.TEXT_METRICS_NOT_COMPUTED,
    }
    md = (out / "report.md").read_text()
    assert "2 generated explanations, 1 with a reference trace" in md and "the cat sat on the mat" in md
    assert "| BLEU-4 (corpus) | ROUGE-L F (mean over rows) |" in md
    assert "| 0.0000 | 0.8333 | 1 | 1 | 0 |" in md
    assert "METEOR needs WordNet data" in md and "(METEOR, BLEURT) are therefore not reproduced" in md


def test_report_explanations_without_references(tmp_path):
    cfg, _ = _synthetic_run(str(tmp_path / "run"), seed=3)
    storage = Storage.from_config(cfg)
    _write(
        storage,
        "explain/explanations",
        {
            S.USER_ID: np.array([1, 2, 3], np.int64),
            S.ITEM_ID: np.array([3, 4, 5], np.int64),
            S.LABEL: np.array([1, 0, 1], np.int8),
            S.EXPLANATION: ["likes dramas", "dislikes horror", "likes comedies"],
            S.REASONING: [None, None, None],
            **{c: ["x"] * 3 for c in (S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH, S.PROMPT_HASH)},
        },
        S.EXPLANATIONS,
    )
    doc = report.run(cfg)
    assert doc["explanations"]["text_metrics"] == {
        "bleu4": None,
        "rouge_l_f": None,
        "rows": 0,
        "skipped_no_reference": 3,
        "skipped_no_explanation": 0,
    }
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| n/a | n/a | 0 | 3 | 0 |" in md and "BLEU-4 and ROUGE-L are n/a" in md


def test_report_without_scores_names_the_stage(tmp_path):
    cfg = C.load("configs/demo.yaml", {"storage.output_root": str(tmp_path / "empty")})
    with pytest.raises(report.MissingInputError, match="run the score stage"):
        report.run(cfg)
    assert not (tmp_path / "empty" / "report").exists()


def test_report_without_mf_baseline(tmp_path):
    import shutil

    cfg, t = _synthetic_run(str(tmp_path / "run"), seed=2)
    shutil.rmtree(tmp_path / "run" / "cf" / "scores")
    doc = report.run(cfg)
    assert "mf" not in doc["metrics"]["all"] and doc["rows"]["mf_test"] is None
    assert doc["rows"]["common"] == doc["rows"]["thinkrec"] == 70  # every labelled ThinkRec row
    assert "no MF baseline" in (tmp_path / "run" / "report" / "report.md").read_text()
