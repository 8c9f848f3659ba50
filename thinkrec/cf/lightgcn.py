"""LightGCN (He et al., 2020), the graph CF encoder of the reference (dim 64): user and item embeddings
propagated over the user-item graph without weights or non-linearities,

    E^(k+1) = Â E^(k),   Â = D^-1/2 A D^-1/2,   E = mean(E^(0), ..., E^(K)),

scored by <e_u, e_i> and trained with BPR on the positive train pairs against uniformly sampled
negative items, as the reference does.

Status: the module, the normalised graph and the BPR loss; the Ray Train loop, driver and
checkpoints in the shape of ``thinkrec.cf.mf`` are not written yet, so ``cf.model`` accepts only
``mf``.

Node numbering of the graph: users 0..U (row 0 = padding), then items at U + 1 + (0..I), so a table
row keeps its id; padding rows have no edges and stay zero.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from thinkrec.model.thinkrec import CFTable


def normalized_adjacency(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> torch.Tensor:
    """Â = D^-1/2 A D^-1/2 of the symmetric bipartite graph with one edge per distinct (user, item)
    pair, as a sparse COO tensor of shape (N, N), N = (U + 1) + (I + 1). Isolated nodes (degree 0)
    get zero rows and columns instead of a division by zero."""
    n_u = num_users + 1
    n = n_u + num_items + 1
    pairs = np.unique(np.stack([np.asarray(users, np.int64), np.asarray(items, np.int64)], axis=1), axis=0)
    u = torch.as_tensor(pairs[:, 0])
    i = torch.as_tensor(pairs[:, 1]) + n_u
    rows = torch.cat([u, i])  # (2E,) both directions
    cols = torch.cat([i, u])
    deg = torch.bincount(rows, minlength=n).double()  # (N,)
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
    values = (inv_sqrt[rows] * inv_sqrt[cols]).float()  # (2E,) 1 / sqrt(d_r d_c)
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, (n, n), check_invariants=True
    ).coalesce()


class LightGCN(nn.Module):
    """``dim``-wide embeddings of every graph node, ``layers`` propagation steps over ``adjacency``."""

    def __init__(
        self, num_users: int, num_items: int, dim: int, layers: int, adjacency: torch.Tensor
    ) -> None:
        super().__init__()
        self.num_users, self.num_items, self.layers = num_users, num_items, layers
        self.embedding = nn.Embedding(num_users + 1 + num_items + 1, dim)
        nn.init.normal_(self.embedding.weight, std=0.1)  # the reference's N(0, 0.1) init
        self.register_buffer("adjacency", adjacency, persistent=False)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> user (U+1, d) and item (I+1, d) final embeddings (the mean over layers 0..K)."""
        e = self.embedding.weight  # (N, d)
        acc = e
        for _ in range(self.layers):
            e = torch.sparse.mm(self.adjacency, e)  # (N, d)
            acc = acc + e
        out = acc / (self.layers + 1)
        n_u = self.num_users + 1
        return out[:n_u], out[n_u:]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B,) user ids, (B,) item ids -> (B,) logits <e_u, e_i>."""
        user, item = self.propagate()
        return (user[users] * item[items]).sum(-1)

    def bpr_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Mean BPR loss -log sigmoid(s(u, pos) - s(u, neg)) over (B,) triples; one propagation."""
        user, item = self.propagate()
        u = user[users]  # (B, d)
        diff = (u * item[pos]).sum(-1) - (u * item[neg]).sum(-1)  # (B,)
        return nn.functional.softplus(-diff).mean()

    def table(self) -> CFTable:
        """The propagated embeddings as a CFTable, padding rows zeroed, detached copies."""
        with torch.no_grad():
            user, item = (t.detach().clone() for t in self.propagate())
        user[0] = 0
        item[0] = 0
        return CFTable(user, item)
