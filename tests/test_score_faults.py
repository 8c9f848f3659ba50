"""The score stage under faults from outside: a scorer actor's worker process SIGKILLed mid-job, the
job's driver SIGKILLed and the job resubmitted (at about 50% and 90% of the shards), a real second
Ray node stopped mid-job. Each run ends with every input row exactly once, checked by the row count
and by (raw user, raw item, request id) keys, and scores within 1e-5 of an uninterrupted run.

The table is shuffled raw ids with a passthrough ``request_id``; a user's candidates meet in one
shard whatever the order (the partition by user). Default run: the actor kill (one in-process stage
run). ``-m chaos``: the driver kills (two subprocess jobs each) and the node stop (a two-node
cluster); they print the rows each resubmission recomputed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from conftest import scoring_root

from cluster import REPO, _kill_group, two_node_cluster  # noqa: F401
from thinkrec.data import schema as S
from thinkrec.data.ids import ids_table
from thinkrec.io.commit import part_name, read_table
from thinkrec.io.fs import Storage
from thinkrec.scoring import stage

pytestmark = pytest.mark.integration

SHARDS = 10
N_ITEMS = 30


def candidate_rows(storage: Storage) -> list[dict]:
    """Every prepared user x N_ITEMS items, shuffled, in raw ids, with a request id."""
    users = ids_table(storage, "user").column(S.RAW_USER_ID).to_pylist()
    items = ids_table(storage, "item").column(S.RAW_ITEM_ID).to_pylist()[:N_ITEMS]
    rows = [
        {S.USER_ID: u, S.ITEM_ID: i, "request_id": f"r-{k}-{j}"}
        for k, u in enumerate(users)
        for j, i in enumerate(items)
    ]
    order = np.random.default_rng(0).permutation(len(rows))
    return [rows[j] for j in order]


def key(r: dict) -> tuple:
    return (r[S.RAW_USER_ID], r[S.RAW_ITEM_ID], r["request_id"])


@pytest.fixture(scope="module")
def table(prepared, tmp_path_factory):
    rows = candidate_rows(Storage.from_config(prepared))
    path = tmp_path_factory.mktemp("fault-tables") / "slates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


def job_config(prepared, tiny_qwen, artifact_dirs, root: str, table_path: str, **overrides):
    return scoring_root(
        prepared,
        tiny_qwen,
        artifact_dirs,
        root,
        **{"score.candidates": table_path, "score.num_shards": SHARDS, **overrides},
    )


@pytest.fixture(scope="module")
def reference(prepared, tiny_qwen, artifact_dirs, table, tmp_path_factory):
    """The uninterrupted run: {key: score}."""
    cfg = job_config(prepared, tiny_qwen, artifact_dirs, str(tmp_path_factory.mktemp("ref")), table[0])
    man = stage.run(cfg)
    assert man["rows"] == len(table[1]) and man["rows_quarantined"] == 0
    out = read_table(Storage.from_config(cfg), stage.output_uri(cfg, Storage.from_config(cfg)))
    return {key(r): r[S.SCORE] for r in out.to_pylist()}


def check_exactly_once(cfg, man, rows, reference) -> None:
    storage = Storage.from_config(cfg)
    out = read_table(storage, stage.output_uri(cfg, storage)).to_pylist()
    assert man["rows"] == len(out) == len(rows) and man["rows_quarantined"] == 0
    got = [key(r) for r in out]
    assert len(set(got)) == len(got)  # no row twice
    want = {(str(r[S.USER_ID]), str(r[S.ITEM_ID]), r["request_id"]) for r in rows}
    assert set(got) == want  # every row
    diff = max(abs(r[S.SCORE] - reference[key(r)]) for r in out)
    assert diff < 1e-5, diff


def published(out: str) -> set[int]:
    return {s for s in range(SHARDS) if os.path.exists(os.path.join(out, part_name(s)))}


def wait_published(out: str, k: int, timeout: float = 900, alive=lambda: True) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = published(out)
        if len(done) >= k:
            return done
        if not alive():
            raise RuntimeError(f"the job ended before {k} shards were published ({len(done)})")
        time.sleep(0.05)
    raise TimeoutError(f"{k} shards not published in {timeout}s")


def test_scorer_actor_killed_mid_job(prepared, tiny_qwen, artifact_dirs, table, reference, tmp_path):
    """SIGKILL of the scorer actor's worker process with shards still to score: Ray restarts the
    actor and retries its shard; the output has every row once and the same scores."""
    cfg = job_config(prepared, tiny_qwen, artifact_dirs, str(tmp_path), table[0])
    out = stage.output_uri(cfg, Storage.from_config(cfg))
    result: dict = {}

    def run() -> None:
        try:
            result["man"] = stage.run(cfg)
        except BaseException as e:  # surfaced below
            result["error"] = e

    job = threading.Thread(target=run)
    job.start()
    wait_published(out, 3, alive=job.is_alive)
    # This test's own Ray: the scorer actor is a descendant of this process.
    victims = [
        p
        for p in psutil.Process().children(recursive=True)
        if "ShardStep" in " ".join(p.cmdline() if p.is_running() else [])
    ]
    assert victims, "no scorer actor process found"
    before = published(out)
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)
    job.join(timeout=900)
    assert not job.is_alive() and "error" not in result, result.get("error")
    assert len(before) < SHARDS  # the kill came mid-job
    check_exactly_once(cfg, result["man"], table[1], reference)


def start_job(cfg_file: str, log: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.score", "--config", cfg_file],
        cwd=REPO,
        env=env,
        stdout=open(log, "ab"),  # noqa: SIM115 (kept by Popen)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.chaos
@pytest.mark.parametrize("at", [0.5, 0.9])
def test_driver_killed_and_resubmitted(prepared, tiny_qwen, artifact_dirs, table, reference, tmp_path, at):
    """``python -m jobs.score`` SIGKILLed (with its whole local Ray) once ``at`` of the shards are
    published, then resubmitted: the shards published before the kill are kept untouched, only the
    others are scored again (their rows are the rows recomputed), and the output is exact. One row
    per scorer call (a runtime setting: same scores) makes a shard take longer than the poll and the
    kill, so the job cannot finish its last shards in between (at 0.9 it once did)."""
    cfg = job_config(
        prepared, tiny_qwen, artifact_dirs, str(tmp_path / "run"), table[0], **{"score.batch_size": 1}
    )
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    out = stage.output_uri(cfg, Storage.from_config(cfg))
    log = str(tmp_path / "job.log")
    proc = start_job(str(cfg_file), log)
    try:
        wait_published(out, int(round(at * SHARDS)), alive=lambda: proc.poll() is None)
    finally:
        _kill_group(proc)
    kept = published(out)
    stamps = {s: os.stat(os.path.join(out, part_name(s))).st_mtime_ns for s in kept}
    proc = start_job(str(cfg_file), log)
    assert proc.wait(timeout=900) == 0, Path(log).read_text()[-4000:]
    man = Storage.from_config(cfg).read_json(f"{out}/_manifest.json")
    assert {s: os.stat(os.path.join(out, part_name(s))).st_mtime_ns for s in kept} == stamps
    rows_per_shard = {int(n[5:10]): f["rows"] for n, f in man["files"].items() if n.startswith("part-")}
    assert man["shards_scored"] == SHARDS - len(kept)
    assert man["rows_scored"] == sum(r for s, r in rows_per_shard.items() if s not in kept)
    print(
        f"\nkilled at {len(kept)}/{SHARDS} shards published: resubmission recomputed "
        f"{man['rows_scored']} of {man['rows']} rows ({man['rows_scored'] / man['rows']:.0%})"
    )
    check_exactly_once(cfg, man, table[1], reference)


@pytest.mark.chaos
def test_second_node_stopped_mid_job(
    two_node_cluster,  # noqa: F811 (the fixture)
    prepared,
    tiny_qwen,
    artifact_dirs,
    table,
    reference,
    tmp_path,
):
    """A job on a real two-node cluster (``ray job submit``), one scorer actor per node; the second
    node is killed outright mid-job and a fresh one joins later. The lost actor's shard is scored
    again elsewhere; every row once, same scores."""
    cfg = job_config(
        prepared,
        tiny_qwen,
        artifact_dirs,
        str(tmp_path / "run"),
        table[0],
        **{"score.concurrency": 2, "ray.address": "auto"},
    )
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    out = stage.output_uri(cfg, Storage.from_config(cfg))
    result: dict = {}
    job = threading.Thread(
        target=lambda: result.update(
            proc=two_node_cluster.submit(["-m", "jobs.score", "--config", str(cfg_file)])
        )
    )
    job.start()
    try:
        wait_published(out, 3, alive=job.is_alive)
        two_node_cluster.stop_worker()
        before = published(out)
        time.sleep(5)
        two_node_cluster.start_worker()
    except RuntimeError as e:  # the job ended early: say why
        job.join(timeout=60)
        proc = result.get("proc")
        raise AssertionError(f"{e}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}" if proc else str(e)) from e
    finally:
        job.join(timeout=1200)
    proc = result["proc"]
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert len(before) < SHARDS
    man = Storage.from_config(cfg).read_json(f"{out}/_manifest.json")
    check_exactly_once(cfg, man, table[1], reference)
