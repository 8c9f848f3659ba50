"""The vLLM backend: exact pre-merged mixtures (unit), and vLLM CPU against a Hugging Face reference
(integration, in its own process: tests/vllm_checks.py).

Tolerances: both sides run the tiny model in float32 on the CPU; vLLM's CPU attention and matmul
kernels accumulate in a different order than PyTorch's, so raw logits agree to ATOL = 1e-3 (observed
differences are around 1e-5). The float64 merge identities hold to 1e-10.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from thinkrec.scoring.engine.merge import (
    LoraAdapter,
    MixtureReport,
    load_adapter,
    merge_exact,
    plan_mixtures,
    quantise,
    save_adapter,
)

sys.path.insert(0, os.path.dirname(__file__))
from vllm_checks import ROW_SETS, build_rows, checks_config  # noqa: E402

ATOL = 1e-3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- unit: the exact merge ---------------------------------------------------------------------------


def _adapter(
    seed: int, r: int, alpha: int, rslora: bool = False, modules: tuple[str, ...] = ("m0", "m1")
) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        tensors[f"{m}.lora_A.weight"] = torch.randn(r, 6, generator=g, dtype=torch.float64)
        tensors[f"{m}.lora_B.weight"] = torch.randn(5, r, generator=g, dtype=torch.float64)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": ["x"]}
    return LoraAdapter(cfg, tensors)


def _delta(a: LoraAdapter, m: str) -> torch.Tensor:
    return a.scaling * a.tensors[f"{m}.lora_B.weight"] @ a.tensors[f"{m}.lora_A.weight"]  # (out, in)


@pytest.mark.parametrize(
    "ranks, alphas, weights, rslora",
    [
        ([8], [16], [1.0], False),  # one adapter: itself, scaling folded in
        ([8, 8, 8], [16, 16, 16], [0.5, 0.3, 0.2], False),  # the usual K experts
        ([4, 8], [8, 32], [0.25, 0.75], False),  # different ranks and alphas
        ([8, 8, 8, 8], [16, 16, 16, 16], [0.2, 0.4, 0.0, 0.4], False),  # a zero weight is dropped
        ([2, 6], [4, 4], [0.6, 0.4], True),  # rsLoRA scaling alpha / sqrt(r)
    ],
)
def test_merge_exact_equals_weighted_sum(ranks, alphas, weights, rslora) -> None:
    adapters = [_adapter(i, r, a, rslora) for i, (r, a) in enumerate(zip(ranks, alphas, strict=True))]
    merged = merge_exact(adapters, weights)
    R = sum(r for r, w in zip(ranks, weights, strict=True) if w)
    assert merged.config["r"] == R and merged.config["lora_alpha"] == R and merged.scaling == 1.0
    for m in ("m0", "m1"):
        assert merged.tensors[f"m{m[-1]}.lora_A.weight"].shape == (R, 6)
        want = sum(w * _delta(a, m) for a, w in zip(adapters, weights, strict=True))
        torch.testing.assert_close(_delta(merged, m), want, atol=1e-10, rtol=0)


def test_merge_exact_missing_module_and_round_trip(tmp_path) -> None:
    """An adapter without a module contributes zeros there; the saved adapter reads back equal."""
    a = _adapter(0, 4, 8, modules=("m0", "m1"))
    b = _adapter(1, 4, 8, modules=("m0",))
    merged = merge_exact([a, b], [0.3, 0.7])
    torch.testing.assert_close(_delta(merged, "m1"), 0.3 * _delta(a, "m1"), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        _delta(merged, "m0"), 0.3 * _delta(a, "m0") + 0.7 * _delta(b, "m0"), atol=1e-10, rtol=0
    )
    save_adapter(str(tmp_path / "mix"), merged)
    back = load_adapter(str(tmp_path / "mix"))
    assert back.config["r"] == 8
    for k, v in merged.tensors.items():
        assert torch.equal(back.tensors[k], v)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "not LORA"),
    ],
)
def test_load_adapter_refuses_unmergeable(tmp_path, config, message) -> None:
    a = _adapter(0, 2, 4)
    a.config.update(config)
    save_adapter(str(tmp_path / "a"), a)
    with pytest.raises(ValueError, match=message):
        load_adapter(str(tmp_path / "a"))


def test_merge_exact_bad_input() -> None:
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        merge_exact([_adapter(0, 2, 4), _adapter(1, 2, 4)], [1.0])
    with pytest.raises(ValueError, match="all weights are zero"):
        merge_exact([_adapter(0, 2, 4)], [0.0])


# -- unit: quantisation and the bounded mixture set -------------------------------------------------


@pytest.mark.parametrize(
    "w, step, units",
    [
        ([0.61, 0.39], 0.1, (6, 4)),
        ([0.5, 0.3, 0.2], 0.1, (5, 3, 2)),  # on the grid (0.3 / 0.1 = 2.999... must stay 3)
        ([1 / 3, 1 / 3, 1 / 3], 0.1, (4, 3, 3)),  # largest remainder, tie to the lower index
        ([0.47, 0.33, 0.20], 0.1, (5, 3, 2)),
        ([0.25, 0.75], 0.5, (1, 1)),  # tie at .5 / .5 -> lower index
        ([0.0, 0.97, 0.03], 0.1, (0, 10, 0)),  # collapses onto a single adapter
        ([0.2, 0.4, 0.0, 0.4], 0.25, (1, 2, 0, 1)),
    ],
)
def test_quantise(w, step, units) -> None:
    got = quantise(np.array(w), step)
    assert got == units
    assert sum(got) == round(sum(w) / step)
    assert np.abs(np.array(got) * step - np.array(w)).max() < step


def test_quantise_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        quantise(np.array([1.2, -0.2]), 0.1)


@pytest.mark.parametrize(
    "rows, max_mixtures, kept, want_kept, want_assigned, snapped, max_err",
    [
        # Three grid points, frequencies 3, 2, 1; keep 2: the rare one snaps to its nearest.
        (
            [[0.5, 0.5]] * 3 + [[0.7, 0.3]] * 2 + [[0.61, 0.39]],
            2,
            [],
            [(5, 5), (7, 3)],
            [(5, 5)] * 3 + [(7, 3)] * 3,
            1,
            0.09,
        ),
        # Room for all: nothing snaps, the error is the rounding alone.
        ([[0.52, 0.48], [0.7, 0.3]], 4, [], [(5, 5), (7, 3)], [(5, 5), (7, 3)], 0, 0.02),
        # Already kept mixtures stay first and count against the bound.
        ([[0.2, 0.8]] * 2, 1, [(5, 5)], [(5, 5)], [(5, 5)] * 2, 2, 0.3),
        # Frequency ties: the smaller units tuple wins.
        ([[0.3, 0.7], [0.7, 0.3]], 1, [], [(3, 7)], [(3, 7), (3, 7)], 1, 0.4),
    ],
)
def test_plan_mixtures(rows, max_mixtures, kept, want_kept, want_assigned, snapped, max_err) -> None:
    plan = plan_mixtures(np.array(rows), 0.1, max_mixtures, kept=kept)
    assert len(plan.kept) <= max_mixtures
    assert plan.kept == want_kept
    assert plan.assigned == want_assigned
    assert plan.report.rows == len(rows) and plan.report.snapped == snapped
    errs = [np.abs(np.array(r) - np.array(a) * 0.1).max() for r, a in zip(rows, want_assigned, strict=True)]
    assert plan.report.max_abs_err == pytest.approx(max_err)
    assert plan.report.mean_abs_err == pytest.approx(float(np.mean(errs)))


def test_mixture_report_add() -> None:
    a = MixtureReport(rows=2, snapped=1, max_abs_err=0.05, sum_abs_err=0.06, mixtures=3)
    a.add(MixtureReport(rows=1, snapped=0, max_abs_err=0.02, sum_abs_err=0.02, mixtures=4))
    assert a.to_dict() == pytest.approx(
        {"rows": 3, "snapped": 1, "mixtures": 4, "max_abs_err": 0.05, "mean_abs_err": 0.08 / 3}
    )


def test_mixture_step_must_divide_one() -> None:
    from thinkrec import config as C

    assert C.load("configs/demo.yaml", ["score.mixture_step=0.25"]).score.mixture_step == 0.25
    with pytest.raises(C.ConfigError, match="score.mixture_step"):
        C.load("configs/demo.yaml", ["score.mixture_step=0.3"])


# -- integration: vLLM CPU against the Hugging Face reference -----------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_qwen, tmp_path_factory):
    from artifacts import make_artifacts, write_prepared

    root = str(tmp_path_factory.mktemp("vllm-run"))
    cfg = checks_config(tiny_qwen, root)
    make_artifacts(cfg, tiny_qwen, n_users=8, n_items=40)
    write_prepared(cfg, n_users=8, n_items=40)
    # A raw-id table, shuffled, with a passthrough request id (also scored by the stage's engine).
    rows = [
        {"user_id": f"u{u}", "item_id": f"i{i}", "request_id": f"r{u}-{i}"}
        for u in range(1, 9)
        for i in (3, 9, 17, 30)
    ]
    order = np.random.default_rng(1).permutation(len(rows))
    os.makedirs(os.path.join(root, "tables"))
    with open(os.path.join(root, "tables", "slates.jsonl"), "w") as f:
        f.writelines(json.dumps(rows[j]) + "\n" for j in order)
    return cfg


def table_path(cfg) -> str:
    return os.path.join(cfg.storage.output_root, "tables", "slates.jsonl")


@pytest.fixture(scope="module")
def vllm_result(setup, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vllm-out") / "result.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "vllm_checks.py"), "--base", setup.model.base,
         "--root", setup.storage.output_root, "--out", out,
         "--table", table_path(setup), "--stage-out", os.path.join(os.path.dirname(out), "stage-scores")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"vllm_checks.py failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


class Reference:
    """Yes/No logits from transformers with the adapters merged explicitly into the base weights,
    W + sum_n w_n s_n B_n A_n (float64 sum), full prompt, last position."""

    def __init__(self, cfg) -> None:
        from thinkrec.model.base import load_model
        from thinkrec.model.thinkrec import CFProjector, CFTable
        from thinkrec.scoring.base import load_artifacts

        self.art = load_artifacts(cfg)
        self.base = load_model(cfg.model.base).eval()
        self.adapters = [load_adapter(os.path.join(self.art.adapters_dir, n)) for n in self.art.adapter_names]
        self.cf = CFTable.load(self.art.cf_embeddings)
        self.projector = CFProjector.load(self.art.projector).eval()
        self.models: dict[tuple[float, ...], torch.nn.Module] = {}

    def model(self, w: list[float]) -> torch.nn.Module:
        key = tuple(round(x, 12) for x in w)
        if key not in self.models:
            m = copy.deepcopy(self.base)
            deltas: dict[str, torch.Tensor] = {}
            for a, wn in zip(self.adapters, w, strict=True):
                for mod in a.modules:
                    d = (
                        wn
                        * a.scaling
                        * (
                            a.tensors[mod + ".lora_B.weight"].double()
                            @ a.tensors[mod + ".lora_A.weight"].double()
                        )
                    )
                    deltas[mod] = deltas.get(mod, 0) + d
            for mod, d in deltas.items():
                lin = m.get_submodule(mod.removeprefix("base_model.model."))
                lin.weight.data = (lin.weight.data.double() + d).float()
            self.models[key] = m
        return self.models[key]

    @torch.no_grad()
    def logits(self, model: torch.nn.Module, row, yes_no: list[int]) -> np.ndarray:
        from thinkrec.model.thinkrec import collate, input_embeddings

        batch = collate([row.prefix + row.candidate], pad_id=0)
        x = input_embeddings(model, batch, self.cf, self.projector)  # (1, T, H)
        out = model(inputs_embeds=x, attention_mask=batch.attention_mask).logits[0, -1]  # (V,)
        return out[yes_no].double().numpy()


@pytest.fixture(scope="module")
def reference(setup, vllm_result):
    """Per row: reference (yes, no) logits with the weights vLLM served, and with the row's exact gate."""
    rows, names = build_rows(setup)
    ref = Reference(setup)
    served_w = vllm_result["served_weights"]
    n = len(ref.adapters)
    onehot = {name: [float(i == j) for j in range(n)] for i, name in enumerate(ref.art.adapter_names)}
    served, exact = [], []
    for row, adapter in zip(rows, vllm_result["served"], strict=True):
        w = served_w[adapter] if adapter in served_w else onehot[adapter]
        served.append(ref.logits(ref.model(w), row, vllm_result["yes_no_ids"]))
        exact.append(ref.logits(ref.model(row.gate.tolist()), row, vllm_result["yes_no_ids"]))
    return {"rows": rows, "names": names, "ref": ref, "served": np.array(served), "exact": np.array(exact)}


@pytest.mark.integration
@pytest.mark.parametrize("row_set", [name for name, *_ in ROW_SETS])
def test_vllm_equals_hf_reference(vllm_result, reference, row_set) -> None:
    """score = the raw Yes logit, p_yes = sigmoid(score) and the No logit, equal to the reference with
    the adapter vLLM served (a single adapter, or the pre-merged mixture's grid weights)."""
    idx = [i for i, n in enumerate(reference["names"]) if n == row_set]
    ref = reference["served"][idx]  # (n, 2)
    score = np.array(vllm_result["score"])[idx]
    p_yes = np.array(vllm_result["p_yes"])[idx]
    np.testing.assert_allclose(score, ref[:, 0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(p_yes, 1 / (1 + np.exp(-ref[:, 0])), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(vllm_result["no_logit"])[idx], ref[:, 1], atol=ATOL, rtol=0)


@pytest.mark.integration
def test_vllm_routing_and_mixture_error(vllm_result, reference) -> None:
    rows, names = reference["rows"], reference["names"]
    served = vllm_result["served"]
    by_set = {n: served[names.index(n)] for n, *_ in ROW_SETS}
    assert by_set["global"] == "global" and by_set["text_global"] == "global"
    assert by_set["expert"] == "expert-1"
    # Room was left (fewer kept mixtures than max_mixtures), so each mixture row got its own grid point.
    assert len(vllm_result["served_weights"]) < 16
    assert by_set["mix_grid"] == by_set["mix_off"] == "mix-0-5-3-2"
    assert by_set["mix_global"] == "mix-2-4-0-4" and by_set["text_mix"] == "mix-0-6-4-0"
    assert vllm_result["use_embeds"] is True
    # Weight error: mix_off is .03 from its grid point in two weights; the others are on the grid.
    rep = vllm_result["mixture_report"]
    n_mix = sum(1 for n in names if n.startswith(("mix", "text_mix")))
    assert rep["rows"] == n_mix and rep["snapped"] == 0
    assert rep["max_abs_err"] == pytest.approx(0.03, abs=1e-9)
    assert rep["mean_abs_err"] == pytest.approx(0.03 * 3 / n_mix, abs=1e-9)
    assert vllm_result["mixture_report_total"]["rows"] == 3 * n_mix  # adapters_for + two score calls
    # The score error the quantisation causes vs the exact per-row mixture: zero on the grid, small off it.
    diff = np.abs(np.array(vllm_result["score"]) - reference["exact"][:, 0])
    on_grid = [i for i, n in enumerate(names) if n != "mix_off"]
    off_grid = [i for i, n in enumerate(names) if n == "mix_off"]
    assert diff[on_grid].max() < ATOL
    print(f"mix_off |score - exact-mixture score|: max {diff[off_grid].max():.2e}")
    assert 0 < diff[off_grid].max() < 0.05
    assert vllm_result["bad_gate_error"].startswith(f"row (user {rows[0].user_id}, item {rows[0].item_id})")


@pytest.mark.integration
def test_vllm_order_and_prefix_cache(vllm_result) -> None:
    """Results follow the caller's order whatever the (adapter, user) sort, and a repeat pass is identical."""
    perm = np.array(vllm_result["perm"])
    np.testing.assert_allclose(
        np.array(vllm_result["score_perm"]), np.array(vllm_result["score"])[perm], atol=1e-5
    )
    np.testing.assert_allclose(
        np.array(vllm_result["p_yes_perm"]), np.array(vllm_result["p_yes"])[perm], atol=1e-5
    )
    print(f"vLLM start {vllm_result['start_s']:.0f}s, first call {vllm_result['first_call_s']:.1f}s, "
          f"cached tokens {vllm_result['cached_tokens']}")  # fmt: skip
    # The repeat pass finds every row's prefix blocks (32 tokens each) in the prefix cache
    # (RequestOutput.num_cached_tokens), LoRA and prompt embeddings included in the block hashes.
    first, repeat = vllm_result["cached_tokens"]
    assert repeat >= 32 * len(perm) and repeat > first


@pytest.mark.integration
def test_reference_equals_peft(setup, reference) -> None:
    """The explicit-merge reference itself equals peft's unmerged forward (global adapter)."""
    from peft import PeftModel

    ref = reference["ref"]
    row = reference["rows"][0]
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(ref.base), os.path.join(ref.art.adapters_dir, "global")
    ).eval()
    yes_no = [1, 2]
    got = ref.logits(peft_model, row, yes_no)
    want = ref.logits(ref.model([1.0, 0.0, 0.0, 0.0]), row, yes_no)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.integration
def test_vllm_equals_hf_scorer(setup, vllm_result, reference) -> None:
    """Against the HF backend with the gates vLLM served (HF mixes exactly per row, so the served grid
    weights are passed as the rows' gates)."""
    from thinkrec.scoring.base import ScoreRow, load_artifacts
    from thinkrec.scoring.engine.hf import HFScorer

    served_w = vllm_result["served_weights"]
    names = list(load_artifacts(setup).adapter_names)
    rows = []
    for r, adapter in zip(reference["rows"], vllm_result["served"], strict=True):
        g = np.array(served_w[adapter] if adapter in served_w else [float(n == adapter) for n in names])
        rows.append(ScoreRow(r.user_id, r.item_id, r.prefix, r.candidate, g, r.gate_label))
    score, p_yes = HFScorer(setup, load_artifacts(setup), device="cpu").score(rows)
    np.testing.assert_allclose(np.array(vllm_result["score"]), score, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(vllm_result["p_yes"]), p_yes, atol=ATOL, rtol=0)


@pytest.mark.integration
def test_stage_vllm_backend_equals_hf_on_a_raw_id_table(setup, vllm_result, ray_local, tmp_path) -> None:
    """score.backend=vllm: the stage's scorer actor body with its vLLM engine (the one vllm_checks.py
    starts) scores a shuffled raw-id table and publishes its shards; the committed rows equal the hf
    backend's stage run on the same table: ids, raw ids, passthrough, gate and version exactly, scores
    within 1e-3 for rows served by one adapter (float32), mixture rows within the error of the
    quantised mixture vLLM serves."""
    from thinkrec.io.commit import read_table
    from thinkrec.io.fs import Storage
    from thinkrec.scoring import stage

    vst = vllm_result["stage"]
    assert (vst["rows"], vst["rows_quarantined"]) == (32, 0)
    hcfg = setup.replace(
        **{
            "score.backend": "hf",
            "score.candidates": table_path(setup),
            "score.output": str(tmp_path / "hf"),
            "score.num_shards": 2,
            "score.torch_threads": 1,
        }
    )
    hman = stage.run(hcfg)
    storage = Storage.from_config(hcfg)
    want = read_table(storage, str(tmp_path / "hf")).sort_by("request_id")
    got = read_table(storage, vst["out"]).sort_by("request_id")
    assert hman["rows"] == got.num_rows == 32
    for col in ("user_id", "item_id", "raw_user_id", "raw_item_id", "request_id", "gate", "version"):
        assert got[col].to_pylist() == want[col].to_pylist(), col
    gates = np.array(got["gate"].to_pylist())
    single = ~np.char.startswith(gates, "mix:")
    diff = np.abs(got["score"].to_numpy() - want["score"].to_numpy())
    assert single.any() and diff[single].max() < ATOL, diff[single].max()
    if (~single).any():
        assert diff[~single].max() < 0.05
