"""The fused per-row LoRA layer against peft itself and against explicit merges, and the gate rules."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from thinkrec import config as C
from thinkrec.model.base import load_model
from thinkrec.model.fusion import gate
from thinkrec.scoring.base import load_artifacts
from thinkrec.scoring.engine import fused_lora

NAMES = ("global", "expert-0", "expert-1", "expert-2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapters(tiny_qwen, tmp_path_factory) -> tuple[str, list[str]]:
    from artifacts import make_artifacts

    root = str(tmp_path_factory.mktemp("fused"))
    cfg = C.load(None, {"storage.output_root": root, "model.base": tiny_qwen})
    make_artifacts(cfg, tiny_qwen, n_users=6, n_items=10, n_experts=3, lora_std=0.1)
    art = load_artifacts(cfg)
    assert art.adapter_names == NAMES
    return tiny_qwen, [os.path.join(art.adapters_dir, n) for n in art.adapter_names]


def tokens(n: int = 3, t: int = 12) -> torch.Tensor:
    return torch.randint(100, 5000, (n, t), generator=torch.Generator().manual_seed(0))  # (B, T)


def fused_logits(base: str, dirs: list[str], gates, mode: str = "exact", dtype=torch.float32) -> torch.Tensor:
    model = load_model(base).to(dtype).eval()
    handle = fused_lora.install(model, dirs, mode)  # type: ignore[arg-type]
    x = tokens()
    with torch.no_grad(), handle.gates(gates):
        return model(input_ids=x).logits  # (B, T, V)


def peft_logits(base: str, dirs: list[str], active: str, mix: list[float] | None = None) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), dirs[0], adapter_name=NAMES[0])
    for name, d in zip(NAMES[1:], dirs[1:], strict=True):
        model.load_adapter(d, adapter_name=name)
    if mix is not None:
        model.add_weighted_adapter(list(NAMES), mix, "mix", combination_type="linear")
    model.set_adapter(active)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens()).logits


@pytest.mark.parametrize("k", range(4))
def test_single_adapter_equals_peft_unmerged(adapters, k):
    """A one-hot gate over K=4, and a lone adapter (K=1), both equal peft's unmerged adapter output
    (float32, atol 1e-5)."""
    base, dirs = adapters
    want = peft_logits(base, dirs, NAMES[k])
    onehot = [[float(j == k) for j in range(4)]] * 3
    np.testing.assert_allclose(fused_logits(base, dirs, onehot), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fused_logits(base, [dirs[k]], [[1.0]] * 3), want, atol=1e-5, rtol=0)
    # The adapter changes the output: the comparison is not vacuous.
    plain = load_model(base).eval()
    with torch.no_grad():
        assert (plain(input_ids=tokens()).logits - want).abs().max() > 1e-3


def test_per_row_mixture_equals_explicit_float64_merge(adapters):
    """Each row of one batch has its own mixture; each equals W + sum_n w_n s_n B_n A_n merged
    explicitly into a float64 copy of the model (float32 fused vs float64 reference, atol 1e-4)."""
    base, dirs = adapters
    g = [[0.0, 0.61, 0.39, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.2, 0.3, 0.5]]
    got = fused_logits(base, dirs, g)
    x = tokens()
    for b, w in enumerate(g):
        ref = load_model(base).double().eval()
        fused_lora.merge_into(ref, dirs, w)
        with torch.no_grad():
            want = ref(input_ids=x[b : b + 1]).logits[0]
        np.testing.assert_allclose(got[b].double(), want, atol=1e-4, rtol=0)


def test_linear_mode_equals_peft_linear_merge(adapters):
    """'linear' reproduces peft add_weighted_adapter(combination_type='linear') (atol 1e-5), and
    differs from the exact mixture (by design) by more than 1e-3."""
    base, dirs = adapters
    w = [0.0, 0.5, 0.3, 0.2]
    want = peft_logits(base, dirs, "mix", mix=w)
    got = fused_logits(base, dirs, [w] * 3, mode="linear")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    exact = fused_logits(base, dirs, [w] * 3, mode="exact")
    assert (exact - want).abs().max() > 1e-3


@pytest.mark.parametrize(
    "user, expect_label, expect_gate",
    [
        ([1.0, 0.0, 0.0], "expert-0", [0, 1, 0, 0]),  # on prototype 0: one expert
        ([0.0, 0.0, 1.0], "expert-2", [0, 0, 0, 1]),
        ([0.0, 0.0, 0.0, 1.0], "global", [1, 0, 0, 0]),  # equidistant: uniform weights -> global
        ([1.0, 1.0, 0.0], "mix", None),  # between two prototypes: a mixture of the experts
    ],
)
def test_gate_picks_global_expert_or_mixture(user, expect_label, expect_gate):
    """fusion.gate: prototypes = the axes; tau 0.1, single when max(w) > 0.5 + 0.6/3, global when
    entropy >= 0.95 ln 3."""
    d = 4
    protos = torch.eye(d)[:3].tolist()
    fusion = {
        "prototypes": protos,
        "tau": 0.1,
        "single_base": 0.5,
        "single_per_group": 0.6,
        "entropy_frac": 0.95,
    }
    u = torch.tensor([user + [0.0] * (d - len(user))])
    g, labels = gate(u, fusion)
    assert labels[0].startswith(expect_label)
    if expect_gate is not None:
        assert g[0].tolist() == expect_gate
    else:
        assert g[0, 0] == 0 and abs(g[0].sum().item() - 1) < 1e-12
        assert abs(g[0, 1].item() - g[0, 2].item()) < 1e-9 and 0 < g[0, 3].item() < 0.01
        assert labels[0] == "mix:" + ",".join(f"{x:.2f}" for x in g[0, 1:].tolist())


def test_gate_weights_equal_torch_cosine_softmax():
    """The gate in numpy (the prompt process imports no torch) equals torch's softmax over
    cosine_similarity / tau, a zero (unknown) embedding included, to float64 rounding."""
    from thinkrec.model.fusion import gate_weights

    g = torch.Generator().manual_seed(0)
    users = torch.cat([torch.randn(31, 16, generator=g), torch.zeros(1, 16)]).double()
    protos = torch.randn(5, 16, generator=g).double()
    want = torch.softmax(
        torch.nn.functional.cosine_similarity(users[:, None], protos[None], dim=-1) / 0.2, -1
    )
    got = gate_weights(users.float().numpy(), protos.numpy(), 0.2)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)  # users rounded to float32 first
    np.testing.assert_allclose(
        gate_weights(users.numpy(), protos.numpy(), 0.2), want.numpy(), rtol=0, atol=1e-12
    )
    assert got.dtype == np.float64 and np.allclose(got.sum(-1), 1)


def test_gates_are_required_and_checked(adapters):
    base, dirs = adapters
    model = load_model(base).eval()
    handle = fused_lora.install(model, dirs)
    assert len(handle.layers) == 2 * model.config.num_hidden_layers  # q_proj and v_proj per layer
    with pytest.raises(RuntimeError, match="no gates set"), torch.no_grad():
        model(input_ids=tokens())
    with pytest.raises(ValueError, match=r"gates must be \(batch, 4\)"):
        handle.set_gates([[1.0, 0.0]])
    with (
        pytest.raises(RuntimeError, match="gates for 2 rows, batch has 3"),
        torch.no_grad(),
        handle.gates([[1, 0, 0, 0]] * 2),
    ):
        model(input_ids=tokens())


@pytest.mark.parametrize("mode", ["exact", "linear"])
def test_fused_projections_equal_separate_ones(adapters, mode):
    """q/k/v and gate/up as one matmul each (fused_proj.fuse), over per-row fused LoRA mixtures: the
    same logits as the separate projections (float32, atol 1e-5), every group fused, weights not
    held twice."""
    from thinkrec.scoring.engine import fused_proj

    base, dirs = adapters
    gates = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(3)), -1)
    want = fused_logits(base, dirs, gates, mode)
    model = load_model(base).eval()
    handle = fused_lora.install(model, dirs, mode)  # type: ignore[arg-type]
    n_params = sum(p.numel() for p in model.parameters())
    assert fused_proj.fuse(model) == 2 * model.config.num_hidden_layers
    assert fused_proj.fuse(model) == 0, "fusing twice must leave fused groups alone"
    assert sum(p.numel() for p in model.parameters()) == n_params
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (attn.q_proj.out_features, model.config.hidden_size)
    with torch.no_grad(), handle.gates(gates):
        got = model(input_ids=tokens()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - fused_logits(base, dirs, gates[[1, 0, 2]], mode)).abs().max() > 1e-3  # gates matter


def test_fused_projection_members_in_any_order_and_on_other_inputs(tiny_llama):
    """A member called with a different input than its group's last matmul recomputes (a model that
    feeds siblings different inputs stays exact), and call order does not matter. Llama: no biases;
    Qwen's q/k/v biases are covered above."""
    from thinkrec.scoring.engine import fused_proj

    model = load_model(tiny_llama).eval()
    attn = model.model.layers[0].self_attn
    ref = {n: getattr(attn, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj")}
    assert fused_proj.fuse(model) == 2 * model.config.num_hidden_layers
    x1, x2 = torch.randn(2, 5, model.config.hidden_size), torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        got_v1 = attn.v_proj(x1)  # v first: computes the group for x1
        got_k2 = attn.k_proj(x2)  # another input: recomputed for x2
        got_q1 = attn.q_proj(x1)  # x1 again after x2: recomputed, still right
        got_q2 = attn.q_proj(x2)
    torch.testing.assert_close(got_v1, x1 @ ref["v_proj"].T, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_k2, x2 @ ref["k_proj"].T, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_q1, x1 @ ref["q_proj"].T, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_q2, x2 @ ref["q_proj"].T, atol=1e-6, rtol=0)
