"""LightGCN (He et al., 2020), the graph CF encoder of the reference (dim 64): user and item embeddings
propagated over the user-item graph without weights or non-linearities,

    E^(k+1) = Â E^(k),   Â = D^-1/2 A D^-1/2,   E = mean(E^(0), ..., E^(K)),

scored by <e_u, e_i>. As in the reference code, the graph holds the positive train pairs (label 1)
and the model is trained point-wise with BCE-with-logits on every train row's label (the LightGCN
paper's BPR is not what the reference trains with), 2 propagation layers.

Shape of ``thinkrec.cf.mf``: the module (``LightGCN``), a Ray Train job for the shared loop of
``thinkrec.cf.loop`` (``job``), ``result`` (the best epoch's propagated embeddings as a ``CFTable``
with the per-epoch history) and a driver (``train``) that runs the job alone.

CF-token export (cf/model/embeddings.safetensors, ``LAYOUT``): the propagated vectors themselves,
user ``[e_u]`` and item ``[e_i]`` (d = ``cf.lightgcn.dim``), so <user, item> is LightGCN's logit.

Node numbering of the graph: users 0..U (row 0 = padding), then items at U + 1 + (0..I), so a table
row keeps its id; padding rows have no edges and stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from thinkrec.cf import loop, mf
from thinkrec.data import schema as S
from thinkrec.model.thinkrec import CFTable

LAYOUT = "user=[e_u]; item=[e_i] (LightGCN's propagated embeddings, mean over layers 0..K)"


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

    def table(self) -> CFTable:
        """The propagated embeddings as a CFTable, padding rows zeroed, detached copies."""
        with torch.no_grad():
            user, item = (t.detach().clone() for t in self.propagate())
        user[0] = 0
        item[0] = 0
        return CFTable(user, item)


# -- Ray Train job and driver ---------------------------------------------------------------------
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch[S.USER_ID], batch[S.ITEM_ID])  # (B,)


def _valid_scores(model: nn.Module, valid: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users, items, labels = valid
    table = model.table()
    u, i = torch.as_tensor(users), torch.as_tensor(items)
    return users, labels, (table.user[u] * table.item[i]).sum(-1).numpy()


def _build(config: dict[str, Any]) -> LightGCN:
    """Every worker builds the same normalised graph from the positive train pairs (by reference in
    the object store) and, seeded, the same initial weights."""
    import ray

    users, items = ray.get(config["graph"])
    adjacency = normalized_adjacency(users, items, config["num_users"], config["num_items"])
    return LightGCN(config["num_users"], config["num_items"], config["dim"], config["layers"], adjacency)


@dataclass
class TrainResult:
    table: CFTable
    """Best epoch's propagated embeddings, (U+1, d) and (I+1, d); padding rows zero."""
    best_epoch: int
    history: list[dict[str, Any]]


def job(
    cfg: Any,
    train_ds: Any,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    positives: tuple[np.ndarray, np.ndarray],
    num_users: int,
    num_items: int,
) -> loop.Job:
    """LightGCN's training on ``train_ds`` (user_id, item_id, label; MF's rows) with the graph of
    ``positives`` (user ids, item ids of the positive train rows); ``valid`` = (user ids, item ids,
    labels)."""
    import ray

    c = cfg.cf.lightgcn
    config = {
        "num_users": num_users,
        "num_items": num_items,
        "dim": c.dim,
        "layers": c.layers,
        "graph": ray.put(tuple(np.asarray(a, dtype=np.int64) for a in positives)),
        "valid": ray.put(tuple(np.asarray(a, dtype=np.int64) for a in valid)),
    }
    return loop.Job("lightgcn", _build, _logits, _valid_scores, config, mf.PAIRS, train_ds)


def result(job: loop.Job, best: dict[str, torch.Tensor], state: dict[str, Any]) -> TrainResult:
    """The job's best epoch's propagated embeddings, with its history."""
    model = _build(job.config)
    model.load_state_dict(best)
    return TrainResult(model.table(), int(state["best_epoch"]), list(state["history"]))


def train(
    cfg: Any,
    train_ds: Any,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    positives: tuple[np.ndarray, np.ndarray],
    num_users: int,
    num_items: int,
    **run: Any,
) -> TrainResult:
    """LightGCN alone in its own Ray Train run; ``run`` = ``run_name``, ``storage_path``,
    ``storage_filesystem`` as for ``loop.train`` (a rerun with the same name resumes)."""
    j = job(cfg, train_ds, valid, positives=positives, num_users=num_users, num_items=num_items)
    return result(j, *loop.train([j], cfg, **run)[j.name])
