"""Packed multi-item scoring: one user's candidates after a single copy of the prefix, in one sequence
(torch only, so the GPU benchmark script uses the scorer's own code).

A pack is ``prefix + cand_1 + ... + cand_m`` with a block attention mask: the prefix attends to itself
causally, and each candidate attends to the whole prefix and to itself causally, never to another
candidate. Each candidate's position ids restart at the prefix's end (P, P + 1, ...), so every
candidate token sees exactly the keys, values and rotary positions it would see in its own full prompt
``prefix + cand_k``: the scores equal full prompts' up to summation order. The answer position of
candidate k is its own last token. FlashInfer's multi-item scoring and SGLang's ``/v1/score`` use the
same layout. Unlike the cached-prefix pass (kv_cache.py), the prefix's keys and values are never
copied per candidate: one forward computes the prefix once and all of its candidates.

The mask comes two ways, the same rule in both (True = attend): ``mask()``, an explicit boolean
(B, 1, T, T) tensor for SDPA, and ``block_mask()``, FlexAttention's block-sparse form. transformers
passes either through unchanged, and the scorer's attention (causal_attn.py) sends a block mask to
FlexAttention. SDPA's masked kernel computes all T x T scores, the candidate-to-candidate ones it
then throws away: with 100 candidates of 56 tokens that is about 25x the attention FLOPs the layout
needs. FlexAttention skips every key block the mask empties, so only the prefix's blocks and each
candidate's own diagonal blocks run. Padding positions attend to themselves only, so their hidden
states stay finite (a query with no key would give NaN, and NaN values times a zero weight are still
NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Packs:
    """Layout of a batch of packs, in token coordinates of the padded (B, T) batch."""

    segment: torch.Tensor  # (B, T) long: 0 prefix, k >= 1 candidate k, -1 padding
    positions: torch.Tensor  # (B, T) long position ids (0 at padding)
    answer: torch.Tensor  # (B, M) long: each candidate's last token; padded slots repeat a real one
    count: torch.Tensor  # (B,) long: candidates in each pack (M = count.max())
    shift: torch.Tensor  # (B,) long: left-padding offset of each row (0 when right-padded)

    def mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool: query i attends key j."""
        seg = self.segment
        T = seg.shape[1]
        t = torch.arange(T, device=seg.device)
        causal = t[None, :, None] >= t[None, None, :]  # (1, T, T): j <= i
        qs, ks = seg[:, :, None], seg[:, None, :]  # (B, T, 1), (B, 1, T)
        allowed = causal & (ks >= 0) & ((ks == 0) | (ks == qs))  # (B, T, T)
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=seg.device)[None]  # padding: itself
        return allowed[:, None]

    def block_mask(self, device: torch.device | str | None = None, block_size: int = 128) -> Any:
        """The same rule as ``mask()`` as a FlexAttention ``BlockMask`` (heads broadcast) on
        ``device``: key blocks the rule empties for a query block are never computed."""
        from torch.nn.attention.flex_attention import create_block_mask

        seg = self.segment.to(device) if device is not None else self.segment
        B, T = seg.shape

        def rule(b: Any, h: Any, q: Any, k: Any) -> Any:  # one (query, key) pair; vmapped by torch
            sq, sk = seg[b, q], seg[b, k]
            return ((k <= q) & (sk >= 0) & ((sk == 0) | (sk == sq))) | (q == k)

        return create_block_mask(rule, B, None, T, T, device=seg.device, BLOCK_SIZE=block_size)


def layout(prefix_lens: Sequence[int], cand_lens: Sequence[Sequence[int]], left_pad: bool = False) -> Packs:
    """The layout of packs ``prefix_b + cands_b``: ``prefix_lens[b]`` tokens, then candidates of
    ``cand_lens[b]`` tokens each (at least one candidate of at least one token per pack)."""
    B = len(prefix_lens)
    totals = [p + sum(c) for p, c in zip(prefix_lens, cand_lens, strict=True)]
    T, M = max(totals), max(len(c) for c in cand_lens)
    segment = torch.full((B, T), -1, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    answer = torch.zeros((B, M), dtype=torch.long)
    shift = torch.tensor([T - n if left_pad else 0 for n in totals])
    for b, (p, cs) in enumerate(zip(prefix_lens, cand_lens, strict=True)):
        if not cs or min(cs) < 1:
            raise ValueError(f"pack {b}: every pack needs candidates of at least one token, got {list(cs)}")
        o = int(shift[b])
        segment[b, o : o + p] = 0
        positions[b, o : o + p] = torch.arange(p)
        s = o + p
        for k, c in enumerate(cs):
            segment[b, s : s + c] = k + 1
            positions[b, s : s + c] = torch.arange(p, p + c)  # restart at the prefix's end
            answer[b, k] = s + c - 1
            s += c
        answer[b, len(cs) :] = answer[b, len(cs) - 1]
    count = torch.tensor([len(c) for c in cand_lens])
    return Packs(segment, positions, answer, count, shift)


def shift_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Right-padded (B, T, ...) rows moved right by ``shift[b]`` (left padding); identity at 0."""
    if not bool((shift > 0).any()):
        return x
    return torch.stack([torch.roll(x[b], int(s), dims=0) for b, s in enumerate(shift.tolist())])
