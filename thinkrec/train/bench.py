"""Training throughput on Ray Train: the tiny model with 1 and 2 CPU workers, side by side.

``thinkrec bench training [--quick] [--json FILE]``. Both runs use the same examples (built through
the prompt builder from synthetic items and histories), the same per-worker batch, and the real
train loop (DDP over gloo for 2 workers); samples/s and tokens/s count the training steps only
(model loading and Ray start-up excluded), timed inside the workers.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from thinkrec import config as C
from thinkrec.model.prompt import ItemInfo, PromptBuilder
from thinkrec.train import data as D

log = logging.getLogger(__name__)


def synthetic_samples(
    n: int, seed: int = 0, history_len: int = 10
) -> tuple[list[D.Sample], dict[int, ItemInfo]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    genres = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi", "Horror", "Animation"]
    items = {
        i: ItemInfo(f"Synthetic Movie {i} ({1950 + i % 70})", tuple(rng.choice(genres, 2, replace=False)))
        for i in range(1, 201)
    }
    samples = []
    for k in range(n):
        hist = rng.integers(1, 201, history_len)
        samples.append(
            D.Sample(
                user_id=1 + k % 50,
                item_id=int(rng.integers(1, 201)),
                label=int(rng.integers(0, 2)),
                history_items=tuple(int(x) for x in hist),
                history_labels=tuple(int(x) for x in rng.integers(0, 2, history_len)),
            )
        )
    return samples, items


def run(quick: bool = False) -> dict[str, Any]:
    import ray

    from thinkrec.model.base import load_tokenizer
    from thinkrec.train.stage import ensure_base_model, fit_phase

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = False
    if not ray.is_initialized():
        from thinkrec.runtime import start_local_ray

        start_local_ray(2)
        started = True
    root = tempfile.mkdtemp(prefix="thinkrec-bench-train-")
    try:
        n = 32 if quick else 128
        results: dict[int, dict[str, Any]] = {}
        for workers in (1, 2):
            cfg = C.load(
                None,
                {
                    "storage.output_root": os.path.join(root, f"w{workers}"),
                    "train.num_workers": workers,
                    "train.batch_size": 4,
                    "train.warmup_steps": 2,
                    "train.checkpoint_every": 10**6,
                    "train.max_answer_tokens": 8,
                },
            )
            base = ensure_base_model(cfg)
            tok = load_tokenizer(base)
            pb = PromptBuilder(tok, cf_tokens=False)
            samples, items = synthetic_samples(n)
            rows = D.encode_rows(pb, samples, items, history_len=10, max_answer_tokens=8)
            spec = {
                "phase": "global",
                "cf_tokens": False,
                "lr": 1e-3,
                "epochs": 1,
                "base_model": base,
                "yes_id": pb.yes_id,
                "pad_id": pb.placeholder_id,
            }
            _, curves = fit_phase(cfg, spec, rows, [], f"bench-{workers}w")
            tp = curves["throughput"]
            results[workers] = {
                "samples_per_s": tp["samples"] / tp["seconds"],
                "tokens_per_s": tp["tokens"] / tp["seconds"],
                "seconds": tp["seconds"],
                "samples": tp["samples"],
            }
        out = {
            "samples_per_s_1w": results[1]["samples_per_s"],
            "samples_per_s_2w": results[2]["samples_per_s"],
            "tokens_per_s_1w": results[1]["tokens_per_s"],
            "tokens_per_s_2w": results[2]["tokens_per_s"],
            "ratio_2w_over_1w": results[2]["tokens_per_s"] / results[1]["tokens_per_s"],
            "samples": n,
            "model": "tiny qwen2 (hidden 128, 2 layers), fp32, LoRA r=8 q/v, batch 4 per worker",
            "cpus": os.cpu_count(),
        }
        print(f"{'workers':>8} {'samples/s':>10} {'tokens/s':>10} {'seconds':>8}")
        for w, r in results.items():
            print(f"{w:>8} {r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.1f} {r['seconds']:>8.2f}")
        print(f"2 workers / 1 worker (tokens/s): {out['ratio_2w_over_1w']:.2f}x")
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if started:
            ray.shutdown()
