"""Synthetic prepared runs with a planted signal, for the planted-signal tests (test_planted.py).

Each builder writes what prepare and cf would have committed (prepare/{interactions,items,users},
cf/model/embeddings.safetensors) under a fresh output root, with a label rule that only one part
of the prompt can reveal:

- ``item_cf``: label = [q_i . w > 0] for the target item's CF vector q_i. Every item has the same
  title and no keywords, so text cannot tell items apart; only the target's CF token can.
- ``keyword``: label = ["Western" in the target item's keywords]. CF vectors are random noise.
- ``groups``: two user groups far apart in CF space; group A likes the items with keyword
  "Western", group B those with "Musical" (each item has exactly one of the two). Histories are
  empty, so only the user (CF token, or the expert the gate picks) says which rule applies.
- ``noise``: labels drawn at random, independent of everything in the prompt (``item_cf``'s items):
  nothing can be learned, the stalled stage 2 that ``train.projector_restarts`` starts over.

Every user's rows are in time order: the first 70% train, the next 10% valid, the last 20% test;
histories (``item_cf``, ``keyword``) are the user's previous ``HISTORY`` rows, labelled by the same
rule. Everything is drawn from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from thinkrec.data import schema as S
from thinkrec.io.commit import TableWriter, mark_success
from thinkrec.io.fs import Storage
from thinkrec.model.thinkrec import CFTable
from thinkrec.scoring.base import CF_EMBEDDINGS, CF_MODEL_DIR

HISTORY = 2
WORDS = ["river", "stone", "cloud", "garden", "mirror", "winter", "lantern", "harbor", "violet", "meadow"]
FILLERS = ["Drama", "Comedy", "Romance", "Thriller"]
LIKED = ("Western", "Musical")  # group A's and group B's keyword


@dataclass
class Planted:
    storage: Storage
    user_group: np.ndarray  # (U+1,) planted group per user id (groups task; else zeros), row 0 = -1
    n_users: int
    n_items: int


def _commit(storage: Storage, uri: str, table: pa.Table, key: str) -> None:
    w = TableWriter(storage, storage.uri(uri), num_shards=1, key=key, schema=table.schema)
    w.write([table])
    w.commit(rows_in=table.num_rows)


def build(
    root: str,
    task: str,
    *,
    seed: int,
    n_users: int = 40,
    n_items: int = 60,
    rows_per_user: int = 30,
    cf_dim: int = 8,
) -> Planted:
    rng = np.random.default_rng(seed)
    storage = Storage(root)
    item_ids = np.arange(1, n_items + 1)
    q = rng.normal(size=(n_items + 1, cf_dim)).astype(np.float32)
    p = rng.normal(size=(n_users + 1, cf_dim)).astype(np.float32)
    group = np.zeros(n_users + 1, dtype=np.int64)
    coin = rng.integers(0, 2, size=(n_users + 1, n_items + 1))  # the noise task's labels
    if task in ("item_cf", "noise"):
        titles = ["Untitled"] * n_items
        keywords: list[list[str]] = [[] for _ in item_ids]
        w = rng.normal(size=cf_dim)
        liked = {int(i): int(q[i] @ w > 0) for i in item_ids}
    elif task in ("keyword", "groups"):
        titles = [" ".join(rng.choice(WORDS, 2)).title() for _ in item_ids]
        kind = rng.permutation(np.arange(n_items) % 2)  # half the items each keyword
        keywords = [[LIKED[k], str(rng.choice(FILLERS))] for k in kind]
        if task == "keyword":
            keywords = [
                [LIKED[0] if k == 0 else str(rng.choice(FILLERS[:2])), kw[1]]
                for k, kw in zip(kind, keywords, strict=True)
            ]
        liked = {int(i): int(kind[i - 1] == 0) for i in item_ids}
        if task == "groups":
            group = np.r_[-1, np.arange(n_users) % 2]
            # Two clusters far apart: +-3 on every axis plus unit noise.
            p = (np.where(group[:, None] == 0, 3.0, -3.0) + rng.normal(size=p.shape)).astype(np.float32)
    else:
        raise ValueError(f"unknown planted task {task!r}")
    group[0] = -1
    p[0] = 0
    q[0] = 0

    def label(u: int, i: int) -> int:
        if task == "noise":
            return int(coin[u, i])
        like = liked[i]
        return like if group[u] <= 0 else 1 - like  # group B likes exactly the other keyword

    cols: dict[str, list] = {c: [] for c in S.INTERACTIONS.names}
    n_train, n_valid = int(rows_per_user * 0.7), int(rows_per_user * 0.1)
    for u in range(1, n_users + 1):
        seq = rng.choice(item_ids, rows_per_user, replace=False)
        labels = [label(u, int(i)) for i in seq]
        for t, (i, y) in enumerate(zip(seq, labels, strict=True)):
            lo = max(0, t - HISTORY) if task != "groups" else t
            cols[S.USER_ID].append(u)
            cols[S.ITEM_ID].append(int(i))
            cols[S.RATING].append(5.0 if y else 1.0)
            cols[S.LABEL].append(y)
            cols[S.TIMESTAMP].append(1000 * u + t)
            cols[S.SPLIT].append("train" if t < n_train else "valid" if t < n_train + n_valid else "test")
            cols[S.HISTORY_ITEMS].append([int(x) for x in seq[lo:t]])
            cols[S.HISTORY_LABELS].append(labels[lo:t])
            cols[S.NOT_COLD].append(True)
    _commit(storage, "prepare/interactions", pa.table(cols, schema=S.INTERACTIONS), S.USER_ID)
    items = pa.table(
        {
            S.ITEM_ID: item_ids,
            S.RAW_ITEM_ID: [str(i) for i in item_ids],
            S.TITLE: titles,
            S.KEYWORDS: keywords,
            S.DESCRIPTION: [[] for _ in item_ids],
        },
        schema=S.ITEMS,
    )
    _commit(storage, "prepare/items", items, S.ITEM_ID)
    users = np.arange(1, n_users + 1)
    _commit(
        storage,
        "prepare/users",
        pa.table({S.USER_ID: users, S.RAW_USER_ID: [str(u) for u in users]}, schema=S.USERS),
        S.USER_ID,
    )
    cf_dir = storage.local_path(storage.uri(CF_MODEL_DIR))
    assert cf_dir is not None
    os.makedirs(cf_dir, exist_ok=True)
    CFTable(torch.from_numpy(p), torch.from_numpy(q)).save(os.path.join(cf_dir, CF_EMBEDDINGS))
    mark_success(storage, storage.uri(CF_MODEL_DIR), {"stage": "planted", "task": task, "seed": seed})
    return Planted(storage, group, n_users, n_items)
