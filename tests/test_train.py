"""The train stage: examples, loss, the Ray Train loop (DDP and DeepSpeed on CPU), the stage end to end."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import small_config
from thinkrec.data import schema as S
from thinkrec.io.commit import TableWriter, mark_success, read_table
from thinkrec.io.fs import Storage
from thinkrec.model.prompt import CF_DISLIKED, CF_ITEM, CF_LIKED, CF_USER, ItemInfo, PromptBuilder
from thinkrec.model.thinkrec import CFTable
from thinkrec.train import data as D
from thinkrec.train.loss import ThinkRecLM, answer_positions, combine, loss_fn, make_batch

CF_DIM = 16


def make_train_inputs(prepared, root: str, *, n_traces: int = 40, seed: int = 0):
    """A fresh output root holding prepare/ (copied from the session's prepared run), a random CF
    table committed as cf/model, and a reasoning-trace table (what the cf and reason stages write)."""
    src = Storage.from_config(prepared).local_path(prepared.storage.output_root)
    shutil.copytree(os.path.join(src, "prepare"), os.path.join(root, "prepare"))
    storage = Storage(root)
    n_users = read_table(storage, storage.uri("prepare/users")).num_rows
    n_items = read_table(storage, storage.uri("prepare/items")).num_rows
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(n_users + 1, CF_DIM, generator=g)
    item = torch.randn(n_items + 1, CF_DIM, generator=g)
    user[0] = 0
    item[0] = 0
    os.makedirs(os.path.join(root, "cf/model"))
    CFTable(user, item).save(os.path.join(root, "cf/model/embeddings.safetensors"))
    mark_success(storage, storage.uri("cf/model"), {"stage": "test-cf"})
    inter = read_table(storage, storage.uri("prepare/interactions"))
    train = inter.filter(pa.compute.equal(inter.column(S.SPLIT), "train")).slice(0, n_traces)
    traces = pa.table(
        {
            S.USER_ID: train.column(S.USER_ID),
            S.ITEM_ID: train.column(S.ITEM_ID),
            S.TIMESTAMP: train.column(S.TIMESTAMP),
            S.LABEL: train.column(S.LABEL),
            S.REASONING: [
                f"the user rated similar titles {'well' if y else 'poorly'}"
                for y in train.column(S.LABEL).to_pylist()
            ],
            S.TEACHER: ["test"] * train.num_rows,
            **{
                c: pa.nulls(train.num_rows, pa.string())
                for c in (S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH)
            },
        }
    )
    w = TableWriter(
        storage,
        storage.uri("reason/traces"),
        num_shards=2,
        schema=S.REASONING_TABLE,
        meta={"stage": "test-reason"},
    )
    w.write([traces])
    w.commit(rows_in=traces.num_rows)
    return storage


def train_config(root: str, **overrides):
    base = {
        "train.num_workers": 2,
        "train.batch_size": 4,
        "train.max_train_samples": 32,
        "train.max_valid_samples": 16,
        "train.max_answer_tokens": 12,
        "train.checkpoint_every": 2,
        "train.warmup_steps": 1,
        "train.lr": 1e-3,
        "model.tiny.hidden_size": 64,
        "model.tiny.num_heads": 1,
        "model.tiny.num_kv_heads": 1,
        "model.tiny.intermediate_size": 64,
    }
    base.update(overrides)
    return small_config(root, **base)


# -- examples: BOS and chat template -----------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    """Loading the converted BPE vocabulary takes seconds; the tests share one per model."""
    from thinkrec.model.base import load_tokenizer

    return load_tokenizer(path)


def _sample(label: int = 1, reasoning: str | None = None) -> D.Sample:
    return D.Sample(7, 3, label, (1, 2), (1, 0), reasoning)


ITEMS = {
    1: ItemInfo("Toy Story", ("Animation",)),
    2: ItemInfo("Heat", ("Crime",)),
    3: ItemInfo("Alien", ("Sci-Fi",)),
}


@pytest.mark.parametrize(
    ("model", "chat", "bos_count"),
    [("tiny_llama", False, 1), ("tiny_qwen", False, 0), ("tiny_llama", True, 1), ("tiny_qwen", True, 0)],
)
@pytest.mark.parametrize("label", [0, 1])
def test_examples_bos_template_and_answer(request, model, chat, bos_count, label):
    tok = _tokenizer(request.getfixturevalue(model))
    pb = PromptBuilder(tok, cf_tokens=True, use_chat_template=chat)
    (row,) = D.encode_rows(pb, [_sample(label, "liked both")], ITEMS, history_len=10, max_answer_tokens=12)
    ids = row["prompt_ids"]
    bos = tok.bos_token_id
    # BOS exactly once, at the start, for Llama (plain: added by us; chat: spelled by the template).
    assert (ids.count(bos) if bos is not None else 0) == bos_count
    if bos_count:
        assert ids[0] == bos
    text = tok.decode(ids)
    if chat:
        head = "<|start_header_id|>user" if model == "tiny_llama" else "<|im_start|>user"
        assert head in text and text.rstrip().endswith(
            "<|start_header_id|>assistant<|end_header_id|>"
            if model == "tiny_llama"
            else "<|im_start|>assistant"
        )
    else:
        assert text.endswith("Answer:")
    ans = row["answer_ids"]
    assert ans[0] == (pb.yes_id if label else pb.no_id)
    assert ans[-1] == tok.eos_token_id and len(ans) <= 12
    assert row["kind"] == D.KIND_REASONING
    # CF slots: the 2 history items (liked, disliked), then the user (the prefix's end), then the
    # target, all on placeholder tokens.
    assert row["cf_kind"] == [CF_LIKED, CF_DISLIKED, CF_USER, CF_ITEM] and row["cf_id"] == [1, 2, 7, 3]
    assert all(ids[p] == pb.placeholder_id for p in row["cf_pos"])


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_prompt_pieces_tokenize_as_the_tokenizer_does(request, model):
    """The builder's batched call to the fast tokenizer's backend gives each piece the ids the
    tokenizer's own call gives it (special-token text, non-ASCII and spacing included)."""
    tok = _tokenizer(request.getfixturevalue(model))
    pb = PromptBuilder(tok, cf_tokens=True)
    assert pb._backend is not None  # the fast path is the one under test
    texts = [
        '"Toy Story (1995)" ',
        ' [Animation, Children\'s]: Yes\n- "Amélie" ',
        "  two  spaces\tand a tab ",
        "<|endoftext|> inside text",
        "Answer:",
    ]
    assert pb.encode_texts(texts) == [tok(t, add_special_tokens=False).input_ids for t in texts]
    # A whole prefix: one call for all its pieces, the same ids as one call per piece.
    text = pb.prefix_text([(ITEMS[1], 1), (ITEMS[2], 0)])
    pieces = text.split("\x00")  # the CF slots: user, then each history item
    want: list[int] = []
    for k, piece in enumerate(pieces):
        want += tok(piece, add_special_tokens=False).input_ids if piece else []
        want += [pb.placeholder_id] if k < len(pieces) - 1 else []
    enc = pb.encode_prefix(7, [(1, ITEMS[1], 1), (2, ITEMS[2], 0)])
    assert enc.ids[len(pb.bos) :] == want and len(enc.cf_pos) == 3


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_file_tokenizer_builds_the_prompts_autotokenizer_builds(request, model, tmp_path):
    """The scorer's prompt process reads the saved tokenizer.json with the tokenizers library alone
    (no transformers import): the same special ids, BOS rule, answer ids and prompt ids as
    AutoTokenizer; a tokenizer transformers would rewrite on load (here: add_bos_token set) or a
    chat template falls back to AutoTokenizer."""
    from thinkrec.model.base import FileTokenizer, load_prompt_tokenizer

    path = request.getfixturevalue(model)
    fast, auto = load_prompt_tokenizer(path), _tokenizer(path)
    assert isinstance(fast, FileTokenizer)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(fast, name) == getattr(auto, name), name
    pf, pa_ = PromptBuilder(fast, cf_tokens=True), PromptBuilder(auto, cf_tokens=True)
    assert (pf.yes_id, pf.no_id, pf.placeholder_id, pf.bos) == (
        pa_.yes_id,
        pa_.no_id,
        pa_.placeholder_id,
        pa_.bos,
    )
    assert pf.bos == ([auto.bos_token_id] if model == "tiny_llama" else [])
    hist = [(1, ITEMS[1], 1), (2, ITEMS[2], 0)]
    assert pf.encode_prefix(7, hist) == pa_.encode_prefix(7, hist)
    assert pf.encode_candidate(3, ITEMS[3]) == pa_.encode_candidate(3, ITEMS[3])
    assert not isinstance(load_prompt_tokenizer(path, chat_template=True), FileTokenizer)
    edited = tmp_path / "tok"
    shutil.copytree(path, edited)
    cfg = json.loads((edited / "tokenizer_config.json").read_text())
    (edited / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    assert not isinstance(load_prompt_tokenizer(str(edited)), FileTokenizer)


def test_examples_text_only_have_no_cf_slots(tiny_qwen):
    pb = PromptBuilder(_tokenizer(tiny_qwen), cf_tokens=False)
    (row,) = D.encode_rows(pb, [_sample(1)], ITEMS, history_len=10, max_answer_tokens=12)
    assert row["cf_pos"] == [] and row["kind"] == D.KIND_LABEL
    assert row["answer_ids"] == [pb.yes_id, pb.tok.eos_token_id]


@pytest.mark.parametrize(
    ("n_label", "n_reason", "ratio", "cap", "want_reason", "want_total"),
    [
        (100, 50, 0.2, 40, 8, 40),  # the paper's 0.2 : 0.8 mix
        (100, 3, 0.2, 40, 3, 40),  # too few traces: all of them, the rest label samples
        (100, 50, 0.0, 40, 0, 40),  # reasoning off
        (10, 0, 0.2, None, 0, 10),  # no cap: every label sample once
    ],
)
def test_mix_samples_ratio_and_determinism(n_label, n_reason, ratio, cap, want_reason, want_total):
    label = [D.Sample(u, 1, 1, (), ()) for u in range(n_label)]
    reason = [D.Sample(1000 + u, 1, 1, (), (), "why") for u in range(n_reason)]
    mixed = D.mix_samples(label, reason, ratio=ratio, cap=cap, seed=3)
    assert len(mixed) == want_total
    assert sum(s.kind == D.KIND_REASONING for s in mixed) == want_reason
    assert mixed == D.mix_samples(label, reason, ratio=ratio, cap=cap, seed=3)
    if want_total > 1:
        assert mixed != D.mix_samples(label, reason, ratio=ratio, cap=cap, seed=4)


# -- loss -------------------------------------------------------------------------------------------
def _bce(x: float, y: float) -> float:
    return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))


@pytest.mark.parametrize(
    ("kinds", "y_hat", "think", "labels"),
    [
        ([D.KIND_REASONING], [1.5], [2.0], [1]),
        ([D.KIND_LABEL], [1.5], [2.0], [1]),
        ([D.KIND_REASONING, D.KIND_LABEL], [-0.3, 2.2], [0.7, 4.0], [0, 1]),
        ([D.KIND_LABEL, D.KIND_LABEL], [0.0, -1.0], [1.0, 1.0], [1, 0]),
    ],
)
def test_loss_weights_by_hand(kinds, y_hat, think, labels):
    rows = [
        {
            "prompt_ids": [5, 6],
            "answer_ids": [9],
            "cf_pos": [],
            "cf_kind": [],
            "cf_id": [],
            "kind": k,
            "label": y,
            "user_id": 1,
        }
        for k, y in zip(kinds, labels, strict=True)
    ]
    batch = make_batch(rows, 0, rec_weight_reasoning=0.1, rec_weight_label=0.9)
    loss, _ = combine(torch.tensor(y_hat), torch.tensor(think), batch.label, batch.w_rec)
    w = [0.1 if k == D.KIND_REASONING else 0.9 for k in kinds]
    want = sum(
        wi * _bce(x, y) + (1 - wi) * c for wi, x, y, c in zip(w, y_hat, labels, think, strict=True)
    ) / len(kinds)
    assert float(loss) == pytest.approx(want, rel=1e-6)


def test_answer_positions():
    rows, cols, j = answer_positions(torch.tensor([3, 5]), torch.tensor([2, 3]))
    assert rows.tolist() == [0, 0, 1, 1, 1]
    assert cols.tolist() == [2, 3, 4, 5, 6]
    assert j.tolist() == [0, 1, 0, 1, 2]


def test_model_loss_matches_full_forward(tiny_qwen):
    """y_hat and L_think from the position-selective forward equal a plain full-logits forward."""
    from thinkrec.model.base import load_model, load_tokenizer

    tok = load_tokenizer(tiny_qwen)
    pb = PromptBuilder(tok, cf_tokens=False)
    samples = [_sample(1, "liked both"), _sample(0)]
    rows = D.encode_rows(pb, samples, ITEMS, history_len=10, max_answer_tokens=8)
    for r, s in zip(rows, samples, strict=True):
        r["kind"] = s.kind
    llm = load_model(tiny_qwen).eval()
    model = ThinkRecLM(llm, None, None, pb.yes_id)
    batch = make_batch(rows, pb.placeholder_id, rec_weight_reasoning=0.1, rec_weight_label=0.9)
    with torch.no_grad():
        y_hat, think = model(batch)
        loss, _ = loss_fn(model, batch)
        want_loss = 0.0
        for b, r in enumerate(rows):
            seq = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
            logits = llm(input_ids=seq).logits[0]  # (T, V)
            P, A = len(r["prompt_ids"]), len(r["answer_ids"])
            assert float(y_hat[b]) == pytest.approx(float(logits[P - 1, pb.yes_id]), abs=1e-4)
            ce = torch.nn.functional.cross_entropy(logits[P - 1 : P - 1 + A], seq[0, P : P + A])
            assert float(think[b]) == pytest.approx(float(ce), abs=1e-4)
            w = 0.1 if r["kind"] == D.KIND_REASONING else 0.9
            want_loss += w * _bce(float(y_hat[b]), r["label"]) + (1 - w) * float(ce)
    assert float(loss) == pytest.approx(want_loss / len(rows), abs=1e-4)


# -- Ray Train: sharding, DeepSpeed ---------------------------------------------------------------------
def test_data_sharding_gives_workers_distinct_samples(ray_local, tmp_path):
    """Every phase's rows in one dataset: each worker gets the same number of each phase's rows
    (DDP needs equal steps per phase), and no row goes to two workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = str(tmp_path)

    def shard_loop(config):  # defined here so Ray ships it by value
        import ray.train

        rows = D.shard_rows(ray.train.get_dataset_shard("train"))
        rank = ray.train.get_context().get_world_rank()
        keys = [[r["phase"], int(r["idx"])] for r in rows]
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(keys))
        ray.train.report({"n": len(rows)})

    rows = {
        "global": [{"idx": k, "user_id": k % 5, "prompt_ids": [1, 2, k]} for k in range(21)],
        "expert-0": [{"idx": k, "user_id": k % 3, "prompt_ids": [3, k]} for k in range(9)],
    }
    TorchTrainer(
        shard_loop,
        train_loop_config={"out": out},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="shard", storage_path=out),
        datasets={"train": D.phases_dataset(rows, 2, trim=True)},
    ).fit()
    a = [tuple(k) for k in json.loads(Path(out, "rank0.json").read_text())]
    b = [tuple(k) for k in json.loads(Path(out, "rank1.json").read_text())]
    for shard in (a, b):  # 21 and 9 rows trimmed to multiples of 2 workers, then halved
        assert sum(p == "global" for p, _ in shard) == 10
        assert sum(p == "expert-0" for p, _ in shard) == 4
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted([("global", k) for k in range(20)] + [("expert-0", k) for k in range(8)])


def _lora_b_nonzero(adapter_dir: str) -> bool:
    w = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return any(k.endswith("lora_B.weight") and float(v.abs().max()) > 0 for k, v in w.items())


@pytest.mark.parametrize(
    "zero_stage,offload",
    [pytest.param(2, False, id="zero2"), pytest.param(3, True, id="zero3-offload", marks=pytest.mark.slow)],
)
def test_deepspeed_two_cpu_workers(ray_local, tmp_path, zero_stage, offload):
    """DeepSpeed (fp32, torch AdamW, gloo, gradient clipping) runs the global phase on 2 CPU workers:
    ZeRO-2, and ZeRO-3 with the optimizer offloaded to CPU."""
    from thinkrec.model.base import load_tokenizer
    from thinkrec.train.bench import synthetic_samples
    from thinkrec.train.stage import ensure_base_model, fit_phase

    cfg = train_config(
        str(tmp_path),
        **{
            "train.backend": "deepspeed",
            "train.zero_stage": zero_stage,
            "train.offload": offload,
            "train.grad_accum": 2,
            "train.max_grad_norm": 1.0,  # DeepSpeed's gradient_clipping
        },
    )
    base = ensure_base_model(cfg)
    pb = PromptBuilder(load_tokenizer(base), cf_tokens=False)
    samples, items = synthetic_samples(16)
    rows = D.encode_rows(pb, samples, items, history_len=4, max_answer_tokens=4)
    spec = {
        "phase": "global",
        "cf_tokens": False,
        "lr": 1e-2,
        "epochs": 1,
        "base_model": base,
        "yes_id": pb.yes_id,
        "pad_id": pb.placeholder_id,
    }
    d, curves = fit_phase(cfg, spec, rows, rows[:8], f"ds-zero{zero_stage}")
    assert json.loads(Path(os.path.join(d, "curves.json")).read_text()) == curves
    # 16 rows / 2 workers / batch 4 = 2 micro-batches per worker = 1 optimizer step (grad_accum 2).
    assert len(curves["loss"]) == 1 and math.isfinite(curves["loss"][0])
    assert len(curves["grad_norm"]) == 1 and curves["grad_norm"][0] > 0  # the engine's, before its clip
    assert len(curves["valid"]) == 1
    assert _lora_b_nonzero(os.path.join(d, "adapter"))


def two_phases(cfg, meta="t"):
    """A global phase and an expert starting from its published adapter, on synthetic rows, with
    their results under the run root's train/_phases."""
    from thinkrec.model.base import load_tokenizer
    from thinkrec.train.bench import synthetic_samples
    from thinkrec.train.stage import PHASES_DIR, TRAIN_DIR, Phase, ensure_base_model

    storage = Storage.from_config(cfg)
    base = ensure_base_model(cfg)
    pb = PromptBuilder(load_tokenizer(base), cf_tokens=False)
    samples, items = synthetic_samples(16)
    rows = D.encode_rows(pb, samples, items, history_len=4, max_answer_tokens=4)

    def out(name):
        return storage.uri(TRAIN_DIR, PHASES_DIR, name)

    common = {"meta": {"run": meta}, "base_model": base, "yes_id": pb.yes_id, "pad_id": pb.placeholder_id}
    common |= {"cf_tokens": False, "lr": 1e-2, "epochs": 1}
    expert = {
        "name": "expert-0",
        "out": out("expert-0"),
        "phase": "expert",
        "init_adapter": f"{out('global')}/adapter",
    }
    return [
        Phase({**common, "name": "global", "out": out("global"), "phase": "global"}, rows, rows[:8]),
        Phase({**common, **expert}, rows[:8], []),
    ]


def expert_started_from_global(g: dict, e: dict) -> bool:
    """Only the last layer's LoRA trains in an expert: its other weights are the global adapter's."""
    return any(not torch.equal(e[k], g[k]) for k in g) and any(torch.equal(e[k], g[k]) for k in g)


def test_phases_share_one_run_and_a_rerun_skips_published_phases(ray_local, tmp_path):
    """Two phases (global, then an expert starting from the global adapter) in one TorchTrainer run.
    Rerun under the same name after the expert's result is removed: the global phase is skipped (its
    published files untouched) and the expert is trained again from it, to the same weights."""
    from thinkrec.train.stage import Phase, fit_phases

    cfg = train_config(str(tmp_path), **{"train.expert_last_layers": 1})
    phases = two_phases(cfg)
    out = {p.spec["name"]: p.spec["out"] for p in phases}
    curves = fit_phases(cfg, phases, "two-phases")
    assert list(curves) == ["global", "expert-0"]
    assert len(curves["global"]["valid"]) == 1 and "valid" in curves["expert-0"]
    runs = os.listdir(os.path.join(str(tmp_path), "train", "_ray"))
    assert runs == ["two-phases"]  # one Ray Train run for both phases
    g_file = os.path.join(out["global"], "adapter", "adapter_model.safetensors")
    e_file = os.path.join(out["expert-0"], "adapter", "adapter_model.safetensors")
    g_before, e_before = os.stat(g_file).st_mtime_ns, load_file(e_file)
    assert expert_started_from_global(load_file(g_file), e_before)

    shutil.rmtree(out["expert-0"])
    os.remove(f"{out['expert-0']}.json")
    again = fit_phases(cfg, phases, "two-phases")
    assert os.stat(g_file).st_mtime_ns == g_before
    assert again["global"] == curves["global"]
    for k, v in load_file(e_file).items():
        torch.testing.assert_close(v, e_before[k], atol=1e-6, rtol=0)
    # A marker from another run (other meta) is not this run's result: the phase trains again.
    other = [Phase({**p.spec, "meta": {"run": "u"}}, p.train_rows, p.valid_rows) for p in phases]
    fit_phases(cfg, other, "two-phases-u")
    assert os.stat(g_file).st_mtime_ns != g_before


def test_grad_norm_recorded_and_clipped(ray_local, tmp_path):
    """Every optimizer step's pre-clip gradient norm is in the curves (``grad_norm``). A clip above
    every norm of a run changes nothing (the same weights to the bit, so turning it on keeps the
    trajectory of a run it never fires in); one below every norm keeps the first step's gradient
    and changes the trained weights."""
    from thinkrec.train.stage import fit_phases

    def train(name, clip):
        cfg = train_config(str(tmp_path / name), **{"train.max_grad_norm": clip})
        (phase, _) = two_phases(cfg)
        curves = fit_phases(cfg, [phase], name)["global"]
        return curves, load_file(os.path.join(phase.spec["out"], "adapter", "adapter_model.safetensors"))

    free, w_free = train("free", None)
    norms = free["grad_norm"]
    assert len(norms) == len(free["loss"]) > 1
    assert all(math.isfinite(n) and n > 0 for n in norms)
    high, w_high = train("high", 10 * max(norms))
    assert high["grad_norm"] == norms
    assert all(torch.equal(w_high[k], w_free[k]) for k in w_free)
    low, w_low = train("low", min(norms) / 4)
    assert low["grad_norm"][0] == norms[0]  # the same first gradient, before its clip
    assert any(not torch.allclose(w_low[k], w_free[k], atol=1e-6) for k in w_free)


# -- the stage end to end -------------------------------------------------------------------------------
def _files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(dp, f), root) for dp, _, fs in os.walk(root) for f in fs}


@pytest.mark.slow
def test_stage_end_to_end_thinkrec(prepared, tmp_path):
    from peft import PeftModel

    from thinkrec.model.base import load_model
    from thinkrec.scoring.base import base_model_path
    from thinkrec.train import stage

    make_train_inputs(prepared, str(tmp_path))
    cfg = train_config(str(tmp_path), **{"train.n_groups": 2, "train.expert_last_layers": 1})
    summary = stage.run(cfg)
    out = os.path.join(str(tmp_path), "train")
    adapter_files = {"adapter_config.json", "adapter_model.safetensors"}
    want = {
        "_SUCCESS",
        "_manifest.json",
        "_config.json",
        "projector.safetensors",
        "fusion.json",
        "groups.json",
        "curves.json",
    }
    want |= {f"adapters/{a}/{f}" for a in ("global", "expert-0", "expert-1") for f in adapter_files}
    assert _files(out) == want
    assert summary["phases"] == ["global", "projector", "expert-0", "expert-1"]
    assert summary["reasoning_samples"] == round(0.2 * 32)
    fusion = json.loads(Path(os.path.join(out, "fusion.json")).read_text())
    assert np.array(fusion["prototypes"]).shape == (2, CF_DIM)
    assert fusion["experts"] == ["expert-0", "expert-1"] and fusion["tau"] == cfg.fusion.tau
    groups = json.loads(Path(os.path.join(out, "groups.json")).read_text())
    assert sum(groups["sizes"]) == groups["train_users"] and "cohens_d_mean" in groups
    curves = json.loads(Path(os.path.join(out, "curves.json")).read_text())
    assert len(curves["global"]["loss"]) == 32 // (2 * 4) and len(curves["global"]["valid"]) == 1
    # Only the last layer's LoRA differs between an expert and the global adapter (2 layers, last 1).
    g = load_file(os.path.join(out, "adapters/global/adapter_model.safetensors"))
    for e in ("expert-0", "expert-1"):
        x = load_file(os.path.join(out, f"adapters/{e}/adapter_model.safetensors"))
        assert set(x) == set(g)
        changed = {k for k in g if not torch.equal(g[k], x[k])}
        assert changed and all(".layers.1." in k for k in changed)
        assert all(torch.equal(g[k], x[k]) for k in g if ".layers.0." in k)
    # The adapters load with peft onto the base model.
    m = PeftModel.from_pretrained(load_model(base_model_path(cfg)), os.path.join(out, "adapters/expert-1"))
    m.load_adapter(os.path.join(out, "adapters/global"), adapter_name="global")
    assert set(m.peft_config) == {"default", "global"}
    # A rerun with the same config and inputs is skipped.
    assert stage.run(cfg) == {"skipped": True, "uri": cfg.storage.output_root.rstrip("/") + "/train"}


@pytest.mark.slow
def test_stage_tallrec_variant(prepared, tmp_path):
    from thinkrec.train import stage

    make_train_inputs(prepared, str(tmp_path))
    cfg = train_config(
        str(tmp_path), **{"model.cf_tokens": False, "train.reasoning": False, "train.experts": False}
    )
    summary = stage.run(cfg)
    out = os.path.join(str(tmp_path), "train")
    assert summary["phases"] == ["global"] and summary["reasoning_samples"] == 0
    assert _files(out) == {
        "_SUCCESS", "_manifest.json", "_config.json", "curves.json",
        "adapters/global/adapter_config.json", "adapters/global/adapter_model.safetensors",
    }  # fmt: skip


# -- benchmarks --------------------------------------------------------------------------------------
def _gpu_bench():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_training.py"
    if str(path.parent) not in sys.path:  # as when run as a script: its siblings import
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("gpu_training", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_training_bench_tiny_cpu_smoke(capsys):
    bench = _gpu_bench()
    args = bench.parse_args([])
    assert (args.batch, args.seq, args.lora_r) == (8, 512, 8)  # the GPU defaults
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--batch", "0"])
    result = bench.main(["--tiny", "--steps", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokens_per_s"] == pytest.approx(result["tokens_per_s"])
    assert result["flops_per_token"] == 4 * result["params_matmul"]
    assert result["tokens_per_s"] > 0 and result["mfu_vs_measured_ceiling"] > 0
    assert result["lora_params"] == 2 * 2 * 8 * (64 + 64)  # 2 layers x (q, v) x r (in + out)


def _summary_case():
    """Two prefixes over a 2-d CF table and one candidate: row 0 is user 1 with history 1 (liked),
    2 (disliked), 3 (liked); row 1 is user 2 with no history; the target is item 4. Returns the
    table, the parts, and row 0's hand-computed ``rate`` and ``taste``."""
    from thinkrec.model.prompt import Encoded
    from thinkrec.model.thinkrec import CFTable

    item = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [9.0, 9.0]])
    cf = CFTable(torch.tensor([[0.0, 0.0], [7.0, 8.0], [-7.0, 6.0]]), item)
    p0 = Encoded([5] * 6, [0, 1, 2, 3], [CF_USER, CF_LIKED, CF_DISLIKED, CF_LIKED], [1, 1, 2, 3])
    p1 = Encoded([5] * 2, [0], [CF_USER], [2])
    cand = Encoded([6] * 3, [1], [CF_ITEM], [4])
    taste = ((item[1] - item[2] + item[3]) / 3).tolist()  # label-signed mean: [-0.5, 1.1667]
    rate = 2 * (2 + 1) / (3 + 2) - 1  # 2 likes of 3, smoothed: 0.2
    return cf, p0, p1, cand, rate, taste


def test_history_summary_by_hand(tmp_path):
    """The user slot's [label, rate, taste] columns against a hand computation, per batch row; the
    prefix embeds the same alone as with a candidate; the projector file keeps ``history``."""
    from thinkrec.model.thinkrec import CFProjector, collate, input_embeddings, with_history

    cf, p0, p1, cand, rate, taste = _summary_case()
    batch = collate([p0 + cand, p1 + cand], pad_id=0)
    out = with_history(cf.lookup(batch.cf_kind, batch.cf_id), batch.cf_row, batch.cf_kind)
    expect = [
        [7.0, 8.0, 0.0, rate, *taste],
        [1.0, 2.0, 1.0, 0.0, 0.0, 0.0],
        [3.0, -1.0, -1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 1.0, 0.0, 0.0, 0.0],
        [9.0, 9.0, 0.0, 0.0, 0.0, 0.0],  # the target: its vector only
        [-7.0, 6.0, 0.0, 0.0, 0.0, 0.0],  # no history: rate 0 (= 1/2 smoothed), taste 0
        [9.0, 9.0, 0.0, 0.0, 0.0, 0.0],
    ]
    assert torch.allclose(out, torch.tensor(expect), atol=1e-6)

    proj = CFProjector(2, 8, history=True)
    proj.save(str(tmp_path / "p.safetensors"))
    proj = CFProjector.load(str(tmp_path / "p.safetensors"))
    assert proj.history and proj.net[0].in_features == 6
    embed = torch.nn.Embedding(10, 8)
    model = type("M", (), {"get_input_embeddings": lambda self: embed})()
    with torch.no_grad():
        full = input_embeddings(model, batch, cf, proj)  # (2, 9, 8)
        alone = input_embeddings(model, collate([p0, p1], pad_id=0), cf, proj)
    assert torch.equal(full[0, :6], alone[0, :6]) and torch.equal(full[1, :2], alone[1, :2])


def test_projector_input_scale_by_hand(tmp_path):
    """``CFProjector.fit_scale``: each CF column over the table's users and items (row 0, the padding,
    left out) is scaled to unit root-mean-square, computed by hand here; the history layout's
    ``label`` and ``rate`` keep scale 1 and ``taste`` takes the vectors' scale. The scale is saved with
    the weights, a projector file without it loads unscaled, and scoring through a loaded projector
    equals the fitted one's output."""
    from safetensors.torch import load_file, save_file

    from thinkrec.model.thinkrec import CFProjector, CFTable

    cf = CFTable(
        torch.tensor([[9.0, 9.0], [3.0, 1.0], [0.0, 1.0]]),  # row 0 is padding: never counted
        torch.tensor([[9.0, 9.0], [4.0, 1.0], [0.0, 1.0], [0.0, -2.0]]),
    )
    # column 0: 3, 0, 4, 0, 0 -> rms sqrt(25 / 5) = sqrt(5); column 1: 1, 1, 1, 1, -2 -> rms sqrt(8 / 5)
    inv = torch.tensor([5**-0.5, (8 / 5) ** -0.5])
    proj = CFProjector(2, 8)
    assert torch.equal(proj.scale, torch.ones(2))  # unfitted: no scaling
    proj.fit_scale(cf)
    assert torch.allclose(proj.scale, inv, atol=1e-6)
    assert not proj.scale.requires_grad
    x = torch.tensor([[3.0, 1.0], [0.0, -2.0]])
    with torch.no_grad():
        assert torch.allclose(proj(x), proj.net(x * inv), atol=1e-6)

    hist = CFProjector(2, 8, history=True)
    hist.fit_scale(cf)
    assert torch.allclose(hist.scale, torch.cat([inv, torch.ones(2), inv]), atol=1e-6)

    path = str(tmp_path / "p.safetensors")
    proj.save(path)
    back = CFProjector.load(path)
    assert torch.equal(back.scale, proj.scale)
    with torch.no_grad():
        assert torch.equal(back(x), proj(x))
    old = {k: v for k, v in load_file(path).items() if k != "scale"}  # a file saved before the scale
    save_file(old, path, metadata={"cf_dim": "2", "hidden_size": "8", "history": "0", "history_item": "0"})
    assert torch.equal(CFProjector.load(path).scale, torch.ones(2))


def test_history_summary_on_the_item_slot_by_hand(tmp_path):
    """``model.cf_history_item``: the target item's slot carries its row's [rate, taste] beside its own
    vector (history items keep their label only); a candidate embedded apart from its prefix, with
    ``prefix_summary``, embeds as it does after the prefix; the projector file keeps the flag."""
    from thinkrec.model.thinkrec import CFProjector, collate, input_embeddings, prefix_summary, with_history

    cf, p0, p1, cand, rate, taste = _summary_case()
    batch = collate([p0 + cand, p1 + cand], pad_id=0)
    out = with_history(cf.lookup(batch.cf_kind, batch.cf_id), batch.cf_row, batch.cf_kind, on_item=True)
    expect = [
        [7.0, 8.0, 0.0, rate, *taste],
        [1.0, 2.0, 1.0, 0.0, 0.0, 0.0],
        [3.0, -1.0, -1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 1.0, 0.0, 0.0, 0.0],
        [9.0, 9.0, 0.0, rate, *taste],  # the target: its vector and its user's summary
        [-7.0, 6.0, 0.0, 0.0, 0.0, 0.0],
        [9.0, 9.0, 0.0, 0.0, 0.0, 0.0],  # no history: rate 0, taste 0
    ]
    assert torch.allclose(out, torch.tensor(expect), atol=1e-6)

    CFProjector(2, 8, history=True, history_item=True).save(str(tmp_path / "p.safetensors"))
    proj = CFProjector.load(str(tmp_path / "p.safetensors"))
    assert proj.history and proj.history_item
    embed = torch.nn.Embedding(10, 8)
    model = type("M", (), {"get_input_embeddings": lambda self: embed})()
    with torch.no_grad():
        full = input_embeddings(model, batch, cf, proj)  # (2, 9, 8)
        summary = prefix_summary(collate([p0, p1], pad_id=0), cf, proj)
        alone = input_embeddings(model, collate([cand, cand], pad_id=0), cf, proj, summary)
        blind = input_embeddings(model, collate([cand, cand], pad_id=0), cf, proj)  # no summary given
    assert torch.allclose(full[0, 6:9], alone[0], atol=1e-6) and torch.allclose(
        full[1, 2:5], alone[1], atol=1e-6
    )
    assert not torch.allclose(full[0, 6:9], blind[0], atol=1e-3)  # the summary is what makes them equal
    assert prefix_summary(collate([p0], pad_id=0), cf, CFProjector(2, 8, history=True)) is None


@pytest.mark.parametrize(
    ("key", "off", "on"),
    [
        ("model.cf_history_item", False, True),
        ("model.cf_scale", False, True),
        ("train.max_grad_norm", None, 1.0),
    ],
)
def test_late_keys_enter_the_train_fingerprint_only_when_on(prepared, monkeypatch, key, off, on):
    """``model.cf_history_item``, ``model.cf_scale`` and ``train.max_grad_norm`` off (the defaults)
    leave the train stage's hashed config as it was before the keys existed, so models trained
    before them are not retrained; on, each is hashed."""
    from thinkrec.train import stage as train_stage

    storage = Storage.from_config(prepared)
    seen = []
    real = train_stage.fingerprint
    monkeypatch.setattr(train_stage, "fingerprint", lambda s, *a: seen.append(s) or real(s, *a))
    base = {"model.cf_tokens": False, "train.experts": False}  # no CF model among this root's inputs
    section, name = key.split(".")
    off_meta = train_stage.stage_meta(prepared.replace(**base, **{key: off}), storage)
    on_meta = train_stage.stage_meta(prepared.replace(**base, **{key: on}), storage)
    assert name not in seen[0][section] and seen[1][section][name] == on
    assert {k: v for k, v in seen[1][section].items() if k != name} == seen[0][section]
    assert off_meta["config_hash"] != on_meta["config_hash"]
    assert off_meta["input_hash"] == on_meta["input_hash"]
