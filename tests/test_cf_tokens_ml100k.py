"""Issue 14 item 2 on real data: with MF's biases in the CF tokens ([p_u, b_u, 1] / [q_i, 1, b_i],
thinkrec/cf/stage.py), the CoLLM-style model (CF tokens, no reasoning, no experts) scores the
ML-100K test rows at least as well as the MF it reads, within 0.005 AUC.

Slow (opt-in, ``-m slow``): the full pipeline of one ablation variant on ML-100K, about 11 minutes on
a 2-core CPU. Seed 0 runs differ with their upstream outputs, and the margin sits near the bound: AUC
0.7002 against MF's 0.7025 (passed), 0.6941 against 0.6999 (failed, -0.0058; 2026-12-07), both with
two epochs of stage 2. The variant now trains three (thinkrec/ablation.py): seed 0 +0.0012 and seed 1
-0.0009 from earlier runs' upstream outputs (bench/results/collm-projector-epochs-cpu.md); this test
with three: 0.6997 against 0.7017 (passed, 18.5 minutes). One run in six of that setting did not
learn (AUC 0.5489 against 0.6990; bench/results/collm-cf-scale-cpu.md); stage 2 now starts over
when no epoch's validation AUC is above chance (train.projector_restarts), so such a run takes one
more stage 2 instead of failing (bench/results/collm-restart-cpu.md: a replayed stall of a
non-shipped setting went from -0.0860 to -0.0059 against MF). From the stalled run's upstream
outputs, the rule's attempts 1 and 2 ended -0.1193 and -0.0141 (bench/results/collm-grad-norm-cpu.md),
so on that draw of the upstream stages this test would fail. Seeds 0, 1 and 2 of the shipped setting
through this path, each with fresh upstream outputs: -0.0035, -0.0040 and -0.0017 against MF, all within
the bound and all below MF (bench/results/collm-shipped-seeds02-cpu.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_collm_auc_at_least_mf_on_ml100k(tmp_path):
    out_root = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.ablation",
            "--config",
            str(ROOT / "configs/ml100k-ablation.yaml"),
            f"storage.output_root={out_root}",
            "ablation.variants=[collm]",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "THINKREC_PROGRESS": "0"},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads((out_root / "ablation" / "comparison.json").read_text())["collm"]
    model, mf = rows["thinkrec"], rows["mf"]
    print(f"CoLLM-style AUC {model['auc']:.4f} UAUC {model['uauc']:.4f}; MF AUC {mf['auc']:.4f}")
    assert model["rows"] == mf["rows"] > 0  # the same test rows
    assert model["auc"] >= mf["auc"] - 0.005
