"""The ``genres`` keyword extractor: MovieLens items' keywords are their genres (REFERENCE.md; no
model). The genres come from the source through prepare/items."""

from __future__ import annotations

from typing import Any

from thinkrec.keywords.base import ItemText


class GenresExtractor:
    name = "genres"

    def __init__(self, cfg: Any = None) -> None:
        pass

    def settings(self) -> dict[str, Any]:
        return {"extractor": self.name, "version": 1}

    def __call__(self, items: list[ItemText]) -> list[list[str]]:
        return [list(it.tags) for it in items]
