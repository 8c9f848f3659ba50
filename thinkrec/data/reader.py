"""The shape every source-format reader has, and the bad-row reasons they share.

A reader turns raw lines into typed rows. Interaction lines become ``raw_user_id, raw_item_id,
rating, timestamp, _reason`` (``_reason`` None for good rows); item lines become ``raw_item_id,
title, keywords, description, _reason``. A line that cannot be used keeps its text (cut to 200 characters) in
``raw_user_id`` and gets a reason, so prepare quarantines it instead of dropping it. Raw ids are
always strings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from thinkrec.data import schema as S
from thinkrec.io.commit import REASON

# Bad-row reasons (also the quarantine table's `reason` values).
MALFORMED = "malformed"
MISSING_FIELD = "missing_field"
BAD_RATING = "bad_rating"
BAD_TIMESTAMP = "bad_timestamp"
BAD_ID = "bad_id"
UNKNOWN_ITEM = "unknown_item"
DUPLICATE = "duplicate"
EMPTY_TITLE = "empty_title"
BAD_ENCODING = "bad_encoding"

MAX_LINE_CHARS = 200
"""A quarantined line keeps this much of its text."""


@dataclass(frozen=True)
class Reader:
    """One source format. ``find`` maps the source directory's file names to (interactions file,
    items file); the parsers are pure functions over lists of lines, run inside Ray Data tasks."""

    name: str
    find: Callable[[list[str]], tuple[str, str]]
    parse_interactions: Callable[[list[str]], pd.DataFrame]
    parse_items: Callable[[list[str]], pd.DataFrame]
    encoding: str = "utf-8"
    header: str | None = None
    """Interaction lines starting with this are a header, not data (neither read nor counted)."""
    item_header: str | None = None
    """The same for item lines."""
    interactions_format: str = "lines"
    """``lines`` (text lines, any format the parsers know), or ``parquet`` (rows read as JSON-object
    lines; the generic reader)."""
    items_format: str = "lines"
    columns: tuple[str, ...] = ()
    """Parquet: the interaction columns to read."""
    item_columns: tuple[str, ...] = ()
    """Parquet: the item columns to read."""


class Rows:
    """Column-wise builder of a parsed interaction frame."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {
            S.RAW_USER_ID: [],
            S.RAW_ITEM_ID: [],
            S.RATING: [],
            S.TIMESTAMP: [],
            REASON: [],
        }

    def good(self, user: str, item: str, rating: float, ts: int) -> None:
        self._add(user, item, rating, ts, None)

    def bad(self, line: str, reason: str, user: str | None = None, item: str | None = None) -> None:
        self._add(user if user is not None else line[:MAX_LINE_CHARS], item, float("nan"), -1, reason)

    def _add(self, user: str | None, item: str | None, rating: float, ts: int, reason: str | None) -> None:
        for k, v in zip(self.cols, (user, item, rating, ts, reason), strict=True):
            self.cols[k].append(v)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.cols).astype({S.RATING: "float64", S.TIMESTAMP: "int64"})


def check_rating(value: Any, lo: float = 0.0, hi: float = 5.0, *, typed: bool = False) -> float | None:
    """The rating as a float, or None when it is not a number in [lo, hi]. ``typed`` (JSON
    sources): the value must already be a JSON number, a string is a wrong type."""
    if isinstance(value, bool) or (typed and not isinstance(value, int | float)):
        return None
    try:
        r = float(value)
    except (TypeError, ValueError):
        return None
    return r if lo <= r <= hi else None


def clean_id(value: Any) -> str | None:
    """A raw id as a non-empty string (integers str()-ed), or None."""
    if value is None or isinstance(value, bool | float | dict | list):
        return None
    s = str(value).strip()
    return s or None


def item_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Parsed item rows -> raw_item_id, title, keywords, description, _reason (a row without a
    description gets an empty list)."""
    cols = [S.RAW_ITEM_ID, S.TITLE, S.KEYWORDS, S.DESCRIPTION, REASON]
    if not rows:
        return pd.DataFrame({c: [] for c in cols})
    return pd.DataFrame([{S.DESCRIPTION: [], **r} for r in rows], columns=cols)


def bad_item(line: str, reason: str = MALFORMED) -> dict[str, Any]:
    """An item line that cannot be used (its text cut to MAX_LINE_CHARS in raw_item_id)."""
    return {S.RAW_ITEM_ID: line[:MAX_LINE_CHARS], S.TITLE: "", S.KEYWORDS: [], REASON: reason}


def json_object(line: str) -> dict[str, Any] | None:
    """One JSON-lines record, None when the line is not a JSON object."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def parse_review_lines(
    lines: list[str],
    keys: tuple[str, str, str, str],
    parse_time: Callable[[Any], int | None],
) -> pd.DataFrame:
    """JSON-lines reviews (Amazon, Yelp) -> interaction rows, each bad line with its reason.
    ``keys`` names the (user, item, rating, time) fields; ``parse_time`` maps the time field to Unix
    seconds (None when it cannot)."""
    user_key, item_key, rating_key, time_key = keys
    rows = Rows()
    for line in lines:
        obj = json_object(line)
        if obj is None:
            rows.bad(line, MALFORMED)
            continue
        if any(k not in obj for k in keys):
            rows.bad(line, MISSING_FIELD)
            continue
        user, item = clean_id(obj[user_key]), clean_id(obj[item_key])
        if user is None or item is None:
            rows.bad(line, BAD_ID)
            continue
        rating = check_rating(obj[rating_key], 1.0, 5.0, typed=True)
        if rating is None:
            rows.bad(line, BAD_RATING, user, item)
            continue
        ts = parse_time(obj[time_key])
        if ts is None or ts < 0:
            rows.bad(line, BAD_TIMESTAMP, user, item)
            continue
        rows.good(user, item, rating, ts)
    return rows.frame()
