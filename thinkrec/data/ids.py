"""Raw <-> internal id maps: the one place later stages look ids up.

Internal ids are 1..N (0 is padding); raw ids are always strings (integers as ``str(raw)``), as in
the logs. prepare writes the maps as committed tables beside its others: prepare/user_ids
(S.USER_IDS) and prepare/item_ids (S.ITEM_IDS), one row per id, sorted by internal id.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from thinkrec.data import schema as S
from thinkrec.io.commit import read_dataset, read_rows, read_table
from thinkrec.io.fs import Storage

USER_IDS = "prepare/user_ids"
ITEM_IDS = "prepare/item_ids"

Kind = Literal["user", "item"]

# kind -> (committed id-map table, raw column, internal column)
_SOURCES: dict[str, tuple[str, str, str]] = {
    "user": (USER_IDS, S.RAW_USER_ID, S.USER_ID),
    "item": (ITEM_IDS, S.RAW_ITEM_ID, S.ITEM_ID),
}


def _source(kind: Kind) -> tuple[str, str, str]:
    if kind not in _SOURCES:
        raise ValueError(f"id map kind must be 'user' or 'item', got {kind!r}")
    return _SOURCES[kind]


def read_ids(storage: Storage, kind: Kind) -> Any:
    """The map as a Ray Dataset of (raw id, internal id), for distributed joins."""
    table, raw, internal = _source(kind)
    return read_dataset(storage, storage.uri(table), columns=[raw, internal])


def ids_table(storage: Storage, kind: Kind) -> pa.Table:
    """The map as one Arrow table (small maps and tests; a join should use ``read_ids``)."""
    table, raw, internal = _source(kind)
    return read_table(storage, storage.uri(table), columns=[raw, internal])


def lookup(storage: Storage, kind: Kind, raw: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """raw id -> internal id for the given raw ids only (those in the map): the map's rows are
    streamed and filtered, so a caller holds the part of the map it needs, never the whole map."""
    table, raw_col, internal = _source(kind)
    t = read_rows(storage, storage.uri(table), raw_col, pc.cast(raw, pa.string()), [raw_col, internal])
    return dict(zip(t.column(raw_col).to_pylist(), t.column(internal).to_pylist(), strict=True))
