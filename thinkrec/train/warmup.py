"""Warm-up of the locally built base model on the train split's own text (``model.warmup_steps``).

The embedded default builds a random-weight tiny model (thinkrec/model/base.py). LoRA on q/v alone
cannot teach such a model a language, so its sampled explanations were degenerate ("No No No ...").
With ``model.warmup_steps`` > 0 the freshly built model is first trained, all parameters, as a
causal LM (``base.warmup_lm``) on text from the train split only:

- every reasoning trace of a train row, as the text-only prompt the trainer builds for it (history
  titles, labels, keywords, the target) followed by its answer "Yes. <rationale>" / "No. <rationale>";
- one line per train item: its title and keywords.

No validation or test row is read. The warmed model replaces the built one under the same path,
with ``warmup.json`` beside its weights (settings, the inputs' fingerprint, the loss curve); a base
model whose warmup.json does not match the config and inputs is rebuilt. A pretrained base
(``model.base`` set) is never touched: ``warmup_steps`` is ignored for it (logged).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import pyarrow.compute as pc

from thinkrec.config import Config
from thinkrec.data import schema as S
from thinkrec.io.commit import SUCCESS, fingerprint
from thinkrec.io.fs import Storage
from thinkrec.model.prompt import PromptBuilder
from thinkrec.train import data as D

log = logging.getLogger(__name__)

MARKER = "warmup.json"
"""Written into a warmed base model's directory: what it was warmed on and how."""


def meta(cfg: Config, storage: Storage) -> dict[str, str]:
    """Fingerprint of what the warm-up reads and does (the tiny model, the warm-up settings, the
    prompt settings, the train split and traces)."""
    m = cfg.to_dict()["model"]
    sections = {
        "model": {k: v for k, v in m.items() if k == "tiny" or k.startswith("warmup") or k.endswith("chars")},
        "history_len": cfg.data.history_len,
        "max_answer_tokens": cfg.train.max_answer_tokens,
        "use_chat_template": cfg.model.use_chat_template,
        "seed": cfg.seed,
        "stage": "warmup/v1",
    }
    inputs = [storage.uri(D.INTERACTIONS), storage.uri(D.ITEMS)]
    if storage.exists(storage.uri(D.TRACES, SUCCESS)):
        inputs.append(storage.uri(D.TRACES))
    return fingerprint(sections, inputs, storage)


def is_current(path: str, cfg: Config, storage: Storage) -> bool:
    """The base model at ``path`` exists and is warmed (or not) exactly as the config asks."""
    if not os.path.exists(os.path.join(path, "config.json")):
        return False
    marker = os.path.join(path, MARKER)
    if not cfg.model.warmup_steps:
        return not os.path.exists(marker)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f).get("meta") == meta(cfg, storage)


def corpus(cfg: Config, storage: Storage, tok: Any) -> list[list[int]]:
    """The warm-up documents as token ids (module docstring), train split only."""
    inputs = D.load_inputs(storage, with_traces=True)
    train = inputs.split("train")
    pb = PromptBuilder(
        tok,
        cf_tokens=False,
        use_chat_template=cfg.model.use_chat_template,
        max_title_chars=cfg.model.max_title_chars,
    )
    docs = []
    if inputs.traces:
        rows = D.encode_rows(
            pb,
            D._samples(train, inputs.traces),
            inputs.items,
            history_len=cfg.data.history_len,
            max_answer_tokens=cfg.train.max_answer_tokens,
        )
        docs = [r["prompt_ids"] + r["answer_ids"] for r in rows]
    item_ids = np.unique(pc.unique(train.column(S.ITEM_ID)).to_numpy())
    for i in item_ids:
        info = inputs.items.get(int(i))
        if info is not None and info.title:
            line = f"{info.title}: {', '.join(info.keywords)}" if info.keywords else info.title
            docs.append(tok(line, add_special_tokens=False)["input_ids"])
    return docs


def warm_up(cfg: Config, storage: Storage, path: str) -> dict[str, Any]:
    """Warm the freshly built base model at ``path`` in place; returns what warmup.json records."""
    import torch

    from thinkrec.model.base import load_model, load_tokenizer, warmup_lm

    m = cfg.model
    tok = load_tokenizer(path)
    docs = corpus(cfg, storage, tok)
    if not docs:
        raise ValueError(
            f"model.warmup_steps={m.warmup_steps}: the train split of {storage.root} has no text"
        )
    model = load_model(path)
    torch.manual_seed(cfg.seed)
    losses = warmup_lm(
        model,
        docs,
        eos_id=tok.eos_token_id,
        steps=m.warmup_steps,
        lr=m.warmup_lr,
        batch_size=m.warmup_batch_size,
        seq_len=m.warmup_seq_len,
        seed=cfg.seed,
    )
    model.save_pretrained(path, safe_serialization=True)
    record = {
        "meta": meta(cfg, storage),
        "steps": m.warmup_steps,
        "documents": len(docs),
        "tokens": sum(len(d) + 1 for d in docs),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss": losses,
    }
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump(record, f)
    log.info(
        "warmup: %d steps on %d train-split documents (%d tokens), loss %.3f -> %.3f",
        m.warmup_steps,
        record["documents"],
        record["tokens"],
        losses[0],
        losses[-1],
    )
    return record
