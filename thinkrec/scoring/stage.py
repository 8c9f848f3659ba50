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
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.data.items import keywords_inputs
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
    "output",
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


class ReadFiles:
    """Ray Data map over file paths: streams each Parquet/CSV/JSON-lines file in slices of
    ``block_rows``, raw ids normalised to strings (``raw_user_id``/``raw_item_id``).

    Used instead of ``ray.data.read_parquet``: its file-listing task asks for a whole CPU, which on a
    small node the actor pools already hold (the job would wait forever); this read asks for
    ``score.read_cpus``. Yields blocks, so a large file never sits whole in memory."""

    def __init__(self, storage: Storage, fmt: str, rows: int, mode: str) -> None:
        self.storage, self.fmt, self.rows, self.mode = storage, fmt, rows, mode

    def __call__(self, batch: dict[str, Any]) -> Any:
        for path in batch["path"]:
            for t in _iter_file(self.storage, str(path), self.fmt, self.rows, self.mode):
                yield _normalise(t, self.mode)


def _normalise(t: pa.Table, mode: str) -> pa.Table:
    """Raw-id tables: ``user_id``/``item_id`` -> ``raw_user_id``/``raw_item_id`` strings (integers as
    ``str(id)``, as the id maps store them)."""
    if mode != "raw":
        return t
    cols = {}
    for c in t.column_names:
        if c == S.USER_ID:
            cols[S.RAW_USER_ID] = pc.cast(t.column(c), pa.string())
        elif c == S.ITEM_ID:
            cols[S.RAW_ITEM_ID] = pc.cast(t.column(c), pa.string())
        else:
            cols[c] = t.column(c)
    return pa.table(cols)


def _iter_file(storage: Storage, path: str, fmt: str, rows: int, mode: str) -> Any:
    """A file's rows in blocks, as stored (mode "test": the test split of prepare/interactions)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, _ = storage.fs(storage.root)
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            cols = [c for c in names if c in CANDIDATE_COLUMNS or c == S.SPLIT] if mode == "test" else None
            for rb in pf.iter_batches(batch_size=rows, columns=cols):
                t = pa.Table.from_batches([rb])
                yield _default_candidates(t) if mode == "test" else t
    elif fmt == "csv":
        # Raw ids read as text: "007" stays "007" (type inference would make it 7).
        types = {S.USER_ID: pa.string(), S.ITEM_ID: pa.string()} if mode == "raw" else {}
        with fs.open_input_stream(path) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                convert_options=pacsv.ConvertOptions(column_types=types),
            )
            for rb in reader:
                yield pa.Table.from_batches([rb])
    else:
        with fs.open_input_stream(path) as f:
            for rb in pajson.open_json(f, read_options=pajson.ReadOptions(block_size=1 << 22)):
                yield pa.Table.from_batches([rb])


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


FORMATS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv", ".jsonl": "json", ".json": "json"}


def _format(path: str) -> str | None:
    return next((f for ext, f in FORMATS.items() if path.endswith(ext)), None)


def candidate_files(cfg: Config, storage: Storage) -> tuple[list[str], str, str]:
    """(paths inside the filesystem, "parquet" / "csv" / "json", mode): mode "test" reads the test
    split of prepare/interactions, "raw" or "internal" a candidate table of that ``score.id_space``."""
    uri = cfg.score.candidates
    if not uri:
        return manifest_files(storage, storage.uri(INTERACTIONS)), "parquet", "test"
    paths = [f.path for f in _file_infos(_storage_for(cfg, storage), uri)]
    if not paths:
        raise FileNotFoundError(f"score.candidates: no files under {uri}")
    fmts = {p: _format(p) for p in paths}
    unknown = [p for p, f in fmts.items() if f is None]
    if unknown:
        raise ValueError(f"score.candidates: {unknown[0]} is not .parquet, .csv(.gz) or .jsonl (JSON lines)")
    if len(set(fmts.values())) > 1:
        raise ValueError(f"score.candidates: {uri} mixes formats {sorted(set(fmts.values()))}; use one")
    return paths, next(iter(fmts.values())), cfg.score.id_space


def count_candidates(cfg: Config, storage: Storage) -> tuple[int, pa.Schema]:
    """Input rows, counted independently of the pipeline (Parquet: footers, or the split column for
    the default; CSV/JSON: one streaming pass), checked against rows_out + rows_quarantined at
    commit; and the output schema (S.SCORES, plus raw ids and the passthrough columns of the table's
    first block). Also checks the required columns, naming the file that lacks them."""
    paths, fmt, mode = candidate_files(cfg, storage)
    # Candidate files are named by their full URI scheme's filesystem: the root's, or the table's.
    st = _storage_for(cfg, storage)
    n, first = 0, None
    for path in paths:
        if fmt == "parquet" and mode != "test":
            import pyarrow.parquet as pq

            fs, _ = st.fs(st.root)
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                n += pf.metadata.num_rows
                first = pf.schema_arrow.empty_table() if first is None else first
            _check_columns(path, names)
        else:
            for t in _iter_file(st, path, fmt, 1 << 16, mode):
                _check_columns(path, t.column_names)
                first = t.slice(0, 0) if first is None else first
                n += t.num_rows
    return n, output_schema(_normalise(first, mode) if first is not None else None, mode)


def _check_columns(path: str, names: list[str]) -> None:
    missing = [c for c in S.CANDIDATE_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"score.candidates: {path} lacks required columns {missing}")


# Input columns the stage consumes (not passed through).
CONSUMED = (S.USER_ID, S.ITEM_ID, S.LABEL, S.HISTORY_ITEMS, S.HISTORY_LABELS, S.SPLIT)


def output_schema(first: pa.Table | None, mode: str) -> pa.Schema:
    """S.SCORES for the test split; for a candidate table S.SCORES with the raw ids after the
    internal ones and every other input column (``timestamp`` included) after ``version``."""
    if mode == "test" or first is None:
        return S.SCORES
    fields = list(S.SCORES)
    if mode == "raw":
        fields[2:2] = [pa.field(S.RAW_USER_ID, pa.string()), pa.field(S.RAW_ITEM_ID, pa.string())]
    taken = {f.name for f in fields}
    fields += [f for f in first.schema if f.name not in CONSUMED and f.name not in taken]
    return pa.schema(fields)


def _storage_for(cfg: Config, storage: Storage) -> Storage:
    """A Storage whose root is on the candidates' filesystem (they may live outside the output root)."""
    uri = cfg.score.candidates or storage.root
    return Storage(root=uri, s3_endpoint=storage.s3_endpoint, s3_region=storage.s3_region)


def read_candidates(cfg: Config, storage: Storage) -> Any:
    """The candidate table as a lazy Ray Dataset of blocks of at most ``score.block_rows`` rows."""
    import ray.data

    paths, fmt, mode = candidate_files(cfg, storage)
    files = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, len(paths)))
    return files.map_batches(
        ReadFiles,
        fn_constructor_args=(_storage_for(cfg, storage), fmt, cfg.score.block_rows, mode),
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
            (f.path, f.size, str(f.mtime))
            for f in _file_infos(_storage_for(cfg, storage), cfg.score.candidates)
        ]
    inputs = [storage.uri(t) for t in (INTERACTIONS, ITEMS, USERS, TRAIN_DIR, CF_MODEL_DIR)]
    inputs += keywords_inputs(storage)
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


def output_uri(cfg: Config, storage: Storage) -> str:
    """``score.output`` (relative to the run root unless absolute or a URI); by default
    ``score/scores`` for the test split and ``score/<table name>`` for a candidate table."""
    out = cfg.score.output
    if out:
        return out if "://" in out or os.path.isabs(out) else storage.uri(out)
    if not cfg.score.candidates:
        return storage.uri(SCORES)
    name = cfg.score.candidates.rstrip("/").rsplit("/", 1)[-1]
    for ext in sorted(FORMATS, key=len, reverse=True):
        name = name.removesuffix(ext)
    if not name or name == "scores":
        raise ValueError(
            f"score.candidates: cannot name an output after {cfg.score.candidates!r}; set score.output"
        )
    return storage.uri("score", name)


def run(cfg: Config) -> dict[str, Any]:
    storage = Storage.from_config(cfg)
    out = output_uri(cfg, storage)
    meta = stage_meta(cfg, storage)
    rows_in, schema = count_candidates(cfg, storage)
    writer = TableWriter.for_stage(cfg, storage, out, meta, schema)
    if writer.complete:
        log.info("score: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/{MANIFEST}")
    artifacts = load_artifacts(cfg)
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
            "id_space": sc.id_space if sc.candidates else "internal",
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
