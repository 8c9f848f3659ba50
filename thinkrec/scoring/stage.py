"""score: candidate pairs -> Yes logit and P(Yes) per pair -> one committed table per candidate table.

    candidates (Parquet/CSV/JSON lines, local or s3://; default: the test split of prepare/interactions)
      -> partition tasks (one per file): rows hash-partitioned by user into staged shards
         (``<output>/_staging/shard-<s>/``), written by the tasks themselves
      -> ShardStep actors (one model each, HF or vLLM behind ``Scorer``), one shard at a time: the
         shard's candidates sorted by user, the lookups it needs (id maps, users, timelines, item
         texts: filtered reads, never whole tables), prompts, scores; the actor publishes the shard
         (quarantine, record, part) the moment it is done
      -> the driver: _manifest.json from the shards' records, then _SUCCESS; the staging goes.

A user's candidates always meet in one shard and one scorer call, so prefix sharing is the same
for a shuffled table as for a sorted one. The driver sees one count row per input file and one record
per shard, so its memory and traffic do not grow with the table. A killed and resubmitted job keeps
the staging and every published shard and scores only the rest; a finished table with the same
fingerprint is skipped before its candidates are read.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.data.items import keywords_inputs
from thinkrec.data.prepare import INTERACTIONS, ITEMS, USERS
from thinkrec.io.commit import (
    MANIFEST,
    REASON,
    CommitError,
    TableWriter,
    fingerprint,
    is_complete,
    manifest_files,
    publish_shard,
    stable_shard,
    upload_file,
)
from thinkrec.io.fs import Storage
from thinkrec.scoring.base import CF_MODEL_DIR, TRAIN_DIR, Artifacts, Scorer, load_artifacts
from thinkrec.scoring.prompts import PromptStep, rows_from_table, shard_key

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


# -- partition: the candidates hash-partitioned by user into staged shards (workers write them) ----
STAGING = "_staging"
PARTITIONED = "_partitioned.json"
FINGERPRINT = "_fingerprint.json"


def _out_storage(storage: Storage, out: str) -> Storage:
    """A Storage on the output's filesystem (the output may live outside the run root)."""
    return Storage(root=out, s3_endpoint=storage.s3_endpoint, s3_region=storage.s3_region)


def n_shards(cfg: Config) -> int:
    return cfg.score.num_shards or cfg.storage.num_shards


def shard_column(mode: str) -> str:
    """The column a row's shard hashes: the raw user id as given (raw tables: no lookup needed to
    partition), else the internal user id."""
    return S.RAW_USER_ID if mode == "raw" else S.USER_ID


def shard_of(t: pa.Table, mode: str, num_shards: int) -> np.ndarray:
    if mode == "raw":
        return stable_shard(pc.fill_null(t.column(S.RAW_USER_ID), ""), num_shards)
    return stable_shard(shard_key(t.column(S.USER_ID)), num_shards)


def _staged_dir(root: str, shard: int) -> str:
    return f"{root}/{STAGING}/shard-{shard:05d}"


def _partition_files(
    batch: dict[str, np.ndarray],
    storage: Storage,
    out: Storage,
    fmt: str,
    mode: str,
    rows: int,
    num_shards: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task over (index, path) rows: each file's blocks split by shard, each piece written as
    ``_staging/shard-<s>/f<file>-b<block>.parquet``. Names are fixed by file and block, so a retried
    task writes the same pieces again, never a second copy. Yields one count row per file, once the
    whole file is staged (a task that dies yields nothing)."""
    fs, root = out.fs(out.root)
    for index, path in zip(batch["index"], batch["path"], strict=True):
        counts = np.zeros(num_shards, np.int64)
        with tempfile.TemporaryDirectory(prefix="thinkrec-stage-") as tmp:
            for b, t in enumerate(_iter_file(storage, str(path), fmt, rows, mode)):
                if mode != "test":
                    _check_columns(str(path), t.column_names)
                t = _normalise(t, mode)
                shards = shard_of(t, mode, num_shards)
                for s in np.unique(shards).tolist():
                    piece = t.filter(pa.array(shards == s))
                    local = os.path.join(tmp, f"{s}-{b}.parquet")
                    pq.write_table(piece, local)
                    upload_file(fs, local, f"{_staged_dir(root, s)}/f{int(index):05d}-b{b:06d}.parquet")
                    os.remove(local)
                    counts[s] += piece.num_rows
        yield {"shard": np.arange(num_shards)[None, :], "rows": counts[None, :]}


def partition(cfg: Config, storage: Storage, out: str, meta: dict[str, str]) -> tuple[np.ndarray, str]:
    """Stage the candidate table as shards by user (skipped when a finished staging of the same table
    and config exists). Returns (rows per shard, mode). The driver sees one count row per file."""
    import ray.data

    ost = _out_storage(storage, out)
    paths, fmt, mode = candidate_files(cfg, storage)
    n = n_shards(cfg)
    marker = f"{out}/{STAGING}/{PARTITIONED}"
    if ost.exists(marker):
        rec = ost.read_json(marker)
        if rec.get("meta") == meta and rec.get("num_shards") == n:
            return np.asarray(rec["rows"], np.int64), mode
    if ost.exists(f"{out}/{STAGING}"):
        ost.delete(f"{out}/{STAGING}")  # half-staged (or another table's): start it over
    files = ray.data.from_items(
        [{"index": i, "path": p} for i, p in enumerate(paths)], override_num_blocks=max(1, len(paths))
    )
    staged = files.map_batches(
        _partition_files,
        fn_kwargs={
            "storage": _storage_for(cfg, storage),
            "out": ost,
            "fmt": fmt,
            "mode": mode,
            "rows": cfg.score.block_rows,
            "num_shards": n,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.score.read_cpus,
    )
    rows = np.zeros(n, np.int64)
    for b in staged.iter_batches(batch_format="numpy", batch_size=None):
        rows += b["rows"].sum(axis=0)
    ost.write_json(marker, {"meta": meta, "num_shards": n, "rows": rows.tolist()})
    return rows, mode


def first_schema(cfg: Config, storage: Storage) -> pa.Schema:
    """The output schema from the first candidate file alone (a Parquet footer or one block)."""
    paths, fmt, mode = candidate_files(cfg, storage)
    if mode == "test":
        return S.SCORES
    st = _storage_for(cfg, storage)
    if fmt == "parquet":
        fs, _ = st.fs(st.root)
        with fs.open_input_file(paths[0]) as f:
            first = pq.ParquetFile(f).schema_arrow.empty_table()
    else:
        first = next(iter(_iter_file(st, paths[0], fmt, 1024, mode)), None)
    if first is not None:
        _check_columns(paths[0], first.column_names)
    return output_schema(_normalise(first, mode) if first is not None else None, mode)


# -- score: one actor scores a whole shard and publishes it ----------------------------------------
def _user_chunks(table: pa.Table, key: str, rows: int) -> Iterator[pa.Table]:
    """Slices of a table sorted by ``key`` of about ``rows`` rows, cut only where the key changes,
    so each user's candidates stay in one scorer call (one prefix pass)."""
    n = table.num_rows
    if n == 0:
        return
    k = table.column(key).to_numpy(zero_copy_only=False)
    change = np.flatnonzero(k[1:] != k[:-1]) + 1  # first row of each user but the first
    start = 0
    while start < n:
        cut = np.searchsorted(change, start + rows)
        end = int(change[cut]) if cut < len(change) else n
        end = max(end, min(n, start + 1))
        yield table.slice(start, end - start)
        start = end


class ShardStep:
    """Ray Data callable class, one per scorer actor: the model loaded once; per shard id, the shard's
    staged candidates -> lookups -> prompts -> scores -> the published shard and its record."""

    def __init__(self, cfg: dict[str, Any], out: str, schema: pa.Schema, mode: str) -> None:
        self.cfg = from_dict(cfg)
        self.artifacts = load_artifacts(self.cfg)  # per actor: a node-local copy when the root is s3://
        self.version = self.artifacts.version
        self.scorer = make_scorer(self.cfg, self.artifacts)
        self.prompts = PromptStep(cfg, artifacts=self.artifacts)
        self.storage = Storage.from_config(self.cfg)
        self.out, self.ost, self.schema, self.mode = out, _out_storage(self.storage, out), schema, mode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        recs = [self.score_shard(int(s)) for s in batch["shard"]]
        return {
            k: np.array([r[k] for r in recs])
            for k in ("shard", "rows", "rows_quarantined", "staged", "started", "ended")
        }

    def _staged(self, shard: int) -> pa.Table:
        fs, root = self.ost.fs(self.out)
        infos = fs.get_file_info(pafs.FileSelector(_staged_dir(root, shard), allow_not_found=True))
        pieces = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        if not pieces:
            return pa.table({})
        t = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in pieces], promote_options="default")
        # Stable sort by user: a user's candidates together, whatever the input order.
        return t.take(pc.sort_indices(t, [(shard_column(self.mode), "ascending")]))

    def score_shard(self, shard: int) -> dict[str, Any]:
        t0 = time.time()  # wall clock: shards of several actors share one timeline
        table = self._staged(shard)
        n = table.num_rows
        batches: Iterator[pa.Table] = iter(())
        if n:
            lk = self.prompts.lookups(table)
            chunks = _user_chunks(table, shard_column(self.mode), self.cfg.score.block_rows)
            batches = (self.score_batch(self.prompts(c, lk)) for c in chunks)
        rec = publish_shard(self.ost, self.out, shard, self.schema, batches)
        return {**rec, "staged": n, "started": t0, "ended": time.time()}

    def score_batch(self, batch: pa.Table) -> pa.Table:
        """Prompt rows -> output rows; quarantined rows pass through with their reason."""
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


def score_shards(
    cfg: Config, out: str, pending: list[int], schema: pa.Schema, mode: str, staged: np.ndarray
) -> float:
    """Scorer actors over the pending shard ids; each publishes its shards as it finishes them. The
    driver receives one small record per shard and checks it against the staged count. Returns the
    scoring window: first shard started to last shard published (actor start-up excluded)."""
    import ray.data

    sc = cfg.score
    shards = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
    done = shards.map_batches(
        ShardStep,
        fn_constructor_kwargs={"cfg": cfg.to_dict(), "out": out, "schema": schema, "mode": mode},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(sc.concurrency, len(pending))),
        num_cpus=sc.num_cpus_per_actor,
        num_gpus=sc.num_gpus_per_actor,
    )
    first, last = float("inf"), 0.0
    for b in done.iter_batches(batch_format="numpy", batch_size=None):
        first, last = min(first, float(b["started"].min())), max(last, float(b["ended"].max()))
        for s, rows, q, n in zip(b["shard"], b["rows"], b["rows_quarantined"], b["staged"], strict=True):
            if rows + q != n or n != staged[s]:
                raise CommitError(
                    f"{out}: shard {s} staged {staged[s]} rows, read {n}, wrote {rows} + {q} quarantined"
                )
            log.info("score: shard %s published (%s rows, %s quarantined)", s, rows, q)
    return max(0.0, last - first)


def throughput(rows: int, wall_s: float, backend: str, **phases: float) -> dict[str, Any]:
    """The manifest's throughput record: the input rows, the stage's wall time (from the start of
    ``run`` to the commit) and their ratio, the backend; plus the phases' seconds (``partition_s``,
    ``score_s`` with actor start-up, ``scoring_window_s`` without)."""
    return {
        "rows": rows,
        "wall_s": wall_s,
        "pairs_per_s": rows / wall_s if wall_s > 0 else 0.0,
        "backend": backend,
        **phases,
    }


def run(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    storage = Storage.from_config(cfg)
    out = output_uri(cfg, storage)
    meta = stage_meta(cfg, storage)
    if is_complete(storage, out, meta):  # before the table is read at all
        log.info("score: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/{MANIFEST}")
    schema = first_schema(cfg, storage)
    ost = _out_storage(storage, out)
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
    staged, mode = partition(cfg, storage, out, meta)
    t1 = time.perf_counter()
    pending = writer.pending_shards()
    window = score_shards(cfg, out, pending, schema, mode, staged) if pending else 0.0
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
                scoring_window_s=window,
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
