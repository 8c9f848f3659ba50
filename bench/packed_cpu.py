"""One-off CPU measurement: packed multi-item scoring vs cached-prefix vs full prompts, pairs/s.

    PYTHONPATH=$PWD .venv/bin/python bench/packed_cpu.py [--per-user 20 100] [--threads 2]

Same tiny model, artifacts and rows as ``thinkrec bench scoring`` (thinkrec/scoring/bench.py); all
three modes measured side by side, interleaved, best of the rounds. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from thinkrec import config as C
from thinkrec.model.base import build_tiny_model, load_tokenizer
from thinkrec.model.prompt import PromptBuilder
from thinkrec.scoring.bench import make_rows, write_artifacts
from thinkrec.scoring.engine.hf import HFScorer

MODES = {
    "full": {"score.prefix_sharing": False},
    "cache": {"score.prefix_sharing": True, "score.prefix_mode": "cache"},
    "packed": {"score.prefix_sharing": True, "score.prefix_mode": "packed"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-user", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="thinkrec-packed-") as tmp:
        base = build_tiny_model(os.path.join(tmp, "base"), C.Config().model.tiny)
        art = write_artifacts(os.path.join(tmp, "art"), base, n_users=args.users, n_items=200)
        tok = load_tokenizer(base)
        for per_user in args.per_user:
            rows = make_rows(PromptBuilder(tok), art, args.users, per_user, 200)
            for bs in (64, per_user):
                cfg = C.load(None, {"model.base": base, "score.batch_size": bs})
                scorers = {m: HFScorer(cfg.replace(**o), art, tokenizer=tok) for m, o in MODES.items()}
                best = dict.fromkeys(MODES, 0.0)
                for _ in range(args.rounds):
                    for m, sc in scorers.items():
                        t = time.perf_counter()
                        sc.score(rows)
                        best[m] = max(best[m], len(rows) / (time.perf_counter() - t))
                key = f"per_user_{per_user}_batch_{bs}"
                out[key] = {f"{m}_pairs_per_s": round(v, 1) for m, v in best.items()}
                out[key]["packed_over_cache"] = round(best["packed"] / best["cache"], 3)
                out[key]["packed_over_full"] = round(best["packed"] / best["full"], 3)
                print(key, out[key], flush=True)
    print(json.dumps({"threads": args.threads, "users": args.users, "results": out}, indent=1))


if __name__ == "__main__":
    main()
