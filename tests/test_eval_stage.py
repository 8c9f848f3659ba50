"""The vectorised metrics engine against the sklearn-based reference, and the evaluate stage on
synthetic committed tables: same rows for every model, missing-row accounting, baselines, slices,
explanation metrics and the self-contained report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from eval import engine as E
from eval import metrics as M
from eval import stage
from thinkrec import config as C
from thinkrec.data import schema as S
from thinkrec.io.commit import TableWriter, read_table
from thinkrec.io.fs import Storage
from thinkrec.scoring import stage as score_stage

K = (1, 3, 5, 10)


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, True)])
def test_engine_equals_reference_metrics(seed, ties):
    rng = np.random.default_rng(seed)
    n = 2000
    u = rng.integers(0, 150, n)
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + y
    if ties:
        s = np.round(s, 1)  # many tied scores, inside and across users
    p = 1 / (1 + np.exp(-s))
    v = E.ModelStats(E.Rows.build(u, y), s, p, K).value()
    ref = M.all_metrics(u, y, s, K)
    for key in ["auc", "uauc"] + [f"{m}@{k}" for m in ("hr", "ndcg", "map") for k in K]:
        assert v[key] == pytest.approx(ref[key], abs=1e-9), key
    assert v["logloss"] == pytest.approx(log_loss(y, p), abs=1e-9)
    # GAUC: per-user AUC weighted by the user's rows
    aucs, w = [], []
    for uu in np.unique(u):
        m = u == uu
        if len(np.unique(y[m])) == 2:
            aucs.append(roc_auc_score(y[m], s[m]))
            w.append(m.sum())
    assert v["gauc"] == pytest.approx(np.average(aucs, weights=w), abs=1e-9)
    # ECE by hand: 10 equal-width bins
    b = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs(y[b == i].sum() - p[b == i].sum()) for i in range(10)) / n
    assert v["ece"] == pytest.approx(ece, abs=1e-9)


@pytest.mark.parametrize("ties", [False, True])
def test_score_agreement_equals_scipy_spearman(ties):
    """What the report says ThinkRec's score follows: Spearman over all rows and the mean within-user
    Spearman, vectorised, equal to scipy's per user; a score constant within users has none."""
    rng = np.random.default_rng(3)
    n = 1500
    u, y = rng.integers(0, 80, n), rng.integers(0, 2, n)
    ref = rng.normal(size=n)
    near = ref + rng.normal(scale=0.7, size=n)
    if ties:
        ref, near = np.round(ref, 1), np.round(near)  # ties inside users in both scores
    per_user = rng.random(80)[u]  # like history_rate: one value per user
    rows = E.Rows.build(u, y)
    got = E.score_agreement(rows, ref, {"near": near, "per_user": per_user, "same": ref, "flipped": -ref})
    assert got["near"]["spearman"] == pytest.approx(spearmanr(ref, near)[0], abs=1e-9)
    want = [spearmanr(ref[u == k], near[u == k])[0] for k in np.unique(u)]
    want = [w for w in want if np.isfinite(w)]
    assert got["near"]["spearman_within_user"] == pytest.approx(np.mean(want), abs=1e-9)
    assert got["near"]["users"] == len(want)
    assert got["per_user"]["spearman"] == pytest.approx(spearmanr(ref, per_user)[0], abs=1e-9)
    assert got["per_user"]["spearman_within_user"] is None and got["per_user"]["users"] == 0
    assert got["same"]["spearman"] == pytest.approx(1.0) and got["same"][
        "spearman_within_user"
    ] == pytest.approx(1.0)
    assert got["flipped"]["spearman_within_user"] == pytest.approx(-1.0)


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(0)
    n = 1500
    u, y = rng.integers(0, 100, n), rng.integers(0, 2, n)
    good = rng.normal(size=n) + 1.5 * y
    weak = good + rng.normal(scale=2.0, size=n)
    rows = E.Rows.build(u, y)
    models = {"thinkrec": (good, None), "weak": (weak, None)}
    a = E.evaluate_models(rows, models, K, 50, 7, "thinkrec")
    b = E.evaluate_models(rows, models, K, 50, 7, "thinkrec")
    assert a == b  # same seed, same intervals
    auc = a["thinkrec"]["metrics"]["auc"]
    assert auc["lo"] < auc["value"] < auc["hi"] and auc["value"] == pytest.approx(roc_auc_score(y, good))
    d = a["weak"]["vs_reference"]["auc"]
    assert d["diff"] > 0 and d["lo"] > 0 and d["p_le_0"] == 0.0  # clearly better, interval excludes 0
    assert "logloss" not in a["weak"]["metrics"]  # no probability given: no calibration metrics


def _write(storage: Storage, rel: str, rows: dict, schema: pa.Schema, extra: dict | None = None) -> None:
    key = schema.names[0]  # user_id, or item_id for prepare/items
    w = TableWriter(storage, storage.uri(rel), num_shards=2, schema=schema, meta={"stage": "test"}, key=key)
    w.write([pa.table(rows, schema=schema)])
    w.commit(rows_in=len(rows[key]), extra=extra)


# The score stage's own record of its throughput, as its manifest holds it.
THROUGHPUT = score_stage.throughput(70, 3.5, "hf")


# One column per CF model the cf stage trained: MF (with and without biases), LightGCN, SASRec.
CF_SCHEMA = S.cf_scores_schema(["cf_mf", "cf_mf_nobias", "cf_lightgcn", "cf_sasrec"])

# A stage 2 that stalled once and started over (train.projector_restarts): a record, not a series.
STALL = {"attempt": 0, "epochs": 2, "best_auc": 0.51, "below": 0.5722, "positives": 130, "negatives": 126}


def _synthetic_run(root: str, seed: int = 0) -> tuple[C.Config, dict]:
    """prepare/interactions (train, valid, test), cf/scores with cf_mf and cf_mf_nobias, score/scores.
    ThinkRec lacks test rows 7 and 11, MF lacks row 5, so 69 of 72 test rows are evaluated."""
    cfg = C.load(
        "configs/demo.yaml",
        {"storage.output_root": root, "eval.bootstrap_resamples": 30, "eval.slice_resamples": 10},
    )
    storage = Storage.from_config(cfg)
    rng = np.random.default_rng(seed)
    n_users, per_user = 12, 6
    users = np.repeat(np.arange(1, n_users + 1), per_user).astype(np.int64)
    items = np.tile(np.arange(1, per_user + 1), n_users).astype(np.int64) + users % 3
    labels = rng.integers(0, 2, len(users)).astype(np.int8)
    n = len(users)
    ntr, nva = 40, 30
    tr_items = rng.integers(1, 10, ntr)
    tr_labels = rng.integers(0, 2, ntr).astype(np.int8)
    hist = [list(rng.integers(0, 2, rng.integers(0, 12))) for _ in range(n + ntr + nva)]
    not_cold = rng.random(n) < 0.7
    va_users = rng.integers(1, n_users + 1, nva)
    va_items = rng.integers(1, 10, nva)
    _write(
        storage,
        "prepare/interactions",
        {
            S.USER_ID: np.concatenate([users, users[:ntr] + 100, va_users]),
            S.ITEM_ID: np.concatenate([items, tr_items, va_items]),
            S.RATING: np.full(n + ntr + nva, 4.0, np.float32),
            S.LABEL: np.concatenate([labels, tr_labels, rng.integers(0, 2, nva).astype(np.int8)]),
            S.TIMESTAMP: np.arange(n + ntr + nva, dtype=np.int64),
            S.SPLIT: ["test"] * n + ["train"] * ntr + ["valid"] * nva,
            S.HISTORY_ITEMS: [[1] * len(h) for h in hist],
            S.HISTORY_LABELS: hist,
            S.NOT_COLD: np.concatenate([not_cold, np.ones(ntr + nva, bool)]),
        },
        S.INTERACTIONS,
    )
    mf = (rng.normal(size=n) + labels).astype(np.float32)
    cf_keep = np.arange(n) != 5
    other = np.random.default_rng(1)  # its own stream: the draws below stay as they were
    lgcn = (mf * 0.3 + other.normal(size=n)).astype(np.float32)
    sas = (mf * 0.2 + other.normal(size=n)).astype(np.float32)
    _write(
        storage,
        "cf/scores",
        {
            S.USER_ID: users[cf_keep],
            S.ITEM_ID: items[cf_keep],
            S.LABEL: labels[cf_keep],
            S.SPLIT: ["test"] * int(cf_keep.sum()),
            S.CF_SCORE: mf[cf_keep],
            "cf_mf": mf[cf_keep],
            "cf_mf_nobias": (mf[cf_keep] * 0.5 + rng.normal(size=int(cf_keep.sum()))).astype(np.float32),
            "cf_lightgcn": lgcn[cf_keep],
            "cf_sasrec": sas[cf_keep],
        },
        CF_SCHEMA,
    )
    tr = (rng.normal(size=n) + 1.5 * labels).astype(np.float32)
    gates = np.array(["global", "expert-0", "expert-1", "mix:0.60,0.40"])[rng.integers(0, 4, n)]
    sc_keep = ~np.isin(np.arange(n), [7, 11])
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
        extra={"backend": "hf", "throughput": THROUGHPUT},
    )
    # What the train stage leaves beside its checkpoint: the expert groups (the grouping code's own
    # report on random embeddings) and the curves of two phases (loss per step, validation per epoch).
    from thinkrec.cf.grouping import group_users

    _, groups = group_users(rng.normal(size=(40, 4)), n_groups=2, seed=0)
    storage.write_json(storage.uri("train/groups.json"), groups)
    curves = {
        ph: {
            "loss": [float(x) for x in np.linspace(1.0, 0.5, 12) + rng.normal(scale=0.02, size=12)],
            "valid": [{"epoch": e, "step": 6 * e, "auc": 0.5 + 0.05 * e, "uauc": 0.5} for e in (1, 2)],
        }
        for ph in ("global", "expert-0")
    }
    curves["projector"] = {**curves["global"], "restarts": [STALL]}
    storage.write_json(storage.uri("train/curves.json"), curves)
    both = cf_keep & sc_keep
    prior = tr_labels.mean()
    cnt = np.bincount(tr_items, minlength=20)
    pos = np.bincount(tr_items, weights=tr_labels, minlength=20)
    item_rate = (pos[items] + 10 * prior) / (cnt[items] + 10)
    truth = {
        "users": users[both],
        "labels": labels[both],
        "thinkrec": tr[both],
        "cf_mf": mf[both],
        "cf_lightgcn": lgcn[both],
        "cf_sasrec": sas[both],
        "item_rate": item_rate[both],
        "not_cold": not_cold[both],
        "gates": gates[both],
        "gates_scored": gates[sc_keep],  # gate usage counts every test row ThinkRec scored
    }
    return cfg, truth


def test_evaluate_same_rows_baselines_slices_and_report(tmp_path):
    cfg, t = _synthetic_run(str(tmp_path / "run"))
    doc = stage.run(cfg)
    out = tmp_path / "run" / "report"
    files = {p.name for p in out.iterdir()}
    assert {
        "metrics.json",
        "report.md",
        "report.html",
        "roc_pr.png",
        "reliability.png",
        "score_hist.png",
        "slices.png",
        "gate_usage.png",
        "gate_weights.png",
        "group_sizes.png",
        "curves.png",
        "_SUCCESS",
    } <= files
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema"] == stage.SCHEMA_VERSION
    r = saved["rows"]
    assert (r["test"], r["evaluated"]) == (72, 69)
    assert r["by_model"]["thinkrec"] == {"scored": 70, "missing": 2, "outside_test_rows": 0}
    assert r["by_model"]["cf_mf"]["missing"] == 1 and r["by_model"]["item_rate"]["missing"] == 0
    allm = saved["metrics"]["all"]
    assert set(allm) == {
        "thinkrec",
        "cf_mf",
        "cf_mf_nobias",
        "cf_lightgcn",
        "cf_sasrec",
        "item_rate",
        "history_rate",
        "logistic",
    }
    for model in ("thinkrec", "cf_mf", "cf_lightgcn", "cf_sasrec", "item_rate"):
        m = allm[model]
        assert m["counts"]["rows"] == 69
        assert m["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(t["labels"], t[model]), abs=1e-6)
        ref = M.all_metrics(t["users"], t["labels"], t[model].astype(np.float64), K)
        assert m["metrics"]["uauc"]["value"] == pytest.approx(ref["uauc"], abs=1e-6)
        assert m["metrics"]["ndcg@3"]["value"] == pytest.approx(ref["ndcg@3"], abs=1e-6)
        lo, hi = m["metrics"]["auc"]["lo"], m["metrics"]["auc"]["hi"]
        assert lo <= m["metrics"]["auc"]["value"] <= hi
    assert "vs_reference" in allm["cf_mf"] and "vs_reference" not in allm["thinkrec"]
    # Every model, baselines and CF included, has every metric with a 95% interval, and a paired
    # difference to ThinkRec for each; log-loss and ECE of its own probability.
    names = ["auc", "uauc", "gauc", "logloss", "ece"] + [f"{m}@{k}" for m in ("hr", "ndcg", "map") for k in K]
    for model, m in allm.items():
        assert set(m["metrics"]) == set(names), model
        for name in names:
            assert m["metrics"][name]["lo"] is not None and m["metrics"][name]["hi"] is not None, (
                model,
                name,
            )
        if model != "thinkrec":
            assert set(m["vs_reference"]) == set(names), model
    y = t["labels"].astype(np.float64)
    for model, prob in (
        ("thinkrec", 1 / (1 + np.exp(-t["thinkrec"].astype(np.float64)))),
        ("cf_mf", 1 / (1 + np.exp(-t["cf_mf"].astype(np.float64)))),
        ("item_rate", t["item_rate"]),
    ):
        assert allm[model]["metrics"]["logloss"]["value"] == pytest.approx(log_loss(y, prob), abs=1e-5), model
        b = np.minimum((prob * 10).astype(int), 9)
        ece = sum(abs(y[b == i].sum() - prob[b == i].sum()) for i in range(10)) / len(y)
        assert allm[model]["metrics"]["ece"]["value"] == pytest.approx(ece, abs=1e-5), model
    assert saved["bootstrap"]["resamples"] == 30 and saved["bootstrap"]["seed"] == cfg.seed
    assert "exact" in saved["auc_method"] and "error bound" in saved["auc_method"]
    best = saved["strongest_baseline"]
    aucs = {b: allm[b]["metrics"]["auc"]["value"] for b in allm if b != "thinkrec"}
    assert best["model"] == max(aucs, key=aucs.get)
    assert best["thinkrec_margin"]["diff"] == pytest.approx(
        allm["thinkrec"]["metrics"]["auc"]["value"] - aucs[best["model"]]
    )
    assert saved["baselines"]["logistic"]["fitted_on_valid_rows"] == 30
    # What ThinkRec's score follows, beside every other model.
    agree = saved["score_agreement"]
    assert set(agree) == set(allm) - {"thinkrec"}
    assert agree["cf_mf"]["spearman"] == pytest.approx(spearmanr(t["thinkrec"], t["cf_mf"])[0], abs=1e-6)
    for a in agree.values():
        assert -1 <= a["spearman"] <= 1 and 0 <= a["users"] <= len(np.unique(t["users"]))
    assert "What ThinkRec's score follows" in (out / "report.md").read_text()
    sl = saved["slices"]
    assert sl["warm (not_cold)"]["rows"] == int(t["not_cold"].sum())
    assert sl["cold"]["rows"] == int((~t["not_cold"]).sum())
    assert sl["gate: mixture"]["rows"] == int((t["gates"] == "mix:0.60,0.40").sum())
    assert sum(sl[k]["rows"] for k in sl if k.startswith("history")) == 69
    assert sl["user group 0"]["rows"] == int(np.isin(t["gates"], ["expert-0", "mix:0.60,0.40"]).sum())
    assert sum(sl[k]["rows"] for k in sl if k.startswith("items: train count")) == 69  # popularity buckets
    assert sum(sl[k]["rows"] for k in sl if k.startswith("gate: ")) == 69
    assert {k for k in sl if k.startswith("gate: ")} == {
        "gate: global",
        "gate: single expert",
        "gate: mixture",
    }
    for name, s in sl.items():  # every slice: its rows, its users, every model's metrics with intervals
        users = len(np.unique(t["users"]))
        assert 0 < s["users"] <= users and s["rows"] > 0, name
        assert set(s["models"]) == set(allm), name
        auc = s["models"]["thinkrec"]["metrics"]["auc"]
        assert auc["value"] is None or auc["lo"] is not None, name
    g = saved["gates"]
    gs = t["gates_scored"]
    assert g["counts"] == {k: int((gs == k).sum()) for k in np.unique(gs)}
    assert g["max_weight_mean"] == pytest.approx(np.mean(np.where(gs == "mix:0.60,0.40", 0.6, 1.0)))
    assert saved["groups"]["sizes"] and saved["groups"]["cohens_d_mean"] is not None
    assert "global.loss" in saved["training_curves"] and "expert-0.valid.auc" in saved["training_curves"]
    assert not [s for s in saved["training_curves"] if "restarts" in s]
    assert saved["training_restarts"] == {"projector": [STALL]}
    assert (
        saved["score_throughput"]
        == THROUGHPUT
        == {"rows": 70, "wall_s": 3.5, "pairs_per_s": 20.0, "backend": "hf"}
    )
    md = (out / "report.md").read_text()
    assert "Strongest baseline by AUC" in md and "The paper's table (not this run)" in md
    assert "Cohen's d" in md and "![Training curves](curves.png)" in md and "![Gate weights]" in md
    assert "Phase `projector` stalled and started over 1 time(s)" in md and "best validation AUC 0.51" in md
    # The paper's table sits beside ours only where the dataset matches (ML-1M), labelled as the paper's.
    from eval.markdown import render_markdown

    assert "this run AUC" not in md and "not comparable" in md
    ml1m = render_markdown({**saved, "data": {**saved["data"], "dataset": "ml-1m"}}, {})
    ours = allm["thinkrec"]["metrics"]
    assert (
        f"| ThinkRec (paper) | 0.7764 | 0.6775 | {ours['auc']['value']:.4f} | {ours['uauc']['value']:.4f} |"
        in ml1m
    )
    assert "| 70 | 3.5000 | 20.0000 | hf |" in md  # rows, wall seconds, pairs/s, backend
    html = (out / "report.html").read_text()
    assert "<td>20.0000</td>" in html
    assert "data:image/png;base64," in html and 'src="roc_pr.png"' not in html and "http" not in html
    before = (out / "_manifest.json").read_text()
    assert stage.run(cfg)["generated_at"] == doc["generated_at"]  # up to date: skipped
    assert (out / "_manifest.json").read_text() == before


def test_evaluate_explanations(tmp_path):
    cfg, _ = _synthetic_run(str(tmp_path / "run"), seed=1)
    storage = Storage.from_config(cfg)
    titles = {1: "Toy Story (1995)", 2: "Heat (1995)", 3: "Alien (1979)", 4: "Matrix, The (1999)"}
    _write(
        storage,
        "prepare/items",
        {
            S.ITEM_ID: np.array(list(titles), np.int64),
            S.RAW_ITEM_ID: [str(i) for i in titles],
            S.TITLE: list(titles.values()),
            S.KEYWORDS: [[] for _ in titles],
            S.DESCRIPTION: [[] for _ in titles],
        },
        S.ITEMS,
    )
    _write(
        storage,
        "explain/explanations",
        {
            S.USER_ID: np.array([1, 2, 3], np.int64),
            S.ITEM_ID: np.array([2, 3, 4], np.int64),
            S.LABEL: np.array([1, 0, 1], np.int8),
            S.EXPLANATION: [
                "Yes. The user sat on the mat, as in Toy Story and Alien.",
                "No No No No No No",
                "",
            ],
            S.REASONING: ["Yes. The user lay on the mat.", "No. dislikes horror", None],
            **{c: ["x"] * 3 for c in (S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH, S.PROMPT_HASH)},
        },
        S.EXPLANATIONS,
    )
    # The explained rows' histories as prepare/interactions holds them (every history item is item 1).
    inter = read_table(storage, storage.uri("prepare/interactions")).to_pylist()
    hist1 = next(
        r[S.HISTORY_ITEMS] for r in inter if (r[S.USER_ID], r[S.ITEM_ID], r[S.SPLIT]) == (1, 2, "test")
    )
    doc = stage.run(cfg)
    e = doc["explanations"]
    assert e["rows"] == 3 and e["with_reference"] == 2
    assert (
        0 < e["bleu4"] < 1 and 0 < e["rouge_l_f"] < 1 and 0 < e["meteor"] < 1 and 0 < e["bertscore_f1"] <= 1
    )
    assert e["degenerate_share"] == pytest.approx(2 / 3)  # the repeated "No" and the empty one
    assert e["states_answer_share"] == pytest.approx(2 / 3)
    # The stated Yes/No against the score's decision (p_yes >= 0.5) of the two rows that state one.
    sc = read_table(storage, storage.uri("score/scores")).to_pylist()
    p_yes = {(r[S.USER_ID], r[S.ITEM_ID]): r[S.P_YES] for r in sc}
    agree = [int(p_yes[(1, 2)] >= 0.5) == 1, int(p_yes[(2, 3)] >= 0.5) == 0]
    assert e["answer_agrees_share"] == pytest.approx(sum(agree) / 2)
    assert "BLEURT is not computed" in e["bleurt"]
    assert {x["user_id"]: x["degenerate"] for x in e["samples"]} == {1: False, 2: True, 3: True}
    # Named items: row 1 names Toy Story (item 1, in its history when the history is not empty) and
    # Alien (item 3, never in a history); the others name none.
    in_hist = int(1 in hist1)
    assert (e["names_items_share"], e["items_named"]) == (pytest.approx(1 / 3), 2)
    assert e["named_in_history_share"] == pytest.approx(in_hist / 2)
    first = next(x for x in e["samples"] if x["user_id"] == 1)
    assert first["items_named"] == ["toy story", "alien"] and first["items_named_in_history"] == in_hist
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "of the explanations name at least one item" in md and "names toy story, alien" in md


def test_evaluate_without_scores_names_the_stage(tmp_path):
    cfg = C.load("configs/demo.yaml", {"storage.output_root": str(tmp_path / "empty")})
    with pytest.raises(stage.MissingInputError, match="run the score stage"):
        stage.run(cfg)


def test_compare_runs_paired(tmp_path):
    import shutil

    from eval.compare import compare
    from thinkrec import cli

    cfg, t = _synthetic_run(str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cli.main(
        [
            "compare",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "cmp"),
            "--resamples",
            "20",
        ]
    )
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert doc["rows"]["common"] == 70 and doc["reference"] == "a"
    d = doc["models"]["b"]["vs_reference"]["auc"]
    assert d["diff"] == 0 and d["lo"] == 0 and d["hi"] == 0  # identical runs: paired difference exactly 0
    assert "| b |" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert "<table>" in (tmp_path / "cmp" / "comparison.html").read_text()
    with pytest.raises(ValueError, match="at least two"):
        compare([str(tmp_path / "a")], str(tmp_path / "x"))


def test_engine_figures_equal_sklearn_on_100k_rows():
    """The engine's figures on a 100k-row sample equal sklearn's within 1e-6: AUC (roc_auc_score),
    log-loss (log_loss), UAUC and GAUC (roc_auc_score per user) and NDCG@k (ndcg_score over the
    users' rows as one (users, 100) matrix). HR and MAP have no sklearn form; they are checked against
    eval/metrics.py in test_engine_equals_reference_metrics."""
    rng = np.random.default_rng(3)
    n_users, per_user = 1000, 100
    u = np.repeat(np.arange(n_users), per_user)  # (100000,)
    y = rng.integers(0, 2, len(u))
    s = (rng.normal(size=len(u)) + 0.5 * y).astype(np.float32)  # float32 scores, as stored: real ties
    p = 1 / (1 + np.exp(-s.astype(np.float64)))
    v = E.ModelStats(E.Rows.build(u, y), s, p, K).value()
    assert v["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert v["logloss"] == pytest.approx(log_loss(y, p), abs=1e-6)
    Y, Sc = y.reshape(n_users, per_user), s.reshape(n_users, per_user)
    aucs = np.array([roc_auc_score(Y[i], Sc[i]) for i in range(n_users)])
    assert v["uauc"] == pytest.approx(aucs.mean(), abs=1e-6)
    assert v["gauc"] == pytest.approx(aucs.mean(), abs=1e-6)  # every user has 100 rows: the same mean
    for k in K:
        assert v[f"ndcg@{k}"] == pytest.approx(ndcg_score(Y, Sc, k=k), abs=1e-6), k


@pytest.mark.parametrize(
    "text, history, candidate, named, in_history",
    [
        # "Toy Story 2" wins over the "Toy Story" inside it; "the matrix" is "Matrix, The (1999)".
        ("Yes. You liked Toy Story 2 and The Matrix.", [2, 4], 6, ["toy story 2", "the matrix"], 1),
        ("No: unlike Heat, Alien is too dark.", [4], 6, ["heat"], 1),  # the candidate (Alien) is not counted
        ("Yes, it looks up your alley.", [1], 4, [], 0),  # "Up": too short a title to match a word
        ("", [], 1, [], 0),
        ("Yes, like toy story (1995).", [3], 6, ["toy story 1995"], 0),  # named, not in the history
    ],
)
def test_title_index_names_history_items(text, history, candidate, named, in_history):
    from eval import text as T

    index = T.TitleIndex(TITLES)
    got = index.named(text, exclude=candidate)
    assert [g[0] for g in got] == named
    assert sum(bool(g[1] & set(history)) for g in got) == in_history


TITLES = {
    1: "Toy Story (1995)",
    2: "Toy Story 2 (1999)",
    3: "Matrix, The (1999)",
    4: "Heat (1995)",
    5: "Up (2009)",
    6: "Alien (1979)",
}


def test_named_items_shares_on_crafted_explanations():
    from eval import text as T

    rows = [
        ("Yes. You liked Toy Story 2 and The Matrix.", [2, 4], 6),
        ("No: unlike Heat, Alien is too dark.", [4], 6),
        ("Yes, it looks up your alley.", [1], 4),
        ("", [], 1),
        ("Yes, like toy story (1995).", [3], 6),
    ]
    res = T.explanation_metrics(
        [r[0] for r in rows],
        [None] * len(rows),
        history_items=[r[1] for r in rows],
        candidates=[r[2] for r in rows],
        titles=TITLES,
        embeddings=False,
    )
    assert res["names_items_share"] == pytest.approx(3 / 5)  # rows 1, 2 and 5 name an item
    assert res["items_named"] == 4
    assert res["named_in_history_share"] == pytest.approx(2 / 4)  # Toy Story 2 and Heat
    assert [r["items_named_in_history"] for r in res["per_row"]] == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="one entry per explanation"):
        T.explanation_metrics(["x"], [None], history_items=[[1]], candidates=[], titles=TITLES)


def test_histogram_curves_equal_sklearn_at_their_thresholds():
    """ROC points counted per threshold bin equal sklearn's roc_curve when every distinct score is a
    threshold, and precision there equals precision_recall_curve's."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    from eval.plots import curve_counts

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 600)
    s = np.round(rng.normal(size=600) + y, 1)  # ties: fewer distinct scores than thresholds
    fpr, tpr, prec = curve_counts(y, s, thresholds=5000)
    f, t, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f, atol=1e-12)
    np.testing.assert_allclose(tpr, t, atol=1e-12)
    pr, rc, _ = precision_recall_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(prec[1:], pr[:-1][::-1], atol=1e-12)  # sklearn: low thresholds first
    np.testing.assert_allclose(tpr[1:], rc[:-1][::-1], atol=1e-12)


def test_training_curves_split_into_panels_by_kind():
    """Losses, validation metrics and gradient norms each get their own panel (a gradient spike of
    hundreds would flatten the losses and AUCs on one axis); empty panels are left out."""
    from eval.plots import curve_panels, curves

    names = ["global.loss", "global.grad_norm", "global.valid.auc", "projector.valid.uauc", "projector.loss"]
    assert curve_panels(names) == {
        "loss": ["global.loss", "projector.loss"],
        "valid": ["global.valid.auc", "projector.valid.uauc"],
        "grad_norm": ["global.grad_norm"],
    }
    assert list(curve_panels(["global.loss", "global.valid.auc"])) == ["loss", "valid"]
    assert curves({n: ([0.0, 1.0], [1.0, 2.0]) for n in names}).startswith(b"\x89PNG")
