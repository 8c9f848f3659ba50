"""The output commit protocol: exactly-once tables on top of at-least-once execution.

Ray Data retries tasks and restarts actors, and its own writers append files with random names, so a
retried or resubmitted job could duplicate rows. Every table thinkrec writes therefore goes through
``TableWriter``:

- each row belongs to one shard, ``stable_shard(key) % num_shards`` (a fixed integer hash, never
  Python's ``hash``); one shard is one file with a deterministic name, ``part-00007.parquet``;
- a shard is spooled to a temporary file and published atomically (``os.replace`` locally, a single
  object upload on S3, which readers never see half-written); its quarantine rows are published first,
  so the existence of ``part-*.parquet`` means the shard is complete;
- when every shard exists, row counts are verified (rows_in = rows_out + rows_quarantined), then
  ``_manifest.json`` (files, rows, sha256, config and input hashes) and ``_SUCCESS`` last;
- a rerun skips published shards (``pending_shards``) and a finished table entirely (``is_complete``).

Readers (``read_table``, ``read_dataset``) read only the files a manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from thinkrec.io.fs import Storage

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
CONFIG = "_config.json"
REASON = "_reason"
"""Column a stage sets (non-null) on rows that must go to quarantine instead of the output."""
QUARANTINE_SCHEMA = pa.schema([("shard", pa.int32()), ("reason", pa.string()), ("row", pa.string())])


class CommitError(RuntimeError):
    """The table could not be committed; no _SUCCESS was written."""


def stable_shard(keys: np.ndarray | pa.Array | list[Any], num_shards: int) -> np.ndarray:
    """Shard of each key: splitmix64 of the integer key (or of the first 8 bytes of sha256 for
    strings), mod num_shards. The same key maps to the same shard on every machine and run."""
    arr = (
        keys.to_numpy(zero_copy_only=False)
        if isinstance(keys, pa.Array | pa.ChunkedArray)
        else np.asarray(keys)
    )
    if arr.dtype.kind in "iu":
        x = arr.astype(np.uint64)
    else:
        x = np.array(
            [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:8], "little") for k in arr],
            dtype=np.uint64,
        )
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_shards)).astype(np.int32)


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def quarantine_name(shard: int) -> str:
    return f"quarantine/part-{shard:05d}.parquet"


def fingerprint(
    config_sections: dict[str, Any], inputs: list[str] | None = None, storage: Storage | None = None
) -> dict[str, str]:
    """Hashes that identify what an output was made from: the config sections the stage reads, and
    the manifests of the tables it read (so a changed input invalidates the output)."""
    config_hash = hashlib.sha256(
        json.dumps(config_sections, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    h = hashlib.sha256()
    for uri in sorted(inputs or []):
        assert storage is not None
        man = storage.read_json(f"{uri}/{MANIFEST}")
        h.update(storage.relative(uri).encode())
        h.update(json.dumps(man.get("files", {}), sort_keys=True).encode())
    return {"config_hash": config_hash, "input_hash": h.hexdigest()[:16]}


def is_complete(storage: Storage, uri: str, meta: dict[str, str] | None = None) -> bool:
    """True if the output at ``uri`` was committed, and (when given) from the same config and inputs."""
    if not storage.exists(f"{uri}/{SUCCESS}"):
        return False
    if meta is None:
        return True
    man = storage.read_json(f"{uri}/{MANIFEST}")
    return all(man.get(k) == v for k, v in meta.items())


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mark_success(
    storage: Storage, uri: str, meta: dict[str, Any], config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Commit a directory of files that is not a sharded table (adapters, embeddings, reports):
    checksum every file under it, write the config, the manifest, then _SUCCESS."""
    fs, root = storage.fs(uri)
    if config is not None:
        storage.write_json(f"{uri}/{CONFIG}", config)
    files = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root) + 1 :]
        if info.type != pafs.FileType.File or rel in (MANIFEST, SUCCESS) or ".tmp-" in rel:
            continue
        files[rel] = {"bytes": info.size, "sha256": _sha256(fs, info.path)}
    manifest = {**meta, "files": files}
    storage.write_json(f"{uri}/{MANIFEST}", manifest)
    storage.write_bytes(f"{uri}/{SUCCESS}", b"")
    return manifest


RECORDS = "_records"
"""Per-shard records (rows, sha256, quarantine reasons) the worker that publishes a shard writes
beside it, so the commit reads a few bytes per shard instead of every file."""


def record_name(shard: int) -> str:
    return f"{RECORDS}/part-{shard:05d}.json"


def upload_file(fs: pafs.FileSystem, local: str, dest: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.tmp-{os.getpid()}"
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
    else:
        # One object upload: S3 makes the object visible only once it is whole.
        with open(local, "rb") as src, fs.open_output_stream(dest) as out:
            shutil.copyfileobj(src, out, 1 << 20)


def _local_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _publish(
    fs: pafs.FileSystem,
    root: str,
    shard: int,
    spooled: str,
    quarantined: list[dict[str, Any]],
    schema: pa.Schema,
) -> dict[str, Any]:
    """Quarantine, then the shard's record, then the part (whose existence marks the shard done).
    Returns the record: {shard, rows, rows_quarantined, quarantine_reasons, files}."""
    if not os.path.exists(spooled):
        pq.write_table(schema.empty_table(), spooled)
    qpath = spooled + ".quarantine"
    pq.write_table(pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA), qpath)
    reasons: dict[str, int] = {}
    for q in quarantined:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    rows = pq.ParquetFile(spooled).metadata.num_rows
    record = {
        "shard": shard,
        "rows": rows,
        "rows_quarantined": len(quarantined),
        "quarantine_reasons": reasons,
        "files": {
            part_name(shard): {"rows": rows, "sha256": _local_sha256(spooled)},
            quarantine_name(shard): {"rows": len(quarantined), "sha256": _local_sha256(qpath)},
        },
    }
    rpath = spooled + ".json"
    with open(rpath, "w") as f:
        json.dump(record, f)
    upload_file(fs, qpath, f"{root}/{quarantine_name(shard)}")
    upload_file(fs, rpath, f"{root}/{record_name(shard)}")
    upload_file(fs, spooled, f"{root}/{part_name(shard)}")
    return record


def _quarantine_rows(table: pa.Table, shard: np.ndarray) -> tuple[pa.Table, np.ndarray, list[dict[str, Any]]]:
    """(rows to keep, their shards, quarantine records) of a batch that may have a ``_reason``."""
    if REASON not in table.column_names:
        return table, shard, []
    reasons = table.column(REASON).to_pylist()
    good = np.array([r is None for r in reasons], dtype=bool)
    bad_rows = table.drop_columns([REASON]).filter(pa.array(~good)).to_pylist()
    q = [
        {"shard": int(s), "reason": r, "row": json.dumps(row, default=str)}
        for r, s, row in zip([x for x in reasons if x is not None], shard[~good], bad_rows, strict=True)
    ]
    return table.drop_columns([REASON]).filter(pa.array(good)), shard[good], q


def publish_shard(
    storage: Storage, uri: str, shard: int, schema: pa.Schema, batches: Iterable[Any]
) -> dict[str, Any]:
    """A worker's side of the protocol: stream the batches of ONE shard (all of its rows, nothing
    else) into a local spool and publish it; rows with a ``_reason`` go to quarantine. Idempotent:
    a retried shard publishes the same names again. Returns the shard's record."""
    fs, root = storage.fs(uri)
    spool = tempfile.mkdtemp(prefix="thinkrec-spool-")
    path = os.path.join(spool, part_name(shard))
    qrows: list[dict[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    try:
        for batch in batches:
            table = _to_table(batch)
            if table.num_rows == 0:
                continue
            table, _, q = _quarantine_rows(table, np.full(table.num_rows, shard, np.int32))
            qrows += q
            if table.num_rows == 0:
                continue
            table = table.select(schema.names)
            table = table.cast(schema) if table.schema != schema else table
            if writer is None:
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
            writer = None
        return _publish(fs, root, shard, path, qrows, schema)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(spool, ignore_errors=True)


class TableWriter:
    """Writes one sharded Parquet table under ``uri`` with the commit protocol.

    Typical use::

        w = TableWriter(storage, uri, num_shards=16, key="user_id", meta=fp)
        if not w.complete:
            for wave in w.waves(4):          # resume granularity: a wave of shards
                w.write(stream_for(wave))    # only rows whose shard is in `wave`
            w.commit(rows_in={...})
    """

    def __init__(
        self,
        storage: Storage,
        uri: str,
        *,
        num_shards: int,
        key: str = "user_id",
        meta: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
        max_quarantine_rate: float = 1.0,
        schema: pa.Schema | None = None,
    ) -> None:
        self.storage, self.uri, self.num_shards, self.key = storage, uri, num_shards, key
        self.meta = dict(meta or {})
        self.config = config
        self.max_quarantine_rate = max_quarantine_rate
        self.schema = schema
        self.fs, self.root = storage.fs(uri)
        self.complete = is_complete(storage, uri, self.meta)
        if storage.exists(f"{uri}/{SUCCESS}") and not self.complete:
            # Made from another config or other inputs: start over rather than mix rows.
            storage.delete(uri)
        if not self.complete and storage.exists(f"{uri}/{MANIFEST}"):
            storage.delete(f"{uri}/{MANIFEST}")

    @classmethod
    def for_stage(
        cls, cfg: Any, storage: Storage, uri: str, meta: dict[str, str], schema: pa.Schema
    ) -> TableWriter:
        """The writer every stage table uses: the run's shard count, sharded by user, the resolved
        config kept beside the data, the run's quarantine threshold."""
        return cls(
            storage,
            uri,
            num_shards=cfg.storage.num_shards,
            key="user_id",
            meta=meta,
            config=cfg.to_dict(),
            max_quarantine_rate=cfg.data.max_quarantine_rate,
            schema=schema,
        )

    # -- resume ---------------------------------------------------------------------------------
    def published(self) -> set[int]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        names = {os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File}
        return {s for s in range(self.num_shards) if part_name(s) in names}

    def pending_shards(self) -> list[int]:
        done = self.published()
        return [s for s in range(self.num_shards) if s not in done]

    def waves(self, shards_per_wave: int) -> list[list[int]]:
        pending = self.pending_shards()
        return [pending[i : i + shards_per_wave] for i in range(0, len(pending), shards_per_wave)]

    # -- write ----------------------------------------------------------------------------------
    def write(
        self, batches: Iterable[pa.Table | pa.RecordBatch | Any], shards: list[int] | None = None
    ) -> dict[int, int]:
        """Stream batches (pyarrow tables or pandas frames) into the given shards and publish them.

        Rows with a non-null ``_reason`` go to quarantine. Rows whose shard is not in ``shards`` are
        an error (the caller filters its input to the wave). Every shard in ``shards`` is published,
        empty ones included, so its existence marks it done. Returns rows written per shard."""
        shards = self.pending_shards() if shards is None else list(shards)
        wanted = set(shards)
        spool = tempfile.mkdtemp(prefix="thinkrec-spool-")
        writers: dict[int, pq.ParquetWriter] = {}
        qrows: dict[int, list[dict[str, Any]]] = {s: [] for s in shards}
        counts = dict.fromkeys(shards, 0)
        try:
            for batch in batches:
                table = _to_table(batch)
                if table.num_rows == 0:
                    continue
                shard = stable_shard(table.column(self.key), self.num_shards)
                stray = set(np.unique(shard).tolist()) - wanted
                if stray:
                    raise CommitError(f"{self.uri}: rows for shards {sorted(stray)} outside this wave")
                table, shard, q = _quarantine_rows(table, shard)
                for row in q:
                    qrows[row["shard"]].append(row)
                if table.num_rows == 0:
                    continue
                if self.schema is None:
                    self.schema = table.schema
                # Quarantined rows keep every input column (in their JSON); output rows keep the schema's.
                table = table.select(self.schema.names)
                table = table.cast(self.schema) if table.schema != self.schema else table
                for s in np.unique(shard).tolist():
                    part = table.filter(pa.array(shard == s))
                    if s not in writers:
                        writers[s] = pq.ParquetWriter(os.path.join(spool, part_name(s)), self.schema)
                    writers[s].write_table(part)
                    counts[s] += part.num_rows
            for w in writers.values():
                w.close()
            writers.clear()
            if self.schema is None:
                raise CommitError(f"{self.uri}: no rows and no schema; cannot write empty shards")
            for s in shards:
                self._publish(s, os.path.join(spool, part_name(s)), qrows[s])
        finally:
            for w in writers.values():
                w.close()
            shutil.rmtree(spool, ignore_errors=True)
        return counts

    def _publish(self, shard: int, spooled: str, quarantined: list[dict[str, Any]]) -> None:
        assert self.schema is not None
        _publish(self.fs, self.root, shard, spooled, quarantined, self.schema)

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, rows_in: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Verify every shard is published and the accounting identity holds; write the manifest and
        then _SUCCESS. ``rows_in`` is the number of input rows (None skips the identity check)."""
        missing = self.pending_shards()
        if missing:
            raise CommitError(f"{self.uri}: shards {missing} were never published")
        files: dict[str, Any] = {}
        rows_out = rows_q = 0
        reasons: dict[str, int] = {}
        examples: dict[str, str] = {}
        for s in range(self.num_shards):
            rec_uri = f"{self.uri}/{record_name(s)}"
            if self.storage.exists(rec_uri):
                # Published by a worker with its record: a few bytes instead of the shard's files.
                rec = self.storage.read_json(rec_uri)
                files.update(rec["files"])
                rows_out += rec["rows"]
                rows_q += rec["rows_quarantined"]
                for r, k in rec["quarantine_reasons"].items():
                    reasons[r] = reasons.get(r, 0) + k
                continue
            for name, is_q in ((part_name(s), False), (quarantine_name(s), True)):
                path = f"{self.root}/{name}"
                n = pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows
                files[name] = {"rows": n, "sha256": _sha256(self.fs, path)}
                if is_q:
                    rows_q += n
                    if n:
                        q = pq.read_table(path, filesystem=self.fs, columns=["reason", "row"])
                        for r, row in zip(q.column(0).to_pylist(), q.column(1).to_pylist(), strict=True):
                            reasons[r] = reasons.get(r, 0) + 1
                            examples.setdefault(r, row)
                else:
                    rows_out += n
        if rows_in is not None and rows_in != rows_out + rows_q:
            raise CommitError(
                f"{self.uri}: rows_in={rows_in} != rows_out={rows_out} + rows_quarantined={rows_q}"
            )
        total = rows_out + rows_q
        rate = rows_q / total if total else 0.0
        manifest = {
            **self.meta,
            **(extra or {}),
            "num_shards": self.num_shards,
            "key": self.key,
            "rows": rows_out,
            "rows_quarantined": rows_q,
            "quarantine_reasons": reasons,
            "files": files,
        }
        if self.config is not None:
            self.storage.write_json(f"{self.uri}/{CONFIG}", self.config)
        self.storage.write_json(f"{self.uri}/{MANIFEST}", manifest)
        if rate > self.max_quarantine_rate:
            top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            for s in range(self.num_shards):  # shards published with a record: examples from their files
                if all(r in examples for r, _ in top):
                    break
                path = f"{self.root}/{quarantine_name(s)}"
                if pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows:
                    q = pq.read_table(path, filesystem=self.fs, columns=["reason", "row"])
                    for r, row in zip(q.column(0).to_pylist(), q.column(1).to_pylist(), strict=True):
                        examples.setdefault(r, row)
            named = "; ".join(f"{r}: {n} rows, e.g. {str(examples.get(r, ''))[:300]}" for r, n in top)
            raise CommitError(
                f"{self.uri}: {rows_q} of {total} rows quarantined ({rate:.2%}) > max {self.max_quarantine_rate:.2%}; "
                f"top reasons: {named}; see {self.uri}/quarantine/"
            )
        # The records are in the manifest now. They go before _SUCCESS, which stays the last object
        # written (on S3, pyarrow's delete writes a directory marker for the parent); a crash in
        # between loses nothing: a recommit reads the shards' files instead.
        if self.storage.exists(f"{self.uri}/{RECORDS}"):
            self.storage.delete(f"{self.uri}/{RECORDS}")
        self.storage.write_bytes(f"{self.uri}/{SUCCESS}", b"")
        self.complete = True
        return manifest


def _to_table(batch: Any) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    if isinstance(batch, dict):
        return pa.table(batch)
    return pa.Table.from_pandas(batch, preserve_index=False)


def manifest_files(storage: Storage, uri: str, *, quarantine: bool = False) -> list[str]:
    """Paths (inside the table's filesystem) of the files a committed table's manifest lists."""
    if not storage.exists(f"{uri}/{SUCCESS}"):
        raise CommitError(f"{uri} is not committed (no _SUCCESS); run the stage that writes it")
    man = storage.read_json(f"{uri}/{MANIFEST}")
    _, root = storage.fs(uri)
    return [
        f"{root}/{name}"
        for name in sorted(man["files"])
        if name.endswith(".parquet") and name.startswith("quarantine/") == quarantine
    ]


def read_table(
    storage: Storage, uri: str, columns: list[str] | None = None, *, quarantine: bool = False
) -> pa.Table:
    fs, _ = storage.fs(uri)
    paths = manifest_files(storage, uri, quarantine=quarantine)
    tables = [pq.read_table(p, filesystem=fs, columns=columns) for p in paths]
    return pa.concat_tables(tables) if tables else pa.table({})


def read_dataset(storage: Storage, uri: str, columns: list[str] | None = None) -> Any:
    """A Ray Dataset over exactly the files a committed table's manifest lists."""
    import ray.data

    fs, _ = storage.fs(uri)
    return ray.data.read_parquet(manifest_files(storage, uri), filesystem=fs, columns=columns)


def read_rows(
    storage: Storage,
    uri: str,
    column: str,
    values: pa.Array | pa.ChunkedArray,
    columns: list[str] | None = None,
    batch_rows: int = 1 << 16,
) -> pa.Table:
    """The rows of a committed table whose ``column`` is in ``values``: the probe side of a join,
    streamed a record batch at a time so only matching rows are held, never the whole table. When
    the table is sharded by ``column`` (its manifest's key), only the shards the values hash to are
    read. Hand-written: Ray Data's ``Dataset.join`` needs polars, and a per-shard lookup is smaller."""
    fs, _ = storage.fs(uri)
    man = storage.read_json(f"{uri}/{MANIFEST}")
    wanted = pc.unique(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
    wanted = wanted.filter(pc.is_valid(wanted))
    paths = manifest_files(storage, uri)
    if man.get("key") == column and len(wanted) and pa.types.is_integer(wanted.type):
        shards = {part_name(int(s)) for s in np.unique(stable_shard(wanted, int(man["num_shards"])))}
        paths = [p for p in paths if os.path.basename(p) in shards]
    cols = None if columns is None else list(dict.fromkeys([*columns, column]))
    parts = []
    schema = None
    for path in paths if len(wanted) else paths[:1]:
        pf = pq.ParquetFile(path, filesystem=fs)
        schema = pf.schema_arrow if cols is None else pa.schema([pf.schema_arrow.field(c) for c in cols])
        if not len(wanted):
            break
        for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
            key = rb.column(column)
            mask = pc.is_in(key, value_set=wanted.cast(key.type))
            if pc.any(mask).as_py():
                parts.append(pa.Table.from_batches([rb]).filter(mask))
    empty = schema.empty_table() if schema is not None else pa.table({})
    out = pa.concat_tables(parts) if parts else empty
    return out.select(columns) if columns is not None and out.num_columns else out


# -- distributed writes: rows staged by shard in tasks, each shard published by one task -----------
STAGING = "_staging"


def staged_dir(root: str, stream: str, shard: int) -> str:
    return f"{root}/{STAGING}/{stream}/shard-{shard:05d}"


def read_staged(fs: pafs.FileSystem, directory: str, sort_by: list[str]) -> pa.Table:
    """Every staged piece of one shard, concatenated and sorted by ``sort_by`` (stable), so the
    shard's rows come out in the same order however the input was split into pieces."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    pieces = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not pieces:
        return pa.table({})
    t = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in pieces], promote_options="default")
    return t.take(pc.sort_indices(t, [(c, "ascending") for c in sort_by])) if sort_by else t


def _stage_batch(
    batch: pa.Table, *, storage: Storage, uri: str, stream: str, key: str, num_shards: int, pending: list[int]
) -> pa.Table:
    """Ray Data task: split a batch by shard and upload each piece (rows of pending shards only) as
    ``_staging/<stream>/shard-<s>/<content hash>.parquet``. The name is the hash of the piece's
    rows, so a retried task writes the same names again, never a second copy. Returns rows per
    shard (one small row per shard it touched)."""
    fs, root = storage.fs(uri)
    shards = stable_shard(batch.column(key), num_shards)
    wanted = np.isin(shards, pending)
    out_shards, out_rows = [], []
    with tempfile.TemporaryDirectory(prefix="thinkrec-stage-") as tmp:
        for s in np.unique(shards[wanted]).tolist():
            piece = batch.filter(pa.array(shards == s))
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, piece.schema) as w:
                w.write_table(piece)
            name = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:24]
            local = os.path.join(tmp, f"{name}.parquet")
            pq.write_table(piece, local)
            upload_file(fs, local, f"{staged_dir(root, stream, s)}/{name}.parquet")
            out_shards.append(s)
            out_rows.append(piece.num_rows)
    return pa.table({"shard": pa.array(out_shards, pa.int32()), "rows": pa.array(out_rows, pa.int64())})


def _publish_staged(
    batch: dict[str, np.ndarray],
    *,
    storage: Storage,
    uri: str,
    schema: pa.Schema,
    streams: list[tuple[str, list[str]]],
) -> dict[str, np.ndarray]:
    """Ray Data task over shard ids: one shard's staged rows, stream after stream, each sorted by
    its keys, published with its quarantine and record (``publish_shard``)."""
    fs, root = storage.fs(uri)
    recs = []
    for shard in batch["shard"].tolist():
        tables = (read_staged(fs, staged_dir(root, name, shard), keys) for name, keys in streams)
        recs.append(publish_shard(storage, uri, shard, schema, (t for t in tables if t.num_rows)))
    return {
        "shard": np.array([r["shard"] for r in recs], np.int64),
        "rows": np.array([r["rows"] + r["rows_quarantined"] for r in recs], np.int64),
    }


def write_distributed(
    writer: TableWriter, datasets: list[tuple[str, Any, list[str]]], pending: list[int] | None = None
) -> dict[int, int]:
    """Write Ray Datasets into ``writer``'s table with no row passing through the driver: tasks stage
    each dataset's rows by shard (``_stage_batch``), then one task per pending shard reads its pieces
    and publishes the shard. ``datasets`` are (stream name, Dataset, sort keys), written in that order
    within each shard; each must have ``writer.key``. The driver sees one count row per piece and one
    record per shard, and checks that every staged row was published. Returns rows per shard."""
    import ray.data

    assert writer.schema is not None, "write_distributed needs the table's schema"
    pending = writer.pending_shards() if pending is None else list(pending)
    if not pending:
        return {}
    staging = f"{writer.uri}/{STAGING}"
    if writer.storage.exists(staging):
        writer.storage.delete(staging)  # a killed run's pieces: published shards are kept, the rest restaged
    staged = np.zeros(writer.num_shards, np.int64)
    kwargs = dict(storage=writer.storage, uri=writer.uri, key=writer.key, num_shards=writer.num_shards)
    for name, ds, _ in datasets:
        counts = ds.map_batches(
            _stage_batch,
            batch_format="pyarrow",
            batch_size=None,  # one piece per block and shard, not per 1,024 rows
            fn_kwargs={**kwargs, "stream": name, "pending": pending},
        )
        for b in counts.iter_batches(batch_format="numpy", batch_size=None):
            np.add.at(staged, b["shard"], b["rows"])
    shards = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
    done = shards.map_batches(
        _publish_staged,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "storage": writer.storage,
            "uri": writer.uri,
            "schema": writer.schema,
            "streams": [(name, keys) for name, _, keys in datasets],
        },
    )
    published: dict[int, int] = {}
    for b in done.iter_batches(batch_format="numpy", batch_size=None):
        published.update(zip(b["shard"].tolist(), b["rows"].tolist(), strict=True))
    for s in pending:
        if published.get(s) != staged[s]:
            raise CommitError(
                f"{writer.uri}: shard {s} staged {staged[s]} rows, published {published.get(s)}"
            )
    writer.storage.delete(staging)
    return published
