"""A prompt-hash cache of generated texts, shared by every run under one output root.

Entries are Parquet files (prompt_hash, generated, new_tokens) under ``<root>/<dir>/``, one per
committed wave, each written whole (a temporary name, then a rename; one object upload on S3), so a
crash leaves no half file. The key (``base.prompt_hash``) covers the model, the decoding settings,
the prompt and its gate: a rerun, or the same prompt met again, is served from here and costs no
generation; other settings never hit. Not a committed stage table (TableWriter): it has no shards
or manifest, and it outlives the tables it fed.

``CachedGenerator`` puts the cache in front of any generator, so every stage that generates (keywords,
teacher traces, explanations) gets it the same way, whatever the stage around it.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from thinkrec.data import schema as S
from thinkrec.generation.base import Decoding, GenRequest, GenResult, prompt_hash
from thinkrec.io.fs import Storage

CACHE_SCHEMA = pa.schema(
    [(S.PROMPT_HASH, pa.string()), (S.GENERATED, pa.string()), (S.NEW_TOKENS, pa.int32())]
)


def load(storage: Storage, rel: str) -> dict[str, tuple[str, int]]:
    """prompt_hash -> (text, new_tokens) of every entry written under ``rel``."""
    fs, root = storage.fs(storage.uri(rel))
    out: dict[str, tuple[str, int]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        t = pq.read_table(info.path, filesystem=fs, schema=CACHE_SCHEMA).to_pydict()
        for h, g, n in zip(t[S.PROMPT_HASH], t[S.GENERATED], t[S.NEW_TOKENS], strict=True):
            out[h] = (g, int(n))
    return out


def add(storage: Storage, rel: str, hashes: list[str], texts: list[str], new_tokens: list[int]) -> None:
    """Write one entry file with these (new) generations; nothing when there are none."""
    if not hashes:
        return
    table = pa.table(
        {S.PROMPT_HASH: hashes, S.GENERATED: texts, S.NEW_TOKENS: new_tokens}, schema=CACHE_SCHEMA
    )
    fs, root = storage.fs(storage.uri(rel))
    name = f"{uuid.uuid4().hex}.parquet"
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(root, recursive=True)
        tmp = f"{root}/.{name}.tmp"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, f"{root}/{name}")
    else:  # S3: an object becomes visible only once whole
        pq.write_table(table, f"{root}/{name}", filesystem=fs)


class CachedGenerator:
    """A ``Generator`` that serves every prompt it has met before from the cache under ``rel`` and
    sends only the others to ``inner`` (a prompt repeated inside one call is generated once). New
    successful generations are written to the cache before they are returned, so whatever a stage
    publishes is cached; failed rows are not cached (a rerun tries them again).

    ``model_key`` names the model in the cache key (default ``inner.model``; the explain stage adds the
    adapters' version, so a retrained model never reuses a stale text). ``stats`` counts the rows sent
    to the backend (``generated``) and those served without it (``cached``). ``enabled=False``
    (``generation.cache: false``): nothing is read or written, every row is generated, keys and stats
    are still computed."""

    def __init__(
        self, inner: Any, storage: Storage, rel: str, model_key: str | None = None, enabled: bool = True
    ) -> None:
        self.inner = inner
        self.name: str = inner.name
        self.model: str = inner.model
        self.model_key = model_key or inner.model
        self.storage, self.rel, self.enabled = storage, rel, enabled
        self.entries = load(storage, rel) if enabled else {}
        self.stats = {"generated": 0, "cached": 0}

    def key(self, request: GenRequest, decoding: Decoding) -> str:
        return prompt_hash(request, self.model_key, decoding)

    def generate(self, requests: list[GenRequest], decoding: Decoding) -> list[GenResult]:
        hashes = [self.key(r, decoding) for r in requests]
        if not self.enabled:
            self.stats["generated"] += len(requests)
            return self.inner.generate(requests, decoding)
        first: dict[str, int] = {}  # hash -> the one row of this call that is generated
        for i, h in enumerate(hashes):
            if h not in self.entries:
                first.setdefault(h, i)
        fresh: dict[str, GenResult] = {}
        if first:
            res = self.inner.generate([requests[i] for i in first.values()], decoding)
            fresh = dict(zip(first, res, strict=True))
            ok = [
                (h, r.text, r.new_tokens) for h, r in fresh.items() if r.error is None and r.text is not None
            ]
            add(self.storage, self.rel, [o[0] for o in ok], [o[1] for o in ok], [o[2] for o in ok])
            self.entries.update({h: (t, n) for h, t, n in ok})
        out: list[GenResult] = []
        for i, (req, h) in enumerate(zip(requests, hashes, strict=True)):
            if first.get(h) == i:  # this row went to the backend
                r = fresh[h]
                out.append(GenResult(req.key, r.text, r.error, r.tries, r.new_tokens))
            elif h in self.entries:  # met before (another call, or earlier in this one): no generation
                text, n = self.entries[h]
                out.append(GenResult(req.key, text, None, 0, n, cached=True))
            else:  # a repeat, in this call, of a row that failed: the same failure, no second request
                out.append(GenResult(req.key, None, fresh[h].error, 0, 0, cached=True))
        self.stats["generated"] += len(first)
        self.stats["cached"] += len(requests) - len(first)
        return out
