"""The whole pipeline on a small subset on a real local Ray: exact artifacts, then a rerun that skips."""

from __future__ import annotations

import os

import pytest

from thinkrec import pipeline
from thinkrec.data import schema as S
from thinkrec.io.commit import MANIFEST, SUCCESS, read_table
from thinkrec.io.fs import Storage

pytestmark = pytest.mark.integration

COMMITTED = [
    "prepare/interactions",
    "prepare/items",
    "prepare/users",
    "keywords/keywords",
    "cf/model",
    "cf/scores",
    "reason/traces",
    "train",
    "score/scores",
    "explain/explanations",
    "report",
]


@pytest.fixture(scope="module")
def run(pipeline_run):
    return pipeline_run


def _mtimes(root: str) -> dict[str, int]:
    out = {}
    for d, _, files in os.walk(root):
        if "_ray" in d:  # Ray Train's own experiment state
            continue
        for f in files:
            out[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
    return out


def test_every_stage_committed(run):
    cfg, _ = run
    st = Storage.from_config(cfg)
    for rel in COMMITTED:
        assert st.exists(st.uri(rel, SUCCESS)), rel
        assert st.exists(st.uri(rel, MANIFEST)), rel


def test_artifacts(run):
    cfg, out = run
    st = Storage.from_config(cfg)
    root = cfg.storage.output_root
    inter = read_table(st, st.uri("prepare/interactions")).to_pandas()
    n_test = int((inter[S.SPLIT] == "test").sum())
    scores = read_table(st, st.uri("score/scores")).to_pandas()
    assert len(scores) == n_test
    assert scores[[S.USER_ID, S.ITEM_ID]].duplicated().sum() == 0
    assert scores[S.P_YES].between(0, 1).all() and scores[S.SCORE].notna().all()
    assert scores[S.VERSION].nunique() == 1
    cf_scores = read_table(st, st.uri("cf/scores")).to_pandas()
    assert len(cf_scores) == int(inter[S.SPLIT].isin(["valid", "test"]).sum())
    adapters = sorted(os.listdir(os.path.join(root, "train", "adapters")))
    assert adapters == ["expert-0", "expert-1", "global"]  # train.n_groups = 2
    for name in adapters:
        files = set(os.listdir(os.path.join(root, "train", "adapters", name)))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert os.path.exists(os.path.join(root, "train", "projector.safetensors"))
    assert os.path.exists(os.path.join(root, "train", "fusion.json"))
    expl = read_table(st, st.uri("explain/explanations")).to_pandas()
    assert len(expl) == cfg.explain.n_samples
    metrics = out["metrics"]
    assert metrics["rows"]["test"] == metrics["rows"]["evaluated"] == n_test
    for model in ("cf_mf", "cf_mf_nobias", "item_rate", "history_rate", "logistic", "thinkrec"):
        m = metrics["metrics"]["all"][model]
        assert 0.0 <= m["metrics"]["auc"]["value"] <= 1.0, model
        assert m["metrics"]["auc"]["lo"] <= m["metrics"]["auc"]["value"] <= m["metrics"]["auc"]["hi"]
        assert m["counts"]["rows"] == n_test, model
    for f in ("metrics.json", "report.md", "report.html"):
        assert os.path.exists(os.path.join(root, "report", f))
    with open(os.path.join(root, "report", "report.md")) as f:
        report = f.read()
    assert "grounded" in report
    # The resolved config is written into every output directory.
    for rel in COMMITTED:
        assert st.exists(st.uri(rel, "_config.json")), rel


def test_rerun_skips_everything(run):
    cfg, first = run
    before = _mtimes(cfg.storage.output_root)
    second = pipeline.run(cfg)
    assert _mtimes(cfg.storage.output_root) == before
    assert second["metrics"]["metrics"] == first["metrics"]["metrics"]


def test_summary_prints_headline_metrics():
    def model(auc, uauc, rows):
        return {"metrics": {"auc": {"value": auc}, "uauc": {"value": uauc}}, "counts": {"rows": rows}}

    doc = {
        "metrics": {"all": {"cf_mf": model(0.7, 0.65, 10), "thinkrec": model(0.71, None, 10)}},
        "strongest_baseline": {"model": "cf_mf", "thinkrec_margin": {"diff": 0.01}},
        "explanations": {"bleu4": 0.0123, "rouge_l_f": 0.25, "meteor": 0.5, "with_reference": 8},
    }
    text = pipeline.summary("runs/x/report", doc, {"prepare": 1.0}, 2.0)
    assert "runs/x/report/report.html" in text
    assert "cf_mf: AUC 0.7000  UAUC 0.6500  (10 test rows)" in text
    assert "thinkrec: AUC 0.7100  UAUC n/a" in text
    assert "strongest baseline cf_mf: ThinkRec AUC margin +0.0100" in text
    assert "explanations: BLEU-4 0.0123  ROUGE-L F 0.2500  METEOR 0.5000  (8 rows with a reference)" in text
    assert "explanations" not in pipeline.summary("r", {"metrics": {}}, {}, 1.0)
