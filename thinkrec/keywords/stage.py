"""keywords stage: up to ``keywords.max_keywords`` keywords per item -> keywords/keywords
(schema.KEYWORDS_TABLE), between prepare and cf.

Pipeline: read_dataset(prepare/items) -> item texts and cache keys (map_batches) -> cached keywords
attached (a hash-partitioned group-by of items and cache entries by key prefix) -> extractor actors
(map_batches over an actor pool; only the items the cache lacks reach the extractor, and each batch
publishes its new cache entries) -> sort by item_id -> TableWriter (sharded by item_id).

The cache key is a hash of everything the result depends on: the item's title, description (each
field cut to ``keywords.max_words`` words) and source tags, the extractor's ``settings()`` and the
post-processing (REFERENCE.md: stopwords, numbers and words under 3 letters dropped, at most 10
kept). A rerun, or another run or dataset pointed at the same ``keywords.cache``, computes nothing
it has computed before. The table is committed like every other (a finished one with the same
fingerprint is skipped; a rerun after a failure writes only unpublished shards, and the cache
keeps every batch that finished). An item the extractor returns as ``Failed`` goes to quarantine
with ``extractor_failed: <error>`` and is not cached, so a rebuilt table asks for it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.data.items import ITEMS, KEYWORDS
from thinkrec.io.commit import REASON, TableWriter, fingerprint, read_dataset, stable_shard
from thinkrec.io.fs import Storage, join
from thinkrec.keywords.base import Failed, ItemText, cut_words, extractor_class, extractor_name, postprocess

log = logging.getLogger(__name__)

TEXT = "text"
TAGS = "tags"
KEY = "cache_key"
CACHED = "cached"
COMPUTED = "_computed"
BUCKET = "_bucket"
CACHE_SCHEMA = pa.schema([(KEY, pa.string()), (S.KEYWORDS, pa.list_(pa.string()))])
TEXTS_SCHEMA = pa.schema(
    [(S.ITEM_ID, pa.int64()), (S.TITLE, pa.string()), (TEXT, pa.string()), (TAGS, pa.list_(pa.string()))]
)
KEYED_SCHEMA = pa.schema(
    [*TEXTS_SCHEMA, (KEY, pa.string()), (BUCKET, pa.string()), (CACHED, pa.list_(pa.string()))]
)
"""Items with their cache keys; cache entries take the same shape (item_id -1) for the group-by."""
POSTPROCESS_VERSION = 1
"""Bumped when ``postprocess`` changes, so cached results made by the old rules are not reused."""
# Settings that change no keyword (placement, batching, where the cache lives).
_NOT_FINGERPRINTED = ("batch_size", "concurrency", "cache")


def cache_root(cfg: Config, storage: Storage) -> str:
    return cfg.keywords.cache or storage.uri("keywords", "cache")


def stage_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    d = cfg.to_dict()
    sections: dict[str, Any] = {
        "keywords": {k: v for k, v in d["keywords"].items() if k not in _NOT_FINGERPRINTED},
        "extractor": extractor_name(cfg),
        "stage": "keywords/v1",
    }
    if extractor_name(cfg) not in ("genres", "tfidf"):
        sections["generation"] = d["generation"]  # the llm (or a custom) extractor may read it
    return fingerprint(sections, [storage.uri(ITEMS)], storage)


def item_texts(batch: pa.Table, max_words: int) -> pa.Table:
    """prepare/items rows -> item_id, title, text (description fields cut and joined), tags."""
    texts = [
        " ".join(cut_words(str(f), max_words) for f in (d or []) if f)
        for d in batch.column(S.DESCRIPTION).to_pylist()
    ]
    return pa.table(
        {
            S.ITEM_ID: batch.column(S.ITEM_ID),
            S.TITLE: [t or "" for t in batch.column(S.TITLE).to_pylist()],
            TEXT: texts,
            TAGS: [k or [] for k in batch.column(S.KEYWORDS).to_pylist()],
        },
        schema=TEXTS_SCHEMA,
    )


def cache_keys(batch: pa.Table, settings_hash: str) -> pa.Table:
    """Each item's cache key (and its 2-hex-digit bucket); ``cached`` null until looked up."""
    cols = [batch.column(c).to_pylist() for c in (S.TITLE, TEXT, TAGS)]
    keys = [
        hashlib.sha256(json.dumps([settings_hash, t, x, g]).encode()).hexdigest()
        for t, x, g in zip(*cols, strict=True)
    ]
    return pa.table(
        {
            **{c: batch.column(c) for c in TEXTS_SCHEMA.names},
            KEY: keys,
            BUCKET: [k[:2] for k in keys],
            CACHED: pa.nulls(len(keys), pa.list_(pa.string())),
        },
        schema=KEYED_SCHEMA,
    )


def cache_entries(batch: pa.Table) -> pa.Table:
    """Cache rows in the keyed shape (item_id -1, keywords in ``cached``)."""
    n = batch.num_rows
    keys = batch.column(KEY).to_pylist()
    return pa.table(
        {
            S.ITEM_ID: np.full(n, -1, np.int64),
            S.TITLE: [""] * n,
            TEXT: [""] * n,
            TAGS: [[] for _ in range(n)],
            KEY: keys,
            BUCKET: [k[:2] for k in keys],
            CACHED: batch.column(S.KEYWORDS),
        },
        schema=KEYED_SCHEMA,
    )


def settings_hash(settings: dict[str, Any], max_keywords: int) -> str:
    blob = {"extractor": settings, "postprocess": POSTPROCESS_VERSION, "max_keywords": max_keywords}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_files(storage: Storage, uri: str) -> list[str]:
    fs, root = storage.fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _attach_cached(group: pa.Table) -> pa.Table:
    """One key-prefix bucket of items and cache entries -> its items, each with its cached keywords
    (null when the cache has none)."""
    is_item = pc.greater_equal(group.column(S.ITEM_ID), 0)
    entries = group.filter(pc.invert(is_item))
    found = dict(zip(entries.column(KEY).to_pylist(), entries.column(CACHED).to_pylist(), strict=True))
    items = group.filter(is_item)
    cached = pa.array([found.get(k) for k in items.column(KEY).to_pylist()], pa.list_(pa.string()))
    return items.set_column(items.schema.get_field_index(CACHED), CACHED, cached)


class ExtractActor:
    """Builds the extractor once; each batch: cached rows pass through, the rest are extracted,
    post-processed and published to the cache as one Parquet file."""

    def __init__(self, cfg: dict[str, Any], name: str, state: Any, cache_uri: str, key_hash: str) -> None:
        self.cfg = from_dict(cfg)
        cls = extractor_class(name)
        self.extractor = cls(self.cfg, state=state) if state is not None else cls(self.cfg)
        self.storage = Storage.from_config(self.cfg)
        self.cache_uri, self.key_hash = cache_uri, key_hash
        self.max_keywords = self.cfg.keywords.max_keywords

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = {c: batch.column(c).to_pylist() for c in (S.ITEM_ID, S.TITLE, TEXT, TAGS, KEY, CACHED)}
        cached = cols[CACHED]
        miss = [i for i, c in enumerate(cached) if c is None]
        keywords: list[list[str]] = [c if c is not None else [] for c in cached]
        reasons: list[str | None] = [None] * batch.num_rows
        if miss:
            items = [
                ItemText(cols[S.ITEM_ID][i], cols[S.TITLE][i], cols[TEXT][i], tuple(cols[TAGS][i]))
                for i in miss
            ]
            raw = self.extractor(items)
            if len(raw) != len(items):
                raise RuntimeError(
                    f"keywords extractor {type(self.extractor).__name__} returned {len(raw)} lists for {len(items)} items"
                )
            done = []
            for i, words in zip(miss, raw, strict=True):
                if isinstance(words, Failed):
                    reasons[i] = f"extractor_failed: {words.error}"
                    continue
                keywords[i] = postprocess([str(w) for w in words], self.max_keywords)
                done.append(i)
            if done:  # a failed item is never cached: a rebuilt table asks again
                self._publish([cols[KEY][i] for i in done], [keywords[i] for i in done])
        computed = np.zeros(batch.num_rows, bool)
        computed[miss] = True
        return pa.table(
            {
                S.ITEM_ID: batch.column(S.ITEM_ID),
                S.KEYWORDS: pa.array(keywords, pa.list_(pa.string())),
                # What produced the row: an LLM extractor's label names backend, model, adapter and
                # decoding hash; a rule-based one is its name.
                S.EXTRACTOR: [getattr(self.extractor, "label", self.extractor.name)] * batch.num_rows,
                COMPUTED: computed,
                REASON: pa.array(reasons, pa.string()),
            }
        )

    def _publish(self, keys: list[str], keywords: list[list[str]]) -> None:
        table = pa.table({KEY: keys, S.KEYWORDS: keywords}, schema=CACHE_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        # Named by its content's keys: a retried batch rewrites the same object, never a second one.
        name = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]
        self.storage.write_bytes(join(self.cache_uri, self.key_hash, f"part-{name}.parquet"), buf.getvalue())


def _settings(cfg: Config, name: str, state: Any) -> dict[str, Any]:
    """The extractor's settings, read on a worker: building it may load a model, never on the driver."""
    import ray

    @ray.remote(num_cpus=1)
    def read(tree: dict[str, Any]) -> dict[str, Any]:
        c = from_dict(tree)
        cls = extractor_class(name)
        ex = cls(c, state=state) if state is not None else cls(c)
        return ex.settings()

    return ray.get(read.remote(cfg.to_dict()))


def _shard_filter(pending: list[int], num_shards: int) -> Any:
    wanted = np.array(pending)

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(np.isin(stable_shard(batch.column(S.ITEM_ID), num_shards), wanted)))

    return keep


def run(cfg: Config) -> dict[str, Any]:
    import ray

    storage = Storage.from_config(cfg)
    out = storage.uri(KEYWORDS)
    meta = stage_meta(cfg, storage)
    w = TableWriter(
        storage,
        out,
        num_shards=cfg.storage.num_shards,
        key=S.ITEM_ID,
        meta=meta,
        config=cfg.to_dict(),
        max_quarantine_rate=cfg.data.max_quarantine_rate,
        schema=S.KEYWORDS_TABLE,
    )
    if w.complete:
        log.info("keywords: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/_manifest.json")

    name = extractor_name(cfg)
    cls = extractor_class(name)
    texts = (
        read_dataset(storage, storage.uri(ITEMS), columns=[S.ITEM_ID, S.TITLE, S.KEYWORDS, S.DESCRIPTION])
        .map_batches(item_texts, batch_format="pyarrow", fn_kwargs={"max_words": cfg.keywords.max_words})
        .materialize()
    )
    n_items = texts.count()
    state = cls.fit(cfg, texts) if hasattr(cls, "fit") else None
    key_hash = settings_hash(_settings(cfg, name, state), cfg.keywords.max_keywords)
    keyed = texts.map_batches(cache_keys, batch_format="pyarrow", fn_kwargs={"settings_hash": key_hash})
    cache_uri = cache_root(cfg, storage)
    cached_files = _cache_files(storage, join(cache_uri, key_hash))
    if cached_files:
        fs, _ = storage.fs(cache_uri)
        entries = ray.data.read_parquet(cached_files, filesystem=fs, schema=CACHE_SCHEMA).map_batches(
            cache_entries, batch_format="pyarrow"
        )
        keyed = keyed.union(entries).groupby(BUCKET).map_groups(_attach_cached, batch_format="pyarrow")
    # Looked up before the actors start: an actor pool holding every CPU would starve the lookup.
    keyed = keyed.materialize()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    results = keyed.map_batches(
        ExtractActor,
        fn_constructor_kwargs={
            "cfg": cfg.to_dict(),
            "name": name,
            "state": state,
            "cache_uri": cache_uri,
            "key_hash": key_hash,
        },
        batch_size=cfg.keywords.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.keywords.concurrency or max(1, min(4, cpus))),
    ).materialize()
    pending = w.pending_shards()
    keep = _shard_filter(pending, cfg.storage.num_shards)
    counted = {"computed": 0}

    def stream() -> Any:
        # Sorted by item id, so every shard's file has the same bytes whatever the blocks were.
        for b in results.sort(S.ITEM_ID).iter_batches(batch_format="pyarrow", batch_size=4096):
            counted["computed"] += int(pc.sum(b.column(COMPUTED)).as_py() or 0)
            yield keep(b.drop_columns([COMPUTED]))  # rows with a _reason go to quarantine

    w.write(stream(), pending)
    computed = counted["computed"]
    man = w.commit(
        rows_in=n_items,
        extra={
            "extractor": name,
            "settings_hash": key_hash,
            "items_computed": computed,
            "items_cached": n_items - computed,
            "cache": join(cache_uri, key_hash),
        },
    )
    log.info(
        "keywords: %d items (%d computed, %d from the cache) by %s",
        n_items,
        computed,
        n_items - computed,
        name,
    )
    return man
