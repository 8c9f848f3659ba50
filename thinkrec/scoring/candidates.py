"""The candidate table: its files (Parquet, CSV or JSON lines, local or s3://), its output's name
and schema, and the partition by user into staged shards that the scorer actors read.

Kept apart from the scorer (no torch import): the partition tasks start in a fresh Ray worker, and
each second of import there is a second of every score job.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from thinkrec.config import Config
from thinkrec.data import schema as S
from thinkrec.data import tables as T
from thinkrec.io.commit import manifest_files, stable_shard, upload_file
from thinkrec.io.fs import Storage

SCORES = "score/scores"
CANDIDATE_COLUMNS = [S.USER_ID, S.ITEM_ID, S.LABEL, S.TIMESTAMP, S.HISTORY_ITEMS, S.HISTORY_LABELS]


def shard_key(user_ids: pa.ChunkedArray | pa.Array) -> pa.Array:
    """user_id with nulls as 0 (the padding id, never a real user), so null-id rows get a shard and
    every batch hashes integer keys the same way."""
    return pc.fill_null(pc.cast(user_ids, pa.int64()), 0)


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


def file_infos(storage: Storage, uri: str) -> list[pafs.FileInfo]:
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
        return manifest_files(storage, storage.uri(T.INTERACTIONS)), "parquet", "test"
    paths = [f.path for f in file_infos(storage_for(cfg, storage), uri)]
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


def storage_for(cfg: Config, storage: Storage) -> Storage:
    """A Storage whose root is on the candidates' filesystem (they may live outside the output root)."""
    uri = cfg.score.candidates or storage.root
    return Storage(root=uri, s3_endpoint=storage.s3_endpoint, s3_region=storage.s3_region)


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


def out_storage(storage: Storage, out: str) -> Storage:
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

    ost = out_storage(storage, out)
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
            "storage": storage_for(cfg, storage),
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


def read_staged(out: Storage, shard: int, mode: str) -> pa.Table:
    """A staged shard's pieces as one table, stably sorted by user (``out``: a Storage rooted at the
    output): a user's candidates together, whatever the input order."""
    fs, root = out.fs(out.root)
    infos = fs.get_file_info(pafs.FileSelector(_staged_dir(root, shard), allow_not_found=True))
    pieces = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not pieces:
        return pa.table({})
    t = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in pieces], promote_options="default")
    return t.take(pc.sort_indices(t, [(shard_column(mode), "ascending")]))


def first_schema(cfg: Config, storage: Storage) -> pa.Schema:
    """The output schema from the first candidate file alone (a Parquet footer or one block)."""
    paths, fmt, mode = candidate_files(cfg, storage)
    if mode == "test":
        return S.SCORES
    st = storage_for(cfg, storage)
    if fmt == "parquet":
        fs, _ = st.fs(st.root)
        with fs.open_input_file(paths[0]) as f:
            first = pq.ParquetFile(f).schema_arrow.empty_table()
    else:
        first = next(iter(_iter_file(st, paths[0], fmt, 1024, mode)), None)
    if first is not None:
        _check_columns(paths[0], first.column_names)
    return output_schema(_normalise(first, mode) if first is not None else None, mode)
