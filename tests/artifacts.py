"""Build a complete set of trained-model artifacts with random (non-trivial) weights, for scorer and
explain tests that must not wait for a real training run."""

from __future__ import annotations

import os

import torch

from thinkrec.io.commit import mark_success
from thinkrec.io.fs import Storage
from thinkrec.model.base import load_model
from thinkrec.model.thinkrec import (
    ADAPTERS,
    FUSION,
    GLOBAL,
    PROJECTOR,
    CFProjector,
    CFTable,
    expert_name,
    save_fusion,
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
    proj = CFProjector(cf_dim, hidden)
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
