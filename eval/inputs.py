"""Reading the evaluate stage's inputs in chunks and aligning every model to the same test rows.

Tables are read one Parquet row group batch at a time (``pyarrow.parquet.ParquetFile.iter_batches``)
over exactly the files their manifests list, keeping only the columns evaluation needs as numpy
arrays: about 50 bytes per test row plus 4-8 per model, so 10M rows stay well under 4 GB.

Rows are identified by the key ``user_id * (max_item_id + 1) + item_id`` (int64); the universe is the
labelled test rows of prepare/interactions (or, without it, the labelled rows of score/scores), and
every model's values are placed on it by a sorted-key lookup (``numpy.searchsorted``). A row a model
did not score stays NaN and is counted as missing for that model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from thinkrec.data import schema as S
from thinkrec.io.commit import SUCCESS, manifest_files
from thinkrec.io.fs import Storage

SCORES = "score/scores"
CF_SCORES = "cf/scores"
INTERACTIONS = "prepare/interactions"
CHUNK_ROWS = 1 << 18


def scores_table(cfg: Any) -> str:
    """Where the score stage's table lives, relative to the output root: the one place evaluate asks,
    answered by the score stage's own rule (``score.output``, else its default for the candidates)."""
    from thinkrec.scoring.stage import output_uri

    storage = Storage.from_config(cfg)
    return storage.relative(output_uri(cfg, storage))


def committed(storage: Storage, rel: str) -> bool:
    return storage.exists(f"{storage.uri(rel)}/{SUCCESS}")


def iter_batches(storage: Storage, rel: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The committed table's rows in batches of at most CHUNK_ROWS, only ``columns``; a column the
    table lacks is an error naming the table and the column."""
    uri = storage.uri(rel)
    fs, _ = storage.fs(uri)
    for path in manifest_files(storage, uri):
        f = pq.ParquetFile(path, filesystem=fs)
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise KeyError(f"{uri}: file {path} has no column(s) {missing}")
        yield from f.iter_batches(batch_size=CHUNK_ROWS, columns=columns)


def schema_names(storage: Storage, rel: str) -> list[str]:
    uri = storage.uri(rel)
    fs, _ = storage.fs(uri)
    paths = manifest_files(storage, uri)
    return pq.ParquetFile(paths[0], filesystem=fs).schema_arrow.names if paths else []


def _np(col: pa.Array | pa.ChunkedArray, dtype: Any, fill: float | None = None) -> np.ndarray:
    if fill is not None:
        col = pc.fill_null(col, fill)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype)


def read_interactions(storage: Storage) -> dict[str, Any]:
    """Test rows (key parts, label, not_cold, history length and like-rate), valid rows (for the
    logistic baseline) and per-item train counts and positives."""
    cols = [S.USER_ID, S.ITEM_ID, S.LABEL, S.SPLIT, S.NOT_COLD, S.HISTORY_LABELS]
    parts: dict[str, dict[str, list[np.ndarray]]] = {
        sp: {k: [] for k in ("user", "item", "label", "not_cold", "hist_len", "hist_rate")}
        for sp in ("test", "valid")
    }
    train_items: list[np.ndarray] = []
    train_labels: list[np.ndarray] = []
    for b in iter_batches(storage, INTERACTIONS, cols):
        split = b.column(S.SPLIT)
        for sp in ("train", "test", "valid"):
            sel = pc.equal(split, sp)
            if not pc.any(sel).as_py():
                continue
            t = b.filter(sel)
            if sp == "train":
                train_items.append(_np(t.column(S.ITEM_ID), np.int64))
                train_labels.append(_np(t.column(S.LABEL), np.float64, 0))
                continue
            h = t.column(S.HISTORY_LABELS)
            hl = _np(pc.list_value_length(h), np.int64, 0)
            flat = _np(pc.list_flatten(h), np.float64)
            parent = _np(pc.list_parent_indices(h), np.int64)
            hsum = np.bincount(parent, weights=flat, minlength=len(t))
            with np.errstate(invalid="ignore", divide="ignore"):
                rate = np.where(hl > 0, hsum / np.maximum(hl, 1), np.nan)
            d = parts[sp]
            d["user"].append(_np(t.column(S.USER_ID), np.int64))
            d["item"].append(_np(t.column(S.ITEM_ID), np.int64))
            d["label"].append(_np(t.column(S.LABEL), np.int8, -1))
            d["not_cold"].append(_np(t.column(S.NOT_COLD), bool, False))
            d["hist_len"].append(hl.astype(np.int32))
            d["hist_rate"].append(rate.astype(np.float32))
    out: dict[str, Any] = {}
    for sp, d in parts.items():
        # Concatenated one column at a time, each column's chunks dropped right after (no second
        # copy of every column at once).
        out[sp] = {}
        for k in list(d):
            chunks = d.pop(k)
            out[sp][k] = np.concatenate(chunks) if chunks else np.zeros(0)
            del chunks
    ti = np.concatenate(train_items) if train_items else np.zeros(0, np.int64)
    tl = np.concatenate(train_labels) if train_labels else np.zeros(0)
    n_items = int(max([ti.max(initial=0)] + [out[s]["item"].max(initial=0) for s in out])) + 1
    out["train_count"] = np.bincount(ti, minlength=n_items).astype(np.float64)
    out["train_pos"] = np.bincount(ti, weights=tl, minlength=n_items)
    out["train_rate"] = float(tl.mean()) if len(tl) else 0.5
    return out


def make_keys(users: np.ndarray, items: np.ndarray, stride: int) -> np.ndarray:
    """Row keys; an item id outside [0, stride) gets key -1, which no universe row has (its key would
    collide with another user's row otherwise)."""
    it = items.astype(np.int64)
    keys = users.astype(np.int64) * stride + it
    keys[(it < 0) | (it >= stride)] = -1
    return keys


class Universe:
    """The sorted, de-duplicated row keys every model is placed on."""

    def __init__(self, keys: np.ndarray):
        uniq, first = np.unique(keys, return_index=True)
        self.keys, self.first, self.duplicates = uniq, first, len(keys) - len(uniq)

    def place_into(self, out: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Write ``values`` into ``out`` (the universe's rows, NaN where not yet placed) at their keys'
        rows, one batch of a streamed table at a time; a row already placed (by this or an earlier
        batch) keeps its first value. Returns the mask of ``keys`` inside the universe."""
        if not len(self.keys):
            return np.zeros(len(keys), bool)
        idx = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = self.keys[idx] == keys
        hi, vals = idx[hit], np.asarray(values)[hit]
        fresh = np.isnan(out[hi])
        # Reversed, so within the batch the first occurrence is written last and wins.
        out[hi[fresh][::-1]] = vals[fresh][::-1]
        return hit

    def place(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, int]:
        """``values`` at the universe's rows (NaN where absent) and how many of ``keys`` fall outside
        it. A key given twice keeps its first value."""
        out = np.full(len(self.keys), np.nan)
        idx = np.searchsorted(self.keys, keys)
        idx_c = np.minimum(idx, len(self.keys) - 1)
        hit = (
            (len(self.keys) > 0) & (self.keys[idx_c] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        )
        hi, vals = idx_c[hit][::-1], np.asarray(values, dtype=np.float64)[hit][::-1]
        out[hi] = vals  # reversed, so the first occurrence is written last and wins
        return out, int((~hit).sum())


LOOKUP_STRIDE = 2**31
"""Key stride of ``lookup``: item ids below 2**31 (the schema's int64 ids, in practice far smaller)."""


def lookup(
    storage: Storage,
    rel: str,
    users: np.ndarray,
    items: np.ndarray,
    columns: list[str],
    split: str | None = None,
) -> list[dict[str, Any] | None]:
    """The ``columns`` of the table's first row for each (user, item) (None where it has none), the
    table streamed batch by batch and only the wanted rows kept: for the few rows a report shows
    (the explanations), not for whole tables. ``split``: only rows of that split."""
    keys = make_keys(np.asarray(users), np.asarray(items), LOOKUP_STRIDE)
    want = np.unique(keys)
    found: dict[int, dict[str, Any]] = {}
    cols = [S.USER_ID, S.ITEM_ID] + ([S.SPLIT] if split else []) + columns
    for b in iter_batches(storage, rel, list(dict.fromkeys(cols))):
        if split:
            b = b.filter(pc.equal(b.column(S.SPLIT), split))
        k = make_keys(_np(b.column(S.USER_ID), np.int64), _np(b.column(S.ITEM_ID), np.int64), LOOKUP_STRIDE)
        sel = np.isin(k, want)
        if not sel.any():
            continue
        sub = b.filter(pa.array(sel)).select(columns)
        for key, row in zip(k[sel].tolist(), sub.to_pylist(), strict=True):
            found.setdefault(key, row)
    return [found.get(k) for k in keys.tolist()]
