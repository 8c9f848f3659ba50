"""The score stage as a submitted job on a real two-node Ray cluster (127.0.0.1), with the model,
the tables and the output on S3 (moto): ``ray job submit -- python -m jobs.score ...``. The output
equals a local run of the same table on a local root, the model version included: every artifact
the scorer actors on both nodes load, the tiny base model too, comes from the run root on S3.

Opt-in (``-m slow``): a cluster start and a job submission take minutes on a shared 2-core machine."""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml
from conftest import scoring_root

from cluster import aws_cluster  # noqa: F401 (the fixture)
from thinkrec.data import schema as S
from thinkrec.data.ids import ids_table
from thinkrec.io.commit import mark_success, read_table
from thinkrec.io.fs import Storage
from thinkrec.scoring import stage
from thinkrec.scoring.base import BASE_MODEL_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_submitted_job_on_s3_equals_local_run(
    aws_cluster,  # noqa: F811 (the imported fixture)
    s3_bucket,
    prepared,
    tiny_qwen,
    artifact_dirs,
    tmp_path,
):
    storage, client, bucket = s3_bucket["storage"], s3_bucket["client"], s3_bucket["bucket"]
    # A local run root whose base model lives in the root (model.base empty), as the train stage
    # leaves it for the tiny model.
    local = scoring_root(prepared, tiny_qwen, artifact_dirs, str(tmp_path / "local"), **{"model.base": ""})
    lst = Storage.from_config(local)
    shutil.copytree(tiny_qwen, lst.local_path(lst.uri(BASE_MODEL_DIR)))
    mark_success(lst, lst.uri(BASE_MODEL_DIR), {"stage": "base_model"})
    users = ids_table(lst, "user").column(S.RAW_USER_ID).to_pylist()[:12]
    items = ids_table(lst, "item").column(S.RAW_ITEM_ID).to_pylist()[:6]
    rows = [(u, i, f"q{k}-{j}") for k, u in enumerate(users) for j, i in enumerate(items)]
    table = pa.table(
        {
            S.USER_ID: [u for u, _, _ in rows],
            S.ITEM_ID: [i for _, i, _ in rows],
            "request_id": [r for *_, r in rows],
        }
    ).take(pa.array(list(range(len(rows)))[::-1]))  # not in user order
    local_table = tmp_path / "slates.csv"
    pacsv.write_csv(table, local_table)
    lcfg = local.replace(**{"score.candidates": str(local_table), "score.num_shards": 4})
    lman = stage.run(lcfg)
    want = read_table(lst, stage.output_uri(lcfg, lst)).sort_by("request_id")

    for part in ("prepare", "cf", "train", BASE_MODEL_DIR):
        storage.copy_tree(os.path.join(local.storage.output_root, part), storage.uri(part))
    with open(local_table, "rb") as f:
        client.put_object(Bucket=bucket, Key="in/slates.csv", Body=f.read())
    out = f"s3://{bucket}/out/slates"
    cfg = lcfg.replace(
        **{
            "storage.output_root": storage.root,
            "storage.s3_endpoint": s3_bucket["endpoint"],
            "score.candidates": f"s3://{bucket}/in/slates.csv",
            "score.output": out,
            "score.concurrency": 2,  # one scorer actor per node
            "ray.address": "auto",
        }
    )
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = aws_cluster.submit(["-m", "jobs.score", "--config", str(cfg_file)], env=s3_bucket["env"])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    man = storage.read_json(f"{out}/_manifest.json")
    got = read_table(storage, out).sort_by("request_id")
    assert (man["rows"], man["rows_quarantined"]) == (lman["rows"], 0) == (len(rows), 0)
    assert man["version"] == lman["version"]  # the same base model files, read from the root
    assert got.schema == want.schema
    for col in got.column_names:
        if col in (S.SCORE, S.P_YES):
            diff = pa.compute.max(pa.compute.abs(pa.compute.subtract(got[col], want[col]))).as_py()
            assert diff < 1e-5, (col, diff)
        else:
            assert got[col].to_pylist() == want[col].to_pylist(), col
