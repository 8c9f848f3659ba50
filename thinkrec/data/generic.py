"""``generic``: a team's own logs as Parquet, CSV or JSON lines, columns named by ``data.generic``.

Interactions need a user, an item, a rating (or a 0/1 label) and a time; an optional item table
gives each item a title and text fields (the keywords stage's input). Without an item table every
item seen in the log is an item, titled by its raw id.

Every format becomes the same thing before parsing: one record per line. CSV and JSON lines are
lines already (a CSV record must not span lines; the header is the first line of each file);
Parquet rows are turned into JSON objects as they are read (``ParquetRecordsDatasource``), with
the row's 1-based number in its file as its "line". One record parser then applies the column
mapping, so a bad value gets the same quarantine reason whatever the format.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import fnmatch
import json
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from thinkrec.data import lines as L
from thinkrec.data import reader as R
from thinkrec.data import schema as S
from thinkrec.io.commit import REASON

FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}


def file_format(name: str, configured: str) -> str:
    if configured != "auto":
        return configured
    base = name[: -len(".gz")] if name.endswith(".gz") else name
    for ext, fmt in FORMATS.items():
        if base.endswith(ext):
            return fmt
    raise ValueError(f"data.generic.format=auto cannot tell the format of {name!r}; set data.generic.format")


def matching(names: list[str], pattern: str, what: str) -> list[str]:
    """File names under data.source that ``pattern`` (a name or a glob, ``*.parquet``) matches."""
    hits = sorted(n for n in names if fnmatch.fnmatch(n, pattern))
    if not hits:
        raise FileNotFoundError(f"data.generic.{what}={pattern!r} matches none of {sorted(names)[:10]}")
    return hits


class ParquetRecordsDatasource(FileBasedDatasource):
    """Parquet rows as JSON-object lines (``text``, ``source_file``, ``source_line``), read in row
    groups, so a file larger than memory streams."""

    def __init__(self, paths: list[str], *, columns: list[str], **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self.columns = columns

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        # Parquet's footer is at the end: a random-access file, not the default sequential stream.
        return filesystem.open_input_file(path)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        pf = pq.ParquetFile(f)
        have = set(pf.schema_arrow.names)
        number = 0
        for batch in pf.iter_batches(
            batch_size=L.BLOCK_LINES, columns=[c for c in self.columns if c in have]
        ):
            rows = batch.to_pylist()
            texts = [json.dumps(r, default=str) for r in rows]
            yield pa.table(
                {
                    L.TEXT: pa.array(texts, pa.string()),
                    L.SOURCE_FILE: pa.array([path] * len(texts), pa.string()),
                    L.SOURCE_LINE: pa.array(range(number + 1, number + 1 + len(texts)), pa.int64()),
                }
            )
            number += len(texts)


def read_records(paths: list[str], fmt: str, columns: list[str], *, filesystem: Any) -> Any:
    """A Ray Dataset of record lines (``text``, ``source_file``, ``source_line``) over the files."""
    import ray.data

    if fmt == "parquet":
        return ray.data.read_datasource(
            ParquetRecordsDatasource(paths, columns=columns, filesystem=filesystem)
        )
    return L.read_lines(paths, filesystem=filesystem)


def csv_header(fs: pafs.FileSystem, path: str) -> tuple[list[str], str]:
    """The first line of a CSV file (decompressed by extension): its column names and its text."""
    with fs.open_input_stream(path) as f:
        first = b""
        while b"\n" not in first:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            first += chunk
    line = first.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    return next(csv.reader([line])), line


def records(lines: list[str], fmt: str, header: list[str] | None) -> list[dict[str, Any] | None]:
    """Each line as a dict (None when it is not one record of the format)."""
    if fmt != "csv":
        return [R.json_object(line) for line in lines]
    assert header is not None
    out: list[dict[str, Any] | None] = []
    for line in lines:
        try:
            row = next(csv.reader([line]))
        except (csv.Error, StopIteration):
            row = []
        out.append(dict(zip(header, row, strict=True)) if len(row) == len(header) else None)
    return out


def time_parser(unit: str) -> Callable[[Any], int | None]:
    """Unix seconds from ``s`` / ``ms`` numbers or ``iso`` strings (no zone = UTC)."""

    def parse(value: Any) -> int | None:
        if value is None or isinstance(value, bool):
            return None
        if unit == "iso":
            try:
                t = dt.datetime.fromisoformat(str(value).strip())
            except ValueError:
                return None
            t = t if t.tzinfo else t.replace(tzinfo=dt.UTC)
            return int(t.timestamp())
        try:
            x = float(value)
        except (TypeError, ValueError):
            return None
        return int(x / 1000) if unit == "ms" else int(x)

    return parse


def parse_interactions(
    lines: list[str], g: Any, fmt: str, header: list[str] | None, rating_range: tuple[float, float]
) -> pd.DataFrame:
    """Record lines -> interaction rows (reader.Rows), each bad line with its reason."""
    value_key = g.label or g.rating
    keys = (g.user, g.item, value_key, g.timestamp)
    parse_time = time_parser(g.timestamp_unit)
    lo, hi = (0.0, 1.0) if g.label else rating_range
    typed = fmt != "csv"  # JSON and Parquet carry types; CSV values are all text
    rows = R.Rows()
    for line, rec in zip(lines, records(lines, fmt, header), strict=True):
        if rec is None:
            rows.bad(line, R.MALFORMED)
            continue
        if any(rec.get(k) is None or rec.get(k) == "" for k in keys):
            rows.bad(line, R.MISSING_FIELD)
            continue
        user, item = R.clean_id(rec[g.user]), R.clean_id(rec[g.item])
        if user is None or item is None:
            rows.bad(line, R.BAD_ID)
            continue
        raw = rec[value_key]
        rating = R.check_rating(float(raw) if isinstance(raw, bool) else raw, lo, hi, typed=typed)
        if rating is None:
            rows.bad(line, R.BAD_RATING, user, item)
            continue
        ts = parse_time(rec[g.timestamp])
        if ts is None or ts < 0:
            rows.bad(line, R.BAD_TIMESTAMP, user, item)
            continue
        rows.good(user, item, rating, ts)
    return rows.frame()


def parse_items(lines: list[str], g: Any, fmt: str, header: list[str] | None) -> pd.DataFrame:
    """Item record lines -> raw_item_id, title, keywords (none), description (the text fields)."""
    id_key = g.item_id or g.item
    out = []
    for line, rec in zip(lines, records(lines, fmt, header), strict=True):
        item = R.clean_id(rec.get(id_key)) if rec else None
        if rec is None or item is None:
            out.append(R.bad_item(line))
            continue
        title = str(rec.get(g.title) or "").strip()
        out.append(
            {
                S.RAW_ITEM_ID: item,
                S.TITLE: title,
                S.KEYWORDS: [],
                S.DESCRIPTION: [str(rec[f]).strip() for f in g.text if rec.get(f) not in (None, "")],
                REASON: None if title else R.EMPTY_TITLE,
            }
        )
    return R.item_frame(out)


def reader(
    cfg: Any, fs: pafs.FileSystem, root: str, names: list[str]
) -> tuple[R.Reader, list[str], list[str]]:
    """The generic Reader for this config, with the interaction files and the item files (maybe none)
    under ``root``."""
    # A plain namespace travels to Ray workers inside the parsers' closures.
    g = SimpleNamespace(**dataclasses.asdict(cfg.data.generic))
    inter = matching(names, g.interactions, "interactions")
    items = matching(names, g.items, "items") if g.items else []
    ifmt = file_format(inter[0], g.format)
    mfmt = file_format(items[0], g.format) if items else ifmt
    iheader, iline = csv_header(fs, f"{root}/{inter[0]}") if ifmt == "csv" else (None, None)
    mheader, mline = csv_header(fs, f"{root}/{items[0]}") if items and mfmt == "csv" else (None, None)
    rating_range = (g.rating_min, g.rating_max)
    r = R.Reader(
        name="generic",
        find=lambda _: (inter[0], items[0] if items else ""),
        parse_interactions=lambda lines: parse_interactions(lines, g, ifmt, iheader, rating_range),
        parse_items=lambda lines: parse_items(lines, g, mfmt, mheader),
        # Each CSV file starts with the header line: skipped, not counted.
        header=iline,
        item_header=mline,
        interactions_format=ifmt,
        items_format=mfmt,
        columns=(g.user, g.item, g.label or g.rating, g.timestamp),
        item_columns=(g.item_id or g.item, g.title, *g.text),
    )
    return r, inter, items
