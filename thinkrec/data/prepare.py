"""prepare: raw logs -> labelled, time-split samples with histories, plus item and user tables.

Rules (ThinkRec reference code, adapted to a single time line):
- label = rating >= data.label_threshold;
- split by time, by the rule data.split names (thinkrec/data/splits.py: one global time window by
  count, calendar slots, or a cut with the later window halved). The two cut points are timestamps,
  so a window never splits one second across splits;
- history = the user's last ``history_len`` interactions strictly before the sample's timestamp,
  from any split (what the user had seen at that time), oldest first, with their labels;
- ids remapped to 1..N in order of the raw ids (0 is padding);
- not_cold = both the user and the item appear in train.

Malformed lines, out-of-range ratings, unknown items and exact duplicates go to quarantine with a
reason; rows_in (lines read) = rows_out + rows_quarantined is checked when the table is committed.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from thinkrec.config import Config
from thinkrec.data import agg, amazon, generic, splits, yelp
from thinkrec.data import lines as L
from thinkrec.data import movielens as ml
from thinkrec.data import reader as R
from thinkrec.data import schema as S
from thinkrec.data.ids import ITEM_IDS, USER_IDS
from thinkrec.data.lines import read_lines
from thinkrec.data.tables import INTERACTIONS, ITEMS, USERS
from thinkrec.io.commit import REASON, TableWriter, fingerprint, is_complete, part_name, write_distributed
from thinkrec.io.fs import Storage

log = logging.getLogger(__name__)


READERS: dict[str, R.Reader] = {
    "ml-100k": ml.ML100K,
    "ml-1m": ml.ML1M,
    "amazon": amazon.READER,
    "yelp": yelp.READER,
}
"""data.dataset -> its reader (one module per source format)."""


def reader_for(dataset: str) -> R.Reader:
    if dataset not in READERS:
        raise ValueError(f"data.dataset={dataset!r} has no reader; known: {sorted(READERS)}")
    return READERS[dataset]


def source_files(cfg: Config) -> tuple[R.Reader, list[str], list[str], pafs.FileSystem]:
    """(reader, interaction paths, item paths (none: the items are those the log names),
    filesystem) in data.source (a local path, file:// or s3://, through the configured endpoint).
    Empty data.source: the dataset's embedded copy."""
    from thinkrec.io.fs import filesystem

    source = cfg.data.source or ml.embedded_dir(cfg.data.dataset)
    fs, root = filesystem(source, cfg.storage.s3_endpoint, cfg.storage.s3_region)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.File]
    if not names:
        raise FileNotFoundError(f"data.source={source!r}: no files found")
    if cfg.data.dataset == "generic":
        reader, inter, items = generic.reader(cfg, fs, root, names)
        return reader, [f"{root}/{n}" for n in inter], [f"{root}/{n}" for n in items], fs
    reader = reader_for(cfg.data.dataset)
    inter_name, items_name = reader.find(names)
    return reader, [f"{root}/{inter_name}"], [f"{root}/{items_name}"], fs


def read_items(fs: pafs.FileSystem, paths: list[str], reader: R.Reader) -> tuple[Any, dict[str, int]]:
    """The item files (decompressed by extension) through Ray Data -> a Dataset of raw_item_id,
    title, keywords, description, and the lines dropped per reason. Unusable lines are dropped and
    counted; of repeated ids the first line (by file, then line) wins, found by a group-by on the id
    across workers, so no process holds the item table."""
    if reader.items_format == "parquet":
        source = generic.read_records(paths, "parquet", list(reader.item_columns), filesystem=fs)
    else:
        source = read_lines(paths, filesystem=fs, encoding=reader.encoding)

    def parse(batch: pd.DataFrame) -> pd.DataFrame:
        text = batch[L.TEXT]
        decoded = text.notna().to_numpy()
        stripped = text.fillna("").str.rstrip("\r")
        keep = ~decoded | (stripped.str.strip() != "").to_numpy()  # blank lines are no items
        if reader.item_header:
            keep &= ~stripped.str.startswith(reader.item_header).to_numpy()
        good, bad = batch[keep & decoded], batch[keep & ~decoded]
        df = reader.parse_items(good[L.TEXT].tolist())
        if len(df) != len(good):  # a reader's contract: one row per line it is given
            raise RuntimeError(f"{reader.name} item parser returned {len(df)} rows for {len(good)} lines")
        if len(bad):
            df = pd.concat([df, R.item_frame([R.bad_item("", R.BAD_ENCODING)] * len(bad))], ignore_index=True)
        where = pd.concat([good, bad], ignore_index=True)
        df[L.SOURCE_FILE] = where[L.SOURCE_FILE].to_numpy()
        df[L.SOURCE_LINE] = where[L.SOURCE_LINE].to_numpy()
        return df

    parsed = source.map_batches(parse, batch_format="pandas").materialize()
    dropped = agg.value_counts(parsed.filter(lambda r: r[REASON] is not None), REASON)
    usable = parsed.filter(lambda r: r[REASON] is None).drop_columns([REASON]).materialize()

    def first_lines(block: pd.DataFrame) -> pd.DataFrame:
        # Whole items per block (the hash partition by id): one sort per block, not a call per item.
        block = block.sort_values([S.RAW_ITEM_ID, L.SOURCE_FILE, L.SOURCE_LINE], kind="stable")
        return block.drop_duplicates(S.RAW_ITEM_ID, keep="first")

    items = (
        usable.repartition(_partitions(), keys=[S.RAW_ITEM_ID])
        .map_batches(first_lines, batch_format="pandas", batch_size=None)
        .materialize()
    )
    counts = {str(k): int(v) for k, v in dropped.items()}
    repeated = usable.count() - items.count()
    if repeated:
        counts[R.DUPLICATE] = repeated
    return items.select_columns([S.RAW_ITEM_ID, S.TITLE, S.KEYWORDS, S.DESCRIPTION]), counts


def stage_meta(cfg: Config) -> dict[str, str]:
    return fingerprint({"data": cfg.to_dict()["data"], "stage": "prepare/v3"})


def id_order(raw: pa.Array) -> pa.Array:
    """The distinct raw ids in internal-id order (position + 1 is the id): numeric order when every
    id is a number, else lexical (UTF-8 bytes, the order of Python's str). The map stays one Arrow
    array on the driver and in the tasks, a few bytes per entity."""
    raw = pc.unique(pc.cast(raw, pa.string()))
    try:
        keys = pa.table({"n": pc.cast(raw, pa.float64()), "r": raw})
        order = pc.sort_indices(keys, sort_keys=[("n", "ascending"), ("r", "ascending")])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        order = pc.sort_indices(raw)
    return raw.take(order)


def to_ids(raw: Any, order: pa.Array) -> np.ndarray:
    """Raw ids -> internal ids 1..N by ``order`` (from ``id_order``). Every id must be in it: the
    rows were filtered against the same map."""
    idx = pc.index_in(pa.array(raw, pa.string()), value_set=order)
    if idx.null_count:
        missing = pa.array(raw, pa.string()).filter(pc.is_null(idx))[0]
        raise ValueError(f"raw id {missing.as_py()!r} is not in the id map")
    return idx.to_numpy().astype(np.int64) + 1


def in_ids(raw: Any, order: pa.Array) -> np.ndarray:
    """Whether each raw id is in the map."""
    return pc.is_in(pa.array(raw, pa.string()), value_set=order).to_numpy(zero_copy_only=False)


def build_samples(
    block: pd.DataFrame,
    *,
    user_ids: pa.Array,
    item_ids: pa.Array,
    cuts: tuple[int, int],
    threshold: float,
    history_len: int,
) -> pa.Table:
    """Rows of whole users (a block of the hash partition by user) -> samples with split and
    history, vectorised over the block: a Python call per user costs more than the user's rows (Ray
    Data's map_groups slices and converts each group, which made a 2M-row log 30x slower than one of
    200k). Duplicated (user, item, timestamp) rows are kept once (the first by source file and
    line); the copies get a ``duplicate`` reason."""
    users = to_ids(block[S.RAW_USER_ID], user_ids)
    items = to_ids(block[S.RAW_ITEM_ID], item_ids)
    ts = block[S.TIMESTAMP].to_numpy(np.int64)
    line = block[L.SOURCE_LINE].to_numpy(np.int64)
    file = block[L.SOURCE_FILE].astype(str).to_numpy()
    # Per user by time; within a second by item id, so "the last N" is well defined under ties.
    order = np.lexsort((line, file, items, ts, users))
    users, items, ts = users[order], items[order], ts[order]
    rating = block[S.RATING].to_numpy(np.float32)[order]
    labels = (rating >= threshold).astype(np.int8)
    n = len(order)
    same = np.zeros(n, bool)
    same[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1]) & (ts[1:] == ts[:-1])
    keep = ~same
    kusers, kts, kitems, klabels = users[keep], ts[keep], items[keep], labels[keep]
    # History of a row: the user's kept rows strictly before its timestamp, at most history_len.
    # Kept rows are sorted by (user, ts): the count before (user, ts) is one searchsorted over
    # a combined key, and the user's first kept row another.
    rank = np.searchsorted(np.unique(kusers), users)
    span = np.int64(max(1, int(ts.max() - ts.min()) + 2)) if n else np.int64(1)
    base = ts.min() if n else 0
    kkey = np.searchsorted(np.unique(kusers), kusers) * span + (kts - base)
    end = np.searchsorted(kkey, rank * span + (ts - base), side="left")
    first = np.searchsorted(kkey, rank * span, side="left")
    start = np.maximum(first, end - history_len)
    lengths = end - start
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - start, lengths)
    split = np.where(ts >= cuts[1], "test", np.where(ts >= cuts[0], "valid", "train"))
    return pa.table(
        {
            S.USER_ID: users,
            S.ITEM_ID: items,
            S.RATING: rating,
            S.LABEL: labels,
            S.TIMESTAMP: ts,
            S.SPLIT: split,
            S.HISTORY_ITEMS: pa.ListArray.from_arrays(pa.array(offsets), pa.array(kitems[idx])),
            S.HISTORY_LABELS: pa.ListArray.from_arrays(pa.array(offsets), pa.array(klabels[idx])),
            REASON: pa.array(np.where(same, R.DUPLICATE, None), pa.string()),
            # Where each row was read, for the quarantine rows (output rows keep only the schema).
            L.SOURCE_FILE: pa.array(file[order]),
            L.SOURCE_LINE: line[order],
        }
    )


class _Phases(dict):
    """Seconds per phase of the stage, logged as each ends and kept in the manifest (``phase_s``):
    where a long prepare spends its time."""

    def __init__(self) -> None:
        super().__init__()
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self[name] = round(now - self.t, 2)
        self.t = now
        # The driver's peak RSS so far (kB on Linux): which phase makes it grow with the input.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log.info("prepare: %s done in %.1fs (driver peak RSS %.0f MiB)", name, self[name], peak)


def run(cfg: Config) -> dict[str, Any]:
    phase = _Phases()
    storage = Storage.from_config(cfg)
    meta = stage_meta(cfg)
    out = {t: storage.uri(t) for t in (INTERACTIONS, ITEMS, USERS, USER_IDS, ITEM_IDS)}
    if all(is_complete(storage, uri, meta) for uri in out.values()):
        log.info("prepare: up to date, skipped (%s)", storage.uri("prepare"))
        return storage.read_json(f"{out[INTERACTIONS]}/_manifest.json")

    reader, inter_paths, item_paths, fs = source_files(cfg)
    items, item_lines_dropped = read_items(fs, item_paths, reader) if item_paths else (None, {})
    # One entry per item (not per row): the parse tasks check reviews against it.
    known_items = agg.distinct(items, S.RAW_ITEM_ID) if items is not None else None
    phase("items")

    def parse(batch: pd.DataFrame) -> pd.DataFrame:
        if reader.header:
            batch = batch[~batch[L.TEXT].fillna("").str.startswith(reader.header)]
        text = batch[L.TEXT]
        decoded = text.notna().to_numpy()
        df = reader.parse_interactions(text[decoded].tolist())
        full = R.Rows()
        for _ in range(int((~decoded).sum())):
            full.bad("", R.BAD_ENCODING)
        df = pd.concat([df, full.frame()], ignore_index=True) if (~decoded).any() else df
        where = pd.concat([batch[decoded], batch[~decoded]], ignore_index=True)
        df[L.SOURCE_FILE] = where[L.SOURCE_FILE].to_numpy()
        df[L.SOURCE_LINE] = where[L.SOURCE_LINE].to_numpy()
        if known_items is not None and cfg.data.unknown_items == "quarantine":
            unknown = df[REASON].isna() & ~in_ids(df[S.RAW_ITEM_ID].where(df[REASON].isna()), known_items)
            df.loc[unknown, REASON] = R.UNKNOWN_ITEM
        return df

    if reader.interactions_format == "parquet":
        source = generic.read_records(inter_paths, "parquet", list(reader.columns), filesystem=fs)
    else:
        source = read_lines(inter_paths, filesystem=fs, encoding=reader.encoding)
    parsed = source.map_batches(parse, batch_format="pandas").materialize()
    phase("parse")
    extra = pa.array([], pa.string())
    if items is None or cfg.data.unknown_items == "keep":
        # Items the log names without metadata (all of them when there is no item table; a
        # distributed distinct), titled by their raw ids.
        seen = pc.cast(agg.distinct(parsed.filter(lambda r: r[REASON] is None), S.RAW_ITEM_ID), pa.string())
        extra = seen if known_items is None else seen.filter(pc.invert(in_ids(seen, known_items)))
    known = pa.array([], pa.string()) if known_items is None else pc.cast(known_items, pa.string())
    item_ids = id_order(pa.concat_arrays([known, extra]))
    ok = parsed.filter(lambda r: r[REASON] is None)
    filtered: dict[str, int] = {}
    lo, hi = splits.window(cfg.data)
    if (lo, hi) != splits.NO_BOUND:
        inside = ok.filter(lambda r: lo <= r[S.TIMESTAMP] < hi).materialize()
        filtered[splits.OUTSIDE_WINDOW] = ok.count() - inside.count()
        ok = inside
    if cfg.data.min_interactions:
        ok, active = filter_active(ok, cfg.data.min_interactions, cfg.data.filter_mode)
        filtered.update(active)
    user_ids = id_order(agg.distinct(ok, S.RAW_USER_ID))
    if cfg.data.max_users:
        user_ids = user_ids[: cfg.data.max_users]
        ok = ok.map_batches(lambda b: b[in_ids(b[S.RAW_USER_ID], user_ids)], batch_format="pandas")
    bad = parsed.filter(lambda r: r[REASON] is not None)
    phase("filters_and_ids")

    cuts = splits.cut_points(ok, cfg.data, S.TIMESTAMP)  # distributed: no timestamps on the driver
    # A hash partition by user (each user's rows in one block), then one vectorised pass per block.
    samples = (
        ok.repartition(_partitions(), keys=[S.RAW_USER_ID])
        .map_batches(
            build_samples,
            batch_format="pandas",
            batch_size=None,
            fn_kwargs=dict(
                user_ids=user_ids,
                item_ids=item_ids,
                cuts=cuts,
                threshold=cfg.data.label_threshold,
                history_len=cfg.data.history_len,
            ),
        )
        .materialize()
    )
    phase("cuts_and_histories")
    train = samples.filter(lambda r: r[S.SPLIT] == "train" and r[REASON] is None)
    # Which ids train has, one flag per id (indexed by internal id).
    in_train = {}
    for col, n in ((S.USER_ID, len(user_ids)), (S.ITEM_ID, len(item_ids))):
        in_train[col] = np.zeros(n + 1, bool)
        in_train[col][agg.distinct(train, col).to_numpy(zero_copy_only=False).astype(np.int64)] = True

    def finish(batch: pd.DataFrame) -> pd.DataFrame:
        users, items = batch[S.USER_ID].to_numpy(np.int64), batch[S.ITEM_ID].to_numpy(np.int64)
        batch[S.NOT_COLD] = in_train[S.USER_ID][users] & in_train[S.ITEM_ID][items]
        return batch

    samples = samples.map_batches(finish, batch_format="pandas")

    def bad_rows(batch: pd.DataFrame) -> pd.DataFrame:
        # Lines that never got a user id all go to user 0's shard; their raw fields ride along
        # into the quarantine rows.
        return batch.assign(**{S.USER_ID: np.zeros(len(batch), np.int64)})

    config = cfg.to_dict()
    # Filter rules remove rows on purpose: rows_in = rows_out + rows_quarantined + rows_filtered.
    lines_read = parsed.count()
    rows_in = lines_read - sum(filtered.values()) if not cfg.data.max_users else ok.count() + bad.count()
    w = TableWriter.for_stage(cfg, storage, out[INTERACTIONS], meta, S.INTERACTIONS)
    if not w.complete:
        # Written by tasks, shard by shard (no row passes through the driver); each shard sorted, so
        # its file has the same bytes however the input was split into files, blocks or CPUs.
        write_distributed(
            w,
            [
                ("samples", samples, [S.USER_ID, S.TIMESTAMP, S.ITEM_ID, L.SOURCE_FILE, L.SOURCE_LINE]),
                ("bad", bad.map_batches(bad_rows, batch_format="pandas"), [L.SOURCE_FILE, L.SOURCE_LINE]),
            ],
        )
        phase("write")
        counts = _split_counts(storage, out[INTERACTIONS], cfg.storage.num_shards)
        w.commit(
            rows_in=rows_in,
            extra={
                "split": {
                    "rule": cfg.data.split,
                    "dates": list(cfg.data.split_dates),
                    "window": [cfg.data.split_start, cfg.data.split_end],
                },
                "split_cut_timestamps": list(cuts),
                "split_rows": counts,
                "source": inter_paths[0] if len(inter_paths) == 1 else inter_paths,
                "dataset": cfg.data.dataset,
                "item_lines_dropped": item_lines_dropped,
                "items_without_metadata": len(extra),
                "lines_read": lines_read,
                "rows_filtered": filtered,
                "filter": {"min_interactions": cfg.data.min_interactions, "mode": cfg.data.filter_mode},
                "phase_s": dict(phase),
            },
        )

    _write_items(storage, out[ITEMS], items, extra, item_ids, meta, config)
    # The id maps (raw id strings <-> 1..N) every later stage looks ids up in (thinkrec/data/ids.py).
    users = _id_table(user_ids, S.RAW_USER_ID, S.USER_ID)
    _write_small(storage, out[USERS], users, S.USERS, S.USER_ID, meta, config)
    _write_small(storage, out[USER_IDS], users, S.USER_IDS, S.USER_ID, meta, config)
    items_map = _id_table(item_ids, S.RAW_ITEM_ID, S.ITEM_ID)
    _write_small(storage, out[ITEM_IDS], items_map, S.ITEM_IDS, S.ITEM_ID, meta, config)
    man = storage.read_json(f"{out[INTERACTIONS]}/_manifest.json")
    log.info(
        "prepare: %s rows (%s quarantined), splits %s",
        man["rows"],
        man["rows_quarantined"],
        man.get("split_rows"),
    )
    return man


def _partitions() -> int:
    """Parts of a hash partition: Ray Data's setting (thinkrec.runtime sizes it for a local Ray)."""
    import ray.data

    return ray.data.DataContext.get_current().default_hash_shuffle_parallelism


FILTER_USER = "user_min_interactions"
FILTER_ITEM = "item_min_interactions"


def filter_active(ds: Any, min_interactions: int, mode: str) -> tuple[Any, dict[str, int]]:
    """Keep rows whose user and item both have more than ``min_interactions`` rows. ``single_pass``
    (the reference code) counts once on the input; ``fixed_point`` repeats until every remaining
    user and item passes. Returns the kept rows and the rows each rule removed (a row whose user
    fails counts for the user rule; one whose user passes and item fails, for the item rule)."""
    removed = {FILTER_USER: 0, FILTER_ITEM: 0}
    while True:
        users, items = agg.value_counts(ds, S.RAW_USER_ID), agg.value_counts(ds, S.RAW_ITEM_ID)
        keep_u = set(users.index[users > min_interactions])
        keep_i = set(items.index[items > min_interactions])
        if len(keep_u) == len(users) and len(keep_i) == len(items):
            break

        def rule(batch: pd.DataFrame, keep_u: set[str] = keep_u, keep_i: set[str] = keep_i) -> pd.DataFrame:
            u = batch[S.RAW_USER_ID].isin(keep_u)
            return batch.assign(_fu=~u, _fi=u & ~batch[S.RAW_ITEM_ID].isin(keep_i))

        flagged = ds.map_batches(rule, batch_format="pandas").materialize()
        got = agg.sums(flagged, ["_fu", "_fi"])
        removed[FILTER_USER] += got["_fu"]
        removed[FILTER_ITEM] += got["_fi"]
        ds = (
            flagged.filter(lambda r: not r["_fu"] and not r["_fi"]).drop_columns(["_fu", "_fi"]).materialize()
        )
        if mode == "single_pass":
            break
    return ds, removed


def _split_counts(storage: Storage, uri: str, num_shards: int) -> dict[str, int]:
    """Rows per split over the published shards (a missing or unreadable shard is an error)."""
    fs, root = storage.fs(uri)
    counts = dict.fromkeys(S.SPLITS, 0)
    for shard in range(num_shards):
        col = pq.read_table(f"{root}/{part_name(shard)}", filesystem=fs, columns=[S.SPLIT]).column(0)
        for item in pc.value_counts(col).to_pylist():
            counts[item["values"]] += item["counts"]
    return counts


def _write_items(
    storage: Storage,
    uri: str,
    items: Any,
    extra: pa.Array,
    item_ids: pa.Array,
    meta: dict[str, str],
    config: dict[str, Any],
) -> None:
    """prepare/items from the parsed item Dataset plus the items the log names without metadata,
    sorted by item id (a distributed sort) and streamed into the writer."""
    import ray.data

    w = TableWriter(storage, uri, num_shards=1, key=S.ITEM_ID, meta=meta, config=config, schema=S.ITEMS)
    if w.complete:
        return
    parts = [] if items is None else [items]
    if len(extra):
        empty = pa.ListArray.from_arrays(np.zeros(len(extra) + 1, np.int32), pa.array([], pa.string()))
        bare = {S.RAW_ITEM_ID: extra, S.TITLE: extra, S.KEYWORDS: empty, S.DESCRIPTION: empty}
        parts.append(ray.data.from_arrow(pa.table(bare)))

    def with_ids(batch: pd.DataFrame) -> pa.Table:
        batch = batch.assign(**{S.ITEM_ID: to_ids(batch[S.RAW_ITEM_ID], item_ids)})
        return pa.Table.from_pandas(batch[S.ITEMS.names], schema=S.ITEMS, preserve_index=False)

    rows = 0

    def stream() -> Any:
        nonlocal rows
        if not parts:
            return
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ds = ds.map_batches(with_ids, batch_format="pandas").sort(S.ITEM_ID)
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
            rows += b.num_rows
            yield b

    w.write(stream())
    w.commit(rows_in=rows)


def _id_table(order: pa.Array, raw: str, internal: str) -> pa.Table:
    return pa.table({raw: order, internal: pa.array(np.arange(1, len(order) + 1, dtype=np.int64))})


def _write_small(
    storage: Storage,
    uri: str,
    table: pa.Table,
    schema: pa.Schema,
    key: str,
    meta: dict[str, str],
    config: dict[str, Any],
) -> None:
    w = TableWriter(storage, uri, num_shards=1, key=key, meta=meta, config=config, schema=schema)
    if not w.complete:
        w.write([table.select(schema.names).cast(schema)])
        w.commit(rows_in=table.num_rows)
