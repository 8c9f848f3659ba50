"""Scoring a team's own candidate table: raw ids through the id maps, passthrough columns, the
output location, histories before the row's timestamp, and unknown raw ids quarantined with the raw
id and a reason (never read as another entity's number)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from conftest import scoring_root

from thinkrec.data import schema as S
from thinkrec.data.ids import ids_table
from thinkrec.io.commit import SUCCESS, read_table
from thinkrec.io.fs import Storage
from thinkrec.scoring import stage
from thinkrec.scoring.base import load_artifacts

pytestmark = pytest.mark.integration


def test_output_location_per_table(prepared):
    storage = Storage.from_config(prepared)
    uri = stage.output_uri
    assert uri(prepared, storage) == storage.uri("score/scores")
    for cands, name in (
        ("s3://b/in/slate_a.parquet", "slate_a"),
        ("/d/x/req.jsonl", "req"),
        ("s3://b/p/", "p"),
    ):
        cfg = prepared.replace(**{"score.candidates": cands})
        assert uri(cfg, storage) == storage.uri("score", name)
    cfg = prepared.replace(**{"score.candidates": "/d/a.csv.gz", "score.output": "s3://o/x"})
    assert uri(cfg, storage) == "s3://o/x"
    cfg = prepared.replace(**{"score.candidates": "/d/a.csv", "score.output": "out/a"})
    assert uri(cfg, storage) == storage.uri("out/a")
    with pytest.raises(ValueError, match="score.output"):
        uri(prepared.replace(**{"score.candidates": "/d/scores.parquet"}), storage)


def test_raw_id_table_with_passthrough_and_unknown_ids(prepared, tiny_qwen, artifact_dirs, tmp_path):
    """A JSON-lines table in raw ids, unordered, with a request id, a slate position and a timestamp:
    every known row scored exactly like the same pairs in internal ids (full prompts, history before
    the row's timestamp), passthrough columns unchanged, unknown raw ids quarantined by name."""
    from thinkrec.scoring.engine.hf import HFScorer
    from thinkrec.scoring.prompts import PromptStep, rows_from_table

    storage = Storage.from_config(prepared)
    users = ids_table(storage, "user").to_pylist()[:4]
    items = ids_table(storage, "item").to_pylist()[5:10]
    inter = read_table(storage, storage.uri("prepare/interactions"), [S.TIMESTAMP]).column(0).to_numpy()
    t_mid = int(np.median(inter))
    rng = np.random.default_rng(0)
    rows = []
    for u in users:
        for k, it in enumerate(items):
            rows.append(
                {
                    # raw ids as the logs hold them: integers where they look like integers
                    S.USER_ID: int(u[S.RAW_USER_ID]) if u[S.RAW_USER_ID].isdigit() else u[S.RAW_USER_ID],
                    S.ITEM_ID: it[S.RAW_ITEM_ID],
                    S.LABEL: k % 2,
                    S.TIMESTAMP: t_mid + k,
                    "request_id": f"req-{u[S.USER_ID]}-{k}",
                    "slate_pos": k,
                }
            )
    # An unknown user and an unknown item whose raw ids look like real internal ids: never mapped.
    known_internal = str(items[0][S.ITEM_ID])
    unknown_raw = next(str(n) for n in range(10**6, 10**7) if str(n) not in {r[S.RAW_ITEM_ID] for r in items})
    nobody = 10**6 + 7  # an integer raw id no user has
    rows.append({S.USER_ID: nobody, S.ITEM_ID: known_internal, S.LABEL: 1, S.TIMESTAMP: t_mid,
                 "request_id": "req-x", "slate_pos": 0})  # fmt: skip
    rows.append({S.USER_ID: rows[0][S.USER_ID], S.ITEM_ID: unknown_raw, S.LABEL: 0, S.TIMESTAMP: t_mid,
                 "request_id": "req-y", "slate_pos": 1})  # fmt: skip
    order = rng.permutation(len(rows))
    path = tmp_path / "tables" / "slate_a.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(rows[j]) + "\n" for j in order))

    out_dir = str(tmp_path / "elsewhere" / "slate_scores")
    cfg = scoring_root(
        prepared,
        tiny_qwen,
        artifact_dirs,
        str(tmp_path / "run"),
        **{"score.candidates": str(path), "score.output": out_dir, "data.max_quarantine_rate": 0.2},
    )
    man = stage.run(cfg)
    n_good = len(users) * len(items)
    assert (man["rows"], man["rows_quarantined"]) == (n_good, 2)
    assert man["quarantine_reasons"] == {"unknown_user": 1, "unknown_item": 1}
    assert os.path.exists(os.path.join(out_dir, SUCCESS))
    assert not os.path.exists(tmp_path / "run" / "score")  # nothing written to another table's place

    st = Storage.from_config(cfg)
    out = read_table(st, out_dir)
    assert out.schema.names == [
        S.USER_ID, S.ITEM_ID, S.RAW_USER_ID, S.RAW_ITEM_ID, S.LABEL, S.SCORE, S.P_YES, S.GATE, S.VERSION,
        S.TIMESTAMP, "request_id", "slate_pos",
    ]  # fmt: skip
    raw_u = {u[S.RAW_USER_ID]: u[S.USER_ID] for u in users}
    raw_i = {i[S.RAW_ITEM_ID]: i[S.ITEM_ID] for i in items}
    got = out.to_pylist()
    assert sorted(r["request_id"] for r in got) == sorted(r["request_id"] for r in rows[:n_good])
    want_by_req = {r["request_id"]: r for r in rows}
    for r in got:
        src = want_by_req[r["request_id"]]
        assert r[S.RAW_USER_ID] == str(src[S.USER_ID]) and r[S.RAW_ITEM_ID] == src[S.ITEM_ID]
        assert (r[S.USER_ID], r[S.ITEM_ID]) == (raw_u[r[S.RAW_USER_ID]], raw_i[r[S.RAW_ITEM_ID]])
        assert (r["slate_pos"], r[S.TIMESTAMP], r[S.LABEL]) == (
            src["slate_pos"],
            src[S.TIMESTAMP],
            src[S.LABEL],
        )
    assert {r[S.VERSION] for r in got} == {load_artifacts(cfg).version}

    q = read_table(st, out_dir, quarantine=True).to_pylist()
    qrows = {x["reason"]: json.loads(x["row"]) for x in q}
    assert qrows["unknown_user"][S.RAW_USER_ID] == str(nobody)
    assert qrows["unknown_user"]["request_id"] == "req-x"
    assert qrows["unknown_item"][S.RAW_ITEM_ID] == unknown_raw

    # The same pairs in internal ids, straight through the prompt builder and a full-prompt scorer.
    internal = pa.Table.from_pylist(
        [
            {
                S.USER_ID: raw_u[str(r[S.USER_ID])],
                S.ITEM_ID: raw_i[r[S.ITEM_ID]],
                S.LABEL: r[S.LABEL],
                S.TIMESTAMP: r[S.TIMESTAMP],
            }
            for r in rows[:n_good]
        ]  # fmt: skip
    )
    rows_p = rows_from_table(PromptStep(scoring_root_cfg(cfg))(internal))
    s, _ = HFScorer(cfg.replace(**{"score.prefix_sharing": False}), load_artifacts(cfg)).score(rows_p)
    by_pair = {(r[S.USER_ID], r[S.ITEM_ID]): r[S.SCORE] for r in got}
    diffs = [abs(by_pair[(r.user_id, r.item_id)] - v) for r, v in zip(rows_p, s, strict=True)]
    assert max(diffs) < 1e-4


def scoring_root_cfg(cfg):
    """The same run as internal-id input (no candidate table: the maps are not loaded)."""
    return cfg.replace(**{"score.candidates": "", "score.output": ""}).to_dict()


def test_raw_csv_prefix_on_s3_to_an_s3_output(s3_bucket, prepared, tiny_qwen, artifact_dirs, tmp_path):
    """A raw-id CSV table as a prefix of two objects on S3 (moto), the run root and the output on S3,
    scored by ``python -m jobs.score`` in its own process: every row once, passthrough kept, scores
    equal to the same pairs in internal ids scored in-process with full prompts."""
    import subprocess
    import sys

    import yaml

    from thinkrec.scoring.engine.hf import HFScorer
    from thinkrec.scoring.prompts import PromptStep, rows_from_table

    storage, client, bucket = s3_bucket["storage"], s3_bucket["client"], s3_bucket["bucket"]
    local = scoring_root(prepared, tiny_qwen, artifact_dirs, str(tmp_path / "local"))
    for part in ("prepare", "cf", "train"):
        storage.copy_tree(os.path.join(local.storage.output_root, part), storage.uri(part))
    lst = Storage.from_config(local)
    users = ids_table(lst, "user").to_pylist()[5:8]
    items = ids_table(lst, "item").to_pylist()[:4]
    rows = [(u, it, f"r{k}-{j}") for k, u in enumerate(users) for j, it in enumerate(items)]
    for part, chunk in enumerate((rows[::2], rows[1::2])):
        body = "user_id,item_id,request_id\n" + "".join(
            f"{u[S.RAW_USER_ID]},{it[S.RAW_ITEM_ID]},{req}\n" for u, it, req in chunk
        )
        client.put_object(Bucket=bucket, Key=f"in/slates/part-{part}.csv", Body=body.encode())
    out = f"s3://{bucket}/out/slates"
    cfg = local.replace(
        **{
            "storage.output_root": storage.root,
            "storage.s3_endpoint": s3_bucket["endpoint"],
            "score.candidates": f"s3://{bucket}/in/slates/",
            "score.output": out,
        }
    )
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, **s3_bucket["env"], "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--config", str(cfg_file)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    got = read_table(storage, out).to_pylist()
    assert sorted(r["request_id"] for r in got) == sorted(req for *_, req in rows)
    want_ids = {req: (u[S.USER_ID], it[S.ITEM_ID]) for u, it, req in rows}
    assert all((r[S.USER_ID], r[S.ITEM_ID]) == want_ids[r["request_id"]] for r in got)
    assert not client.list_objects_v2(Bucket=bucket, Prefix="run/score/").get("KeyCount")
    internal = pa.Table.from_pylist(
        [{S.USER_ID: u[S.USER_ID], S.ITEM_ID: it[S.ITEM_ID]} for u, it, _ in rows]
    )
    rows_p = rows_from_table(PromptStep(local.to_dict())(internal))
    s, _ = HFScorer(local.replace(**{"score.prefix_sharing": False}), load_artifacts(local)).score(rows_p)
    by_pair = {(r[S.USER_ID], r[S.ITEM_ID]): r[S.SCORE] for r in got}
    assert max(abs(by_pair[(r.user_id, r.item_id)] - v) for r, v in zip(rows_p, s, strict=True)) < 1e-4
