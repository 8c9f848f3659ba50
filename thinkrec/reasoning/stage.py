"""reason stage: reasoning traces for hard training samples -> reason/traces (schema.REASONING_TABLE).

Hard samples are the train samples the committed MF model gets wrong: (sigmoid(logit) >= 0.5) != label,
with the logit recomputed from cf/model by the same formula as cf/scores (thinkrec.cf.mf.logits).
When there are more than ``reason.max_traces``, the ones kept are those with the smallest
``priority``, a fixed 64-bit hash of (seed, user_id, item_id, timestamp): the choice depends only
on the seed and the data, never on how Ray split or ordered the rows.

Pipeline: read_dataset(prepare/interactions) -> filter train, mark hard (map_batches) -> sort by
priority, limit -> teacher actors (map_batches) -> TableWriter (sharded by user_id; rows a teacher
cannot explain go to quarantine; rows_in = the hard samples selected). A generating teacher's
per-row turn counters (``reasoning/llm.py``) are summed into the manifest (``turns_generated``,
``turns_cached``: a rerun served from the prompt cache generates nothing) and not stored.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from thinkrec.cf import mf
from thinkrec.cf import stage as cf_stage
from thinkrec.config import Config
from thinkrec.data import prepare
from thinkrec.data import schema as S
from thinkrec.data.items import keywords_inputs
from thinkrec.io.commit import TableWriter, fingerprint, read_dataset, stable_shard
from thinkrec.io.fs import Storage
from thinkrec.reasoning.llm import CACHED, GENERATED
from thinkrec.reasoning.teachers import get_teacher

log = logging.getLogger(__name__)

TRACES = "reason/traces"
PROVENANCE = (S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH)
PRIORITY = "_priority"
INPUTS = (prepare.INTERACTIONS, prepare.ITEMS, cf_stage.MODEL)
SAMPLE_COLUMNS = [
    S.USER_ID,
    S.ITEM_ID,
    S.TIMESTAMP,
    S.LABEL,
    S.SPLIT,
    S.HISTORY_ITEMS,
    S.HISTORY_LABELS,
]


def stage_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    d = cfg.to_dict()
    sections = {
        "reason": d["reason"],
        "cf": d["cf"],
        "data": d["data"],
        "seed": d["seed"],
        "storage.num_shards": d["storage"]["num_shards"],
        "stage": "reason/v2",
    }
    if cfg.reason.teacher != "grounded":  # a generating teacher: its backend and model change the traces
        sections["generation"] = {k: d["generation"][k] for k in ("backend", "model")}
    return fingerprint(sections, [*(storage.uri(t) for t in INPUTS), *keywords_inputs(storage)], storage)


def priority(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, seed: int) -> np.ndarray:
    """A fixed 64-bit hash per sample (splitmix64 over a mix of the ids, the timestamp and the seed),
    as int64 >= 0 so Arrow and Ray sort it as a plain integer."""
    with np.errstate(over="ignore"):
        x = np.asarray(users, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.asarray(items, dtype=np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        x ^= np.asarray(timestamps, dtype=np.int64).astype(np.uint64) * np.uint64(0x165667B19E3779F9)
        x ^= np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0xD6E8FEB86659FD93)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(1)).astype(np.int64)


def is_hard(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """MF's decision (sigmoid(logit) >= 0.5, i.e. logit >= 0) disagrees with the label."""
    return (np.asarray(logits) >= 0.0) != (np.asarray(labels) > 0)


def hard_samples(cfg: Config, storage: Storage, max_traces: int | None = None) -> tuple[Any, int]:
    """(materialised Ray Dataset of the chosen hard train samples with their MF logit in
    ``cf_score``, number of hard train samples before the limit)."""
    import ray

    limit = cfg.reason.max_traces if max_traces is None else max_traces
    table, biases = cf_stage.load_model(storage)
    weights = ray.put((table, biases))  # shared by every task through the object store
    seed = cfg.seed

    def mark(batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch[batch[S.SPLIT] == "train"]
        t, b = ray.get(weights)
        score = mf.logits(t, batch[S.USER_ID].to_numpy(), batch[S.ITEM_ID].to_numpy(), b)
        keep = is_hard(score, batch[S.LABEL].to_numpy())
        out = batch[keep].drop(columns=[S.SPLIT]).assign(**{S.CF_SCORE: score[keep]})
        return out.assign(
            **{
                PRIORITY: priority(
                    out[S.USER_ID].to_numpy(), out[S.ITEM_ID].to_numpy(), out[S.TIMESTAMP].to_numpy(), seed
                )
            }
        )

    hard = (
        read_dataset(storage, storage.uri(prepare.INTERACTIONS), columns=SAMPLE_COLUMNS)
        .map_batches(mark, batch_format="pandas")
        .materialize()
    )
    total = hard.count()
    if total > limit:
        # The driver pulls only the priorities (8 bytes a row) and finds the cut; the rows stay in
        # the object store. A tie at the cut (a 63-bit hash collision) falls back to a full sort.
        prio = hard.select_columns([PRIORITY]).to_pandas()[PRIORITY].to_numpy()
        cut = np.partition(prio, limit - 1)[limit - 1] if limit else None
        if cut is None:
            hard = hard.limit(0)
        elif (prio == cut).sum() == 1:
            hard = hard.map_batches(lambda b: b[b[PRIORITY] <= cut], batch_format="pandas")
        else:
            hard = hard.sort([PRIORITY, S.USER_ID, S.ITEM_ID, S.TIMESTAMP]).limit(limit)
    return hard.drop_columns([PRIORITY]).materialize(), total


def run(cfg: Config) -> dict[str, Any]:
    import ray.data

    storage = Storage.from_config(cfg)
    uri = storage.uri(TRACES)
    teacher_cls = get_teacher(cfg.reason.teacher)
    w = TableWriter.for_stage(cfg, storage, uri, stage_meta(cfg, storage), S.REASONING_TABLE)
    if w.complete:
        log.info("reason: up to date, skipped (%s)", uri)
        return storage.read_json(f"{uri}/_manifest.json")

    hard, total = hard_samples(cfg, storage)
    chosen = hard.count()
    pending = w.pending_shards()
    wanted = np.array(pending)
    num_shards = cfg.storage.num_shards

    def in_wave(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(np.isin(stable_shard(batch.column(S.USER_ID), num_shards), wanted)))

    traces = hard.map_batches(in_wave, batch_format="pyarrow").map_batches(
        teacher_cls,
        fn_constructor_kwargs={"cfg": cfg},
        batch_format="pandas",
        batch_size=cfg.reason.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.reason.concurrency),
        num_gpus=cfg.reason.num_gpus_per_actor or None,
    )
    turns = {GENERATED: 0, CACHED: 0}

    def provenance(batches: Any) -> Any:
        """Null provenance for teachers that do not generate; the turn counters summed, then dropped."""
        for b in batches:
            for c in PROVENANCE:
                if c not in b.column_names:
                    b = b.append_column(c, pa.nulls(b.num_rows, pa.string()))
            for c in turns:
                if c in b.column_names:
                    turns[c] += int(pc.sum(b.column(c)).as_py() or 0)
                    b = b.drop_columns([c])
            yield b

    w.write(provenance(traces.iter_batches(batch_format="pyarrow", batch_size=4096)), pending)
    man = w.commit(
        rows_in=chosen,
        extra={
            "teacher": getattr(teacher_cls, "name", cfg.reason.teacher),
            "hard_samples": total,
            "turns_generated": turns[GENERATED],
            "turns_cached": turns[CACHED],
        },
    )
    log.info(
        "reason: %d traces (%d quarantined) for %d of %d hard train samples, teacher %s",
        man["rows"],
        man["rows_quarantined"],
        chosen,
        total,
        cfg.reason.teacher,
    )
    return man
