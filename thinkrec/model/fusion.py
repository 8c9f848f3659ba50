"""Instance-wise expert fusion: the ThinkRec gate, as per-row weights over adapters.

Adapters are indexed [global, expert-0, ..., expert-(N-1)]; a row's gate is a vector g of length
1 + N. The gate for user u (REFERENCE.md):

    w = softmax(cos(e_u, e_1..N) / tau)
    max(w) > single_base + single_per_group / N   -> one expert   g = onehot(1 + argmax w)
    entropy(w) >= entropy_frac * ln N             -> global       g = onehot(0)
    otherwise                                     -> mixture      g = [0, w]

With g per row, the exact output of the mixture is ``W x + sum_k g_k B_k A_k x``, which the fused
LoRA layer computes for a whole batch at once (scoring/engine/fused_lora.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def gate_weights(user_emb: torch.Tensor, prototypes: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, d) user CF embeddings, (N, d) prototypes -> (B, N) softmax(cos / tau)."""
    cos = torch.nn.functional.cosine_similarity(
        user_emb[:, None, :].double(), prototypes[None].double(), dim=-1
    )
    return torch.softmax(cos / tau, dim=-1)


def gate(
    user_emb: torch.Tensor, fusion: dict[str, Any], mode: str = "thinkrec"
) -> tuple[torch.Tensor, list[str]]:
    """Per-row adapter weights (B, 1+N) and a label per row ("global", "expert-2", "mix:0.61,0.39").

    mode "global" always picks the global adapter; "thinkrec" applies the paper's rule; "linear"
    uses the same rule but its mixtures are to be served by peft's linear merge (paper-compatible)."""
    B = user_emb.shape[0]
    protos = torch.tensor(fusion["prototypes"], dtype=torch.float64)
    N = protos.shape[0]
    g = torch.zeros(B, 1 + N, dtype=torch.float64)
    if mode == "global" or N == 0:
        g[:, 0] = 1
        return g, ["global"] * B
    w = gate_weights(user_emb, protos, fusion["tau"])
    wmax, arg = w.max(dim=-1)
    entropy = -(w * w.clamp_min(1e-30).log()).sum(-1)
    single = wmax > fusion["single_base"] + fusion["single_per_group"] / N
    uniform = entropy >= fusion["entropy_frac"] * math.log(N) if N > 1 else torch.zeros(B, dtype=torch.bool)
    labels = []
    for i in range(B):
        if single[i] or N == 1:
            g[i, 1 + arg[i]] = 1
            labels.append(f"expert-{int(arg[i])}")
        elif uniform[i]:
            g[i, 0] = 1
            labels.append("global")
        else:
            g[i, 1:] = w[i]
            labels.append("mix:" + ",".join(f"{x:.2f}" for x in w[i].tolist()))
    return g, labels
