"""A keyword extractor for tests that counts what it is asked: the genres extractor, logging one line
per item it is called on to ``extractor_calls.log`` beside the run's output root (appends of one
short line are atomic, so several actors can share the file)."""

from __future__ import annotations

import os
from typing import Any

from thinkrec.keywords.base import ItemText
from thinkrec.keywords.genres import GenresExtractor


class CountingGenres(GenresExtractor):
    name = "counting-genres"

    def __init__(self, cfg: Any) -> None:
        self.log = os.path.join(os.path.dirname(cfg.storage.output_root), "extractor_calls.log")

    def __call__(self, items: list[ItemText]) -> list[list[str]]:
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for it in items:
                os.write(fd, f"{it.item_id}\n".encode())
        finally:
            os.close(fd)
        return super().__call__(items)


def calls(root: str) -> list[int]:
    path = os.path.join(os.path.dirname(root), "extractor_calls.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(x) for x in f.read().split()]
