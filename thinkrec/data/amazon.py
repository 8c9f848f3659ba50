"""Amazon Reviews 2018, one category: reviews and metadata as JSON lines (plain or ``.gz``).

Reviews: ``reviewerID, asin, overall, unixReviewTime, ...``. Metadata: ``asin, title, description,
category, brand, ...`` (``description`` becomes the item's description fields, the keywords stage's
text), where ``title`` may hold HTML, ``description`` and ``category`` are lists, and
an asin can appear more than once (the first line wins; prepare keeps the first by file order).
The category path (minus the root category, which every item of the file shares) stands in for
keywords until the keywords stage writes its own.
"""

from __future__ import annotations

import html
import re
from typing import Any

import pandas as pd

from thinkrec.data import reader as R
from thinkrec.data import schema as S
from thinkrec.io.commit import REASON

_TAG = re.compile(r"<[^>]+>")


def strip_html(text: str) -> str:
    """Tags removed and entities decoded; whitespace collapsed."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def text_of(value: Any) -> str:
    """A metadata field (string or list of strings) as plain text."""
    if isinstance(value, list):
        return " ".join(strip_html(str(v)) for v in value if v)
    return strip_html(str(value)) if value else ""


def _unix_seconds(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_interaction_lines(lines: list[str]) -> pd.DataFrame:
    return R.parse_review_lines(lines, ("reviewerID", "asin", "overall", "unixReviewTime"), _unix_seconds)


def parse_item_lines(lines: list[str]) -> pd.DataFrame:
    out = []
    for line in lines:
        obj = R.json_object(line)
        item = R.clean_id(obj.get("asin")) if obj else None
        if obj is None or item is None:
            out.append(R.bad_item(line))
            continue
        title = text_of(obj.get("title"))
        cats = obj.get("category") or []
        cats = [strip_html(str(c)) for c in (cats[1:] if isinstance(cats, list) else [cats])]
        desc = obj.get("description") or []
        out.append(
            {
                S.RAW_ITEM_ID: item,
                S.TITLE: title,
                S.KEYWORDS: [c for c in cats if c],
                # One plain-text string per description field (the keywords stage cuts each).
                S.DESCRIPTION: [
                    t for t in (text_of(d) for d in (desc if isinstance(desc, list) else [desc])) if t
                ],
                REASON: None if title else R.EMPTY_TITLE,
            }
        )
    return R.item_frame(out)


def find(names: list[str]) -> tuple[str, str]:
    """``<Category>.json[.gz]`` and ``meta_<Category>.json[.gz]``."""
    js = [n for n in names if n.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))]
    meta = [n for n in js if n.startswith("meta_")]
    reviews = [n for n in js if not n.startswith("meta_")]
    if len(meta) != 1 or len(reviews) != 1:
        raise FileNotFoundError(
            f"amazon: data.source must hold one reviews file and one meta_*.json[.gz] file, found {sorted(js)}"
        )
    return reviews[0], meta[0]


READER = R.Reader(
    name="amazon", find=find, parse_interactions=parse_interaction_lines, parse_items=parse_item_lines
)
