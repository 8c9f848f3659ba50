"""The generic reader: a team's own Parquet / CSV / JSON-lines logs through a column mapping."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import small_config
from thinkrec import config as C
from thinkrec.data import generic, prepare
from thinkrec.data import reader as R
from thinkrec.data import schema as S
from thinkrec.io.commit import REASON, read_table
from thinkrec.io.fs import Storage

MAPPING = {
    "data.dataset": "generic",
    "data.generic.user": "member",
    "data.generic.item": "sku",
    "data.generic.rating": "score",
    "data.generic.timestamp": "event_time",
    "data.generic.timestamp_unit": "ms",
    "data.generic.items": "catalog.csv",
    "data.generic.item_id": "sku",
    "data.generic.title": "name",
    "data.generic.text": ["blurb", "details"],
}


def _g(**over):
    cfg = C.load(None, {**MAPPING, **over})
    import dataclasses
    from types import SimpleNamespace

    return SimpleNamespace(**dataclasses.asdict(cfg.data.generic))


@pytest.mark.parametrize(
    "fmt,line,reason",
    [
        ("json", '{"member": "m1", "sku": "s1", "score": 4, "event_time": 1.5e12}', None),
        ("json", '{"member": "m1", "sku": "s1", "score": 4}', R.MISSING_FIELD),
        ("json", '{"member": "m1", "sku": "s1", "score": "4", "event_time": 1}', R.BAD_RATING),
        ("json", '{"member": "m1", "sku": "s1", "score": 9, "event_time": 1}', R.BAD_RATING),
        ("json", '{"member": "m1", "sku": "s1", "score": 4, "event_time": "noon"}', R.BAD_TIMESTAMP),
        ("json", '{"member": "m1", "sku": "s1", "sc', R.MALFORMED),
        ("csv", "m1,s1,4,1500000000000", None),
        ("csv", "m1,s1,four,1500000000000", R.BAD_RATING),
        ("csv", "m1,s1,4", R.MALFORMED),
        ("csv", "m1,,4,1500000000000", R.MISSING_FIELD),
    ],
)
def test_generic_records_get_their_reason(fmt, line, reason):
    header = ["member", "sku", "score", "event_time"] if fmt == "csv" else None
    df = generic.parse_interactions([line], _g(), fmt, header, (0.0, 5.0))
    got = df[REASON].iloc[0]
    assert (got if isinstance(got, str) else None) == reason
    if reason is None:
        assert (df[S.RAW_USER_ID].iloc[0], df[S.TIMESTAMP].iloc[0]) == ("m1", 1500000000)


def test_generic_label_column_and_iso_times():
    g = _g(**{"data.generic.label": "clicked", "data.generic.timestamp_unit": "iso"})
    lines = [
        json.dumps({"member": 7, "sku": 3, "clicked": True, "event_time": "2020-01-02T03:04:05"}),
        json.dumps({"member": 7, "sku": 3, "clicked": 2, "event_time": "2020-01-02T03:04:05"}),
    ]
    df = generic.parse_interactions(lines, g, "json", None, (0.0, 5.0))
    assert df[S.RATING].iloc[0] == 1.0 and df[S.RAW_USER_ID].iloc[0] == "7"
    assert df[S.TIMESTAMP].iloc[0] == 1577934245 and df[REASON].iloc[1] == R.BAD_RATING


def _write_logs(d: str, seed: int = 0) -> pd.DataFrame:
    """The same log as two Parquet files and as one gzipped CSV, plus a CSV catalog."""
    rng = np.random.default_rng(seed)
    n = 600
    log = pd.DataFrame(
        {
            "member": [f"m{x:03d}" for x in rng.integers(0, 30, n)],
            "sku": [f"s{x:02d}" for x in rng.integers(0, 20, n)],
            "score": rng.integers(1, 6, n).astype(float),
            "event_time": (1.5e12 + rng.integers(0, 10**9, n) * 1000).astype(np.int64),
            "ignored": "x",
        }
    ).drop_duplicates(["member", "sku", "event_time"])
    for sub in ("pq", "csv"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    half = len(log) // 2
    pq.write_table(
        pa.Table.from_pandas(log.iloc[:half], preserve_index=False), os.path.join(d, "pq", "log-0.parquet")
    )
    pq.write_table(
        pa.Table.from_pandas(log.iloc[half:], preserve_index=False), os.path.join(d, "pq", "log-1.parquet")
    )
    with gzip.open(os.path.join(d, "csv", "log.csv.gz"), "wt") as f:
        log.to_csv(f, index=False)
    catalog = pd.DataFrame(
        {
            "sku": [f"s{i:02d}" for i in range(20)],
            "name": [f"Thing {i}" for i in range(20)],
            "blurb": [f"A sturdy {'red' if i % 2 else 'blue'} widget" for i in range(20)],
            "details": ["made of steel" if i % 3 == 0 else "" for i in range(20)],
        }
    )
    for sub in ("pq", "csv"):
        catalog.to_csv(os.path.join(d, sub, "catalog.csv"), index=False)
    return log


def test_same_input_split_differently_gives_identical_tables(ray_local, tmp_path):
    """One log as two Parquet files, read in default blocks, and as one gzipped CSV, read in tiny
    blocks with other keyword batches, and the Parquet files again under a Ray of one CPU instead of
    two: byte-identical prepared tables, id maps and keyword tables (the same manifest checksums).
    The keywords are tfidf over the catalog's text."""
    from thinkrec.data import ids
    from thinkrec.data import items as I
    from thinkrec.keywords import stage as kw_stage

    log = _write_logs(str(tmp_path / "raw"))
    ctx = ray_local.data.DataContext.get_current()
    default_block = ctx.target_max_block_size
    files = {}
    for sub, pattern, block, batch in (("pq", "log-*.parquet", None, 64), ("csv", "log.csv.gz", 4096, 7)):
        cfg = small_config(
            str(tmp_path / f"run-{sub}"),
            **{
                **MAPPING,
                "data.source": str(tmp_path / "raw" / sub),
                "data.generic.interactions": pattern,
                "data.max_users": None,
                "keywords.batch_size": batch,
            },
        )
        ctx.target_max_block_size = block or default_block
        try:
            man = prepare.run(cfg)
            kw_stage.run(cfg)
        finally:
            ctx.target_max_block_size = default_block
        st = Storage.from_config(cfg)
        tables = (prepare.INTERACTIONS, prepare.ITEMS, prepare.USERS, ids.USER_IDS, ids.ITEM_IDS, I.KEYWORDS)
        files[sub] = {t: st.read_json(st.uri(t, "_manifest.json"))["files"] for t in tables}
        assert man["rows"] == len(log) and man["rows_quarantined"] == 0
    for t in files["pq"]:
        assert files["pq"][t] == files["csv"][t], t
    # The Parquet files again under a Ray of one CPU (its own process, as a job driver would be).
    files["1cpu"] = _tables_under_one_cpu(cfg.replace(**{"data.source": str(tmp_path / "raw" / "pq"),
        "data.generic.interactions": "log-*.parquet", "storage.output_root": str(tmp_path / "run-1cpu")}), tables)  # fmt: skip
    for t in files["pq"]:
        assert files["1cpu"][t] == files["pq"][t], t
    items = read_table(st, st.uri(prepare.ITEMS)).to_pandas().sort_values(S.ITEM_ID)
    assert items[S.TITLE].iloc[1] == "Thing 1"
    assert list(items[S.DESCRIPTION].iloc[1]) == ["A sturdy red widget"]
    assert list(items[S.DESCRIPTION].iloc[0]) == ["A sturdy blue widget", "made of steel"]
    kw = read_table(st, st.uri(I.KEYWORDS)).to_pandas().sort_values(S.ITEM_ID)
    # tfidf: "thing", "sturdy" and "widget" are in every item (over max_df), "made" is a stopword;
    # steel (7 of 20 items) outweighs blue (10 of 20); titles' numbers are dropped.
    assert list(kw[S.KEYWORDS].iloc[0]) == ["steel", "blue"] and list(kw[S.KEYWORDS].iloc[1]) == ["red"]
    assert list(kw[S.KEYWORDS].iloc[2]) == ["blue"] and set(kw[S.EXTRACTOR]) == {"tfidf"}
    inter = read_table(st, st.uri(prepare.INTERACTIONS)).to_pandas()
    assert sorted(inter[S.TIMESTAMP]) == sorted(log["event_time"] // 1000)


def _tables_under_one_cpu(cfg, tables) -> dict:
    """prepare + keywords in a child process on a local Ray of one CPU -> each table's manifest files."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    conf = os.path.join(cfg.storage.output_root + "-config.json")
    with open(conf, "w") as f:
        json.dump({**cfg.to_dict(), "ray": {**cfg.to_dict()["ray"], "num_cpus": 1}}, f)
    code = (
        "import sys; from thinkrec import config as C; from thinkrec.runtime import init_ray; "
        "from thinkrec.data import prepare; from thinkrec.keywords import stage; "
        "cfg = C.load(sys.argv[1]); init_ray(cfg); prepare.run(cfg); stage.run(cfg)"
    )
    env = dict(os.environ, PYTHONPATH=repo, THINKREC_PROGRESS="0")
    proc = subprocess.run(
        [sys.executable, "-c", code, conf], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    st = Storage.from_config(cfg)
    return {t: st.read_json(st.uri(t, "_manifest.json"))["files"] for t in tables}
