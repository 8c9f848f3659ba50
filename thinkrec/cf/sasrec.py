"""SASRec (Kang & McAuley, 2018), the sequential CF encoder of the reference: hidden 64, 2 self-attention
blocks, sequences of the last 25 items. As in the reference code, it is trained point-wise with
BCE-with-logits on every train row's label: the row's sequence (the user's last ``max_len`` items
strictly before the row's timestamp, liked or not, oldest first) is encoded, and the logit is the
last position's state dotted with the target item's embedding.

Sequences are left-padded with item 0, so the last position always holds the most recent item. As
in the reference implementation, attention uses only the causal mask (position t reads positions
<= t); padded positions are zeroed after the embedding and after every block instead of being masked
as keys, so a row of padding never attends over an empty set (which would give NaN).

Shape of ``thinkrec.cf.mf``: the module (``SASRec``), a Ray Train job for the shared loop of
``thinkrec.cf.loop`` (``job``), ``result`` (the best epoch's model with the per-epoch history) and a
driver (``train``) that runs the job alone.

CF-token export (cf/model/embeddings.safetensors, ``LAYOUT``; ``export``): the CF tokens are one
vector per user, so a user's vector is SASRec's state after the user's last ``max_len`` train items,
and an item's vector is its embedding (d = ``cf.sasrec.hidden``); <user, item> is SASRec's logit for
that item after the train sequence. The ``cf_sasrec`` scores of valid/test rows use each row's own
sequence instead (``scores``), as SASRec itself scores.
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

LAYOUT = "user=[h_u] (SASRec's last state after the user's train sequence); item=[e_i]"
SEQ = "seq"
"""Column of the training dataset: (max_len,) left-padded item ids per row."""
SEQUENCES = "sequences"
"""The Ray Dataset SASRec trains on (``seq``, item_id, label)."""


def sequences(
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    query_users: np.ndarray,
    query_timestamps: np.ndarray,
    max_len: int,
) -> np.ndarray:
    """For each query (user, timestamp): the user's last ``max_len`` items among the interactions
    (users, items, timestamps) strictly before that timestamp, oldest first, ordered by (timestamp,
    item id) as prepare orders histories; left-padded with 0. -> (n_queries, max_len) int64."""
    users, items, ts = (np.asarray(a, dtype=np.int64) for a in (users, items, timestamps))
    qu, qts = np.asarray(query_users, dtype=np.int64), np.asarray(query_timestamps, dtype=np.int64)
    if not len(users):
        return np.zeros((len(qu), max_len), np.int64)
    order = np.lexsort((items, ts, users))  # by user, then time, then item
    su, sts, si = users[order], ts[order], items[order]
    # One sortable int64 key per (user, time): times replaced by their rank among distinct times.
    times = np.unique(sts)
    span = np.int64(len(times) + 1)
    keys = su * span + np.searchsorted(times, sts, side="left")
    qkeys = qu * span + np.searchsorted(times, qts, side="left")  # rank of the first time >= query
    end = np.searchsorted(keys, qkeys, side="left")  # first interaction not strictly before
    start = np.searchsorted(keys, qu * span, side="left")  # the user's first interaction
    idx = end[:, None] - max_len + np.arange(max_len)[None, :]  # (n, L)
    keep = idx >= start[:, None]
    return np.where(keep, si[np.clip(idx, 0, len(si) - 1)], 0).astype(np.int64)


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

    def forward(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, T) sequences, (B,) target item ids -> (B,) logits <h_last, e_item>."""
        return (self.user_vectors(seq) * self.item(items)).sum(-1)


def scores(model: SASRec, seq: np.ndarray, items: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """SASRec's logit of each row from its own sequence, in eval mode. (n, T), (n,) -> (n,) float32."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(items), batch_size):
            s = torch.as_tensor(seq[lo : lo + batch_size])
            i = torch.as_tensor(items[lo : lo + batch_size])
            out.append(model(s, i).float().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def export(model: SASRec, users: np.ndarray, seq: np.ndarray, num_users: int) -> CFTable:
    """The CF-token vectors (module docstring): user rows from ``seq`` (each train user's last train
    items, (n, T)) for ``users`` (n,), every other user row zero; item rows the item embeddings."""
    was_training = model.training
    model.eval()
    user = torch.zeros(num_users + 1, model.item.embedding_dim)
    with torch.no_grad():
        for lo in range(0, len(users), 4096):
            vec = model.user_vectors(torch.as_tensor(seq[lo : lo + 4096]))  # (b, H)
            user[torch.as_tensor(users[lo : lo + 4096])] = vec.float()
        item = model.item.weight.detach().float().clone()
    model.train(was_training)
    user[0] = 0
    item[0] = 0
    return CFTable(user, item)


# -- Ray Train job and driver ---------------------------------------------------------------------
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch[SEQ], batch[S.ITEM_ID])  # (B,)


def _valid_scores(model: nn.Module, valid: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users, items, labels, seq = valid
    return users, labels, scores(model, seq, items)


def sizes(cfg: Any, num_items: int) -> dict[str, Any]:
    """The model's constructor arguments from ``cfg.cf.sasrec`` (what ``build_model`` takes)."""
    c = cfg.cf.sasrec
    return {
        "num_items": num_items,
        "hidden": c.hidden,
        "blocks": c.blocks,
        "max_len": c.max_len,
        "heads": c.heads,
        "dropout": c.dropout,
    }


def build_model(config: dict[str, Any]) -> SASRec:
    return SASRec(
        config["num_items"],
        hidden=config["hidden"],
        blocks=config["blocks"],
        max_len=config["max_len"],
        heads=config["heads"],
        dropout=config["dropout"],
    )


@dataclass
class TrainResult:
    model: SASRec
    """The best epoch's model (eval mode)."""
    best_epoch: int
    history: list[dict[str, Any]]


def job(
    cfg: Any, train_ds: Any, valid: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], *, num_items: int
) -> loop.Job:
    """SASRec's training on ``train_ds`` (``seq`` (max_len,), item_id, label per row); ``valid`` =
    (user ids, item ids, labels, sequences (n, max_len)) for model selection."""
    import ray

    config = {
        **sizes(cfg, num_items),
        "valid": ray.put(tuple(np.asarray(a, dtype=np.int64) for a in valid)),
    }
    return loop.Job("sasrec", build_model, _logits, _valid_scores, config, SEQUENCES, train_ds)


def result(job: loop.Job, best: dict[str, torch.Tensor], state: dict[str, Any]) -> TrainResult:
    """The job's best epoch's model (eval mode), with its history."""
    model = build_model(job.config)
    model.load_state_dict(best)
    return TrainResult(model.eval(), int(state["best_epoch"]), list(state["history"]))


def train(
    cfg: Any,
    train_ds: Any,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    num_items: int,
    **run: Any,
) -> TrainResult:
    """SASRec alone in its own Ray Train run; ``run`` = ``run_name``, ``storage_path``,
    ``storage_filesystem`` as for ``loop.train`` (a rerun with the same name resumes)."""
    j = job(cfg, train_ds, valid, num_items=num_items)
    return result(j, *loop.train([j], cfg, **run)[j.name])
