"""The ``hf`` generation backend on the tiny model: left padding, fused per-row gates, beams."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from conftest import small_config

from thinkrec.generation.base import Decoding, GenRequest
from thinkrec.generation.hf import HFGenerator
from thinkrec.model.prompt import ItemInfo

PROMPTS = [
    "User 1 liked Toy Story.",
    "User 2 liked a very long list of films: Heat, Alien, Jaws, Fargo, Brazil and Ran. Next",
    "Hello",
    "Recommend something with space ships and a robot in it, please",
]
GREEDY = Decoding(max_new_tokens=6)


@pytest.fixture(scope="module")
def setup(tiny_qwen, tmp_path_factory, one_torch_thread):
    from artifacts import make_artifacts

    from thinkrec.scoring.base import load_artifacts

    cfg = small_config(
        str(tmp_path_factory.mktemp("gen-hf")),
        **{"model.base": tiny_qwen, "generation.batch_size": 4, "generation.torch_threads": 1},
    )
    make_artifacts(cfg, tiny_qwen, n_users=8, n_items=20, n_experts=2, lora_std=0.5)
    return cfg, load_artifacts(cfg)


def texts(gen, reqs, d=GREEDY):
    res = gen.generate(reqs, d)
    assert all(r.error is None for r in res) and [r.key for r in res] == [q.key for q in reqs]
    return [r.text for r in res]


def next_token_logits(gen):
    """(prompts, V): the base model's raw logits after each of PROMPTS, one prompt per forward pass."""
    import torch

    with torch.inference_mode():
        rows = [gen.lm(gen.tok(p, return_tensors="pt", add_special_tokens=False).input_ids).logits[0, -1]
                for p in PROMPTS]  # fmt: skip
    return torch.stack(rows)


def test_batched_left_padding_equals_one_at_a_time(setup):
    cfg, _ = setup
    gen = HFGenerator(cfg)
    reqs = [GenRequest(str(i), p) for i, p in enumerate(PROMPTS)]
    batched = texts(gen, reqs)
    alone = [texts(gen, [r])[0] for r in reqs]
    assert batched == alone
    assert all(isinstance(t, str) for t in batched)
    res = gen.generate(reqs[:1], GREEDY)
    assert res[0].new_tokens > 0


@pytest.mark.parametrize("beams", [1, 2])
def test_per_row_gates_in_one_batch(setup, beams):
    cfg, art = setup
    gen = HFGenerator(cfg, art)
    d = Decoding(max_new_tokens=6, num_beams=beams)
    gates = [np.array(g, dtype=np.float64) for g in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.5, 0.3])]
    reqs = [GenRequest(f"k{i}", PROMPTS[1], gate=g, adapter="x") for i, g in enumerate(gates)]
    batched = texts(gen, reqs, d)
    alone = [texts(gen, [r], d)[0] for r in reqs]
    assert batched == alone  # each row generated under its own gate, whatever its batch
    assert len(set(batched)) > 1  # the gates matter (adapters with std 0.5)


def test_sampling_follows_the_seed(setup):
    cfg, _ = setup
    gen = HFGenerator(cfg)
    reqs = [GenRequest("a", PROMPTS[0])]
    d1 = Decoding(max_new_tokens=6, temperature=1.0, seed=1)
    assert texts(gen, reqs, d1) == texts(gen, reqs, d1)


def test_first_token_among_the_answer_tokens_and_min_new_tokens(setup):
    """Decoding.first_token_ids: the first new token is one of them, in text and CF-token prompts;
    after_first_ids follow it; min_new_tokens: no end of text before."""
    from thinkrec.model.base import load_tokenizer
    from thinkrec.model.prompt import PromptBuilder

    cfg, art = setup
    pb = PromptBuilder(load_tokenizer(cfg.model.base))
    gen = HFGenerator(cfg, art)
    reqs = [GenRequest(str(i), p) for i, p in enumerate(PROMPTS)]
    reqs.append(GenRequest("cf", encoded=pb.encode_prefix(1, []) + pb.encode_candidate(2, ItemInfo("Heat"))))
    free = gen.generate(reqs, Decoding(max_new_tokens=6, temperature=1.0, seed=3))
    d = Decoding(max_new_tokens=6, temperature=1.0, seed=3, first_token_ids=(pb.yes_id, pb.no_id),
                 after_first_ids=pb.separator_ids, min_new_tokens=6)  # fmt: skip
    got = gen.generate(reqs, d)
    assert not any(r.text.startswith((" Yes", " No")) for r in free)  # else the check says nothing
    assert all(r.text.startswith((" Yes.", " No.")) for r in got), [r.text for r in got]
    assert all(r.new_tokens == 6 for r in got)
    assert d.hash() != Decoding(max_new_tokens=6, temperature=1.0, seed=3).hash()


def test_binary_answer_follows_the_yes_logit_alone(setup):
    """Decoding.first_token_binary: the answer is Yes with probability sigmoid(Yes logit / T), the No
    logit read as 0; greedy, Yes iff the raw Yes logit is > 0, whatever the No logit says. The head's
    No row is set to twice the Yes row, so a draw between the two logits answers the opposite; with
    the Yes row then negated every answer flips, so both answers are seen."""
    import torch

    from thinkrec.model.base import load_tokenizer
    from thinkrec.model.prompt import PromptBuilder

    cfg, _ = setup
    pb = PromptBuilder(load_tokenizer(cfg.model.base))
    gen = HFGenerator(cfg)  # the base model: its raw logits are one forward pass away
    reqs = [GenRequest(str(i), p) for i, p in enumerate(PROMPTS)]
    d = Decoding(max_new_tokens=3, repetition_penalty=1.3, first_token_ids=(pb.yes_id, pb.no_id),
                 after_first_ids=pb.separator_ids, first_token_binary=True)  # fmt: skip

    def raw() -> np.ndarray:  # (prompts, 2): the Yes and No logits at the answer position
        return next_token_logits(gen)[:, [pb.yes_id, pb.no_id]].float().numpy()

    head = gen.lm.get_output_embeddings().weight
    seen = []
    for _ in range(2):
        with torch.no_grad():
            head[pb.no_id] = 2 * head[pb.yes_id]
        logits = raw()
        answers = [t.startswith(" Yes.") for t in texts(gen, reqs, d)]
        assert answers == (logits[:, 0] > 0).tolist(), (answers, logits)
        between = [
            t.startswith(" Yes.") for t in texts(gen, reqs, dataclasses.replace(d, first_token_binary=False))
        ]
        assert between == [not a for a in answers]  # else the check says nothing
        seen += answers
        with torch.no_grad():
            head[pb.yes_id] *= -1
    assert set(seen) == {True, False}
    assert d.hash() != dataclasses.replace(d, first_token_binary=False).hash()


def test_answer_temperature_draws_the_answer_apart_from_the_rationale(setup):
    """Decoding.answer_temperature: the answer is Yes with probability sigmoid(Yes logit / answer T)
    while the rationale is sampled at ``temperature``. At T = 50 with answer T = 0 every answer is
    the greedy one (Yes iff the raw Yes logit > 0) on every seed; at T = 50 alone the answers are
    close to coin flips, so some differ (else the check says nothing)."""
    import torch

    from thinkrec.generation.hf import _FirstTokenAmong
    from thinkrec.model.base import load_tokenizer
    from thinkrec.model.prompt import PromptBuilder

    cfg, _ = setup
    pb = PromptBuilder(load_tokenizer(cfg.model.base))
    gen = HFGenerator(cfg)
    reqs = [GenRequest(str(i), p) for i, p in enumerate(PROMPTS)]
    greedy = (next_token_logits(gen)[:, pb.yes_id] > 0).tolist()
    hot = Decoding(max_new_tokens=3, temperature=50.0, first_token_ids=(pb.yes_id, pb.no_id),
                   after_first_ids=pb.separator_ids, first_token_binary=True)  # fmt: skip
    pinned, free = [], []
    for seed in range(4):
        d = dataclasses.replace(hot, seed=seed)
        pinned += [
            t.startswith(" Yes.") for t in texts(gen, reqs, dataclasses.replace(d, answer_temperature=0.0))
        ]
        free += [t.startswith(" Yes.") for t in texts(gen, reqs, d)]
    assert pinned == greedy * 4
    assert free != greedy * 4

    # The processor's arithmetic: after generate()'s division by T, the draw over the two answers is
    # sigmoid(logit / answer T).
    scores = torch.tensor([[1.5, -0.7, 3.0], [-2.0, 5.0, 0.1]])
    for t, ta in ((0.7, 0.4), (0.4, 1.0), (1.0, 1.0)):
        out = _FirstTokenAmong((0, 1), 0, binary=True, ratio=ta / t)(torch.zeros(2, 0), scores.clone())
        p_first = torch.softmax(out[:, [0, 1]] / t, dim=-1)[:, 0]
        assert torch.allclose(p_first, torch.sigmoid(scores[:, 0] / ta)), (t, ta)
        assert torch.isinf(out[:, 2]).all()
    out = _FirstTokenAmong((0, 1), 0, binary=True, ratio=0.0)(torch.zeros(2, 0), scores.clone())
    assert torch.isinf(out[0, 1]) and not torch.isinf(out[0, 0])  # logit 1.5 > 0: Yes only
    assert torch.isinf(out[1, 0]) and not torch.isinf(out[1, 1])  # -2.0: No only


def test_answer_temperature_in_the_hash_and_the_vllm_draw():
    """None (the decoding's temperature) keeps the hash of settings stored before the field existed;
    0 and 0.4 are other settings. vLLM's draw (made in the stage from the raw Yes logit) reads it."""
    from types import SimpleNamespace

    from thinkrec.generation.base import _LATER_SETTINGS
    from thinkrec.generation.vllm import _binary_answer

    d = Decoding(temperature=0.7, first_token_ids=(7, 9), first_token_binary=True)
    hashes = {dataclasses.replace(d, answer_temperature=t).hash() for t in (None, 0.0, 0.4, 0.7)}
    assert len(hashes) == 4
    assert d.answer_draw_temperature() == 0.7
    plain = Decoding(temperature=0.7)  # no later setting: hashed as before any of them existed
    before = {k: v for k, v in dataclasses.asdict(plain).items() if k not in _LATER_SETTINGS}
    assert plain.hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert dataclasses.replace(d, temperature=0.0, answer_temperature=0.4).answer_draw_temperature() == 0.0
    with pytest.raises(ValueError, match="answer_temperature"):
        Decoding(answer_temperature=-1.0)

    def share_yes(dd: Decoding, logit: float) -> float:
        values = {7: SimpleNamespace(logprob=logit)}
        return float(np.mean([_binary_answer(dd, f"k{i}", values) == 7 for i in range(4000)]))

    for ta in (0.2, 1.5):
        expected = 1 / (1 + np.exp(-0.5 / ta))
        assert share_yes(dataclasses.replace(d, answer_temperature=ta), 0.5) == pytest.approx(
            expected, abs=0.03
        )
    assert share_yes(dataclasses.replace(d, answer_temperature=0.0), -0.01) == 0.0
    assert share_yes(dataclasses.replace(d, answer_temperature=0.0), 0.01) == 1.0


def test_no_repeat_ngrams_count_the_new_tokens_only():
    """A text prompt's own bigrams may be repeated (a rationale quotes its prompt); the new text's
    may not. hf's processor alone, over the whole sequence, bans the prompt's."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    from thinkrec.generation.hf import _NewTokensOnly

    rule = NoRepeatNGramLogitsProcessor(2)
    prompt = [5, 6, 7]

    def banned(ids: list[int], p) -> list[int]:
        return torch.isinf(p(torch.tensor([ids]), torch.zeros(1, 10)))[0].nonzero().flatten().tolist()

    assert banned(prompt + [5], rule) == [6]  # hf over prompt + new: the prompt's (5, 6) banned
    assert banned(prompt + [5], _NewTokensOnly(rule, len(prompt))) == []
    assert banned(prompt + [5, 6, 5], _NewTokensOnly(rule, len(prompt))) == [6]  # the new text's own


def test_prompt_cache_serves_repeats_and_reruns(setup, tmp_path):
    from generation_servers import Counting

    from thinkrec.generation.cache import CachedGenerator
    from thinkrec.io.fs import Storage

    cfg, _ = setup
    storage = Storage(root=str(tmp_path))
    hf = HFGenerator(cfg)
    reqs = [GenRequest("a", PROMPTS[0]), GenRequest("b", PROMPTS[1]), GenRequest("c", PROMPTS[0])]
    first = Counting(hf)
    res = CachedGenerator(first, storage, "cache/t").generate(reqs, GREEDY)
    assert first.rows == 2  # the repeated prompt is generated once
    assert [r.key for r in res] == ["a", "b", "c"] and res[2].text == res[0].text
    assert [(r.cached, r.tries) for r in res] == [(False, 1), (False, 1), (True, 0)]
    rerun = Counting(hf)  # a new actor or a rerun: the cache is read back from storage
    res2 = CachedGenerator(rerun, storage, "cache/t").generate(reqs, GREEDY)
    assert rerun.rows == 0 and [r.text for r in res2] == [r.text for r in res]
    assert all(r.cached and r.new_tokens == res[0].new_tokens for r in res2[::2])
    other = Counting(hf)  # other decoding settings never hit
    CachedGenerator(other, storage, "cache/t").generate(reqs[:1], Decoding(max_new_tokens=5))
    off = Counting(hf)
    CachedGenerator(off, storage, "cache/t", enabled=False).generate(reqs, GREEDY)
    assert (other.rows, off.rows) == (1, 3)


def test_llm_keywords_extractor(setup, tmp_path):
    from generation_servers import Counting

    from thinkrec.keywords.base import EXTRACTORS, ItemText, postprocess
    from thinkrec.keywords.llm import LLMExtractor

    cfg = small_config(str(tmp_path), **{"model.base": setup[0].model.base, "generation.torch_threads": 1})
    assert EXTRACTORS["llm"] == "thinkrec.keywords.llm:LLMExtractor"
    items = [
        ItemText(1, "Heat", "A crime film about a heist in Los Angeles."),
        ItemText(2, "Alien", "Space horror."),
    ]
    hf = HFGenerator(cfg)
    first = Counting(hf)
    ex = LLMExtractor(cfg, generator=first)
    raw = ex(items)
    assert first.rows == 2
    assert len(raw) == 2 and all(isinstance(w, str) and w and "," not in w for ws in raw for w in ws)
    assert all(len(postprocess(ws)) <= 10 for ws in raw)
    rerun = Counting(hf)
    assert LLMExtractor(cfg, generator=rerun)(items) == raw and rerun.rows == 0  # a rerun costs nothing
    # Beam search is deterministic, so a cache-free run gives the same keywords.
    off = small_config(str(tmp_path), **{"model.base": cfg.model.base, "generation.cache": False})
    assert LLMExtractor(off, generator=hf)(items) == raw
    dec = ex.decoding
    assert ex.settings() == {"backend": "hf", "model": cfg.model.base, "adapter": "base",
                             "prompt": ex.settings()["prompt"], "decoding": dec.hash()}  # fmt: skip
    assert ex.label == f"llm:hf:{cfg.model.base}:base:{dec.hash()}"
    # The reference decoding by default; keywords.llm_* change it, and with it every cache key.
    assert (dec.num_beams, dec.max_new_tokens, dec.repetition_penalty, dec.temperature) == (4, 32, 1.2, 0.0)
    short = small_config(str(tmp_path), **{"model.base": cfg.model.base, "keywords.llm_max_new_tokens": 4,
                                            "keywords.llm_num_beams": 1})  # fmt: skip
    fresh = Counting(hf)
    ex4 = LLMExtractor(short, generator=fresh)
    assert (ex4.decoding.max_new_tokens, ex4.decoding.num_beams) == (4, 1)
    assert ex4.settings()["decoding"] != dec.hash()
    assert all(len(ws) <= 4 for ws in ex4(items)) and fresh.rows == 2  # not served from the cache
