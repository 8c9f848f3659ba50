"""Build a complete set of trained-model artifacts with random (non-trivial) weights, for scorer and
explain tests that must not wait for a real training run."""

from __future__ import annotations

import os

import torch

from thinkrec.io.commit import mark_success
from thinkrec.io.fs import Storage
from thinkrec.model.base import load_model
from thinkrec.model.fusion import save_fusion
from thinkrec.model.thinkrec import (
    ADAPTERS,
    FUSION,
    GLOBAL,
    PROJECTOR,
    CFProjector,
    CFTable,
    expert_name,
)
from thinkrec.scoring.base import CF_EMBEDDINGS, CF_MODEL_DIR, TRAIN_DIR


def make_artifacts(
    cfg,
    base_model: str,
    *,
    n_users: int,
    n_items: int,
    n_experts: int = 3,
    cf_dim: int = 16,
    seed: int = 0,
    lora_std: float = 0.05,
) -> None:
    """Write cf/model and train/ under cfg's output root: a CF table, a projector, a global adapter and
    ``n_experts`` expert adapters (peft layout, random A and B), fusion.json with prototypes taken from
    the CF table. ``cfg.model.base`` should point at ``base_model``."""
    from peft import LoraConfig, get_peft_model

    storage = Storage.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    cf_dir = storage.local_path(storage.uri(CF_MODEL_DIR))
    train_dir = storage.local_path(storage.uri(TRAIN_DIR))
    assert cf_dir and train_dir, "test artifacts are written to a local output root"
    os.makedirs(cf_dir, exist_ok=True)
    table = CFTable(
        torch.randn(n_users + 1, cf_dim, generator=g), torch.randn(n_items + 1, cf_dim, generator=g)
    )
    table.user[0] = 0
    table.item[0] = 0
    table.save(os.path.join(cf_dir, CF_EMBEDDINGS))
    mark_success(storage, storage.uri(CF_MODEL_DIR), {"stage": "test-artifacts"})

    model = load_model(base_model)
    hidden = model.config.hidden_size
    torch.manual_seed(seed)
    proj = CFProjector(cf_dim, hidden, cfg.model.cf_history, cfg.model.cf_history_item)
    # Small outputs keep the CF tokens' embeddings on the scale of real token embeddings.
    with torch.no_grad():
        proj.net[2].weight.mul_(0.1)
    os.makedirs(train_dir, exist_ok=True)
    proj.save(os.path.join(train_dir, PROJECTOR))

    lcfg = LoraConfig(
        r=cfg.train.lora_r,
        lora_alpha=cfg.train.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(cfg.train.lora_targets),
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lcfg)
    names = [GLOBAL] + [expert_name(i) for i in range(n_experts)]
    for name in names:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * lora_std)
        peft_model.save_pretrained(os.path.join(train_dir, ADAPTERS, name))
        # save_pretrained nests non-default adapter names; keep the flat layout.
    protos = torch.stack([table.user[1 + i :: max(1, n_experts)].mean(0) for i in range(n_experts)])
    save_fusion(os.path.join(train_dir, FUSION), protos, cfg.fusion, names[1:], {"groups": n_experts})
    mark_success(storage, storage.uri(TRAIN_DIR), {"stage": "test-artifacts"})


def write_prepared(cfg, *, n_users: int, n_items: int, per_user: int = 12, seed: int = 0) -> None:
    """A small prepared run under cfg's root (prepare/{interactions,items,users,user_ids,item_ids}),
    raw ids ``u<k>`` / ``i<k>`` for internal ids k, every user with ``per_user`` timed interactions."""
    import numpy as np
    import pyarrow as pa

    from thinkrec.data import schema as S
    from thinkrec.data.ids import ITEM_IDS, USER_IDS
    from thinkrec.data.prepare import INTERACTIONS, ITEMS, USERS
    from thinkrec.io.commit import TableWriter

    storage = Storage.from_config(cfg)
    rng = np.random.default_rng(seed)
    uids, iids = np.arange(1, n_users + 1), np.arange(1, n_items + 1)
    n = n_users * per_user
    genres = ["drama", "comedy", "thriller", "romance", "action"]
    tables = {
        ITEMS: (
            S.ITEMS,
            S.ITEM_ID,
            {
                S.ITEM_ID: iids,
                S.RAW_ITEM_ID: [f"i{i}" for i in iids],
                S.TITLE: [f"Movie number {i}" for i in iids],
                S.KEYWORDS: [[genres[i % 5], genres[(i + 2) % 5]] for i in iids],
                S.DESCRIPTION: [[] for _ in iids],
            },
        ),
        USERS: (S.USERS, S.USER_ID, {S.USER_ID: uids, S.RAW_USER_ID: [f"u{u}" for u in uids]}),
        USER_IDS: (S.USER_IDS, S.USER_ID, {S.RAW_USER_ID: [f"u{u}" for u in uids], S.USER_ID: uids}),
        ITEM_IDS: (S.ITEM_IDS, S.ITEM_ID, {S.RAW_ITEM_ID: [f"i{i}" for i in iids], S.ITEM_ID: iids}),
        INTERACTIONS: (
            S.INTERACTIONS,
            S.USER_ID,
            {
                S.USER_ID: np.repeat(uids, per_user),
                S.ITEM_ID: rng.integers(1, n_items + 1, n),
                S.RATING: rng.integers(1, 6, n).astype(np.float32),
                S.LABEL: rng.integers(0, 2, n).astype(np.int8),
                S.TIMESTAMP: np.tile(np.arange(per_user), n_users),
                S.SPLIT: ["train"] * n,
                S.HISTORY_ITEMS: [[] for _ in range(n)],
                S.HISTORY_LABELS: [[] for _ in range(n)],
                S.NOT_COLD: np.ones(n, bool),
            },
        ),
    }
    for uri, (schema, key, cols) in tables.items():
        t = pa.table(cols, schema=schema)
        w = TableWriter(storage, storage.uri(uri), num_shards=2, key=key, schema=schema)
        w.write([t])
        w.commit(rows_in=t.num_rows)
