"""score: candidate pairs -> Yes logit and P(Yes) per pair -> score/scores.

    candidates (Parquet/CSV, local or s3://; default: the test split of prepare/interactions)
      -> PromptStep actors (shard filter to the pending wave, ids checked, histories, prompts, gates)
      -> ScoreStep actors (one model per actor: HF or vLLM backend behind ``Scorer``)
      -> TableWriter (deterministic shards, quarantine, manifest, _SUCCESS last)

Streaming end to end: Ray Data reads, maps and hands over blocks; the driver writes each block into
its shard spool as it arrives, so memory does not grow with the candidate table. A resubmitted job
writes only the shards not yet published; a finished table with the same fingerprint is skipped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.data.prepare import INTERACTIONS, ITEMS, USERS
from thinkrec.io.commit import MANIFEST, REASON, TableWriter, fingerprint, manifest_files
from thinkrec.io.fs import Storage
from thinkrec.scoring.base import CF_MODEL_DIR, TRAIN_DIR, Artifacts, Scorer, load_artifacts
from thinkrec.scoring.prompts import PromptStep, rows_from_table

log = logging.getLogger(__name__)

SCORES = "score/scores"
# Score settings that change no score (batching, placement): left out of the fingerprint so that a
# resubmission with more actors or another batch size resumes instead of starting over.
RUNTIME_KEYS = (
    "batch_size",
    "concurrency",
    "num_cpus_per_actor",
    "num_gpus_per_actor",
    "block_rows",
    "prompt_concurrency",
    "prompt_cpus",
    "shards_per_wave",
    "max_buffer_mb",
    "torch_threads",
    "read_cpus",
    # Same scores up to float rounding: how the forward runs, not what it computes.
    "fuse_projections",
    "compile",
)
CANDIDATE_COLUMNS = [S.USER_ID, S.ITEM_ID, S.LABEL, S.TIMESTAMP, S.HISTORY_ITEMS, S.HISTORY_LABELS]


def make_scorer(cfg: Config, artifacts: Artifacts) -> Scorer:
    """The configured backend, imported only when chosen (vLLM is a GPU extra)."""
    if cfg.score.backend == "hf":
        from thinkrec.scoring.hf import HFScorer

        return HFScorer(cfg, artifacts)
    if cfg.score.backend == "vllm":
        from thinkrec.scoring.vllm import VLLMScorer

        return VLLMScorer(cfg, artifacts)
    raise ValueError(f"score.backend: unknown backend {cfg.score.backend!r} (hf or vllm)")


class ScoreStep:
    """Ray Data callable class: one scorer per actor, loaded once; quarantined rows pass through."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = from_dict(cfg)
        self.artifacts = load_artifacts(self.cfg)  # per actor: a node-local copy when the root is s3://
        self.version = self.artifacts.version
        self.scorer = make_scorer(self.cfg, self.artifacts)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        good = pc.is_null(batch.column(REASON)).to_numpy(zero_copy_only=False)
        score = np.full(n, np.nan, np.float32)
        p_yes = np.full(n, np.nan, np.float32)
        if good.any():
            s, p = self.scorer.score(rows_from_table(batch.filter(pa.array(good))))
            score[good], p_yes[good] = s, p
        return pa.table(
            {
                S.USER_ID: batch.column(S.USER_ID),
                S.ITEM_ID: batch.column(S.ITEM_ID),
                S.LABEL: batch.column(S.LABEL),
                S.SCORE: pa.array(score, mask=~good),
                S.P_YES: pa.array(p_yes, mask=~good),
                S.GATE: batch.column(S.GATE),
                S.VERSION: pa.array([self.version] * n, pa.string()),
                REASON: batch.column(REASON),
            }
        )


class ReadFiles:
    """Ray Data map over file paths: streams each Parquet/CSV file in slices of ``block_rows``.

    Used instead of ``ray.data.read_parquet``: its file-listing task asks for a whole CPU, which on a
    small node the actor pools already hold (the job would wait forever); this read asks for
    ``score.read_cpus``. Yields blocks, so a large file never sits whole in memory."""

    def __init__(self, storage: Storage, fmt: str, rows: int, test_split: bool) -> None:
        self.storage, self.fmt, self.rows, self.test_split = storage, fmt, rows, test_split

    def __call__(self, batch: dict[str, Any]) -> Any:
        for path in batch["path"]:
            yield from _iter_file(self.storage, str(path), self.fmt, self.rows, self.test_split)


def _iter_file(storage: Storage, path: str, fmt: str, rows: int, test_split: bool) -> Any:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, _ = storage.fs(storage.root)
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in pf.schema_arrow.names if c in CANDIDATE_COLUMNS or c == S.SPLIT]
            for rb in pf.iter_batches(batch_size=rows, columns=cols):
                t = pa.Table.from_batches([rb])
                yield _default_candidates(t) if test_split else t
    else:
        with fs.open_input_stream(path) as f:
            reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 22))
            for rb in reader:
                t = pa.Table.from_batches([rb])
                yield t.select([c for c in t.column_names if c in CANDIDATE_COLUMNS])


def _default_candidates(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column(S.SPLIT), "test")).drop_columns([S.SPLIT])


def _file_infos(storage: Storage, uri: str) -> list[pafs.FileInfo]:
    fs, path = storage.fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"score.candidates: {uri} does not exist")
    if info.type == pafs.FileType.File:
        return [info]
    return sorted(
        (
            i
            for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File and not i.base_name.startswith(("_", "."))
        ),
        key=lambda i: i.path,
    )


def candidate_files(cfg: Config, storage: Storage) -> tuple[list[str], str, bool]:
    """(paths inside the filesystem, "parquet" or "csv", whether to keep only the test split)."""
    uri = cfg.score.candidates
    if not uri:
        return manifest_files(storage, storage.uri(INTERACTIONS)), "parquet", True
    paths = [f.path for f in _file_infos(storage, uri)]
    if not paths:
        raise FileNotFoundError(f"score.candidates: no files under {uri}")
    if all(p.endswith((".csv", ".csv.gz")) for p in paths):
        fmt = "csv"
    elif all(p.endswith(".parquet") for p in paths):
        fmt = "parquet"
    else:
        raise ValueError(f"score.candidates: {uri} must hold only .parquet or only .csv files")
    return paths, fmt, False


def count_candidates(cfg: Config, storage: Storage) -> int:
    """Input rows, counted independently of the pipeline (Parquet: footers, or the split column for
    the default; CSV: one streaming pass), checked against rows_out + rows_quarantined at commit.
    Also checks the required columns, naming the file that lacks them."""
    paths, fmt, test_split = candidate_files(cfg, storage)
    # Candidate files are named by their full URI scheme's filesystem: the root's, or the table's.
    st = _storage_for(cfg, storage)
    n = 0
    for path in paths:
        if fmt == "parquet" and not test_split:
            import pyarrow.parquet as pq

            fs, _ = st.fs(st.root)
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                missing = [c for c in S.CANDIDATE_COLUMNS if c not in pf.schema_arrow.names]
                if missing:
                    raise ValueError(f"score.candidates: {path} lacks required columns {missing}")
                n += pf.metadata.num_rows
        else:
            for t in _iter_file(st, path, fmt, 1 << 16, test_split):
                missing = [c for c in S.CANDIDATE_COLUMNS if c not in t.column_names]
                if missing:
                    raise ValueError(f"score.candidates: {path} lacks required columns {missing}")
                n += t.num_rows
    return n


def _storage_for(cfg: Config, storage: Storage) -> Storage:
    """A Storage whose root is on the candidates' filesystem (they may live outside the output root)."""
    uri = cfg.score.candidates or storage.root
    return Storage(root=uri, s3_endpoint=storage.s3_endpoint, s3_region=storage.s3_region)


def read_candidates(cfg: Config, storage: Storage) -> Any:
    """The candidate table as a lazy Ray Dataset of blocks of at most ``score.block_rows`` rows."""
    import ray.data

    paths, fmt, test_split = candidate_files(cfg, storage)
    files = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, len(paths)))
    return files.map_batches(
        ReadFiles,
        fn_constructor_args=(_storage_for(cfg, storage), fmt, cfg.score.block_rows, test_split),
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.score.read_cpus,
        compute=ray.data.ActorPoolStrategy(size=1),
    )


def stage_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    d = cfg.to_dict()
    score = {k: v for k, v in d["score"].items() if k not in RUNTIME_KEYS}
    sections: dict[str, Any] = {
        "stage": "score/v1",
        **{k: d[k] for k in ("model", "train", "fusion", "data")},
        "score": score,
    }
    if cfg.score.candidates:
        # An external table has no manifest: identify it by its files' names, sizes and times.
        sections["candidate_files"] = [
            (f.path, f.size, str(f.mtime)) for f in _file_infos(storage, cfg.score.candidates)
        ]
    inputs = [storage.uri(t) for t in (INTERACTIONS, ITEMS, USERS, TRAIN_DIR, CF_MODEL_DIR)]
    return fingerprint(sections, inputs, storage)


@contextlib.contextmanager
def buffer_limit(max_mb: int | None) -> Iterator[None]:
    """Cap the object-store memory Ray Data may fill during this stage's executions (restored after).

    Without a cap, Ray Data lets operators run ahead into a share of the whole object store, so a
    larger candidate table queues more prompt blocks in front of the scorer and the job's memory
    grows with the table; with it, upstream operators wait (backpressure) instead."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    saved = options.resource_limits
    if max_mb:
        options.resource_limits = saved.copy(object_store_memory=max_mb * 2**20)
    try:
        yield
    finally:
        options.resource_limits = saved


def score_wave(cfg: Config, candidates: Any, writer: TableWriter, wave: list[int]) -> None:
    """One pass over the candidates: prompts for the wave's shards (CPU actors) -> scorer actors ->
    the wave's output shards, published as they complete."""
    import ray.data

    sc = cfg.score
    scored = candidates.map_batches(
        PromptStep,
        fn_constructor_kwargs={"cfg": cfg.to_dict(), "shards": wave},
        batch_format="pyarrow",
        batch_size=sc.block_rows,
        compute=ray.data.ActorPoolStrategy(size=sc.prompt_concurrency),
        num_cpus=sc.prompt_cpus,
    ).map_batches(
        ScoreStep,
        fn_constructor_kwargs={"cfg": cfg.to_dict()},
        batch_format="pyarrow",
        batch_size=sc.block_rows,
        compute=ray.data.ActorPoolStrategy(size=sc.concurrency),
        num_cpus=sc.num_cpus_per_actor,
        num_gpus=sc.num_gpus_per_actor,
    )
    counts = writer.write(scored.iter_batches(batch_format="pyarrow", batch_size=None), wave)
    log.info("score: wave %s written (%s rows)", wave, sum(counts.values()))


def run(cfg: Config) -> dict[str, Any]:
    storage = Storage.from_config(cfg)
    out = storage.uri(SCORES)
    meta = stage_meta(cfg, storage)
    writer = TableWriter.for_stage(cfg, storage, out, meta, S.SCORES)
    if writer.complete:
        log.info("score: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/{MANIFEST}")
    artifacts = load_artifacts(cfg)
    rows_in = count_candidates(cfg, storage)
    sc = cfg.score
    with buffer_limit(sc.max_buffer_mb):
        candidates = read_candidates(cfg, storage)  # a dataset keeps the context it was made in
        for wave in writer.waves(sc.shards_per_wave):
            score_wave(cfg, candidates, writer, wave)
    manifest = writer.commit(
        rows_in=rows_in,
        extra={
            "version": artifacts.version,
            "backend": sc.backend,
            "candidates": sc.candidates or "test split",
        },
    )
    log.info(
        "score: %s rows scored, %s quarantined %s -> %s",
        manifest["rows"],
        manifest["rows_quarantined"],
        manifest["quarantine_reasons"],
        out,
    )
    return manifest
