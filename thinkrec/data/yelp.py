"""The Yelp Open Dataset: ``review.json`` (``user_id, business_id, stars, date, ...``) and
``business.json`` (``business_id, name, categories, ...``), JSON lines, plain or ``.gz``; the
``yelp_academic_dataset_`` prefix of the official download is accepted. ``date`` is
``YYYY-MM-DD HH:MM:SS`` in UTC. The business categories stand in for keywords until the keywords
stage writes its own.
"""

from __future__ import annotations

import calendar
import json
import time
from typing import Any

import pandas as pd

from thinkrec.data import reader as R
from thinkrec.data import schema as S
from thinkrec.io.commit import REASON


def _json(line: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def parse_date(value: Any) -> int | None:
    """``2016-03-09 00:44:35`` (or a bare date) -> Unix seconds (UTC), None when unparseable."""
    if not isinstance(value, str):
        return None
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(value.strip(), fmt))
        except ValueError:
            continue
    return None


def parse_interaction_lines(lines: list[str]) -> pd.DataFrame:
    rows = R.Rows()
    for line in lines:
        obj = _json(line)
        if obj is None:
            rows.bad(line, R.MALFORMED)
            continue
        if any(k not in obj for k in ("user_id", "business_id", "stars", "date")):
            rows.bad(line, R.MISSING_FIELD)
            continue
        user, item = R.clean_id(obj["user_id"]), R.clean_id(obj["business_id"])
        if user is None or item is None:
            rows.bad(line, R.BAD_ID)
            continue
        rating = R.check_rating(obj["stars"], 1.0, 5.0, typed=True)
        if rating is None:
            rows.bad(line, R.BAD_RATING, user, item)
            continue
        ts = parse_date(obj["date"])
        if ts is None or ts < 0:
            rows.bad(line, R.BAD_TIMESTAMP, user, item)
            continue
        rows.good(user, item, rating, ts)
    return rows.frame()


def parse_item_lines(lines: list[str]) -> pd.DataFrame:
    out = []
    for line in lines:
        obj = _json(line)
        item = R.clean_id(obj.get("business_id")) if obj else None
        if obj is None or item is None:
            out.append(
                {S.RAW_ITEM_ID: line[: R.MAX_LINE_CHARS], S.TITLE: "", S.KEYWORDS: [], REASON: R.MALFORMED}
            )
            continue
        title = str(obj.get("name") or "").strip()
        cats = obj.get("categories") or ""
        cats = cats if isinstance(cats, list) else str(cats).split(",")
        out.append(
            {
                S.RAW_ITEM_ID: item,
                S.TITLE: title,
                S.KEYWORDS: [c.strip() for c in cats if str(c).strip()],
                REASON: None if title else R.EMPTY_TITLE,
            }
        )
    return R.item_frame(out)


def find(names: list[str]) -> tuple[str, str]:
    def one(kind: str) -> str:
        hits = [n for n in names if kind in n and n.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))]
        if len(hits) != 1:
            raise FileNotFoundError(
                f"yelp: data.source must hold one {kind}.json[.gz], found {sorted(names)[:10]}"
            )
        return hits[0]

    return one("review"), one("business")


READER = R.Reader(
    name="yelp", find=find, parse_interactions=parse_interaction_lines, parse_items=parse_item_lines
)
