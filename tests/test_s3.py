"""The commit protocol on a real S3-compatible server on 127.0.0.1, reached through boto3, pyarrow's
S3FileSystem and Ray Data.

Two servers: moto's server mode, and s3rver (npm), which checks request signatures (its fixed
credentials are S3RVER / S3RVER) and is the stricter of the two. s3rver is installed with
``npm install --prefix <pytest cache>/s3rver s3rver@3.7.1`` on first use and skipped with the reason
when npm or the registry is unavailable. Credentials reach the code only through the standard AWS
environment variables, set per test; nothing passes them in config.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pytest
from conftest import scoring_root
from servers import aws_env, free_port, wait_for

from thinkrec.io.commit import (
    MANIFEST,
    REASON,
    SUCCESS,
    CommitError,
    TableWriter,
    is_complete,
    manifest_files,
    part_name,
    quarantine_name,
    read_table,
    stable_shard,
)
from thinkrec.io.fs import Storage

pytestmark = pytest.mark.integration

S3RVER_VERSION = "3.7.1"
SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("score", pa.float32())])


def _s3rver_bin(cache: Path) -> Path:
    """s3rver's CLI, installed under ``cache`` by npm on first use; skips when npm cannot do it."""
    js = cache / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if js.exists():
        return js
    npm, node = shutil.which("npm"), shutil.which("node")
    if not npm or not node:
        pytest.skip("s3rver needs node and npm on PATH (not found)")
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", f"s3rver@{S3RVER_VERSION}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 or not js.exists():
        pytest.skip(
            f"npm install s3rver@{S3RVER_VERSION} failed (rc {proc.returncode}): {proc.stderr[-500:]}"
        )
    return js


@pytest.fixture(scope="module", params=["moto", "s3rver"])
def server(request, tmp_path_factory):
    """(name, endpoint, access key, secret key) of a running S3-compatible server."""
    if request.param == "moto":
        from moto.server import ThreadedMotoServer

        srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        srv.start()
        host, port = srv.get_host_and_port()
        yield "moto", f"http://{host}:{port}", "testing", "testing"
        srv.stop()
        return
    # pytest's cache (absent under -p no:cacheprovider) keeps the npm install between runs.
    pytest_cache = getattr(request.config, "cache", None)
    cache = Path(pytest_cache.mkdir("s3rver")) if pytest_cache else tmp_path_factory.mktemp("npm")
    js = _s3rver_bin(cache)
    port = free_port()
    data = tmp_path_factory.mktemp("s3rver-data")
    env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
    proc = subprocess.Popen(
        ["node", str(js), "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "--silent"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(port, proc)
        yield "s3rver", f"http://127.0.0.1:{port}", "S3RVER", "S3RVER"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3(server, monkeypatch):
    """A fresh bucket on the server, the AWS chain pointed at it through the environment only, and a
    Storage rooted in it."""
    name, endpoint, key, secret = server
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in aws_env(endpoint, key, secret).items():
        monkeypatch.setenv(var, value)
    bucket = f"thinkrec-{uuid.uuid4().hex[:10]}"
    # A fresh boto3 session: boto3's default session caches the first credentials it resolved, and
    # the two servers take different keys.
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    storage = Storage(root=f"s3://{bucket}/run", s3_endpoint=endpoint)
    return {"server": name, "endpoint": endpoint, "bucket": bucket, "client": client, "storage": storage}


def _rows(n_users: int = 30, per_user: int = 5) -> pa.Table:
    users = np.repeat(np.arange(1, n_users + 1), per_user).astype(np.int64)
    items = np.tile(np.arange(1, per_user + 1), n_users).astype(np.int64) * 10 + users
    return pa.table(
        {"user_id": users, "item_id": items, "score": (items % 7).astype(np.float32)}, schema=SCHEMA
    )


def _wave(table: pa.Table, shards: list[int], num_shards: int) -> pa.Table:
    s = stable_shard(table.column("user_id"), num_shards)
    return table.filter(pa.array(np.isin(s, shards)))


def _objects(client, bucket: str, prefix: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) :]] = obj
    return out


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job_env() -> dict[str, str]:
    """A job driver's environment: the AWS chain the fixture set, its own local Ray (no address)."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "THINKREC_PROGRESS": "0",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _sorted_rows(table: pa.Table) -> list[tuple]:
    return sorted(zip(*(table.column(c).to_pylist() for c in SCHEMA.names), strict=True))


def test_write_resume_commit_read(s3):
    storage, client, bucket = s3["storage"], s3["client"], s3["bucket"]
    uri = storage.uri("scores")
    prefix = "run/scores/"
    data, num_shards = _rows(), 4
    w = TableWriter(storage, uri, num_shards=num_shards, meta={"config_hash": "a"}, schema=SCHEMA)
    assert not w.complete
    first, second = w.waves(2)
    assert first == [0, 1] and second == [2, 3]
    w.write([_wave(data, first, num_shards)], shards=first)
    before = _objects(client, bucket, prefix)
    assert {part_name(0), part_name(1), quarantine_name(0), quarantine_name(1)} <= set(before)
    assert part_name(2) not in before

    # The job dies here; a resubmitted one skips the published shards and never rewrites them.
    w2 = TableWriter(storage, uri, num_shards=num_shards, meta={"config_hash": "a"}, schema=SCHEMA)
    assert not w2.complete and w2.pending_shards() == second
    w2.write([_wave(data, second, num_shards)], shards=second)
    listed = _objects(client, bucket, prefix)
    assert SUCCESS not in listed and MANIFEST not in listed  # nothing marks it done before commit
    assert listed[part_name(0)]["ETag"] == before[part_name(0)]["ETag"]
    manifest = w2.commit(rows_in=data.num_rows)
    assert manifest["rows"] == data.num_rows and manifest["rows_quarantined"] == 0

    after = _objects(client, bucket, prefix)
    assert SUCCESS in after and MANIFEST in after
    others = [o["LastModified"] for k, o in after.items() if k != SUCCESS]
    later = [k for k, o in after.items() if o["LastModified"] > after[SUCCESS]["LastModified"]]
    assert after[SUCCESS]["LastModified"] >= max(others), later  # _SUCCESS is the last object written
    body = json.loads(client.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read())
    assert sorted(body["files"]) == sorted(
        [part_name(s) for s in range(4)] + [quarantine_name(s) for s in range(4)]
    )

    got = read_table(storage, uri)
    assert got.num_rows == data.num_rows
    assert _sorted_rows(got) == _sorted_rows(data)  # exactly the rows, none twice

    # A finished table is skipped; other config -> the old output is removed, not mixed.
    assert TableWriter(storage, uri, num_shards=num_shards, meta={"config_hash": "a"}).complete
    assert is_complete(storage, uri, {"config_hash": "a"}) and not is_complete(
        storage, uri, {"config_hash": "b"}
    )
    w3 = TableWriter(storage, uri, num_shards=num_shards, meta={"config_hash": "b"}, schema=SCHEMA)
    assert not w3.complete
    assert not [
        k for k in _objects(client, bucket, prefix) if k.endswith(".parquet") or k in (SUCCESS, MANIFEST)
    ]


def test_readers_use_the_manifest_only(s3):
    storage, client, bucket = s3["storage"], s3["client"], s3["bucket"]
    uri = storage.uri("t")
    data = _rows(10, 3)
    w = TableWriter(storage, uri, num_shards=2, schema=SCHEMA)
    w.write([data])
    w.commit(rows_in=data.num_rows)
    # A stray file (say, from another writer) next to the committed table is never read.
    stray = pa.BufferOutputStream()
    import pyarrow.parquet as pq

    pq.write_table(data, stray)
    client.put_object(Bucket=bucket, Key="run/t/part-00099.parquet", Body=stray.getvalue().to_pybytes())
    assert read_table(storage, uri).num_rows == data.num_rows
    assert len(manifest_files(storage, uri)) == 2
    with pytest.raises(CommitError, match="not committed"):
        read_table(storage, storage.uri("nothing-here"))


@pytest.mark.parametrize(
    "bad_every, max_rate, commits",
    [
        (5, 0.25, True),  # 20% quarantined, threshold 25%: committed
        (5, 0.1, False),  # 20% > 10%: no _SUCCESS
        (0, 0.0, True),  # nothing quarantined, zero tolerance
    ],
)
def test_quarantine_and_threshold(s3, bad_every, max_rate, commits):
    storage, client, bucket = s3["storage"], s3["client"], s3["bucket"]
    uri = storage.uri("q")
    data = _rows(20, 5)
    n = data.num_rows
    reasons = [("bad_score" if bad_every and i % bad_every == 0 else None) for i in range(n)]
    n_bad = sum(r is not None for r in reasons)
    w = TableWriter(storage, uri, num_shards=3, schema=SCHEMA, max_quarantine_rate=max_rate)
    w.write([data.append_column(REASON, pa.array(reasons, pa.string()))])
    if not commits:
        with pytest.raises(CommitError, match="quarantined"):
            w.commit(rows_in=n)
        assert SUCCESS not in _objects(client, bucket, "run/q/")
        assert not is_complete(storage, uri)
        return
    manifest = w.commit(rows_in=n)
    assert manifest["rows"] + manifest["rows_quarantined"] == n  # rows_in = rows_out + rows_quarantined
    assert manifest["rows_quarantined"] == n_bad
    assert manifest["quarantine_reasons"] == ({"bad_score": n_bad} if n_bad else {})
    assert read_table(storage, uri).num_rows == n - n_bad
    q = read_table(storage, uri, quarantine=True)
    assert q.num_rows == n_bad
    if n_bad:
        assert set(q.column("reason").to_pylist()) == {"bad_score"}
        kept = {json.loads(r)["item_id"] for r in q.column("row").to_pylist()}
        assert kept == {data.column("item_id")[i].as_py() for i in range(n) if reasons[i]}


def test_identity_mismatch_is_refused(s3):
    storage, client, bucket = s3["storage"], s3["client"], s3["bucket"]
    uri = storage.uri("mismatch")
    data = _rows(5, 2)
    w = TableWriter(storage, uri, num_shards=2, schema=SCHEMA)
    w.write([data])
    with pytest.raises(CommitError, match="rows_in"):
        w.commit(rows_in=data.num_rows + 1)  # a row went missing somewhere
    assert SUCCESS not in _objects(client, bucket, "run/mismatch/")


def test_ray_data_reads_exactly_the_manifest_rows(s3, tmp_path):
    """read_dataset in a separate job driver (its own local Ray), whose workers get the AWS chain from
    the environment as cluster workers do; a stray file beside the table must not be read."""
    if s3["server"] != "moto":
        pytest.skip("Ray Data over S3 runs once, against moto (pyarrow paths are covered on both servers)")
    storage, client, bucket = s3["storage"], s3["client"], s3["bucket"]
    uri = storage.uri("ray")
    data = _rows(25, 4)
    w = TableWriter(storage, uri, num_shards=4, schema=SCHEMA)
    w.write([data])
    w.commit(rows_in=data.num_rows)
    client.put_object(Bucket=bucket, Key="run/ray/part-00042.parquet", Body=b"not parquet")
    script = textwrap.dedent(
        f"""
        import json, ray
        from thinkrec.io.commit import read_dataset
        from thinkrec.io.fs import Storage
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        ds = read_dataset(Storage(root={storage.root!r}, s3_endpoint={storage.s3_endpoint!r}), {uri!r})
        df = ds.to_pandas()
        print("ROWS=" + json.dumps(sorted(map(list, zip(df.user_id.tolist(), df.item_id.tolist())))))
        """
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS=")), None)
    assert line is not None, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    got = json.loads(line[len("ROWS=") :])
    want = sorted(
        [u, i]
        for u, i in zip(data.column("user_id").to_pylist(), data.column("item_id").to_pylist(), strict=True)
    )
    assert got == want


def test_score_job_on_s3_equals_local_and_resubmits_as_a_no_op(
    s3, prepared, tiny_qwen, artifact_dirs, scored, tmp_path
):
    """The score stage as a submitted job (its own driver and local Ray, AWS chain from the
    environment) with every input and output on S3: the prepared tables and model artifacts are read
    from the bucket (artifacts copied node-local per actor), the scores committed there equal the
    local run's, and a resubmission changes no object."""
    if s3["server"] != "moto":
        pytest.skip("the whole job runs once, against moto")
    import yaml

    storage, client, bucket = s3["storage"], s3["client"], s3["bucket"]
    local = scoring_root(prepared, tiny_qwen, artifact_dirs, str(tmp_path / "local"))
    for part in ("prepare", "cf", "train"):
        storage.copy_tree(os.path.join(local.storage.output_root, part), storage.uri(part))
    cfg = local.replace(**{"storage.output_root": storage.root, "storage.s3_endpoint": s3["endpoint"]})
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))

    def submit() -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.score", "--config", str(cfg_file)],
            cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    submit()
    assert is_complete(storage, storage.uri("score/scores"))
    got = read_table(storage, storage.uri("score/scores"))
    _, _, want = scored
    key = [("user_id", "ascending"), ("item_id", "ascending")]
    got, want = got.sort_by(key), want.sort_by(key)
    for col in ("user_id", "item_id", "label", "gate", "version"):
        assert got.column(col).to_pylist() == want.column(col).to_pylist(), col
    np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), atol=1e-5)
    before = _objects(client, bucket, "run/score/")
    submit()
    assert _objects(client, bucket, "run/score/") == before


def test_train_phases_publish_to_s3(s3, tmp_path):
    """Training phases on an S3 run root, in a job driver with its own local Ray whose workers get
    the AWS chain from the environment: the tiny base model is committed to the bucket, each phase's
    worker publishes its result and marker there, and the expert starts from the global adapter it
    read back from the bucket."""
    if s3["server"] != "moto":
        pytest.skip("the training job runs once, against moto")
    from safetensors.torch import load as load_safetensors

    from tests.test_train import expert_started_from_global

    storage, client, bucket = s3["storage"], s3["client"], s3["bucket"]
    script = textwrap.dedent(
        f"""
        import json
        from thinkrec.runtime import start_local_ray
        from tests.test_train import train_config, two_phases
        from thinkrec.train.stage import fit_phases

        start_local_ray(2)
        cfg = train_config({storage.root!r}, **{{"storage.s3_endpoint": {storage.s3_endpoint!r},
                                                 "train.expert_last_layers": 1}})
        curves = fit_phases(cfg, two_phases(cfg), "two-phases")
        print("STEPS=" + json.dumps({{k: len(v["loss"]) for k, v in curves.items()}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    steps = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("STEPS="))[len("STEPS=") :])
    assert steps == {"global": 2, "expert-0": 1}  # 16 and 8 rows over 2 workers, batch 4
    objects = _objects(client, bucket, "run/")
    assert "base_model/_SUCCESS" in objects
    for name in ("global", "expert-0"):
        assert {
            f"train/_phases/{name}.json",
            f"train/_phases/{name}/adapter/adapter_model.safetensors",
        } <= set(objects)

    def adapter(name):
        body = client.get_object(
            Bucket=bucket, Key=f"run/train/_phases/{name}/adapter/adapter_model.safetensors"
        )
        return load_safetensors(body["Body"].read())

    assert expert_started_from_global(adapter("global"), adapter("expert-0"))
