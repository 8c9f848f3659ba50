"""The ``llm`` keyword extractor: an LLM summarises each item's description into keywords.

The reference's shape (REFERENCE.md, stage 1): the item's title and description fields go into one
prompt asking for up to ten comma-separated keywords; decoding is beam search with at most 32 new
tokens and repetition penalty 1.2. The reply is split at commas and given to ``postprocess`` by the
keywords stage, which also caches by a hash of the text and ``settings()``.

Below that, every prompt goes through the prompt-hash cache (``cache/keywords``,
generation/cache.py), so a rerun or an item text met again costs no generation whatever the stage
around the extractor does. ``settings()`` names what produced the keywords (backend, model, adapter,
decoding hash, prompt): the stage records it with its rows.
"""

from __future__ import annotations

from typing import Any

from thinkrec.generation.base import Decoding, GenRequest, make_generator
from thinkrec.generation.cache import CachedGenerator
from thinkrec.io.fs import Storage
from thinkrec.keywords.base import ItemText

PROMPT = (
    "Summarise the item below in at most ten keywords, separated by commas.\n"
    "Title: {title}\nDescription: {text}\nKeywords:"
)
# The reference decoding: beam search (4 beams on the hf backend; vLLM and servers decode greedily,
# recorded through the backend name), at most 32 new tokens, repetition penalty 1.2.
DECODING = Decoding(max_new_tokens=32, temperature=0.0, repetition_penalty=1.2, num_beams=4)
CACHE = "cache/keywords"
ADAPTER = "base"  # the summariser is used as it is


class LLMExtractor:
    """``Extractor`` over the configured generator (``generation.*``), behind the prompt cache."""

    name = "llm"

    def __init__(self, cfg: Any, generator: Any = None) -> None:
        self.gen = CachedGenerator(
            generator or make_generator(cfg), Storage.from_config(cfg), CACHE, enabled=cfg.generation.cache
        )
        self.failed = 0  # rows the generator failed (they get no keywords; the item keeps its title)

    def settings(self) -> dict[str, Any]:
        return {
            "backend": self.gen.name,
            "model": self.gen.model,
            "adapter": ADAPTER,
            "prompt": PROMPT,
            "decoding": DECODING.hash(),
        }

    def __call__(self, items: list[ItemText]) -> list[list[str]]:
        reqs = [GenRequest(str(it.item_id), PROMPT.format(title=it.title, text=it.text)) for it in items]
        out = []
        for r in self.gen.generate(reqs, DECODING):
            self.failed += r.error is not None
            text = (r.text or "").split("\n", 1)[0]
            out.append([w.strip() for w in text.split(",") if w.strip()])
        return out
