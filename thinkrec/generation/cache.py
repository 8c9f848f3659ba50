"""A prompt-hash cache of generated texts, shared by every run under one output root.

Entries are Parquet files (prompt_hash, generated, new_tokens) under ``<root>/<dir>/``, one per
committed wave, each written whole (a temporary name, then a rename; one object upload on S3), so a
crash leaves no half file. The key (``base.prompt_hash``) covers the model, the decoding settings,
the prompt and its gate: a rerun, or the same prompt met again, is served from here and costs no
generation; other settings never hit. Not a committed stage table (TableWriter): it has no shards
or manifest, and it outlives the tables it fed.
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from thinkrec.data import schema as S
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
