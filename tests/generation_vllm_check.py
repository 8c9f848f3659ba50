"""Runs the vLLM offline generation backend in its own process (vLLM needs a __main__ guard) and
writes its results to JSON for tests/test_generation_vllm.py.

    python tests/generation_vllm_check.py --base <tiny model dir> --root <root with artifacts> --out out.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

PROMPTS = ["User 1 liked Toy Story.", "Recommend something with space ships and a robot in it, please"]
GATES = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0.5, 0.5]]


def requests():
    from thinkrec.generation.base import GenRequest

    return [
        GenRequest(f"{p}|{g}", prompt, gate=np.array(gate, dtype=np.float64))
        for p, prompt in enumerate(PROMPTS)
        for g, gate in enumerate(GATES)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    for a in ("--base", "--root", "--out"):
        ap.add_argument(a, required=True)
    args = ap.parse_args()
    from conftest import small_config

    from thinkrec.generation.base import Decoding
    from thinkrec.generation.vllm import VLLMGenerator
    from thinkrec.scoring.base import load_artifacts

    cfg = small_config(
        args.root,
        **{"model.base": args.base, "score.vllm_max_model_len": 512, "score.vllm_enforce_eager": True,
           "score.vllm_kv_cache_gib": 0.25},
    )  # fmt: skip
    gen = VLLMGenerator(cfg, load_artifacts(cfg))
    res = gen.generate(requests(), Decoding(max_new_tokens=6))
    with open(args.out, "w") as f:
        json.dump([r.__dict__ for r in res], f)


if __name__ == "__main__":
    main()
