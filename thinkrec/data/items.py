"""Item titles and keywords as every prompt-building stage reads them.

Titles come from prepare/items. Keywords come from the keywords stage's committed table
(keywords/keywords) when it exists, else from the keywords the source ships in prepare/items
(MovieLens genres, Amazon and Yelp categories), so a stage run without the keywords stage still
has something to show. This module sits below prepare, keywords and the stages that build
prompts, so none of them reaches into another's internals.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from thinkrec.data import schema as S
from thinkrec.io.commit import SUCCESS, read_rows, read_table
from thinkrec.io.fs import Storage

log = logging.getLogger(__name__)

ITEMS = "prepare/items"
KEYWORDS = "keywords/keywords"


def keywords_committed(storage: Storage) -> bool:
    return storage.exists(storage.uri(KEYWORDS, SUCCESS))


def keywords_inputs(storage: Storage) -> list[str]:
    """The keywords table's URI when it is committed (for a prompt-building stage's input
    fingerprint beside prepare/items, so new keywords invalidate its output), else nothing."""
    return [storage.uri(KEYWORDS)] if keywords_committed(storage) else []


def read_items(storage: Storage) -> pa.Table:
    """(item_id, title, keywords) for every prepared item, keywords from keywords/keywords when it is
    committed (an item it lacks gets an empty list)."""
    items = read_table(storage, storage.uri(ITEMS), [S.ITEM_ID, S.TITLE, S.KEYWORDS])
    if not keywords_committed(storage):
        log.info("items: %s not committed; prompts use the source's keywords", storage.uri(KEYWORDS))
        return items
    kw = read_table(storage, storage.uri(KEYWORDS), [S.ITEM_ID, S.KEYWORDS])
    by_id = dict(zip(kw.column(S.ITEM_ID).to_pylist(), kw.column(S.KEYWORDS).to_pylist(), strict=True))
    filled = pa.array(
        [by_id.get(i) or [] for i in items.column(S.ITEM_ID).to_pylist()], pa.list_(pa.string())
    )
    return items.set_column(items.schema.get_field_index(S.KEYWORDS), S.KEYWORDS, filled)


def lookup_items(storage: Storage, item_ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``read_items`` for the given item ids only: filtered streaming reads of both tables, so a
    caller (a prompt actor's shard) holds the items it needs, never the whole item table."""
    cols = [S.ITEM_ID, S.TITLE, S.KEYWORDS]
    items = read_rows(storage, storage.uri(ITEMS), S.ITEM_ID, item_ids, cols)
    if not keywords_committed(storage):
        return items
    kw = read_rows(storage, storage.uri(KEYWORDS), S.ITEM_ID, item_ids, [S.ITEM_ID, S.KEYWORDS])
    by_id = dict(zip(kw.column(S.ITEM_ID).to_pylist(), kw.column(S.KEYWORDS).to_pylist(), strict=True))
    filled = pa.array(
        [by_id.get(i) or [] for i in items.column(S.ITEM_ID).to_pylist()], pa.list_(pa.string())
    )
    return items.set_column(items.schema.get_field_index(S.KEYWORDS), S.KEYWORDS, filled)
