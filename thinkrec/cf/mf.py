"""Matrix factorisation (the reference CF model): score(u, i) = <e_u, e_i> (+ b_u + b_i + b), trained
with BCE-with-logits on the train split's labels through Ray Train (DDP over gloo on CPU).

Shape of every CF model module here: a ``torch.nn.Module`` (``MF``), a Ray Train job (``job``: how
to build, score and validate it, for the shared loop of ``thinkrec.cf.loop``), ``result`` (the best
epoch's weights as a ``CFTable``, + extras such as biases, and the per-epoch history) and a driver
(``train``) that runs the job alone. Checkpoints and resume are the shared loop's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from thinkrec.cf import loop
from thinkrec.data import schema as S
from thinkrec.model.thinkrec import CFTable

PAIRS = "pairs"
"""The Ray Dataset of train rows (user_id, item_id, label) MF and LightGCN train on."""


class MF(nn.Module):
    """User and item embeddings of size ``dim``; row 0 of each table is padding (never trained)."""

    def __init__(self, num_users: int, num_items: int, dim: int, bias: bool = False) -> None:
        """``num_users``/``num_items`` count real ids 1..N; the tables have N + 1 rows."""
        super().__init__()
        self.user = nn.Embedding(num_users + 1, dim, padding_idx=0)
        self.item = nn.Embedding(num_items + 1, dim, padding_idx=0)
        # Small init: logits start near 0 (p = 0.5), so early BCE gradients are well scaled.
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        with torch.no_grad():
            self.user.weight[0].zero_()
            self.item.weight[0].zero_()
        self.bias = bias
        if bias:
            self.user_bias = nn.Embedding(num_users + 1, 1, padding_idx=0)
            self.item_bias = nn.Embedding(num_items + 1, 1, padding_idx=0)
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
            self.global_bias = nn.Parameter(torch.zeros(1))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B,) user ids, (B,) item ids -> (B,) logits."""
        out = (self.user(users) * self.item(items)).sum(-1)  # (B,)
        if self.bias:
            out = out + self.user_bias(users)[:, 0] + self.item_bias(items)[:, 0] + self.global_bias
        return out

    def table(self) -> tuple[CFTable, dict[str, torch.Tensor]]:
        """The embeddings as a CFTable and the biases (empty without them), detached copies."""
        table = CFTable(self.user.weight.detach().clone(), self.item.weight.detach().clone())
        extras: dict[str, torch.Tensor] = {}
        if self.bias:
            extras = {
                "user": self.user_bias.weight.detach()[:, 0].clone(),
                "item": self.item_bias.weight.detach()[:, 0].clone(),
                "global": self.global_bias.detach().clone(),
            }
        return table, extras


def logits(
    table: CFTable,
    users: np.ndarray,
    items: np.ndarray,
    biases: dict[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """MF logits from saved weights: the same formula as ``MF.forward``. Ids beyond a table (unknown)
    read its zero row, like ``CFTable.lookup``. (n,), (n,) -> (n,) float32."""
    u = torch.from_numpy(np.array(users, dtype=np.int64))  # copies: inputs may be read-only views
    i = torch.from_numpy(np.array(items, dtype=np.int64))
    u = torch.where((u >= 0) & (u < len(table.user)), u, torch.zeros_like(u))
    i = torch.where((i >= 0) & (i < len(table.item)), i, torch.zeros_like(i))
    with torch.no_grad():
        out = (table.user[u] * table.item[i]).sum(-1)  # (n,)
        if biases:
            out = out + biases["user"][u] + biases["item"][i] + biases["global"]
    return out.float().numpy()


# -- Ray Train job and driver ---------------------------------------------------------------------
def _build(config: dict[str, Any]) -> MF:
    return MF(config["num_users"], config["num_items"], config["dim"], config["bias"])


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch[S.USER_ID], batch[S.ITEM_ID])  # (B,)


def _valid_scores(model: nn.Module, valid: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users, items, labels = valid
    table, biases = model.table()
    return users, labels, logits(table, users, items, biases)


@dataclass
class TrainResult:
    table: CFTable
    """Best epoch's embeddings, (U+1, d) and (I+1, d)."""
    biases: dict[str, torch.Tensor]
    """user (U+1,), item (I+1,), global (1,); empty without ``cf.bias``."""
    best_epoch: int
    history: list[dict[str, Any]]


def job(
    cfg: Any,
    train_ds: Any,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    num_users: int,
    num_items: int,
) -> loop.Job:
    """MF's training on ``train_ds`` (a Ray Dataset of user_id, item_id, label); ``valid`` = (user
    ids, item ids, labels) for model selection."""
    import ray

    c = cfg.cf
    config = {
        "num_users": num_users,
        "num_items": num_items,
        "dim": c.dim,
        "bias": c.bias,
        # By reference: only rank 0 fetches the validation rows.
        "valid": ray.put(tuple(np.asarray(a, dtype=np.int64) for a in valid)),
    }
    return loop.Job("mf", _build, _logits, _valid_scores, config, PAIRS, train_ds)


def result(job: loop.Job, best: dict[str, torch.Tensor], state: dict[str, Any]) -> TrainResult:
    """The job's best epoch as a CFTable and biases, with its history."""
    model = _build(job.config)
    model.load_state_dict(best)
    table, biases = model.table()
    return TrainResult(table, biases, int(state["best_epoch"]), list(state["history"]))


def train(
    cfg: Any,
    train_ds: Any,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    num_users: int,
    num_items: int,
    **run: Any,
) -> TrainResult:
    """MF alone in its own Ray Train run; ``run`` = ``run_name``, ``storage_path``,
    ``storage_filesystem`` as for ``loop.train`` (a rerun with the same name resumes). The cf stage
    runs ``job`` with its baselines' jobs in one run instead."""
    j = job(cfg, train_ds, valid, num_users=num_users, num_items=num_items)
    return result(j, *loop.train([j], cfg, **run)[j.name])
