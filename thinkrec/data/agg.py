"""Aggregates computed per block and combined on the driver, for results that are small (one row per
block or per distinct value).

Ray Data's global aggregates (``Dataset.unique``, ``sum``, ``min``) start hash-shuffle aggregator
actors: about 9 s each on a 2-core machine whatever the data size, and prepare needs a dozen. A
map over the blocks with ``batch_size=None`` and a sum of the pieces gives the same numbers at the
cost of one task per block. The per-block results are combined again in batches of ``COMBINE_ROWS``
rows before they reach the driver, so it receives about one row per distinct value (not one per
distinct value per block: with many blocks that is close to one per input row).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

COMBINE_ROWS = 1 << 20


def distinct(ds: Any, col: str) -> pa.Array:
    """The sorted distinct values of ``col`` (each block's own distinct values, united here), as one
    Arrow array: a string per distinct value costs a few bytes, not a Python object each."""
    import ray

    def block(batch: pa.Table) -> pa.Table:
        return pa.table({col: pc.unique(batch.column(col))})

    refs = (
        ds.select_columns([col])
        .map_batches(block, batch_format="pyarrow", batch_size=None)
        .map_batches(block, batch_format="pyarrow", batch_size=COMBINE_ROWS)
        .to_arrow_refs()
    )
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return pa.array([])
    values = pc.unique(pa.concat_tables(tables, promote_options="permissive").column(col))
    return values.take(pc.sort_indices(values))


def sums(ds: Any, cols: list[str]) -> dict[str, int]:
    """Row count (``rows``) and the integer sums of ``cols`` (booleans count their true rows)."""

    def block(batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"rows": [len(batch)], **{c: [int(batch[c].sum())] for c in cols}})

    parts = (ds.select_columns(cols) if cols else ds).map_batches(
        block, batch_format="pandas", batch_size=None
    )
    df = parts.to_pandas()
    return {c: int(df[c].sum()) if len(df) else 0 for c in ["rows", *cols]}


def value_counts(ds: Any, col: str) -> pd.Series:
    """Rows per distinct value of ``col`` (as strings): each block counts its own values and the small
    per-block counts are summed (one row per distinct value comes back)."""

    def block(batch: pd.DataFrame) -> pd.DataFrame:
        v = batch[col].value_counts()
        return pd.DataFrame({col: v.index.astype(str), "n": v.to_numpy(np.int64)})

    def combine(batch: pd.DataFrame) -> pd.DataFrame:
        v = batch.groupby(col, sort=False)["n"].sum()
        return pd.DataFrame({col: v.index.astype(str), "n": v.to_numpy(np.int64)})

    df = (
        ds.select_columns([col])
        .map_batches(block, batch_format="pandas", batch_size=None)
        .map_batches(combine, batch_format="pandas", batch_size=COMBINE_ROWS)
        .to_pandas()
    )
    return df.groupby(col)["n"].sum() if len(df) else pd.Series(dtype="int64")
