"""The ``llm`` keyword extractor: an LLM summarises each item's description into keywords.

The reference's shape (REFERENCE.md, stage 1): the item's title and description fields go into one
prompt asking for up to ten comma-separated keywords; decoding is beam search with at most 32 new
tokens and repetition penalty 1.2. The reply is split at commas and given to ``postprocess`` by the
keywords stage, which also caches by a hash of the text and ``settings()``.
"""

from __future__ import annotations

from typing import Any

from thinkrec.generation.base import Decoding, GenRequest, make_generator
from thinkrec.keywords.base import ItemText

PROMPT = (
    "Summarise the item below in at most ten keywords, separated by commas.\n"
    "Title: {title}\nDescription: {text}\nKeywords:"
)
# The reference decoding: beam search (4 beams on the hf backend; servers decode greedily, recorded in
# the settings hash through the backend name), at most 32 new tokens, repetition penalty 1.2.
DECODING = Decoding(max_new_tokens=32, temperature=0.0, repetition_penalty=1.2, num_beams=4)


class LLMExtractor:
    """``Extractor`` over the configured generator (``generation.*``)."""

    name = "llm"

    def __init__(self, cfg: Any, generator: Any = None) -> None:
        self.gen = generator or make_generator(cfg)

    def settings(self) -> dict[str, Any]:
        return {
            "backend": self.gen.name,
            "model": self.gen.model,
            "prompt": PROMPT,
            "decoding": DECODING.hash(),
        }

    def __call__(self, items: list[ItemText]) -> list[list[str]]:
        reqs = [GenRequest(str(it.item_id), PROMPT.format(title=it.title, text=it.text)) for it in items]
        out = []
        for r in self.gen.generate(reqs, DECODING):
            # A failed row yields no keywords (the item keeps its title); the stage counts empties.
            text = (r.text or "").split("\n", 1)[0]
            out.append([w.strip() for w in text.split(",") if w.strip()])
        return out
