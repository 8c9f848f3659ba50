"""The train / valid / test split rules, and the distributed rank statistics their cut points need.

Every rule reduces to two cut timestamps and an optional window (REFERENCE.md, "Datasets and
splits"); a row at or after the test cut is test, at or after the valid cut valid, else train, and
rows outside the window are filtered (counted in the manifest's ``rows_filtered``):

- ``time_window``: one timeline; the latest ``test_frac`` of the interactions (by count) form the
  test window and the ``valid_frac`` before it the validation window.
- ``dates``: consecutive calendar slots (the reference's ML-1M month slots): ``split_dates`` =
  [valid start, test start].
- ``cut_halve``: train before ``split_dates[0]``; the later window sorted by time and halved by count
  into valid / test (the reference's Yelp rule, and its Books rule with the window 2017).

A count-based cut is the timestamp of the row at that rank in time order, so a window never splits one
second. It comes from a distributed computation, never from the rows on the driver: per-block counts
into a fixed number of equal-width bins, summed on the driver, locate the bin holding the rank; the
distinct timestamps of that bin only, counted per block, give the exact value. The driver holds
O(bins + blocks) numbers whatever the size of the log, and the result equals indexing the sorted
column (tested).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

BINS = 1 << 12
"""Equal-width bins of the first pass (one count vector per block); the second pass reads the
distinct values of the bins holding the ranks only."""
OUTSIDE_WINDOW = "outside_split_window"
"""rows_filtered rule: rows before data.split_start or at/after data.split_end."""
NO_BOUND = (-(2**63), 2**63 - 1)


def epoch_seconds(date: str, key: str) -> int:
    """An ISO date or date-time (UTC unless it names a zone) -> Unix seconds; ``key`` names the
    setting in the error."""
    try:
        t = dt.datetime.fromisoformat(date)
    except ValueError as err:
        raise ValueError(f"{key}={date!r}: expected an ISO date such as 2017-11-01 ({err})") from err
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp())


def window(data: Any) -> tuple[int, int]:
    """[lo, hi) of the timestamps the split keeps (data.split_start, data.split_end; empty: open)."""
    lo = epoch_seconds(data.split_start, "data.split_start") if data.split_start else NO_BOUND[0]
    hi = epoch_seconds(data.split_end, "data.split_end") if data.split_end else NO_BOUND[1]
    return lo, hi


def _in(ts: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return ts[(ts >= lo) & (ts < hi)]


def count_in(ds: Any, col: str, lo: int, hi: int) -> tuple[int, int, int]:
    """(rows, min, max) of ``col`` over rows with lo <= value < hi: one small row per block."""

    def block(batch: pd.DataFrame) -> pd.DataFrame:
        v = _in(batch[col].to_numpy(np.int64), lo, hi)
        return pd.DataFrame(
            {"n": [len(v)], "min": [v.min() if len(v) else hi], "max": [v.max() if len(v) else lo]}
        )

    parts = ds.select_columns([col]).map_batches(block, batch_format="pandas", batch_size=None).to_pandas()
    n = int(parts["n"].sum()) if len(parts) else 0
    if not n:
        return 0, 0, 0
    return n, int(parts["min"].min()), int(parts["max"].max())


def values_at_ranks(
    ds: Any,
    col: str,
    ranks: list[int],
    lo: int = NO_BOUND[0],
    hi: int = NO_BOUND[1],
    stats: tuple[int, int, int] | None = None,
) -> list[int]:
    """The values at the given 0-based ranks of ``col`` sorted ascending, over rows with
    lo <= value < hi (int64 columns), as ``np.sort(values)[ranks]`` but distributed (module doc).
    ``stats``: ``count_in(ds, col, lo, hi)`` when the caller has it already."""
    n, vmin, vmax = stats or count_in(ds, col, lo, hi)
    if not n:
        raise ValueError(f"no rows with {col} in [{lo}, {hi}) to cut")
    if any(r < 0 or r >= n for r in ranks):
        raise ValueError(f"ranks {ranks} outside 0..{n - 1}")
    width = max(1, -(-(vmax - vmin + 1) // BINS))  # ceil: every value in some bin

    def bins(batch: pd.DataFrame) -> pd.DataFrame:
        b = (_in(batch[col].to_numpy(np.int64), lo, hi) - vmin) // width
        return pd.DataFrame({"counts": [np.bincount(b, minlength=BINS)]})

    total = np.zeros(BINS, np.int64)
    per_block = ds.select_columns([col]).map_batches(bins, batch_format="pandas", batch_size=None)
    for part in per_block.iter_batches(batch_format="pandas", batch_size=16):  # summed as they come
        for c in part["counts"]:
            total += np.asarray(c, np.int64)
    nz = np.flatnonzero(total)
    counts = pd.Series(total[nz], index=nz)
    cum = counts.cumsum()
    # The bin holding each rank, and how many rows lie in the bins before it.
    where = {r: int(np.searchsorted(cum.to_numpy(), r, side="right")) for r in ranks}
    wanted = sorted({int(counts.index[i]) for i in where.values()})

    def distinct(batch: pd.DataFrame) -> pd.DataFrame:
        v = _in(batch[col].to_numpy(np.int64), lo, hi)
        v = v[np.isin((v - vmin) // width, wanted)]
        u, c = np.unique(v, return_counts=True)
        return pd.DataFrame({"value": u, "n": c})

    vals = ds.select_columns([col]).map_batches(distinct, batch_format="pandas", batch_size=None).to_pandas()
    vals = vals.groupby("value")["n"].sum().sort_index()
    out = []
    for r in ranks:
        i = where[r]
        before = int(cum.iloc[i - 1]) if i else 0
        b = int(counts.index[i])
        in_bin = vals[(vals.index.to_numpy() - vmin) // width == b]
        k = int(np.searchsorted(in_bin.cumsum().to_numpy(), r - before, side="right"))
        out.append(int(in_bin.index[k]))
    return out


def cut_points(ds: Any, data: Any, col: str) -> tuple[int, int]:
    """(valid cut, test cut) timestamps of data.split over ``ds`` (rows already inside the window)."""
    lo, hi = window(data)
    if data.split == "dates":
        valid, test = (epoch_seconds(d, "data.split_dates") for d in data.split_dates)
        return valid, test
    if data.split == "cut_halve":
        cut = epoch_seconds(data.split_dates[0], "data.split_dates")
        stats = count_in(ds, col, max(cut, lo), hi)
        if not stats[0]:
            raise ValueError(f"data.split=cut_halve: no interactions at or after {data.split_dates[0]}")
        return cut, values_at_ranks(ds, col, [stats[0] // 2], max(cut, lo), hi, stats)[0]
    stats = count_in(ds, col, lo, hi)
    n = stats[0]
    if not n:
        return 0, 0
    ranks = [int(n * (1 - data.valid_frac - data.test_frac)), int(n * (1 - data.test_frac))]
    valid, test = values_at_ranks(ds, col, ranks, lo, hi, stats)
    return valid, test
