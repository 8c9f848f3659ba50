"""The keyword-extractor interface shared by every extractor (genres, tfidf, llm).

An extractor maps item texts to raw keywords; ``postprocess`` applies the reference rules to them.
The keywords stage caches results by a hash of each item's text and ``settings()``, so an extractor's
settings must name everything that changes its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

EXTRACTORS: dict[str, str] = {
    "llm": "thinkrec.keywords.llm:LLMExtractor",
}
"""Registered extractor name -> ``module:Class``; a class is built as ``Cls(cfg)``."""


@dataclass(frozen=True)
class ItemText:
    item_id: int
    title: str
    text: str
    """The item's description fields, joined (each already cut to the configured word limit)."""


class Extractor(Protocol):
    name: str

    def settings(self) -> dict[str, Any]:
        """Everything that changes the output; hashed with the item's text for the cache key."""
        ...

    def __call__(self, items: list[ItemText]) -> list[list[str]]:
        """Raw keywords per item, in the order given."""
        ...


def postprocess(words: list[str], max_keywords: int = 10) -> list[str]:
    """The reference rules on raw keywords (comma-separated strings are split): stopwords, numbers
    and words under 3 letters dropped, case-folded duplicates dropped, at most ``max_keywords`` kept
    in the order given."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    out: list[str] = []
    seen: set[str] = set()
    for chunk in words:
        for word in chunk.split(","):
            word = word.strip().strip(".;:!?\"'()[]{}").strip()
            key = word.lower()
            if len(word) < 3 or key in ENGLISH_STOP_WORDS or key in seen:
                continue
            if key.replace(".", "", 1).replace("-", "", 1).isdigit():
                continue
            seen.add(key)
            out.append(word)
            if len(out) == max_keywords:
                return out
    return out
