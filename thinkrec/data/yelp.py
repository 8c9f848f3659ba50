"""The Yelp Open Dataset: ``review.json`` (``user_id, business_id, stars, date, ...``) and
``business.json`` (``business_id, name, categories, ...``), JSON lines, plain or ``.gz``; the
``yelp_academic_dataset_`` prefix of the official download is accepted. ``date`` is
``YYYY-MM-DD HH:MM:SS`` in UTC. The business categories stand in for keywords until the keywords
stage writes its own.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

import pandas as pd

from thinkrec.data import reader as R
from thinkrec.data import schema as S
from thinkrec.io.commit import REASON


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
    return R.parse_review_lines(lines, ("user_id", "business_id", "stars", "date"), parse_date)


def parse_item_lines(lines: list[str]) -> pd.DataFrame:
    out = []
    for line in lines:
        obj = R.json_object(line)
        item = R.clean_id(obj.get("business_id")) if obj else None
        if obj is None or item is None:
            out.append(R.bad_item(line))
            continue
        title = str(obj.get("name") or "").strip()
        cats = obj.get("categories") or ""
        cats = cats if isinstance(cats, list) else str(cats).split(",")
        out.append(
            {
                S.RAW_ITEM_ID: item,
                S.TITLE: title,
                S.KEYWORDS: [c.strip() for c in cats if str(c).strip()],
                # Yelp ships no description: the categories are the text keywords are drawn from.
                S.DESCRIPTION: [", ".join(c.strip() for c in cats if str(c).strip())] if cats else [],
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
