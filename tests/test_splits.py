"""The split rules (thinkrec/data/splits.py): the distributed rank statistic against sorted indexing,
and each rule through prepare with its row counts checked against an independent pandas computation."""

from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import pandas as pd
import pytest

from tests.conftest import small_config
from thinkrec import config as C
from thinkrec.data import prepare, splits
from thinkrec.data import schema as S
from thinkrec.io.commit import read_table
from thinkrec.io.fs import Storage


def _epoch(d: str) -> int:
    return int(dt.datetime.fromisoformat(d).replace(tzinfo=dt.UTC).timestamp())


@pytest.mark.parametrize("kind", ["few_distinct", "spread", "clustered"])
def test_values_at_ranks_equal_sorted_indexing(ray_local, kind):
    rng = np.random.default_rng(1)
    n = 6000
    values = {
        "few_distinct": rng.integers(0, 40, n),  # heavy ties: a bin holds one value many times
        "spread": 1_400_000_000 + rng.integers(0, 10**8, n),  # 3 years of seconds, mostly distinct
        "clustered": np.r_[rng.integers(0, 10, n - 10), rng.integers(10**12, 10**12 + 5, 10)],  # outliers
    }[kind].astype(np.int64)
    ds = ray_local.data.from_pandas(pd.DataFrame({"t": values})).repartition(13)
    ranks = [0, 1, n // 2, int(n * 0.8), int(n * 0.9), n - 1]
    assert splits.values_at_ranks(ds, "t", ranks) == np.sort(values)[ranks].tolist()
    lo, hi = np.quantile(values, [0.1, 0.7]).astype(np.int64)
    inside = np.sort(values[(values >= lo) & (values < hi)])
    if len(inside):
        r = [0, len(inside) // 3, len(inside) - 1]
        assert splits.values_at_ranks(ds, "t", r, int(lo), int(hi)) == inside[r].tolist()
    with pytest.raises(ValueError, match="ranks"):
        splits.values_at_ranks(ds, "t", [n])


def test_split_settings_are_checked():
    with pytest.raises(ValueError, match="takes 2 data.split_dates"):
        C.load(None, {"data.split": "dates", "data.split_dates": ["2017-01-01"]})
    with pytest.raises(ValueError, match="ascending"):
        C.load(None, {"data.split": "dates", "data.split_dates": ["2017-05-01", "2017-01-01"]})
    with pytest.raises(ValueError, match="inside"):
        C.load(
            None,
            {"data.split": "cut_halve", "data.split_dates": ["2016-05-01"], "data.split_start": "2017-01-01"},
        )
    with pytest.raises(ValueError, match="data.split_start='Jan 2017'"):
        C.load(None, {"data.split_start": "Jan 2017"})


START, END = _epoch("2016-07-01"), _epoch("2018-03-01")


@pytest.fixture(scope="module")
def raw_log(tmp_path_factory) -> tuple[str, pd.DataFrame]:
    """A JSON-lines log over 20 months (ties on some seconds), read by the generic reader."""
    d = tmp_path_factory.mktemp("splits-raw")
    rng = np.random.default_rng(7)
    n = 2400
    ts = START + rng.integers(0, (END - START) // 600, n) * 600  # 10-minute grid: equal timestamps
    log = pd.DataFrame(
        {"uid": rng.integers(0, 60, n), "iid": rng.integers(0, 40, n), "r": rng.integers(1, 6, n), "t": ts}
    ).drop_duplicates(["uid", "iid", "t"])
    with open(d / "log.jsonl", "w") as f:
        for row in log.itertuples(index=False):
            f.write(
                json.dumps({"uid": f"u{row.uid}", "iid": f"i{row.iid}", "r": int(row.r), "t": int(row.t)})
                + "\n"
            )
    return str(d), log


def _expected(log: pd.DataFrame, rule: str) -> tuple[dict[str, int], int]:
    """Split counts and rows outside the window, computed here from the rules' text alone."""
    t = np.sort(log["t"].to_numpy())
    if rule == "time_window":
        inside = t
        cv, ct = inside[int(len(t) * 0.8)], inside[int(len(t) * 0.9)]
    elif rule == "dates":
        inside = t
        cv, ct = _epoch("2017-06-01"), _epoch("2017-10-01")
    else:  # the Books rule: the year 2017; train Jan-Oct, Nov-Dec sorted and halved
        inside = t[(t >= _epoch("2017-01-01")) & (t < _epoch("2018-01-01"))]
        cv = _epoch("2017-11-01")
        later = inside[inside >= cv]
        ct = later[len(later) // 2]
    counts = {"train": int((inside < cv).sum()), "valid": int(((inside >= cv) & (inside < ct)).sum())}
    counts["test"] = int((inside >= ct).sum())
    return counts, len(t) - len(inside)


@pytest.mark.parametrize(
    "rule,over",
    [
        ("time_window", {}),
        ("dates", {"data.split_dates": ["2017-06-01", "2017-10-01"]}),
        (
            "cut_halve",
            {
                "data.split_dates": ["2017-11-01"],
                "data.split_start": "2017-01-01",
                "data.split_end": "2018-01-01",
            },
        ),
    ],
)
def test_each_rule_through_prepare(ray_local, raw_log, tmp_path, rule, over):
    src, log = raw_log
    cfg = small_config(
        str(tmp_path / "run"),
        **{
            "data.dataset": "generic",
            "data.source": src,
            "data.generic.interactions": "log.jsonl",
            "data.generic.format": "json",
            "data.generic.user": "uid",
            "data.generic.item": "iid",
            "data.generic.rating": "r",
            "data.generic.timestamp": "t",
            "data.max_users": None,
            "data.split": rule,
            **over,
        },
    )
    man = prepare.run(cfg)
    want, outside = _expected(log, rule)
    assert man["split_rows"] == want
    assert man["rows_filtered"].get(splits.OUTSIDE_WINDOW, 0) == outside
    assert man["rows"] + man["rows_quarantined"] + sum(man["rows_filtered"].values()) == len(log)
    assert man["split"]["rule"] == rule
    st = Storage.from_config(cfg)
    inter = read_table(st, st.uri(prepare.INTERACTIONS), [S.TIMESTAMP, S.SPLIT]).to_pandas()
    cv, ct = man["split_cut_timestamps"]
    # Each split is a time window: no second on both sides of a cut.
    assert (
        inter[S.TIMESTAMP][inter[S.SPLIT] == "train"].max()
        < cv
        <= inter[S.TIMESTAMP][inter[S.SPLIT] != "train"].min()
    )
    assert (
        inter[S.TIMESTAMP][inter[S.SPLIT] == "valid"].max()
        < ct
        <= inter[S.TIMESTAMP][inter[S.SPLIT] == "test"].min()
    )
    assert os.path.exists(st.local_path(st.uri(prepare.INTERACTIONS, "_SUCCESS")))
