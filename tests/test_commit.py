"""The output commit protocol on a local filesystem (the S3 variant is in test_s3.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from thinkrec.io.commit import (
    MANIFEST,
    REASON,
    SUCCESS,
    CommitError,
    TableWriter,
    is_complete,
    part_name,
    publish_shard,
    read_rows,
    read_table,
    record_name,
    stable_shard,
)
from thinkrec.io.fs import Storage

SCHEMA = pa.schema([("user_id", pa.int64()), ("value", pa.float64())])


def rows(n: int, bad_every: int = 0) -> pa.Table:
    reasons = [("bad_value" if bad_every and i % bad_every == 0 else None) for i in range(n)]
    return pa.table({"user_id": np.arange(n, dtype=np.int64), "value": np.arange(n) * 0.5, REASON: reasons})


def test_stable_shard_is_fixed_and_balanced():
    keys = np.arange(10_000)
    a, b = stable_shard(keys, 8), stable_shard(keys.tolist(), 8)
    assert (a == b).all()
    # Fixed values: a change of hash function would silently reshuffle every existing output.
    assert stable_shard(np.array([1, 2, 3, 1_000_000]), 16).tolist() == [1, 14, 13, 7]
    counts = np.bincount(a, minlength=8)
    assert counts.min() > 1000, counts
    assert stable_shard(np.array(["u1", "u2"]), 4).tolist() == [1, 2]


def test_write_commit_and_read(tmp_path):
    st = Storage(str(tmp_path))
    w = TableWriter(st, st.uri("t"), num_shards=3, meta={"config_hash": "c1"}, schema=SCHEMA)
    w.write([rows(100, bad_every=10)])
    man = w.commit(rows_in=100)
    assert man["rows"] == 90 and man["rows_quarantined"] == 10
    assert man["quarantine_reasons"] == {"bad_value": 10}
    assert set(os.listdir(tmp_path / "t")) == {
        MANIFEST,
        SUCCESS,
        *[part_name(s) for s in range(3)],
        "quarantine",
    }
    t = read_table(st, st.uri("t"))
    assert sorted(t.column("user_id").to_pylist()) == [i for i in range(100) if i % 10]
    q = read_table(st, st.uri("t"), quarantine=True)
    assert json.loads(q.column("row")[0].as_py())["user_id"] % 10 == 0
    assert is_complete(st, st.uri("t"), {"config_hash": "c1"})
    assert not is_complete(st, st.uri("t"), {"config_hash": "other"})


def test_accounting_identity_is_checked(tmp_path):
    st = Storage(str(tmp_path))
    w = TableWriter(st, st.uri("t"), num_shards=2, schema=SCHEMA)
    w.write([rows(10)])
    with pytest.raises(CommitError, match="rows_in=11"):
        w.commit(rows_in=11)
    assert not (tmp_path / "t" / SUCCESS).exists()


def test_quarantine_threshold_blocks_success(tmp_path):
    st = Storage(str(tmp_path))
    w = TableWriter(st, st.uri("t"), num_shards=2, schema=SCHEMA, max_quarantine_rate=0.05)
    w.write([rows(100, bad_every=10)])
    with pytest.raises(CommitError, match="quarantined"):
        w.commit(rows_in=100)
    assert not (tmp_path / "t" / SUCCESS).exists()
    assert (tmp_path / "t" / MANIFEST).exists()  # the manifest says what happened


def test_waves_resume_without_duplicates(tmp_path):
    st = Storage(str(tmp_path))
    data = rows(200)
    shard = stable_shard(data.column("user_id"), 4)

    def wave_rows(wave):
        return [data.filter(pa.array(np.isin(shard, wave)))]

    w = TableWriter(st, st.uri("t"), num_shards=4, schema=SCHEMA)
    first = w.waves(2)[0]
    w.write(wave_rows(first), first)
    # The job dies here. A resubmitted job sees only the other shards pending.
    w2 = TableWriter(st, st.uri("t"), num_shards=4, schema=SCHEMA)
    assert w2.pending_shards() == [s for s in range(4) if s not in first]
    for wave in w2.waves(1):
        w2.write(wave_rows(wave), wave)
    w2.commit(rows_in=200)
    got = read_table(st, st.uri("t")).column("user_id").to_pylist()
    assert sorted(got) == list(range(200))


def test_rows_outside_the_wave_are_refused(tmp_path):
    st = Storage(str(tmp_path))
    w = TableWriter(st, st.uri("t"), num_shards=4, schema=SCHEMA)
    with pytest.raises(CommitError, match="outside this wave"):
        w.write([rows(50)], [0])
    assert w.pending_shards() == [0, 1, 2, 3]  # nothing half-published


def test_changed_config_rewrites_instead_of_mixing(tmp_path):
    st = Storage(str(tmp_path))
    w = TableWriter(st, st.uri("t"), num_shards=2, meta={"config_hash": "a"}, schema=SCHEMA)
    w.write([rows(10)])
    w.commit(rows_in=10)
    w2 = TableWriter(st, st.uri("t"), num_shards=2, meta={"config_hash": "b"}, schema=SCHEMA)
    assert not w2.complete and w2.pending_shards() == [0, 1]


def test_workers_publish_shards_and_the_commit_reads_their_records(tmp_path):
    """publish_shard (a worker's side): one shard's rows and quarantine published with a record; the
    commit takes rows, checksums and reasons from the records, equal to reading the files."""
    st = Storage(str(tmp_path))
    data = rows(40, bad_every=4)
    shard = stable_shard(data.column("user_id"), 2)
    w = TableWriter(st, st.uri("t"), num_shards=2, meta={"config_hash": "c"}, schema=SCHEMA)
    recs = [publish_shard(st, st.uri("t"), s, SCHEMA, [data.filter(pa.array(shard == s))]) for s in (0, 1)]
    assert all(os.path.exists(tmp_path / "t" / record_name(s)) for s in (0, 1))
    assert sum(r["rows"] for r in recs) == 30 and sum(r["rows_quarantined"] for r in recs) == 10
    man = w.commit(rows_in=40)
    assert (man["rows"], man["rows_quarantined"], man["quarantine_reasons"]) == (30, 10, {"bad_value": 10})
    assert not os.path.exists(tmp_path / "t" / "_records")  # folded into the manifest
    # The same shards written by the driver-side writer give the same manifest files.
    w2 = TableWriter(st, st.uri("u"), num_shards=2, schema=SCHEMA)
    w2.write([data])
    assert w2.commit(rows_in=40)["files"] == man["files"]
    # A published shard is idempotent: publishing it again gives the same record.
    again = publish_shard(st, st.uri("t"), 0, SCHEMA, [data.filter(pa.array(shard == 0))])
    assert again["files"] == recs[0]["files"]


def test_read_rows_holds_only_matching_rows_and_reads_only_their_shards(tmp_path):
    st = Storage(str(tmp_path))
    w = TableWriter(st, st.uri("t"), num_shards=4, key="user_id", schema=SCHEMA)
    w.write([rows(1000)])
    w.commit(rows_in=1000)
    got = read_rows(st, st.uri("t"), "user_id", pa.array([3, 500, 999, 5000, None]), ["user_id", "value"])
    assert sorted(got.column("user_id").to_pylist()) == [3, 500, 999]
    assert got.column_names == ["user_id", "value"]
    assert read_rows(st, st.uri("t"), "value", pa.array([], pa.float64())).num_rows == 0
    # Keyed by user_id: only the shards the values hash to are opened (a broken other shard is
    # never read).
    other = next(s for s in range(4) if s not in set(stable_shard(np.array([3]), 4).tolist()))
    (tmp_path / "t" / part_name(other)).write_bytes(b"not parquet")
    assert read_rows(st, st.uri("t"), "user_id", pa.array([3])).column("user_id").to_pylist() == [3]
