"""The explain stage: generated reasoning for a deterministic sample of test rows.

    sampled test rows -> Ray Data map_batches(Explainer) -> explain/explanations

The prompt is the scorer's and the trainer's (``PromptBuilder``: user prefix, then the candidate,
ending at "Answer:"); CF slots are filled with projected CF embeddings and the global adapter
generates greedily from ``inputs_embeds``, so the text starts with the Yes/No answer and continues
with the reasoning the model was trained to give ("Yes. <reasoning>"). ``reasoning`` holds the
reference the report scores the explanation against (BLEU-4, ROUGE-L): the teacher's trace for the
same (user, item) when reason/traces has one, else the configured teacher (``reason.teacher``) run
here on the row with its true label, as the paper makes reference reasoning for test rows. It is
null only where the teacher cannot explain the row (e.g. an item missing from prepare/items).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.io.commit import SUCCESS, TableWriter, fingerprint, read_table
from thinkrec.io.fs import Storage
from thinkrec.model.prompt import Encoded, ItemInfo, PromptBuilder

log = logging.getLogger(__name__)

EXPLANATIONS = "explain/explanations"
INTERACTIONS = "prepare/interactions"
ITEMS = "prepare/items"
TRACES = "reason/traces"
TRAIN = "train"
CF_MODEL = "cf/model"


def sample_rows(storage: Storage, n: int, seed: int) -> pd.DataFrame:
    """``n`` test rows chosen by ``seed``; the same rows on every run whatever the shard layout
    (rows are put in a canonical order before sampling). Returned in that canonical order."""
    cols = [S.USER_ID, S.ITEM_ID, S.LABEL, S.TIMESTAMP, S.SPLIT, S.HISTORY_ITEMS, S.HISTORY_LABELS]
    table = read_table(storage, storage.uri(INTERACTIONS), columns=cols)
    df = table.to_pandas()
    df = df[df[S.SPLIT] == "test"].drop(columns=[S.SPLIT])
    df = df.sort_values([S.USER_ID, S.ITEM_ID, S.TIMESTAMP], kind="stable").reset_index(drop=True)
    k = min(n, len(df))
    idx = np.sort(np.random.default_rng(seed).choice(len(df), size=k, replace=False))
    return df.iloc[idx].reset_index(drop=True)


def item_infos(storage: Storage, item_ids: set[int]) -> dict[int, tuple[str, list[str]]]:
    """(title, keywords) of the given items only, so actors carry what they need, not the catalogue."""
    items = read_table(storage, storage.uri(ITEMS), columns=[S.ITEM_ID, S.TITLE, S.KEYWORDS]).to_pandas()
    items = items[items[S.ITEM_ID].isin(item_ids)]
    return {
        int(r[S.ITEM_ID]): (
            str(r[S.TITLE]),
            [str(k) for k in (r[S.KEYWORDS] if r[S.KEYWORDS] is not None else [])],
        )
        for r in items.to_dict("records")
    }


def reference_traces(storage: Storage) -> dict[tuple[int, int], str]:
    """(user_id, item_id) -> the teacher's reasoning, when reason/traces is committed."""
    uri = storage.uri(TRACES)
    if not storage.exists(f"{uri}/{SUCCESS}"):
        return {}
    t = read_table(storage, uri, columns=[S.USER_ID, S.ITEM_ID, S.REASONING]).to_pandas()
    return {(int(u), int(i)): r for u, i, r in zip(t[S.USER_ID], t[S.ITEM_ID], t[S.REASONING], strict=True)}


def teacher_references(cfg: Config, rows: pd.DataFrame) -> dict[tuple[int, int], str | None]:
    """(user_id, item_id) -> the configured teacher's rationale for each row and its true label. The
    teacher runs in a Ray Data actor, as in the reason stage, so an LLM teacher gets its GPUs there."""
    import ray

    from thinkrec.reasoning.teachers import get_teacher

    if not len(rows):
        return {}
    out = (
        ray.data.from_pandas(rows)
        .map_batches(
            get_teacher(cfg.reason.teacher),
            fn_constructor_kwargs={"cfg": cfg},
            batch_format="pandas",
            batch_size=cfg.reason.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),  # a handful of rows: one teacher
            num_gpus=cfg.reason.num_gpus_per_actor or None,
        )
        .to_pandas()
    )
    return {
        (int(u), int(i)): (r if isinstance(r, str) else None)
        for u, i, r in zip(out[S.USER_ID], out[S.ITEM_ID], out[S.REASONING], strict=True)
    }


class Explainer:
    """Ray Data callable class: loads the base model, the global adapter, the projector and the CF
    table once per actor; ``__call__`` generates one explanation per row of a pandas batch."""

    def __init__(
        self, config: dict[str, Any], items: dict[int, tuple[str, list[str]]], device: str | None = None
    ) -> None:
        import torch
        from peft import PeftModel

        from thinkrec.model.base import load_model, load_tokenizer
        from thinkrec.model.thinkrec import GLOBAL, CFProjector, CFTable
        from thinkrec.scoring.base import load_artifacts

        cfg = from_dict(config)
        self.cfg = cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        art = load_artifacts(cfg)
        model = load_model(
            art.base_model,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            device=self.device,
        )
        self.model = PeftModel.from_pretrained(model, os.path.join(art.adapters_dir, GLOBAL)).eval()
        self.model.requires_grad_(False)
        self.tok = load_tokenizer(art.base_model, cfg.model.trust_remote_code)
        self.builder = PromptBuilder(
            self.tok,
            cf_tokens=cfg.model.cf_tokens,
            use_chat_template=cfg.model.use_chat_template,
            max_title_chars=cfg.model.max_title_chars,
        )
        self.projector = None
        self.cf = None
        if cfg.model.cf_tokens and art.projector and art.cf_embeddings:
            self.projector = CFProjector.load(art.projector).to(self.device).eval().requires_grad_(False)
            self.cf = CFTable.load(art.cf_embeddings)
        self.items = {int(k): ItemInfo(t, tuple(kw)) for k, (t, kw) in items.items()}
        self.max_new_tokens = cfg.explain.max_new_tokens

    def _info(self, item_id: int) -> ItemInfo:
        # An item missing from prepare/items still gets a prompt line (its CF slot reads the zero row).
        return self.items.get(int(item_id), ItemInfo(f"item {int(item_id)}"))

    def encode(self, row: dict[str, Any]) -> Encoded:
        hist = [
            (int(i), self._info(i), int(lab))
            for i, lab in zip(row[S.HISTORY_ITEMS], row[S.HISTORY_LABELS], strict=True)
        ]
        item = int(row[S.ITEM_ID])
        return self.builder.encode_prefix(int(row[S.USER_ID]), hist) + self.builder.encode_candidate(
            item, self._info(item)
        )

    def generate(self, encoded: list[Encoded]) -> list[str]:
        """Greedy continuation of each prompt, from input embeddings with CF slots filled."""
        import torch

        from thinkrec.model.thinkrec import collate, input_embeddings

        pad = self.builder.placeholder_id
        T = max(len(e.ids) for e in encoded)
        # Left padding: every prompt ends at the last column, where generation continues.
        shifted = [
            Encoded(
                [pad] * (T - len(e.ids)) + e.ids, [p + T - len(e.ids) for p in e.cf_pos], e.cf_kind, e.cf_id
            )
            for e in encoded
        ]
        batch = collate(shifted, pad)
        for r, e in enumerate(encoded):
            batch.attention_mask[r, : T - len(e.ids)] = 0
        with torch.inference_mode():
            emb = input_embeddings(self.model, batch, self.cf, self.projector)  # (B, T, H)
            out = self.model.generate(
                inputs_embeds=emb,
                attention_mask=batch.attention_mask.to(emb.device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=self.tok.eos_token_id,
            )  # (B, new) : with inputs_embeds only the new tokens come back
        return [self.tok.decode(ids, skip_special_tokens=True).strip() for ids in out.tolist()]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        texts = self.generate([self.encode(r) for r in rows]) if rows else []
        return pd.DataFrame(
            {
                S.USER_ID: batch[S.USER_ID].astype(np.int64).to_numpy(),
                S.ITEM_ID: batch[S.ITEM_ID].astype(np.int64).to_numpy(),
                S.LABEL: batch[S.LABEL].astype(np.int8).to_numpy(),
                S.EXPLANATION: texts,
            }
        )


def stage_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    d = cfg.to_dict()
    sections = {
        "seed": d["seed"],
        "model": d["model"],
        "explain": d["explain"],
        "teacher": {k: d["reason"][k] for k in ("teacher", "model")},
        "stage": "explain/v2",
    }
    inputs = [storage.uri(t) for t in (INTERACTIONS, ITEMS, TRACES, TRAIN, CF_MODEL)]
    return fingerprint(sections, [u for u in inputs if storage.exists(f"{u}/{SUCCESS}")], storage)


def run(cfg: Config) -> dict[str, Any]:
    """Sample ``explain.n_samples`` test rows, generate explanations, commit explain/explanations."""
    import ray

    storage = Storage.from_config(cfg)
    for rel, stage in ((INTERACTIONS, "prepare"), (ITEMS, "prepare"), (TRAIN, "train"), (CF_MODEL, "cf")):
        if not storage.exists(f"{storage.uri(rel)}/{SUCCESS}"):
            raise FileNotFoundError(f"{storage.uri(rel)} is not committed: run the {stage} stage first")
    out = storage.uri(EXPLANATIONS)
    meta = stage_meta(cfg, storage)
    writer = TableWriter.for_stage(cfg, storage, out, meta, S.EXPLANATIONS)
    if writer.complete:
        log.info("explain: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/_manifest.json")

    sample = sample_rows(storage, cfg.explain.n_samples, cfg.seed)
    needed = set(sample[S.ITEM_ID].tolist())
    for h in sample[S.HISTORY_ITEMS]:
        needed.update(int(i) for i in h)
    items = item_infos(storage, needed)
    refs = reference_traces(storage)
    untraced = [
        (int(u), int(i)) not in refs for u, i in zip(sample[S.USER_ID], sample[S.ITEM_ID], strict=True)
    ]
    refs.update(teacher_references(cfg, sample[untraced]))

    generated = pd.DataFrame(columns=[S.USER_ID, S.ITEM_ID, S.LABEL, S.EXPLANATION])
    if len(sample):
        ds = ray.data.from_pandas(sample).map_batches(
            Explainer,
            fn_constructor_kwargs={"config": cfg.to_dict(), "items": items},
            batch_size=max(1, min(8, cfg.score.batch_size)),
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=1),  # a handful of rows: one model copy
            num_cpus=cfg.score.num_cpus_per_actor,
            num_gpus=cfg.score.num_gpus_per_actor,
        )
        generated = ds.to_pandas()
    generated[S.REASONING] = [
        refs.get((int(u), int(i))) for u, i in zip(generated[S.USER_ID], generated[S.ITEM_ID], strict=True)
    ]
    table = pa.Table.from_pandas(generated, schema=S.EXPLANATIONS, preserve_index=False)
    writer.write([table])
    manifest = writer.commit(rows_in=len(sample))
    log.info("explain: %d explanations -> %s", manifest["rows"], out)
    return manifest
