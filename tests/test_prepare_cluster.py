"""prepare + keywords as submitted jobs on a real two-node Ray cluster (127.0.0.1), the raw logs read
from S3 (moto) and every table written there: ``ray job submit -- python -m jobs.prepare ...`` then
``jobs.keywords``. The tables equal a local run's, file for file (the same manifest checksums)."""

from __future__ import annotations

import os

import pytest
import yaml
from test_generic import MAPPING, _write_logs

from cluster import aws_cluster  # noqa: F401 (the fixture)
from tests.conftest import small_config
from thinkrec.data import ids, prepare
from thinkrec.data import items as I
from thinkrec.io.fs import Storage
from thinkrec.keywords import stage as kw_stage

pytestmark = pytest.mark.integration

TABLES = (prepare.INTERACTIONS, prepare.ITEMS, prepare.USERS, ids.USER_IDS, ids.ITEM_IDS, I.KEYWORDS)


def _files(st: Storage) -> dict[str, dict]:
    return {t: st.read_json(st.uri(t, "_manifest.json"))["files"] for t in TABLES}


def test_submitted_prepare_and_keywords_on_s3_equal_a_local_run(
    aws_cluster,  # noqa: F811 (the imported fixture)
    s3_bucket,
    ray_local,
    tmp_path,
):
    raw = tmp_path / "raw"
    log = _write_logs(str(raw))
    over = {**MAPPING, "data.generic.interactions": "log-*.parquet", "data.max_users": None}
    local = small_config(str(tmp_path / "local"), **{**over, "data.source": str(raw / "pq")})
    prepare.run(local)
    kw_stage.run(local)
    want = _files(Storage.from_config(local))

    client, bucket, st = s3_bucket["client"], s3_bucket["bucket"], s3_bucket["storage"]
    for name in sorted(os.listdir(raw / "pq")):
        client.upload_file(str(raw / "pq" / name), bucket, f"raw/pq/{name}")
    job = local.replace(
        **{
            "data.source": f"s3://{bucket}/raw/pq",
            "storage.output_root": st.root,
            "storage.s3_endpoint": s3_bucket["endpoint"],
            "ray.address": "auto",
        }
    )
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(job.to_dict()))
    for module in ("jobs.prepare", "jobs.keywords"):
        proc = aws_cluster.submit(["-m", module, "--config", str(cfg_file)], env=s3_bucket["env"])
        assert proc.returncode == 0, f"{module}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got = _files(st)
    for t in TABLES:
        assert got[t] == want[t], t
    man = st.read_json(st.uri(prepare.INTERACTIONS, "_manifest.json"))
    assert man["rows"] == len(log)
    assert [p.split(bucket, 1)[-1] for p in man["source"]] == [
        "/raw/pq/log-0.parquet",
        "/raw/pq/log-1.parquet",
    ]
    assert not st.exists(st.uri(prepare.INTERACTIONS, "_staging"))  # the tasks' pieces are gone
