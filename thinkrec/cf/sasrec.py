"""SASRec (Kang & McAuley, 2018), the sequential CF encoder of the reference: hidden 64, 2 self-attention
blocks, sequences of the last 25 items, trained with BCE on each position's next item against one
sampled negative item, as the reference does.

Sequences are left-padded with item 0, so the last position always holds the most recent item. As
in the reference implementation, attention uses only the causal mask (position t reads positions
<= t); padded positions are zeroed after the embedding and after every block instead of being masked
as keys, so a row of padding never attends over an empty set (which would give NaN).

For the CF tokens, a user's vector is the sequence representation at the last position of the
user's train sequence (the items before the split), and an item's vector is its input embedding;
<user, item> is SASRec's logit for that item coming next.

Status: the module, the mask and the loss; the Ray Train loop, driver and checkpoints in the shape
of ``thinkrec.cf.mf`` are not written yet, so ``cf.model`` accepts only ``mf``.
"""

from __future__ import annotations

import torch
from torch import nn


def causal_mask(length: int) -> torch.Tensor:
    """(T, T) bool, True where attention is forbidden: query t may read keys 0..t only."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)


class _Block(nn.Module):
    """Pre-norm self-attention + point-wise feed-forward, each with a residual (the reference's)."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ff_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ff = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (T, T) causal mask -> (B, T, H)."""
        q = self.attn_norm(x)
        x = q + self.attn(q, x, x, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.ff_norm(x))


class SASRec(nn.Module):
    """Item embeddings (I+1, H) with row 0 = padding, learned positions (max_len, H), ``blocks`` blocks."""

    def __init__(
        self,
        num_items: int,
        hidden: int = 64,
        blocks: int = 2,
        max_len: int = 25,
        heads: int = 1,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.item = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.position = nn.Embedding(max_len, hidden)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden, eps=1e-8)

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded item ids, T <= max_len -> (B, T, H) representation at every position."""
        T = seq.shape[1]
        keep = (seq != 0).unsqueeze(-1)  # (B, T, 1)
        x = (
            self.item(seq) * self.item.embedding_dim**0.5 + self.position.weight[self.max_len - T :]
        )  # (B, T, H)
        x = self.dropout(x) * keep
        mask = causal_mask(T).to(seq.device)
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.norm(x)

    def user_vectors(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, H): the representation at the last position (the user's most recent item)."""
        return self.encode(seq)[:, -1]

    def bce_loss(self, seq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Mean BCE over non-padding positions: (B, T) inputs, (B, T) next items, (B, T) negatives."""
        h = self.encode(seq)  # (B, T, H)
        pos_logit = (h * self.item(pos)).sum(-1)  # (B, T)
        neg_logit = (h * self.item(neg)).sum(-1)  # (B, T)
        valid = pos != 0
        bce = nn.functional.binary_cross_entropy_with_logits
        loss = bce(pos_logit, torch.ones_like(pos_logit), reduction="none") + bce(
            neg_logit, torch.zeros_like(neg_logit), reduction="none"
        )
        return (loss * valid).sum() / valid.sum().clamp(min=1)
