"""score: candidate pairs -> Yes logit and P(Yes) per pair -> one committed table per candidate table.

    candidates (Parquet/CSV/JSON lines, local or s3://; default: the test split of prepare/interactions)
      -> partition tasks (one per file): rows hash-partitioned by user into staged shards
         (``<output>/_staging/shard-<s>/``), written by the tasks themselves
      -> ShardStep actors (Ray actors, one model each, HF or vLLM behind ``Scorer``; started while
         the table is partitioned), one shard at a time: the shard's candidates sorted by user, the
         lookups it needs (id maps, users, timelines, item texts: filtered reads, never whole
         tables) and prompts, built by the actor's prompt process (prompt_process.py) slices ahead
         of the model and into the next shard; scores; the actor publishes the shard (quarantine,
         record, part) the moment it is done
      -> the driver: _manifest.json from the shards' records, then _SUCCESS; the staging goes.

A user's candidates always meet in one shard and one scorer call, so prefix sharing is the same
for a shuffled table as for a sorted one. The driver sees one count row per input file and one record
per shard, so its memory and traffic do not grow with the table. A killed and resubmitted job keeps
the staging and every published shard and scores only the rest; a finished table with the same
fingerprint is skipped before its candidates are read.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.data import tables as T
from thinkrec.data.items import keywords_inputs
from thinkrec.io.commit import (
    MANIFEST,
    REASON,
    CommitError,
    TableWriter,
    fingerprint,
    is_complete,
    publish_shard,
)
from thinkrec.io.fs import Storage
from thinkrec.runtime import CorePin
from thinkrec.scoring.base import CF_MODEL_DIR, TRAIN_DIR, Artifacts, Scorer, load_artifacts
from thinkrec.scoring.candidates import (  # noqa: F401 (SCORES: re-exported)
    FINGERPRINT,
    SCORES,
    STAGING,
    candidate_files,
    file_infos,
    first_schema,
    n_shards,
    out_storage,
    output_uri,
    partition,
    shard_column,
    storage_for,
)
from thinkrec.scoring.prompt_process import PromptProcess

log = logging.getLogger(__name__)

# Score settings that change no score (batching, placement): left out of the fingerprint so that a
# resubmission with more actors or another batch size resumes instead of starting over.
RUNTIME_KEYS = (
    "batch_size",
    "concurrency",
    "num_cpus_per_actor",
    "num_gpus_per_actor",
    "block_rows",
    "torch_threads",
    "pin_cores",
    "read_cpus",
    # Same scores up to float rounding: how the forward runs, not what it computes.
    "fuse_projections",
    "compile",
    "output",
)


def make_scorer(
    cfg: Config,
    artifacts: Artifacts,
    tokenizer: Any | None = None,
    answer_ids: Callable[[], tuple[int, int, int]] | None = None,
) -> Scorer:
    """The configured backend, imported only when chosen (vLLM is a GPU extra). ``tokenizer``: one
    already loaded, or ``answer_ids``: a source of the (Yes, No, placeholder) ids instead (the HF
    backend reads only those from a tokenizer)."""
    if cfg.score.backend == "hf":
        from thinkrec.model.base import import_transformers

        import_transformers()  # before the engine's own imports pull transformers in
        from thinkrec.scoring.engine.hf import HFScorer

        return HFScorer(cfg, artifacts, tokenizer=tokenizer, answer_ids=answer_ids)
    if cfg.score.backend == "vllm":
        from thinkrec.scoring.engine.vllm import VLLMScorer

        return VLLMScorer(cfg, artifacts)
    raise ValueError(f"score.backend: unknown backend {cfg.score.backend!r} (hf or vllm)")


def stage_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    d = cfg.to_dict()
    score = {k: v for k, v in d["score"].items() if k not in RUNTIME_KEYS}
    sections: dict[str, Any] = {
        "stage": "score/v2",  # v2: p_yes = sigmoid(Yes logit)
        **{k: d[k] for k in ("model", "train", "fusion", "data")},
        "score": score,
    }
    if cfg.score.candidates:
        # An external table has no manifest: identify it by its files' names, sizes and times.
        sections["candidate_files"] = [
            (f.path, f.size, str(f.mtime))
            for f in file_infos(storage_for(cfg, storage), cfg.score.candidates)
        ]
    inputs = [storage.uri(t) for t in (T.INTERACTIONS, T.ITEMS, T.USERS, TRAIN_DIR, CF_MODEL_DIR)]
    inputs += keywords_inputs(storage)
    return fingerprint(sections, inputs, storage)


# -- score: one actor scores a whole shard and publishes it ----------------------------------------
class ShardStep:
    """The scorer actor's body: the model loaded once; per shard id, the shard's staged candidates ->
    lookups -> prompts -> scores -> the published shard and its record. The staged read, lookups and
    prompts run in a child process (prompt_process.py), slices ahead of the model and on into the
    next shard the driver has named, so they cost the scorer neither its GIL nor a wait per shard."""

    def __init__(self, cfg: dict[str, Any], out: str, schema: pa.Schema, mode: str) -> None:
        self.cfg = from_dict(cfg)
        sc = self.cfg.score
        # Before the model loads, so that torch's thread pool (and the prompt process) start inside
        # the pinned cores.
        self.pin = CorePin(math.ceil(sc.num_cpus_per_actor) if sc.pin_cores else 0)
        if self.pin.cores:
            log.info("scorer actor pinned to cores %s", self.pin.cores)
        self.artifacts = load_artifacts(self.cfg)  # per actor: a node-local copy when the root is s3://
        self.version = self.artifacts.version
        # Started first: its imports and tokenizer load beside the model's; it sends the answer ids,
        # so the scorer loads no tokenizer.
        self.prompts = PromptProcess(cfg, self.artifacts, out, mode)
        self.scorer = make_scorer(self.cfg, self.artifacts, answer_ids=self.prompts.answer_ids)
        self.storage = Storage.from_config(self.cfg)
        self.out, self.ost, self.schema, self.mode = out, out_storage(self.storage, out), schema, mode

    def cores(self) -> dict[str, list[int]]:
        """The cores this actor claimed (empty: not pinned) and its process's CPU mask now."""
        mask = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        return {"cores": self.pin.cores, "mask": mask}

    def score_shard(self, shard: int, next_shard: int | None = None) -> dict[str, Any]:
        """Score and publish ``shard``; ``next_shard``: the one the driver gives this actor next, whose
        prompts the child starts on as soon as this shard's are built."""
        t0 = time.time()  # wall clock: shards of several actors share one timeline
        batches = (self.score_batch(p) for p in self.prompts.slices(shard))
        if next_shard is not None:
            self.prompts.prefetch(next_shard)
        rec = publish_shard(self.ost, self.out, shard, self.schema, batches)
        return {**rec, "staged": self.prompts.staged, "started": t0, "ended": time.time()}

    def score_batch(self, batch: pa.Table) -> pa.Table:
        """Prompt rows -> output rows; quarantined rows pass through with their reason."""
        from thinkrec.scoring.prompts import rows_from_table  # torch: not at the actor module's import

        n = batch.num_rows
        good = pc.is_null(batch.column(REASON)).to_numpy(zero_copy_only=False)
        score = np.full(n, np.nan, np.float32)
        p_yes = np.full(n, np.nan, np.float32)
        if good.any():
            s, p = self.scorer.score(rows_from_table(batch.filter(pa.array(good))))
            score[good], p_yes[good] = s, p
        out = {
            S.USER_ID: batch.column(S.USER_ID),
            S.ITEM_ID: batch.column(S.ITEM_ID),
            S.LABEL: batch.column(S.LABEL),
            S.SCORE: pa.array(score, mask=~good),
            S.P_YES: pa.array(p_yes, mask=~good),
            S.GATE: batch.column(S.GATE),
            S.VERSION: pa.array([self.version] * n, pa.string()),
            REASON: batch.column(REASON),
        }
        # Raw ids and passthrough columns, unchanged; the prompt encodings stay behind.
        for c in batch.column_names:
            if c not in out and not c.startswith("_"):
                out[c] = batch.column(c)
        return pa.table(out)


def actors_before_partition(cfg: Config, k: int) -> int:
    """How many of the ``k`` scorer actors can start while the table is partitioned: as many as
    leave the partition tasks ``score.read_cpus`` free (the rest start after it), so the actors'
    start-up (worker process, torch, the model) overlaps the partition without starving it."""
    import ray

    per = cfg.score.num_cpus_per_actor
    if per <= 0:
        return k
    free = ray.cluster_resources().get("CPU", 0) - cfg.score.read_cpus
    return max(0, min(k, int(free // per + 1e-9)))


def start_actors(cfg: Config, out: str, schema: pa.Schema, mode: str, k: int) -> list[Any]:
    """``k`` scorer actors (each ``score.num_cpus_per_actor`` CPUs, ``num_gpus_per_actor`` GPUs).
    Ray restarts an actor that dies (its process killed, its node lost) and retries its shard there;
    a shard publishes the same names again, so a retry never leaves a second copy."""
    import ray

    sc = cfg.score
    actor = ray.remote(ShardStep).options(
        num_cpus=sc.num_cpus_per_actor,
        num_gpus=sc.num_gpus_per_actor,
        max_restarts=-1,
        max_task_retries=-1,
    )
    return [actor.remote(cfg.to_dict(), out, schema, mode) for _ in range(k)]


def score_shards(
    cfg: Config, out: str, pending: list[int], staged: np.ndarray, actors: list[Any]
) -> tuple[float, float]:
    """The pending shard ids over the scorer actors, one shard per actor at a time (and the next
    named in advance); each actor publishes its shards as it finishes them. The driver receives one
    small record per shard and checks it against the staged count. Returns the scoring window's
    wall-clock bounds: the first shard started, the last one published."""
    import ray
    from tqdm.auto import tqdm

    todo, running = list(reversed(pending)), {}
    bar = tqdm(
        total=int(sum(staged[s] for s in pending)),
        desc="score",
        unit="pairs",
        disable=os.environ.get("THINKREC_PROGRESS", "1") == "0",
    )

    # Each actor is told its next shard with its current one, so its prompt process starts on it
    # early; only while there are shards enough for every actor, so none idles at the end.
    nxt: dict[Any, int] = {}

    def submit(a: Any) -> None:
        s = nxt.pop(a, None)
        if s is None and todo:
            s = todo.pop()
        if s is None:
            return
        if len(todo) >= len(actors):
            nxt[a] = todo.pop()
        running[a.score_shard.remote(s, nxt.get(a))] = a

    for a in actors:
        submit(a)
    first, last = float("inf"), 0.0
    with bar:
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            a = running.pop(ref)
            r = ray.get(ref)
            s, rows, q, n = r["shard"], r["rows"], r["rows_quarantined"], r["staged"]
            if rows + q != n or n != staged[s]:
                raise CommitError(
                    f"{out}: shard {s} staged {staged[s]} rows, read {n}, wrote {rows} + {q} quarantined"
                )
            first, last = min(first, r["started"]), max(last, r["ended"])
            log.info("score: shard %s published (%s rows, %s quarantined)", s, rows, q)
            bar.update(n)
            submit(a)
    return first, last


def throughput(rows: int, wall_s: float, backend: str, **phases: float) -> dict[str, Any]:
    """The manifest's throughput record: the input rows, the stage's wall time (from the start of
    ``run`` to the commit) and their ratio, the backend; plus the phases' seconds (``partition_s``,
    ``score_s`` with actor start-up, ``startup_s`` from the start of ``run`` to the first shard's
    start (the actors' start-up, which overlaps the partition), ``scoring_window_s`` from then to
    the last shard published)."""
    return {
        "rows": rows,
        "wall_s": wall_s,
        "pairs_per_s": rows / wall_s if wall_s > 0 else 0.0,
        "backend": backend,
        **phases,
    }


def _stop(actors: list[Any]) -> None:
    """End the scorer actors now, not whenever the driver's handles are collected."""
    import ray

    for a in actors:
        ray.kill(a)


def run(cfg: Config) -> dict[str, Any]:
    t0, t0_wall = time.perf_counter(), time.time()
    storage = Storage.from_config(cfg)
    out = output_uri(cfg, storage)
    meta = stage_meta(cfg, storage)
    if is_complete(storage, out, meta):  # before the table is read at all
        log.info("score: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/{MANIFEST}")
    schema = first_schema(cfg, storage)
    ost = out_storage(storage, out)
    _, _, mode = candidate_files(cfg, storage)
    # The fingerprint a job's shards were made with, kept beside them: a resubmission with the same
    # one keeps every published shard; shards of another config or table are never mixed in.
    fp_uri = f"{out}/{FINGERPRINT}"
    if ost.exists(out) and (not ost.exists(fp_uri) or ost.read_json(fp_uri) != meta):
        ost.delete(out)
    if not ost.exists(fp_uri):
        ost.write_json(fp_uri, meta)
    writer = TableWriter(
        ost,
        out,
        num_shards=n_shards(cfg),
        key=shard_column(mode),
        meta=meta,
        config=cfg.to_dict(),
        max_quarantine_rate=cfg.data.max_quarantine_rate,
        schema=schema,
    )
    pending = writer.pending_shards()
    k = min(cfg.score.concurrency, len(pending))
    # Scorer actors start now, where they fit beside the partition; the others after it.
    actors = start_actors(cfg, out, schema, mode, actors_before_partition(cfg, k)) if k else []
    try:
        staged, mode = partition(cfg, storage, out, meta)
        t1 = time.perf_counter()
        actors += start_actors(cfg, out, schema, mode, k - len(actors))
        first, last = score_shards(cfg, out, pending, staged, actors) if pending else (t0_wall, t0_wall)
    finally:
        _stop(actors)
    t2 = time.perf_counter()
    artifacts = load_artifacts(cfg)
    sc = cfg.score
    rows_in = int(staged.sum())
    manifest = writer.commit(
        rows_in=rows_in,
        extra={
            "version": artifacts.version,
            "backend": sc.backend,
            "candidates": sc.candidates or "test split",
            "id_space": sc.id_space if sc.candidates else "internal",
            "shards_scored": len(pending),
            "rows_scored": int(sum(staged[s] for s in pending)),
            "throughput": throughput(
                rows_in,
                time.perf_counter() - t0,
                sc.backend,
                partition_s=t1 - t0,
                score_s=t2 - t1,
                startup_s=max(0.0, first - t0_wall),
                scoring_window_s=max(0.0, last - first),
            ),
        },
    )
    ost.delete(f"{out}/{STAGING}")
    log.info(
        "score: %s rows scored, %s quarantined %s -> %s",
        manifest["rows"],
        manifest["rows_quarantined"],
        manifest["quarantine_reasons"],
        out,
    )
    return manifest
