"""The keyword-extractor interface shared by every extractor (genres, tfidf, llm).

An extractor maps item texts to raw keywords; ``postprocess`` applies the reference rules to them.
The keywords stage caches results by a hash of each item's text and ``settings()``, so an extractor's
settings must name everything that changes its output.

An extractor class is built as ``Cls(cfg)`` inside each actor of the stage's pool. One that must
see every item first (tfidf's document frequencies) also has a classmethod ``fit(cfg, texts)``
over a Ray Dataset of item texts, whose small result is given to every actor as
``Cls(cfg, state=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

EXTRACTORS: dict[str, str] = {
    "genres": "thinkrec.keywords.genres:GenresExtractor",
    "tfidf": "thinkrec.keywords.tfidf:TfidfExtractor",
    "llm": "thinkrec.keywords.llm:LLMExtractor",
}
"""Registered extractor name -> ``module:Class``; a class is built as ``Cls(cfg)``."""


def extractor_name(cfg: Any) -> str:
    """keywords.extractor with ``auto`` resolved: the genres for MovieLens, tfidf elsewhere."""
    name = cfg.keywords.extractor
    if name == "auto":
        return "genres" if cfg.data.dataset.startswith("ml-") else "tfidf"
    return name


def extractor_class(name: str) -> type:
    """A registered name or ``package.module:Class``."""
    import importlib

    target = EXTRACTORS.get(name, name)
    if ":" not in target:
        raise ValueError(f"keywords.extractor={name!r}: expected one of {sorted(EXTRACTORS)} or module:Class")
    module, cls = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"keywords.extractor={name!r}: cannot load {target} ({err})") from err


def cut_words(text: str, max_words: int) -> str:
    """The first ``max_words`` whitespace-separated words (REFERENCE.md: description fields, 100)."""
    return " ".join(text.split()[:max_words])


@dataclass(frozen=True)
class ItemText:
    item_id: int
    title: str
    text: str
    """The item's description fields, joined (each already cut to the configured word limit)."""
    tags: tuple[str, ...] = ()
    """The keywords the source ships (MovieLens genres, Amazon and Yelp categories)."""


@dataclass(frozen=True)
class Failed:
    """An extractor's result for an item it could not process (an LLM call that failed all its
    tries): the stage quarantines the item with ``error`` and caches nothing for it, so a rebuilt
    table asks again."""

    error: str


class Extractor(Protocol):
    name: str

    def settings(self) -> dict[str, Any]:
        """Everything that changes the output; hashed with the item's text for the cache key."""
        ...

    def __call__(self, items: list[ItemText]) -> list[list[str] | Failed]:
        """Raw keywords per item, in the order given (``Failed`` for an item that got none)."""
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
