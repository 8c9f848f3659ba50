"""MovieLens readers: RecBole atomic files (.inter/.item, ML-100K as shipped in the recbole wheel)
and GroupLens .dat files (ML-1M).

Readers turn raw lines into typed rows. A line that cannot be parsed becomes a row with a ``_reason``
(malformed, bad_rating, bad_timestamp, ...) so the stage can quarantine it instead of dropping it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
import pandas as pd

from thinkrec.data import schema as S
from thinkrec.io.commit import REASON

# Bad-row reasons (also the quarantine table's `reason` values).
MALFORMED = "malformed"
BAD_RATING = "bad_rating"
BAD_TIMESTAMP = "bad_timestamp"
BAD_ID = "bad_id"
UNKNOWN_ITEM = "unknown_item"
DUPLICATE = "duplicate"


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


def source_files(dataset: str, source: str) -> tuple[str, str, str]:
    """(interactions file, items file, format) for a dataset directory."""
    root = source or embedded_dir(dataset)
    if dataset == "ml-100k":
        return os.path.join(root, "ml-100k.inter"), os.path.join(root, "ml-100k.item"), "atomic"
    if dataset == "ml-1m":
        return os.path.join(root, "ratings.dat"), os.path.join(root, "movies.dat"), "dat"
    raise ValueError(f"data.dataset={dataset!r} has no MovieLens reader")


def parse_interaction_lines(lines: list[str], fmt: str) -> pd.DataFrame:
    """Raw lines -> raw_user_id, raw_item_id, rating, timestamp, _reason (None for good rows)."""
    sep = "\t" if fmt == "atomic" else "::"
    out: dict[str, list[Any]] = {
        S.RAW_USER_ID: [],
        S.RAW_ITEM_ID: [],
        S.RATING: [],
        S.TIMESTAMP: [],
        REASON: [],
    }
    for line in lines:
        parts = line.rstrip("\r\n").split(sep)
        user = item = None
        rating = np.nan
        ts = -1
        reason = None
        if len(parts) != 4 or not parts[0].strip() or not parts[1].strip():
            reason = MALFORMED
        else:
            user, item = parts[0].strip(), parts[1].strip()
            try:
                rating = float(parts[2])
                if not (0 <= rating <= 5):
                    reason = BAD_RATING
            except ValueError:
                reason = BAD_RATING
            try:
                ts = int(float(parts[3]))
                if ts < 0:
                    reason = reason or BAD_TIMESTAMP
            except ValueError:
                reason = reason or BAD_TIMESTAMP
        out[S.RAW_USER_ID].append(user if reason != MALFORMED else line[:200])
        out[S.RAW_ITEM_ID].append(item)
        out[S.RATING].append(rating)
        out[S.TIMESTAMP].append(ts)
        out[REASON].append(reason)
    return pd.DataFrame(out)


def read_items(path: str, fmt: str) -> pd.DataFrame:
    """raw_item_id, title, keywords (the genres: MovieLens keywords need no LLM)."""
    rows = []
    with open(path, encoding="latin-1") as f:
        if fmt == "atomic":
            next(f)  # header: item_id:token movie_title:token_seq release_year:token class:token_seq
        for line in f:
            parts = line.rstrip("\r\n").split("\t" if fmt == "atomic" else "::")
            if len(parts) < 3:
                continue
            if fmt == "atomic":
                raw, title, genres = parts[0], parts[1], parts[3] if len(parts) > 3 else ""
                keywords = genres.split()
            else:
                raw, title, genres = parts[0], parts[1], parts[2]
                keywords = genres.split("|")
            rows.append(
                {S.RAW_ITEM_ID: raw.strip(), S.TITLE: title.strip(), S.KEYWORDS: [k for k in keywords if k]}
            )
    return pd.DataFrame(rows)
