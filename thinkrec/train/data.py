"""Training and validation examples, built only through the one prompt builder.

An example is a prompt (``encode_prefix(user, last-N history) + encode_candidate(target)``) and an
answer (``answer_ids(label, reasoning)``), stored as plain list columns so a Ray Dataset can carry
it to the workers:

    idx         int    position in the epoch's sample list (sharding and ordering key)
    user_id     int
    item_id     int
    label       int    0/1
    kind        int    KIND_LABEL or KIND_REASONING
    prompt_ids  list   prefix + candidate token ids
    cf_pos      list   CF slot positions inside prompt_ids
    cf_kind     list   CF_USER / CF_ITEM per slot
    cf_id       list   user or item id per slot
    answer_ids  list   Yes/No token first, then ". <reasoning>" (reasoning samples), then EOS

Reasoning samples (train rows with a trace) and label samples are mixed by ``train.reasoning_ratio``;
the mix is capped at ``train.max_train_samples`` and fully determined by ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from thinkrec.data import schema as S
from thinkrec.data.items import read_items
from thinkrec.io.commit import SUCCESS, read_table
from thinkrec.io.fs import Storage
from thinkrec.model.prompt import Encoded, ItemInfo, PromptBuilder

KIND_LABEL = 0
KIND_REASONING = 1

INTERACTIONS = "prepare/interactions"
ITEMS = "prepare/items"
TRACES = "reason/traces"

COLUMNS = (
    "idx",
    "user_id",
    "item_id",
    "label",
    "kind",
    "prompt_ids",
    "cf_pos",
    "cf_kind",
    "cf_id",
    "answer_ids",
)


@dataclass(frozen=True)
class Sample:
    """One row to encode: the interaction, its history and (for reasoning samples) the trace."""

    user_id: int
    item_id: int
    label: int
    history_items: tuple[int, ...]
    history_labels: tuple[int, ...]
    reasoning: str | None = None

    @property
    def kind(self) -> int:
        return KIND_REASONING if self.reasoning else KIND_LABEL


@dataclass
class Inputs:
    """What the train stage reads: interactions by split, item texts and reasoning traces."""

    interactions: pa.Table
    items: dict[int, ItemInfo]
    traces: dict[tuple[int, int, int], str]  # (user_id, item_id, timestamp) -> reasoning

    def split(self, name: str) -> pa.Table:
        import pyarrow.compute as pc

        return self.interactions.filter(pc.equal(self.interactions.column(S.SPLIT), name))


def load_inputs(storage: Storage, *, with_traces: bool) -> Inputs:
    inter = read_table(storage, storage.uri(INTERACTIONS))
    items_t = read_items(storage)
    items = {
        int(i): ItemInfo(str(t or ""), tuple(k or ()))
        for i, t, k in zip(
            items_t.column(S.ITEM_ID).to_pylist(),
            items_t.column(S.TITLE).to_pylist(),
            items_t.column(S.KEYWORDS).to_pylist(),
            strict=True,
        )
    }
    traces: dict[tuple[int, int, int], str] = {}
    uri = storage.uri(TRACES)
    if with_traces and storage.exists(f"{uri}/{SUCCESS}"):
        t = read_table(storage, uri, [S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.REASONING])
        for u, i, ts, r in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            if r:
                traces[(int(u), int(i), int(ts))] = str(r)
    return Inputs(inter, items, traces)


def _samples(table: pa.Table, traces: dict[tuple[int, int, int], str] | None = None) -> list[Sample]:
    cols = {c: table.column(c).to_pylist() for c in (S.USER_ID, S.ITEM_ID, S.LABEL, S.TIMESTAMP)}
    hi = table.column(S.HISTORY_ITEMS).to_pylist()
    hl = table.column(S.HISTORY_LABELS).to_pylist()
    out = []
    for k in range(table.num_rows):
        u, i, ts = int(cols[S.USER_ID][k]), int(cols[S.ITEM_ID][k]), int(cols[S.TIMESTAMP][k])
        reasoning = traces.get((u, i, ts)) if traces is not None else None
        if traces is not None and reasoning is None:
            continue
        out.append(Sample(u, i, int(cols[S.LABEL][k]), tuple(hi[k] or ()), tuple(hl[k] or ()), reasoning))
    return out


def mix_samples(
    label_pool: Sequence[Sample],
    reasoning_pool: Sequence[Sample],
    *,
    ratio: float,
    cap: int | None,
    seed: int,
) -> list[Sample]:
    """The epoch's samples: ``ratio`` of them reasoning samples (as far as traces allow), the rest
    label samples, at most ``cap`` in all, shuffled. Deterministic in ``seed``.

    When there are fewer traces than the ratio asks for, all of them are used and the rest are label
    samples (the ratio is an upper bound on the reasoning share, never a reason to drop data)."""
    rng = np.random.default_rng([seed, 7])
    total = len(label_pool) if cap is None else min(cap, len(label_pool) + len(reasoning_pool))
    n_reason = min(len(reasoning_pool), int(round(ratio * total)))
    n_label = min(len(label_pool), total - n_reason)
    reason_pick = rng.permutation(len(reasoning_pool))[:n_reason]
    label_pick = rng.permutation(len(label_pool))[:n_label]
    mixed = [reasoning_pool[k] for k in reason_pick] + [label_pool[k] for k in label_pick]
    order = rng.permutation(len(mixed))
    return [mixed[k] for k in order]


def train_samples(inputs: Inputs, cfg: Any) -> list[Sample]:
    train = inputs.split("train")
    label_pool = _samples(train)
    reasoning_pool = _samples(train, inputs.traces) if cfg.train.reasoning and inputs.traces else []
    return mix_samples(
        label_pool,
        reasoning_pool,
        ratio=cfg.train.reasoning_ratio if cfg.train.reasoning else 0.0,
        cap=cfg.train.max_train_samples,
        seed=cfg.seed,
    )


def valid_samples(inputs: Inputs, cfg: Any) -> list[Sample]:
    """Up to ``train.max_valid_samples`` validation rows (label samples), chosen by seed."""
    pool = _samples(inputs.split("valid"))
    rng = np.random.default_rng([cfg.seed, 11])
    pick = np.sort(rng.permutation(len(pool))[: cfg.train.max_valid_samples])
    return [pool[k] for k in pick]


def encode(
    builder: PromptBuilder,
    sample: Sample,
    items: dict[int, ItemInfo],
    *,
    history_len: int,
    max_answer_tokens: int,
) -> tuple[Encoded, list[int]]:
    """(prompt, answer ids) for one sample, through the prompt builder only."""
    unknown = ItemInfo("unknown")
    hist = list(zip(sample.history_items, sample.history_labels, strict=True))[-history_len:]
    prefix = builder.encode_prefix(
        sample.user_id, [(int(i), items.get(int(i), unknown), int(lab)) for i, lab in hist]
    )
    cand = builder.encode_candidate(sample.item_id, items.get(sample.item_id, unknown))
    answer = builder.answer_ids(sample.label, sample.reasoning, max_answer_tokens)
    return prefix + cand, answer


def encode_rows(
    builder: PromptBuilder,
    samples: Sequence[Sample],
    items: dict[int, ItemInfo],
    *,
    history_len: int,
    max_answer_tokens: int,
) -> list[dict[str, Any]]:
    """Rows with the columns in COLUMNS, ``idx`` = position in ``samples``."""
    rows = []
    for idx, s in enumerate(samples):
        prompt, answer = encode(
            builder, s, items, history_len=history_len, max_answer_tokens=max_answer_tokens
        )
        rows.append(
            {
                "idx": idx,
                "user_id": s.user_id,
                "item_id": s.item_id,
                "label": s.label,
                "kind": s.kind,
                "prompt_ids": prompt.ids,
                "cf_pos": prompt.cf_pos,
                "cf_kind": prompt.cf_kind,
                "cf_id": prompt.cf_id,
                "answer_ids": answer,
            }
        )
    return rows


def phases_dataset(rows: dict[str, list[dict[str, Any]]], num_workers: int, *, trim: bool) -> Any:
    """One Ray Dataset over every phase's rows, each tagged with its ``phase``, in ``num_workers``
    blocks. Block k holds the k-th contiguous part of every phase's rows, so whichever worker a
    block goes to, each phase's rows are spread evenly. With ``trim`` each phase is cut to a
    multiple of ``num_workers`` (DDP needs the same number of steps on every rank)."""
    import ray.data

    parts: list[list[dict[str, Any]]] = [[] for _ in range(num_workers)]
    for name, rs in rows.items():
        n = len(rs) - len(rs) % num_workers if trim else len(rs)
        if trim and n == 0:
            raise ValueError(
                f"train phase {name!r}: {len(rs)} examples cannot be split over {num_workers} workers"
            )
        for k, chunk in enumerate(np.array_split(np.arange(n), num_workers)):
            parts[k] += [{**rs[i], "phase": name} for i in chunk]
    # One block per worker (equal sizes when trimmed): the split hands out whole blocks, which keeps
    # each shard's content the same from run to run (resume after a failure sees the same samples).
    return ray.data.from_items([r for p in parts for r in p], override_num_blocks=num_workers)


def shard_rows(shard: Any) -> list[dict[str, Any]]:
    """All rows of this worker's dataset shard, in ``idx`` order (shard order is not guaranteed)."""
    if shard is None:
        return []
    rows = [dict(r) for r in shard.iter_rows()]
    rows.sort(key=lambda r: int(r["idx"]))
    return [
        {k: (list(v) if isinstance(v, list | tuple | np.ndarray) else v) for k, v in r.items()} for r in rows
    ]
