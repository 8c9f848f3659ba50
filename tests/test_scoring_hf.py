"""The HF scorer: prefix-shared scores equal full-prompt scores, a row's score does not depend on its
batch, and the Yes/No-only projection equals the full vocabulary head."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch

from thinkrec import config as C
from thinkrec.model.base import decoder_and_head, load_model, load_tokenizer
from thinkrec.model.fusion import gate, load_fusion
from thinkrec.model.prompt import ItemInfo, PromptBuilder
from thinkrec.model.thinkrec import CFTable
from thinkrec.scoring.base import ScoreRow, load_artifacts

N_USERS, N_ITEMS = 8, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def tokenizer(path: str):
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def scoring_setup(tiny_qwen, tmp_path_factory):
    """A config over tiny_qwen and a full set of random artifacts (global + 3 experts)."""
    from artifacts import make_artifacts

    root = str(tmp_path_factory.mktemp("score-hf"))
    cfg = C.load(None, {"storage.output_root": root, "model.base": tiny_qwen, "score.batch_size": 3})
    make_artifacts(cfg, tiny_qwen, n_users=N_USERS, n_items=N_ITEMS, n_experts=3)
    return cfg, load_artifacts(cfg)


def make_rows(
    cfg: C.Config, artifacts, *, users: int = 5, per_user: int = 4, seed: int = 0, gates: str = "fusion"
) -> list[ScoreRow]:
    """Rows for ``users`` users with random histories (0..10 items, so prefixes differ in length) and
    ``per_user`` candidates each. gates="fusion": the ThinkRec gate from the CF table; "random": a
    random mixture over all adapters per user."""
    rng = random.Random(seed)
    pb = PromptBuilder(tokenizer(artifacts.base_model))
    items = {
        i: ItemInfo(f"Film number {i} {'x' * (i % 7)}", (f"genre{i % 5}", "drama"))
        for i in range(1, N_ITEMS + 1)
    }
    cf = CFTable.load(artifacts.cf_embeddings)
    fusion = load_fusion(artifacts.fusion)
    rows = []
    for u in range(1, users + 1):
        hist = [
            (i, items[i], rng.randint(0, 1)) for i in rng.sample(range(1, N_ITEMS + 1), rng.randint(0, 10))
        ]
        prefix = pb.encode_prefix(u, hist)
        if gates == "fusion":
            g, labels = gate(cf.user[u : u + 1], fusion)
            g, label = g[0], labels[0]
        else:
            g = np.random.default_rng(seed * 100 + u).dirichlet(np.ones(len(artifacts.adapter_names)))
            label = "random"
        for i in rng.sample(range(1, N_ITEMS + 1), per_user):
            rows.append(ScoreRow(u, i, prefix, pb.encode_candidate(i, items[i]), g, label))
    return rows


def scorer_for(cfg: C.Config, artifacts, **score_overrides):
    from thinkrec.scoring.engine.hf import HFScorer

    over = {f"score.{k}": v for k, v in score_overrides.items()}
    return HFScorer(cfg.replace(**over), artifacts, tokenizer=tokenizer(artifacts.base_model))


def test_prefix_shared_equals_full_prompt(scoring_setup):
    """float32, atol 1e-4 on the Yes logit and P(Yes): the only difference is summation order."""
    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=5, per_user=4, gates="random")
    s_full, p_full = scorer_for(cfg, art, prefix_sharing=False).score(rows)
    s_shared, p_shared = scorer_for(cfg, art, prefix_sharing=True).score(rows)
    assert s_full.shape == (20,) and s_full.dtype == np.float32
    np.testing.assert_allclose(s_shared, s_full, atol=1e-4, rtol=0)
    np.testing.assert_allclose(p_shared, p_full, atol=1e-4, rtol=0)
    assert np.ptp(s_full) > 1e-3, "scores should differ between pairs"


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_row_score_independent_of_batch(scoring_setup, prefix_sharing):
    """Shuffled rows in batches of other sizes give the same per-row scores (float32, atol 1e-5)."""
    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=4, per_user=3, seed=1)
    base_s, base_p = scorer_for(cfg, art, prefix_sharing=prefix_sharing, batch_size=4).score(rows)
    perm = np.random.default_rng(7).permutation(len(rows))
    s, p = scorer_for(cfg, art, prefix_sharing=prefix_sharing, batch_size=5).score([rows[i] for i in perm])
    np.testing.assert_allclose(s, base_s[perm], atol=1e-5, rtol=0)
    np.testing.assert_allclose(p, base_p[perm], atol=1e-5, rtol=0)
    # And one row alone.
    one_s, _ = scorer_for(cfg, art, prefix_sharing=prefix_sharing, batch_size=1).score([rows[3]])
    np.testing.assert_allclose(one_s, base_s[3:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_fused_projections_do_not_change_scores(scoring_setup, prefix_sharing):
    """score.fuse_projections (one matmul for q/k/v and for gate/up): the same scores as separate
    projections (float32, atol 1e-5)."""
    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=3, per_user=3, seed=4, gates="random")
    fused = scorer_for(cfg, art, prefix_sharing=prefix_sharing, fuse_projections=True)
    assert type(fused.model.model.layers[0].self_attn.k_proj).__name__ == "_Member"
    s, p = fused.score(rows)
    s0, p0 = scorer_for(cfg, art, prefix_sharing=prefix_sharing, fuse_projections=False).score(rows)
    np.testing.assert_allclose(s, s0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(p, p0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_last_layer_mlp_at_answer_rows_only(scoring_setup, prefix_sharing):
    """The last layer's MLP at each row's answer position only (answer_rows.py): the scores of the full
    last layer, over right-padded prompts of different lengths (float32, atol 1e-5)."""
    from thinkrec.scoring.engine import answer_rows

    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=4, per_user=3, seed=6, gates="random")
    scorer = scorer_for(cfg, art, prefix_sharing=prefix_sharing, batch_size=4)
    last = scorer.model.model.layers[-1]
    assert scorer.answer_rows is not None and isinstance(
        last.post_attention_layernorm, answer_rows.AnswerRowsNorm
    )
    s, p = scorer.score(rows)
    scorer.answer_rows = None  # the same model, every position through the last layer
    s0, p0 = scorer.score(rows)
    np.testing.assert_allclose(s, s0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(p, p0, atol=1e-5, rtol=0)
    # A decoder whose last layer is not a known pre-norm layer is left as it is.
    other = torch.nn.Module()
    other.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    assert answer_rows.install(other) is None


def test_compiled_scorer_equals_eager(scoring_setup):
    """score.compile (torch.compile, dynamic shapes, over fused projections and per-row LoRA mixtures):
    the eager scores on batches of varying rows and lengths, both paths (float32, atol 1e-4)."""
    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=4, per_user=3, seed=5, gates="random")
    for sharing in (False, True):
        s0, p0 = scorer_for(cfg, art, prefix_sharing=sharing).score(rows)
        # With fused projections, as on a GPU (the identity check of fused_proj traced by dynamo).
        compiled = scorer_for(cfg, art, prefix_sharing=sharing, compile=True, fuse_projections=True)
        assert compiled.body is not decoder_and_head(compiled.model)[0]
        s, p = compiled.score(rows)
        np.testing.assert_allclose(s, s0, atol=1e-4, rtol=0)
        np.testing.assert_allclose(p, p0, atol=1e-4, rtol=0)


def test_compiled_full_prompts_build_no_causal_mask(scoring_setup, monkeypatch):
    """Under torch.compile, transformers builds a (B, 1, T, T) causal mask in every forward, which
    keeps SDPA off its causal kernel. The scorer's attention (causal_attn.py) builds none for full
    prompts, and still builds transformers' mask where one is needed (the prefix-shared candidate pass
    with its padding mask and cache). Plain "sdpa" on the same model is the control."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from thinkrec.scoring.engine import causal_attn

    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=3, per_user=2, seed=8, gates="random")
    built = []

    def spy(**kwargs):  # transformers' SDPA mask, recorded each time dynamo traces a mask build
        built.append(kwargs["q_length"])
        return sdpa_mask(**kwargs)

    monkeypatch.setattr(causal_attn, "sdpa_mask", spy)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "sdpa", spy)
    # Masks are built while dynamo traces, whatever backend then compiles the graph: the eager backend
    # skips inductor's code generation (most of this test's time; test_compiled_scorer_equals_eager
    # runs inductor).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))

    def masks_built(scorer) -> list[int]:
        torch._dynamo.reset()  # a fresh trace, so every mask build runs the spy
        built.clear()
        scorer.score(rows)
        return list(built)

    full = scorer_for(cfg, art, prefix_sharing=False, compile=True)
    assert full.model.config._attn_implementation == causal_attn.NAME
    assert masks_built(full) == []
    assert masks_built(scorer_for(cfg, art, prefix_sharing=True, compile=True))  # the candidate pass
    full.model.set_attn_implementation("sdpa")
    assert masks_built(full), "the control: plain sdpa builds a mask under compile"
    torch._dynamo.reset()


def test_yes_no_projection_equals_full_head_in_float64(scoring_setup):
    """Fused mixtures per row == an explicitly merged float64 model (W + sum_n w_n s_n B_n A_n), with the
    full vocabulary head: the scorer's Yes and No logits within atol 1e-4 and p_yes = sigmoid(Yes)."""
    from thinkrec.model.thinkrec import CFProjector, collate, input_embeddings
    from thinkrec.scoring.engine.fused_lora import merge_into

    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=3, per_user=2, seed=2, gates="random")
    scorer = scorer_for(cfg, art, prefix_sharing=True)
    s, p = scorer.score(rows)
    proj = CFProjector.load(art.projector).double()
    cf = CFTable.load(art.cf_embeddings)
    pb = PromptBuilder(tokenizer(art.base_model))
    dirs = [f"{art.adapters_dir}/{n}" for n in art.adapter_names]
    for i, r in enumerate(rows):
        ref = load_model(art.base_model).double().eval()
        merge_into(ref, dirs, r.gate.tolist())
        batch = collate([r.prefix + r.candidate], pb.placeholder_id)
        with torch.no_grad():
            emb = input_embeddings(ref, batch, CFTable(cf.user.double(), cf.item.double()), proj)
            logits = ref(inputs_embeds=emb, attention_mask=batch.attention_mask).logits[0, -1]  # (V,)
        yes, no = logits[pb.yes_id].item(), logits[pb.no_id].item()
        assert abs(s[i] - yes) < 1e-4, (i, s[i], yes)
        assert abs(scorer.last_no_logits[i] - no) < 1e-4, (i, scorer.last_no_logits[i], no)
        assert abs(p[i] - 1 / (1 + np.exp(-yes))) < 1e-5


def test_prefix_cache_equals_gather_and_concatenation():
    """kv_cache.prefix_cache: each row starts with its group's prefix (groups in any order), the
    candidate pass's keys land after it in place (what DynamicCache's gather + concatenation gave,
    exactly), and writing past the reserved room is an error."""
    from thinkrec.scoring.engine.kv_cache import prefix_cache

    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)) for _ in range(2)]
    groups = [2, 2, 0, 2, 1]
    cache = prefix_cache(kv, groups, extra=3)
    assert cache.get_seq_length() == 5
    new_k, new_v = torch.randn(5, 2, 3, 4, generator=g), torch.randn(5, 2, 3, 4, generator=g)
    for layer, (k, v) in enumerate(kv):
        keys, values = cache.update(new_k, new_v, layer)
        assert torch.equal(keys, torch.cat([k[groups], new_k], dim=2))
        assert torch.equal(values, torch.cat([v[groups], new_v], dim=2))
    with pytest.raises(RuntimeError, match="8 positions"):
        prefix_cache(kv, groups, extra=2).update(new_k, new_v, 0)


def test_empty_and_bad_gate(scoring_setup):
    cfg, art = scoring_setup
    sc = scorer_for(cfg, art)
    s, p = sc.score([])
    assert s.shape == (0,) and p.shape == (0,)
    row = make_rows(cfg, art, users=1, per_user=1)[0]
    row.gate = np.array([1.0, 0.0])  # 2 weights for 4 adapters
    with pytest.raises(ValueError, match="gates over 2 adapters"):
        sc.score([row])


def test_gpu_bench_tiny_smoke():
    """bench/gpu_scoring.py --tiny runs on CPU and its prefix-shared path scores what full prompts
    score (max |logit difference| < 1e-4 in float32)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_scoring.py"
    out = subprocess.run(
        [sys.executable, str(script), "--tiny", "--iters", "1"],
        capture_output=True,
        text=True,
        timeout=900,  # four torch.compile variants: minutes on a busy 2-core machine
        check=True,
    )
    res = json.loads(out.stdout)
    assert res["model"]["tiny"] is True
    assert res["prefix_shared"]["max_abs_logit_diff_vs_full"] < 1e-4
    assert res["full_prompt"]["pairs_per_s"] > 0 and res["matmul_tflops"] > 0
    full = res["full_prompt"]
    assert full["pairs_per_s"] == max(full["pairs_per_s_by_batch"].values())
    names = [v["variant"] for v in full["variants"]]
    assert (
        len(names) == 6
        and sum("compiled" in n for n in names) == 4
        and all(0 < v["flops_skipped_share"] < 1 for v in full["variants"][-2:])
        and all(v["pairs_per_s"] > 0 for v in full["variants"])
    )
    assert full["best"]["pairs_per_s"] == max(v["pairs_per_s"] for v in full["variants"])
    # The profile of the best variant finds its GEMMs and its attention by kernel name.
    split = full["breakdown"]
    assert split["variant"] == full["best"]["variant"] and abs(sum(split["share"].values()) - 1) < 1e-9
    assert split["ms"]["gemm"] > 0 and split["ms"]["attention"] > 0 and split["gemm_tflops_in_forward"] > 0
    assert split["fraction_of_floor_if_only_gemms"] > 0
    assert res["fused_projection_groups"] == 2 * res["model"]["layers"] and res["matmul_tflops_sustained"] > 0
    pk = res["prefix_packed"]  # packed scoring: full prompts' scores, a floor fraction measured
    assert pk["max_abs_logit_diff_vs_full"] < 1e-4 and pk["pairs_per_s"] > 0
    assert pk["fraction_of_floor"] > 0 and pk["sequence_tokens"] > pk["candidates_per_user"]
    shared = res["prefix_shared"]
    # Several users' prefixes in one batch, each row attending to its own user's cache.
    assert shared["users"] > 1 and shared["candidate_chunk"] > shared["candidates_per_user"] // 2


def test_item_summary_scores_equal_full_prompt(tiny_qwen, tmp_path):
    """``model.cf_history_item`` (the target's CF token carries its prefix's history summary): the
    shared-prefix and packed scorers, which embed candidates apart from their prefix or after it, give
    the full prompts' scores (float32, atol 1e-4)."""
    from artifacts import make_artifacts

    cfg = C.load(
        None,
        {
            "storage.output_root": str(tmp_path),
            "model.base": tiny_qwen,
            "model.cf_history_item": True,
            "score.batch_size": 3,
        },
    )
    make_artifacts(cfg, tiny_qwen, n_users=N_USERS, n_items=N_ITEMS, n_experts=3)
    art = load_artifacts(cfg)
    rows = make_rows(cfg, art, users=5, per_user=4, seed=7, gates="random")
    full = scorer_for(cfg, art, prefix_sharing=False)
    assert full.projector.history_item
    s_full, _ = full.score(rows)
    for over in ({"prefix_sharing": True}, {"prefix_sharing": True, "prefix_mode": "packed"}):
        s, _ = scorer_for(cfg, art, **over).score(rows)
        np.testing.assert_allclose(s, s_full, atol=1e-4, rtol=0)
    assert np.ptp(s_full) > 1e-3

    # vLLM's prompt embeddings (a user's prefix embedded once, each candidate apart, with the
    # prefix's summary): the full prompt's, on the scorer's own prompt code (no engine needed here).
    from thinkrec.model.thinkrec import collate, input_embeddings
    from thinkrec.scoring.engine.vllm import VLLMScorer, load_input_embeddings

    v = VLLMScorer.__new__(VLLMScorer)
    v.use_embeds, v.cf, v.projector = True, full.cf, full.projector
    v.embedder = load_input_embeddings(art.base_model, torch.float32)
    for r, prompt in zip(rows, v._prompts(rows), strict=True):
        whole = input_embeddings(v.embedder, collate([r.prefix + r.candidate], 0), v.cf, v.projector)[0]
        torch.testing.assert_close(prompt["prompt_embeds"], whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("left_pad", "attention"), [(False, "sdpa"), (True, "sdpa"), (False, "flex")])
def test_packed_equals_full_prompt(scoring_setup, left_pad, attention):
    """score.prefix_mode="packed" (a user's candidates after one prefix copy, block mask, positions
    restarting at the prefix's end): the full prompts' scores (float32, atol 1e-5), right- and
    left-padded, several users of different prefix and candidate lengths per batch, per-user gates
    through the fused LoRA, CF tokens, the answer-rows-only last layer; a user split over packs too;
    the mask as SDPA's dense boolean and as FlexAttention's block mask."""
    cfg, art = scoring_setup
    rows = make_rows(cfg, art, users=5, per_user=4, seed=5, gates="random")
    rng = random.Random(3)
    rows = rng.sample(rows, len(rows))  # a user's candidates are not adjacent
    s_full, p_full = scorer_for(cfg, art, prefix_sharing=False).score(rows)
    # Packs split a user (3), several users per forward (7, 64); FlexAttention (compiled on its first
    # call, 30 s on CPU per shape) at one of them: the scorer code around the mask is the same.
    for bs in (7,) if attention == "flex" else (3, 7, 64):
        sc = scorer_for(
            cfg,
            art,
            prefix_sharing=True,
            prefix_mode="packed",
            packed_attention=attention,
            batch_size=bs,
        )
        assert sc.answer_rows is not None and sc.projector is not None and sc.flex == (attention == "flex")
        sc.left_pad = left_pad
        s, p = sc.score(rows)
        np.testing.assert_allclose(s, s_full, atol=1e-5, rtol=0)
        np.testing.assert_allclose(p, p_full, atol=1e-5, rtol=0)
    assert len({len(r.candidate.ids) for r in rows}) > 1 and len({len(r.prefix.ids) for r in rows}) > 1
    assert np.ptp(s_full) > 1e-3


def test_packed_flex_compiled_with_fused_projections():
    """The GPU path's pieces on CPU: fused q/k/v projections, the answer-rows-only last layer and
    FlexAttention's block mask, under a static-shape torch.compile, give the eager dense-mask hidden
    states at every answer position (float32, atol 1e-5). With fused projections q, k and v are
    strided views of one matmul's output, which compiled FlexAttention read wrongly (errors near 2)
    until the attention made them contiguous."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from thinkrec.scoring.engine import answer_rows, causal_attn, fused_proj
    from thinkrec.scoring.engine.packed import layout

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert causal_attn.install(model) and fused_proj.fuse(model) == 4
    body = model.model
    rows = answer_rows.install(body)
    lay = layout([24, 17], [[8] * 10, [5, 9, 3]])
    ids = torch.randint(3, 512, tuple(lay.segment.shape))

    def answers(net, mask):
        with torch.inference_mode(), rows.at(lay.answer):
            h = net(input_ids=ids, attention_mask=mask, position_ids=lay.positions, use_cache=False)
        return h.last_hidden_state[torch.arange(2)[:, None], lay.answer]  # (B, M, H)

    want = answers(body, lay.mask())
    torch._dynamo.reset()
    got = answers(torch.compile(body, dynamic=False), lay.block_mask())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_packed_mask_blocks_other_candidates():
    """The block mask: the prefix is causal, a candidate sees the prefix and itself, never another
    candidate; padding sees itself only; positions restart at the prefix's end."""
    from thinkrec.scoring.engine.packed import layout

    lay = layout([2, 1], [[2, 1], [1]], left_pad=True)
    m = lay.mask()[:, 0]
    # row 0: tokens p p a a b (T=5, no padding); a = candidate 1, b = candidate 2
    assert lay.positions[0].tolist() == [0, 1, 2, 3, 2]
    assert m[0, 4].tolist() == [True, True, False, False, True]
    assert m[0, 3].tolist() == [True, True, True, True, False]
    # row 1: left-padded by 3: _ _ _ p a
    assert lay.segment[1].tolist() == [-1, -1, -1, 0, 1] and lay.answer[1].tolist() == [4, 4]
    assert m[1, 4].tolist() == [False, False, False, True, True]
    assert m[1, 1].tolist() == [False, True, False, False, False]
    # FlexAttention's block mask, at a block size of 1 so every (query, key) pair is its own block,
    # keeps exactly the pairs the dense mask keeps.
    bm = lay.block_mask(block_size=1)
    assert torch.equal(bm.to_dense().bool(), lay.mask())


def test_scorer_start_up_imports_no_optional_packages(tiny_qwen):
    """A scorer process imports transformers' model and tokenizer machinery without scikit-learn or
    scipy (1.2 s of its start-up), and both import normally afterwards; the actor's module imports
    no torch before it starts its prompt process, and the prompt process's modules and tokenizer
    import no transformers (about 3 s)."""
    import subprocess
    import sys

    prompts = (
        "import sys\n"
        "import thinkrec.scoring.prompt_process, thinkrec.scoring.prompts\n"
        "from thinkrec.model.base import load_prompt_tokenizer\n"
        f"tok = load_prompt_tokenizer({tiny_qwen!r})\n"
        "assert 'transformers' not in sys.modules and 'sklearn' not in sys.modules\n"
        "print(tok('Yes', add_special_tokens=False).input_ids)\n"
    )
    out = subprocess.run([sys.executable, "-c", prompts], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().startswith("["), out.stderr[-2000:]
    code = (
        "import sys\n"
        "import thinkrec.scoring.stage\n"
        "assert 'torch' not in sys.modules\n"
        "from thinkrec.model.base import import_transformers\n"
        "import_transformers()\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "assert 'torch' in sys.modules and 'transformers.modeling_utils' in sys.modules\n"
        "assert 'sklearn' not in sys.modules and 'scipy' not in sys.modules, sorted(sys.modules)\n"
        "import scipy.optimize, sklearn.metrics\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
