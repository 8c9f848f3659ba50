"""Runs the vLLM offline generation backend in its own process (vLLM needs a __main__ guard) and
writes its results to JSON for tests/test_generation_vllm.py. One engine start serves every check:
one-hot gates, exact mixtures (merged once per distinct gate), CF tokens as prompt embeddings, a gate
of the wrong width (quarantined, the batch goes on), and the explain stage's answer-first decoding.

    python tests/generation_vllm_check.py --base <tiny model dir> --root <root with artifacts> --out out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

PROMPTS = ["User 1 liked Toy Story.", "Recommend something with space ships and a robot in it, please"]
# Gates over [global, expert-0, expert-1]: the kind of each is the key's last part.
GATES = {"global": [1, 0, 0], "e0": [0, 1, 0], "e1": [0, 0, 1], "mix": [0, 0.5, 0.5], "mix3": [0.2, 0.5, 0.3]}
CF_ROWS = [(1, 3, "global"), (2, 5, "mix3"), (3, 7, "mix")]  # (user, candidate item, gate)
BAD_GATE = "bad|gate"
DECODING = {"max_new_tokens": 6}
# The explain stage's answer-first decoding (first token among Yes/No, then ".", no early end), greedy.
ANSWER_FIRST = {"max_new_tokens": 6, "min_new_tokens": 6}


def answer_first(base: str, binary: bool = False):
    """binary: the answer from the raw Yes logit alone (the explain stage's); else between the two."""
    from thinkrec.generation.base import Decoding
    from thinkrec.model.base import load_tokenizer
    from thinkrec.model.prompt import PromptBuilder

    pb = PromptBuilder(load_tokenizer(base))
    return Decoding(**ANSWER_FIRST, first_token_ids=(pb.yes_id, pb.no_id), after_first_ids=pb.separator_ids,
                    first_token_binary=binary)  # fmt: skip


def text_requests():
    from thinkrec.generation.base import GenRequest

    return [
        GenRequest(f"text{p}|{g}", prompt, gate=np.array(gate, dtype=np.float64), adapter=g)
        for p, prompt in enumerate(PROMPTS)
        for g, gate in GATES.items()
    ]


def cf_requests(base: str):
    """Encoded prompts with CF slots (the explain stage's shape: user prefix, then the candidate)."""
    from thinkrec.generation.base import GenRequest
    from thinkrec.model.base import load_tokenizer
    from thinkrec.model.prompt import ItemInfo, PromptBuilder

    pb = PromptBuilder(load_tokenizer(base), cf_tokens=True)
    out = []
    for user, item, g in CF_ROWS:
        hist = [(i, ItemInfo(f"Movie number {i}", ("drama",)), (user + i) % 2) for i in range(1, 4)]
        enc = pb.encode_prefix(user, hist) + pb.encode_candidate(item, ItemInfo(f"Film {item}", ("comedy",)))
        assert enc.cf_pos, "the prompt must carry CF slots"
        out.append(GenRequest(f"cf{user}|{g}", encoded=enc, gate=np.array(GATES[g], np.float64), adapter=g))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    for a in ("--base", "--root", "--out"):
        ap.add_argument(a, required=True)
    args = ap.parse_args()
    from conftest import small_config

    from thinkrec.generation.base import Decoding, GenRequest
    from thinkrec.generation.vllm import VLLMGenerator
    from thinkrec.scoring.base import load_artifacts

    cfg = small_config(
        args.root,
        **{"model.base": args.base, "score.vllm_max_model_len": 512, "score.vllm_enforce_eager": True,
           "score.vllm_kv_cache_gib": 0.25},
    )  # fmt: skip
    t0 = time.perf_counter()
    gen = VLLMGenerator(cfg, load_artifacts(cfg))
    start_s = time.perf_counter() - t0
    d = Decoding(**DECODING)
    bad = GenRequest(BAD_GATE, PROMPTS[0], gate=np.ones(2))
    text = gen.generate([*text_requests(), bad], d)
    cf = gen.generate(cf_requests(args.base), d)
    mixtures_after_first = len(gen.mixtures)
    again = gen.generate(text_requests(), d)  # the same mixtures again: no new merge
    first = gen.generate([*text_requests()[:2], *cf_requests(args.base)], answer_first(args.base))
    binary = gen.generate([*text_requests()[:2], *cf_requests(args.base)], answer_first(args.base, True))
    # A hot rationale (vLLM takes T <= 2) with the answer pinned to the Yes logit's sign (answer_temperature 0).
    pinned_d = dataclasses.replace(answer_first(args.base, True), temperature=2.0, answer_temperature=0.0)
    pinned = gen.generate([*text_requests()[:2], *cf_requests(args.base)], pinned_d)
    result = {
        "start_s": start_s,
        "text": [r.__dict__ for r in text],
        "cf": [r.__dict__ for r in cf],
        "again": [r.__dict__ for r in again],
        "answer_first": [r.__dict__ for r in first],
        "answer_first_binary": [r.__dict__ for r in binary],
        "answer_pinned": [r.__dict__ for r in pinned],
        "mixtures": [mixtures_after_first, len(gen.mixtures)],
        "embeds": gen.embedder is not None,
    }
    gen.close()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
