"""The ablation runner: variants on one split in one table, the shared upstream stages run once; and
the storage pieces it relies on (fingerprints that survive moving a run, copies that publish
_SUCCESS last)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from thinkrec import ablation
from thinkrec.io.commit import MANIFEST, SUCCESS, TableWriter, fingerprint, is_complete
from thinkrec.io.fs import Storage

META = {"config_hash": "c", "input_hash": "i"}


def _committed_table(root: str) -> Storage:
    storage = Storage(root)
    w = TableWriter(storage, storage.uri("t"), num_shards=2, meta=META)
    w.write([pa.table({"user_id": [1, 2, 3], "x": [0.5, 0.25, 1.0]})])
    w.commit(rows_in=3)
    return storage


def _mtimes(root) -> dict[str, int]:
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(root)
        if "_ray" not in d and os.path.basename(d) != "report"  # Ray Train's experiment state
        for f in files
    }


def test_copied_table_keeps_its_fingerprint(tmp_path):
    """A run directory copied elsewhere is complete there, and what read it hashes the same."""
    a = _committed_table(str(tmp_path / "a"))
    b = Storage(str(tmp_path / "b"))
    n = a.copy_tree(a.uri("t"), b.uri("t"))
    assert n == sum(len(files) for _, _, files in os.walk(tmp_path / "a" / "t")) and n >= 4
    assert is_complete(b, b.uri("t"), META)
    assert b.read_json(b.uri("t", MANIFEST)) == a.read_json(a.uri("t", MANIFEST))
    assert fingerprint({"s": 1}, [a.uri("t")], a) == fingerprint({"s": 1}, [b.uri("t")], b)
    # ...while a different input table still changes the hash.
    a.copy_tree(a.uri("t"), a.uri("t2"))
    assert fingerprint({"s": 1}, [a.uri("t2")], a) != fingerprint({"s": 1}, [a.uri("t")], a)


def test_copy_cut_short_shows_no_success(tmp_path, monkeypatch):
    a = _committed_table(str(tmp_path / "a"))
    copied: list[str] = []
    real = pafs.copy_files

    def copy_then_fail(src, dst, **kw):
        if len(copied) == 2:
            raise OSError("disk full")
        copied.append(os.path.basename(src))
        real(src, dst, **kw)

    monkeypatch.setattr(pafs, "copy_files", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        a.copy_tree(a.uri("t"), str(tmp_path / "b" / "t"))
    assert len(copied) == 2 and SUCCESS not in copied
    assert not os.path.exists(tmp_path / "b" / "t" / SUCCESS)


@pytest.mark.integration
def test_two_variants_share_upstream_and_fill_the_table(pipeline_run, tmp_path, caplog):
    """The session's pipeline run is the ThinkRec variant (the demo's defaults) moved into an
    ablation root: it is found complete there and nothing of it reruns; the TALLRec-style variant
    reuses its upstream stages and trains its own model."""
    run_cfg, _ = pipeline_run
    cfg = run_cfg.replace(
        **{"storage.output_root": str(tmp_path), "ablation.variants": ["thinkrec", "tallrec"]}
    )
    first = tmp_path / "ablation" / "thinkrec"
    shutil.copytree(run_cfg.storage.output_root, first)
    before = _mtimes(first)
    with caplog.at_level(logging.INFO):
        rows = ablation.run(cfg)
    # The moved run was complete: no table rewritten or added (evaluate always rewrites the report).
    assert _mtimes(first) == before
    assert "train: up to date, skipped" in caplog.text
    assert list(rows) == ["thinkrec", "tallrec"]
    for r in rows.values():
        assert 0.0 <= r["thinkrec"]["auc"] <= 1.0 and 0.0 <= r["mf"]["auc"] <= 1.0
    # Same split and the same MF scores: the second variant reused the first's upstream outputs...
    assert rows["tallrec"]["mf"] == rows["thinkrec"]["mf"]
    for stage in ("prepare", "cf"):
        assert f"{stage}: up to date, skipped" in caplog.text
    assert "ablation: reused prepare" in caplog.text
    # ...and still trained its own model (CF tokens change the model, so the scores differ).
    assert rows["tallrec"]["thinkrec"] != rows["thinkrec"]["thinkrec"]
    table = (tmp_path / "ablation" / "comparison.md").read_text()
    assert "| tallrec | False | False | False |" in table and "| thinkrec | True | True | True |" in table
    # The runner's `thinkrec compare` over the variants: paired intervals, tallrec against thinkrec.
    cmp = json.loads((tmp_path / "ablation" / "compare" / "comparison.json").read_text())
    assert cmp["reference"] == "thinkrec" and set(cmp["models"]) == {"thinkrec", "tallrec"}
    assert {"diff", "lo", "hi"} <= set(cmp["models"]["tallrec"]["vs_reference"]["auc"])
    assert "| tallrec |" in (tmp_path / "ablation" / "compare" / "comparison.md").read_text()
    root = Storage(str(tmp_path))
    assert root.exists(root.uri("ablation", "tallrec", "train", SUCCESS))


@pytest.mark.integration
def test_without_experts_is_scored_from_the_thinkrec_model(pipeline_run, tmp_path, caplog):
    """With ThinkRec in the run, ThinkRec-without-experts is its trained model with the global adapter
    alone: the train output is copied (a partial one left in its root replaced), never retrained, and
    every row is scored by the global adapter where ThinkRec's gate routes some rows to experts."""
    from thinkrec.io.commit import read_table
    from thinkrec.scoring import stage as score_stage

    run_cfg, _ = pipeline_run
    variants = ["thinkrec-no-experts", "thinkrec"]
    cfg = run_cfg.replace(**{"storage.output_root": str(tmp_path), "ablation.variants": variants})
    assert ablation.derived_from("thinkrec-no-experts", variants) == "thinkrec"
    assert ablation.derived_from("thinkrec-no-experts", ["thinkrec-no-experts"]) is None
    alone = ablation.variant_config(cfg, "thinkrec-no-experts")
    assert alone.train.experts is False and alone.fusion.mode == "thinkrec"
    shutil.copytree(run_cfg.storage.output_root, tmp_path / "ablation" / "thinkrec")
    stale = tmp_path / "ablation" / "thinkrec-no-experts" / "train" / "_phases"
    stale.mkdir(parents=True)  # an interrupted training of its own, from before
    with caplog.at_level(logging.INFO):
        rows = ablation.run(cfg)
    assert list(rows) == variants  # the table in the configured order
    assert "ablation: thinkrec-no-experts scores thinkrec's trained model" in caplog.text
    assert "ablation: reused train" in caplog.text and not stale.exists()
    assert "train: phase" not in caplog.text  # nothing trained
    root = Storage(str(tmp_path))
    man = {v: root.read_json(root.uri("ablation", v, "train", MANIFEST)) for v in variants}
    assert man["thinkrec-no-experts"]["config_hash"] == man["thinkrec"]["config_hash"]
    gates = {}
    for v in variants:
        vcfg = ablation.variant_config(cfg, v, None, ablation.derived_from(v, variants))
        t = read_table(root, score_stage.output_uri(vcfg, Storage.from_config(vcfg)))
        gates[v] = set(t.column("gate").to_pylist())
    assert gates["thinkrec-no-experts"] == {"global"} and gates["thinkrec"] != {"global"}
    table = (tmp_path / "ablation" / "comparison.md").read_text()
    assert "| thinkrec-no-experts | True | True | False |" in table


def _seed_run(auc: float, uauc: float, mf: float, item: float) -> dict:
    return {
        "thinkrec": {"auc": auc, "uauc": uauc, "rows": 10},
        "mf": {"auc": mf, "uauc": 0.7, "rows": 10},
        "baselines": {"item_rate": {"auc": item, "uauc": 0.69, "rows": 10}},
        "timings": {"train": 1.0},
    }


def test_seeds_give_mean_and_spread_and_the_ordering(tmp_path):
    """Several seeds: each variant's root is per seed, and the table's means, sample sds, strongest
    baseline, margins and the paper's ordering follow from the per-seed metrics (no pipeline run)."""
    from thinkrec.config import Config

    cfg = Config().replace(**{"storage.output_root": str(tmp_path), "ablation.seeds": [3, 4]})
    v = ablation.variant_config(cfg, "collm", 4)
    assert v.seed == 4 and v.storage.output_root.endswith("ablation/seed-4/collm")
    # CoLLM-style reads the CF vectors alone; the ThinkRec variants add the history summary.
    assert v.model.cf_history is False and ablation.variant_config(cfg, "thinkrec").model.cf_history
    assert ablation.variant_config(cfg, "collm").storage.output_root.endswith("ablation/collm")
    runs = {
        "thinkrec": [_seed_run(0.72, 0.61, 0.70, 0.69), _seed_run(0.74, 0.63, 0.70, 0.69)],
        "tallrec": [_seed_run(0.60, 0.52, 0.70, 0.69), _seed_run(0.80, 0.56, 0.70, 0.69)],
    }
    rows = {name: ablation.summarise({"3": r3, "4": r4}) for name, (r3, r4) in runs.items()}
    assert rows["thinkrec"]["thinkrec"]["auc"] == pytest.approx(0.73)
    sp = rows["tallrec"]["spread"]["thinkrec"]["auc"]
    assert sp["mean"] == pytest.approx(0.70) and sp["sd"] == pytest.approx(0.1414213, abs=1e-6)
    assert (sp["min"], sp["max"], sp["n"]) == (0.60, 0.80, 2)
    text = ablation.table(cfg, rows, [3, 4])
    assert "seeds 3, 4: mean ± sample sd" in text
    assert "| thinkrec | True | True | True | 0.7300 ± 0.0141 | 0.6200 ± 0.0141 | 0.7000 ± 0.0000 |" in text
    assert "| item_rate | 0.6900 ± 0.0000 | 0.6900 ± 0.0000 |" in text
    assert "Strongest baseline by AUC: item_rate" in text and "- thinkrec: AUC margin to it +0.0400" in text
    # thinkrec 0.73 over tallrec 0.70: the ordering of these two holds; swapped, it does not.
    assert "(thinkrec > tallrec): holds" in text and "started over" not in text
    # A seed whose stage 2 stalled and started over is named under the table.
    rows["thinkrec"]["seeds"]["4"]["curves"] = {"global": {"loss": [1.0]}, "projector": {"restarts": [{}]}}
    assert "started over (train.projector_restarts) in: thinkrec seed 4 (projector 1x)." in ablation.table(
        cfg, rows, [3, 4]
    )
    rows["tallrec"]["spread"]["thinkrec"]["auc"]["mean"] = 0.75
    assert "does not hold here. Measured (mean AUC): tallrec 0.7500 > thinkrec 0.7300" in ablation.table(
        cfg, rows, [3, 4]
    )
