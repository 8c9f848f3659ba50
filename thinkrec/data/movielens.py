"""MovieLens readers: RecBole atomic files (.inter/.item, ML-100K as shipped in the recbole wheel)
and GroupLens .dat files (ML-1M: ``ratings.dat``, ``movies.dat``, ``::``-separated, latin-1).

MovieLens keywords are the genres, so the item reader fills them in (no extractor needed).
"""

from __future__ import annotations

import importlib.util
import os

import pandas as pd

from thinkrec.data import reader as R
from thinkrec.data import schema as S
from thinkrec.io.commit import REASON

# Kept here for callers that name them through the MovieLens module.
MALFORMED, BAD_RATING, BAD_TIMESTAMP, BAD_ID = R.MALFORMED, R.BAD_RATING, R.BAD_TIMESTAMP, R.BAD_ID
UNKNOWN_ITEM, DUPLICATE = R.UNKNOWN_ITEM, R.DUPLICATE

ATOMIC_HEADER = "user_id:"
ITEM_HEADER = "item_id:"


def embedded_dir(dataset: str) -> str:
    """The dataset's embedded copy. ML-100K ships in the recbole wheel (found without importing it)."""
    if dataset != "ml-100k":
        raise ValueError(f"data.source is empty but {dataset!r} has no embedded copy; set data.source")
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MovieLens-100K comes from the recbole wheel: pip install --no-deps recbole==1.2.1"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "dataset_example", "ml-100k")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found in the installed recbole")
    return path


def parse_interaction_lines(lines: list[str], fmt: str) -> pd.DataFrame:
    """Raw lines -> raw_user_id, raw_item_id, rating, timestamp, _reason (None for good rows).
    ``fmt`` is ``atomic`` (tab-separated) or ``dat`` (``::``). One output row per line (the
    atomic file's ``user_id:token`` header is dropped by the caller, see ``Reader.header``)."""
    sep = "\t" if fmt == "atomic" else "::"
    rows = R.Rows()
    for line in lines:
        parts = line.rstrip("\r\n").split(sep)
        if len(parts) != 4 or not parts[0].strip() or not parts[1].strip():
            rows.bad(line, R.MALFORMED)
            continue
        user, item = parts[0].strip(), parts[1].strip()
        rating = R.check_rating(parts[2])
        if rating is None:
            rows.bad(line, R.BAD_RATING, user, item)
            continue
        try:
            ts = int(float(parts[3]))
        except ValueError:
            ts = -1
        if ts < 0:
            rows.bad(line, R.BAD_TIMESTAMP, user, item)
            continue
        rows.good(user, item, rating, ts)
    return rows.frame()


def parse_item_lines(lines: list[str], fmt: str) -> pd.DataFrame:
    """raw_item_id, title, keywords (the genres), _reason."""
    out = []
    for line in lines:
        if fmt == "atomic" and line.startswith(ITEM_HEADER):
            continue  # item_id:token movie_title:token_seq release_year:token class:token_seq
        parts = line.rstrip("\r\n").split("\t" if fmt == "atomic" else "::")
        if len(parts) < 3 or not parts[0].strip():
            out.append(R.bad_item(line))
            continue
        if fmt == "atomic":
            raw, title, genres = parts[0], parts[1], (parts[3] if len(parts) > 3 else "").split()
        else:
            raw, title, genres = parts[0], parts[1], parts[2].split("|")
        title = title.strip()
        out.append(
            {
                S.RAW_ITEM_ID: raw.strip(),
                S.TITLE: title,
                S.KEYWORDS: [g for g in genres if g],
                REASON: None if title else R.EMPTY_TITLE,
            }
        )
    return R.item_frame(out)


def read_items(path: str, fmt: str) -> pd.DataFrame:
    """A local item file -> raw_item_id, title, keywords (good rows only)."""
    with open(path, encoding="latin-1") as f:
        df = parse_item_lines(f.read().splitlines(), fmt)
    return df[df[REASON].isna()].drop(columns=[REASON]).reset_index(drop=True)


def _named(names: list[str], inter: str, items: str, what: str) -> tuple[str, str]:
    missing = [n for n in (inter, items) if n not in names]
    if missing:
        raise FileNotFoundError(f"{what}: {missing} not found in data.source (has {sorted(names)[:10]})")
    return inter, items


ML100K = R.Reader(
    name="ml-100k",
    find=lambda names: _named(names, "ml-100k.inter", "ml-100k.item", "ml-100k"),
    parse_interactions=lambda lines: parse_interaction_lines(lines, "atomic"),
    parse_items=lambda lines: parse_item_lines(lines, "atomic"),
    encoding="latin-1",
    header=ATOMIC_HEADER,
    item_header=ITEM_HEADER,
)
ML1M = R.Reader(
    name="ml-1m",
    find=lambda names: _named(names, "ratings.dat", "movies.dat", "ml-1m"),
    parse_interactions=lambda lines: parse_interaction_lines(lines, "dat"),
    parse_items=lambda lines: parse_item_lines(lines, "dat"),
    encoding="latin-1",
)
