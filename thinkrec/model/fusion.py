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

import json
import math
import os
from typing import Any

import numpy as np

# numpy, not torch: the scorer actor's prompt process computes the gates and imports no torch, so its
# start-up (beside the model's load, on the same cores) stays short.


def gate_weights(user_emb: Any, prototypes: Any, tau: float) -> np.ndarray:
    """(B, d) user CF embeddings, (N, d) prototypes -> (B, N) softmax(cos / tau), float64."""
    u = np.asarray(user_emb, dtype=np.float64)
    p = np.asarray(prototypes, dtype=np.float64)
    # torch's cosine_similarity: each norm clamped at 1e-8, so a zero embedding gives cos 0
    un = np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-8)
    pn = np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-8)
    cos = (u / un) @ (p / pn).T  # (B, N)
    z = cos / tau
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gate(user_emb: Any, fusion: dict[str, Any], mode: str = "thinkrec") -> tuple[np.ndarray, list[str]]:
    """Per-row adapter weights (B, 1+N) float64 and a label per row ("global", "expert-2",
    "mix:0.61,0.39"). ``user_emb``: (B, d), a numpy array or a CPU tensor.

    mode "global" always picks the global adapter; "thinkrec" applies the paper's rule; "linear"
    uses the same rule but its mixtures are to be served by peft's linear merge (paper-compatible)."""
    u = np.asarray(user_emb, dtype=np.float64)
    B = u.shape[0]
    protos = np.asarray(fusion["prototypes"], dtype=np.float64)
    N = protos.shape[0]
    g = np.zeros((B, 1 + N))
    if mode == "global" or N == 0:
        g[:, 0] = 1
        return g, ["global"] * B
    w = gate_weights(u, protos, fusion["tau"])
    arg = w.argmax(axis=-1)
    wmax = w.max(axis=-1)
    entropy = -(w * np.log(np.maximum(w, 1e-30))).sum(-1)
    single = wmax > fusion["single_base"] + fusion["single_per_group"] / N
    uniform = entropy >= fusion["entropy_frac"] * math.log(N) if N > 1 else np.zeros(B, dtype=bool)
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


def user_gate(
    users: np.ndarray | None, fusion: dict[str, Any] | None, n_adapters: int, user_id: int, mode: str
) -> tuple[np.ndarray, str]:
    """One user's (n_adapters,) weights and label: the global adapter for an unknown user (id 0) or
    a model without experts or CF table, else ``gate`` on the user's row of ``users`` (``mode``:
    ``fusion.mode``)."""
    if user_id == 0 or fusion is None or users is None or n_adapters == 1:
        g = np.zeros(n_adapters)
        g[0] = 1.0
        return g, "global"
    w, labels = gate(users[user_id : user_id + 1], fusion, mode)
    return w[0], labels[0]


def user_embeddings(path: str) -> np.ndarray:
    """The CF table's user rows (row 0 = unknown) as the gate reads them, float32 like ``CFTable``,
    loaded without torch."""
    from safetensors.numpy import load_file

    return load_file(path)["user"].astype(np.float32)


def save_fusion(
    path: str, prototypes: Any, fusion_cfg: Any, groups: list[str], extra: dict[str, Any]
) -> None:
    """fusion.json: the gate's settings at training (a record), the expert names and their (N, d)
    prototypes."""
    doc = {
        **{k: getattr(fusion_cfg, k) for k in GATE_SETTINGS},
        "experts": groups,
        "prototypes": np.asarray(prototypes, dtype=np.float64).tolist(),
        **extra,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


GATE_SETTINGS = ("tau", "single_base", "single_per_group", "entropy_frac")
"""The gate's settings (``fusion.*``). fusion.json records the values the model was trained with;
scoring and explanations apply the ones in their own config, so changing them never retrains."""


def load_fusion(path: str, settings: Any = None) -> dict[str, Any] | None:
    """fusion.json as written by the train stage, or None where the model has no experts. With
    ``settings`` (a ``FusionConfig``), its gate settings replace those recorded at training."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        doc = json.load(f)
    if settings is not None:
        doc |= {k: getattr(settings, k) for k in GATE_SETTINGS}
    return doc
