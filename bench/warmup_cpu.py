"""Warm-up steps on CPU: ``warmup_lm`` (one gather of the tied table, a persistent gradient buffer
cleared only where the last step wrote, fused AdamW) against its textbook form (``plain_warmup``:
embedding lookup, head rows by index, fresh autograd gradients, unfused AdamW), side by side on the
tiny Qwen2-style model with Qwen's real vocabulary (the demo's base).

    python bench/warmup_cpu.py [--steps 40] [--repeats 2]

Prints the seconds of each and ``warmup_speedup`` (textbook over ``warmup_lm``), and both loss curves'
last value (tests/test_warmup.py checks that the two are the same computation)."""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time


def plain_warmup(model, docs, *, eos_id, steps, lr, batch_size, seq_len, seed, negatives):
    """warmup_lm's sampled softmax in its textbook form (embedding lookup, head rows by index, fresh
    autograd gradients, unfused AdamW): what the fast path's gather and gradient buffer must equal."""
    import math

    import torch
    import torch.nn.functional as F

    from thinkrec.model.base import decoder_and_head

    body, head = decoder_and_head(model)
    stream = torch.tensor([t for d in docs for t in (*d, eos_id)])
    used = torch.unique(stream)
    position = torch.full((head.weight.shape[0],), -1, dtype=torch.long)
    position[used] = torch.arange(len(used))
    rest = torch.nonzero(position < 0).flatten()
    correction = math.log(len(rest) / negatives)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ramp, losses = max(1, steps // 10), []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / ramp)
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=g)
        window = stream[starts[:, None] + torch.arange(seq_len + 1)]
        drawn = rest[torch.randint(0, len(rest), (negatives,), generator=g)]
        h = body(input_ids=window[:, :-1]).last_hidden_state
        logits = h @ head.weight[torch.cat([used, drawn])].T
        logits = torch.cat([logits[..., : len(used)], logits[..., len(used) :] + correction], dim=-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), position[window[:, 1:]].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--used", type=int, default=8000, help="distinct tokens in the documents")
    args = p.parse_args()

    import torch

    from thinkrec.config import TinyModelConfig
    from thinkrec.model.base import build_tiny_model, load_model, warmup_lm

    torch.set_num_threads(1)
    path = build_tiny_model(tempfile.mkdtemp(prefix="thinkrec-bench-"), TinyModelConfig())
    rng = random.Random(0)
    docs = [[rng.randrange(args.used) for _ in range(150)] for _ in range(3000)]
    kw = {"eos_id": 0, "steps": args.steps, "lr": 3e-3, "batch_size": 8, "seq_len": 128, "seed": 0}
    seconds: dict[str, list[float]] = {"plain": [], "warmup_lm": []}
    last = {}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain_warmup), ("warmup_lm", warmup_lm)):
            model = load_model(path)
            t = time.perf_counter()
            losses = fn(model, docs, negatives=512, **kw)
            seconds[name].append(time.perf_counter() - t)
            last[name] = losses[-1]
    best = {k: min(v) for k, v in seconds.items()}
    out = {
        "steps": args.steps,
        "seconds": best,
        "warmup_speedup": best["plain"] / best["warmup_lm"],
        "last_loss": last,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
