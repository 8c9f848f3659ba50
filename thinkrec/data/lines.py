"""A Ray Data source of text lines that knows where each line came from.

Ray's own ``read_text`` decodes a whole file at once (one invalid byte fails the job) and drops the
line numbers that a quarantine row must name. This source streams each file (``.gz`` and other
compressions decompressed on the fly by pyarrow, chosen from the extension), and yields blocks of
``text`` (None when the line is not valid in the encoding), ``source_file`` and ``source_line``
(1-based). Blank lines carry no data and are skipped (their numbers are not reused).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.datasource.file_based_datasource import FileBasedDatasource

TEXT = "text"
SOURCE_FILE = "source_file"
SOURCE_LINE = "source_line"

BLOCK_LINES = 50_000
CHUNK_BYTES = 8 << 20


class LinesDatasource(FileBasedDatasource):
    def __init__(self, paths: list[str], *, encoding: str = "utf-8", **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self.encoding = encoding

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        texts: list[str | None] = []
        numbers: list[int] = []
        number = 0
        rest = b""

        def block() -> pa.Table:
            t = pa.table(
                {
                    TEXT: pa.array(texts, pa.string()),
                    SOURCE_FILE: pa.array([path] * len(texts), pa.string()),
                    SOURCE_LINE: pa.array(numbers, pa.int64()),
                }
            )
            texts.clear()
            numbers.clear()
            return t

        while True:
            chunk = f.read(CHUNK_BYTES)
            data = rest + chunk
            raw_lines = data.split(b"\n")
            # The last piece is a partial line unless the file ended.
            rest = raw_lines.pop() if chunk else b""
            for raw in raw_lines + ([rest] if not chunk and rest else []):
                number += 1
                raw = raw.rstrip(b"\r")
                if not raw.strip():
                    continue
                try:
                    texts.append(raw.decode(self.encoding))
                except UnicodeDecodeError:
                    texts.append(None)
                numbers.append(number)
                if len(texts) >= BLOCK_LINES:
                    yield block()
            if not chunk:
                break
        if texts:
            yield block()


def read_lines(paths: str | list[str], *, filesystem: Any = None, encoding: str = "utf-8") -> Any:
    import ray.data

    return ray.data.read_datasource(LinesDatasource(paths, encoding=encoding, filesystem=filesystem))
