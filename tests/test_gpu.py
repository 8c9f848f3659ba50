"""The HF scorer on CUDA (opt-in: ``-m gpu``; skipped without a GPU): it gives the CPU scorer's scores,
with prefix sharing and per-row fused experts, in float32 and in bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_scoring_hf import make_rows, scoring_setup, tokenizer  # noqa: F401  (scoring_setup: fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def scorer(cfg, art, device: str, overrides: dict):
    from thinkrec.scoring.engine.hf import HFScorer

    return HFScorer(cfg.replace(**overrides), art, device=device, tokenizer=tokenizer(art.base_model))


@pytest.mark.parametrize(("prefix_sharing", "mode"), [(False, "cache"), (True, "cache"), (True, "packed")])
def test_cuda_float32_equals_cpu(scoring_setup, prefix_sharing, mode):  # noqa: F811
    """float32, atol 1e-3 on the Yes logit (CUDA kernels sum in another order than CPU ones); packed
    runs FlexAttention's block mask on CUDA (score.packed_attention=auto) and the dense mask on CPU."""
    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=5, per_user=6, gates="random")
    over = {"score.prefix_sharing": prefix_sharing, "score.prefix_mode": mode}
    s_cpu, p_cpu = scorer(cfg, art, "cpu", over).score(rows)
    gpu = scorer(cfg, art, "cuda", over)
    assert gpu.flex == (mode == "packed")
    s_gpu, p_gpu = gpu.score(rows)
    assert s_gpu.dtype == np.float32 and s_gpu.shape == s_cpu.shape
    np.testing.assert_allclose(s_gpu, s_cpu, atol=1e-3, rtol=0)
    np.testing.assert_allclose(p_gpu, p_cpu, atol=1e-3, rtol=0)
    assert np.ptp(s_cpu) > 1e-3


def test_cuda_bfloat16_close_to_float32(scoring_setup):  # noqa: F811
    """bfloat16 on CUDA, prefix-shared with the gate's fused experts, against float32 on CPU: atol 0.05
    on P(Yes) (bf16 keeps 8 mantissa bits)."""
    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=5, per_user=6, gates="fusion")
    _, p_cpu = scorer(cfg, art, "cpu", {"score.prefix_sharing": True}).score(rows)
    _, p_bf16 = scorer(cfg, art, "cuda", {"score.prefix_sharing": True, "model.dtype": "bfloat16"}).score(
        rows
    )
    np.testing.assert_allclose(p_bf16, p_cpu, atol=0.05, rtol=0)
