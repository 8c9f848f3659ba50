"""The ``llm`` keyword extractor: an LLM summarises each item's description into keywords.

The reference's shape (REFERENCE.md, stage 1): the item's title and description fields go into one
prompt asking for up to ten comma-separated keywords; decoding is beam search with at most 32 new
tokens and repetition penalty 1.2 (``keywords.llm_*``). The reply is split at commas and given to
``postprocess`` by the keywords stage, which also caches by a hash of the text and ``settings()``;
an item whose generation failed comes back as ``Failed`` (quarantined by the stage, never cached).

Below that, every prompt goes through the prompt-hash cache (``cache/keywords``,
generation/cache.py), so a rerun or an item text met again costs no generation whatever the stage
around the extractor does. ``settings()`` names what produced the keywords (backend, model, adapter,
decoding hash, prompt) and ``label`` puts the same in one string for the stage to store on each row.
"""

from __future__ import annotations

from typing import Any

from thinkrec.generation.base import Decoding, GenRequest, make_generator
from thinkrec.generation.cache import CachedGenerator
from thinkrec.io.fs import Storage
from thinkrec.keywords.base import Failed, ItemText

PROMPT = (
    "Summarise the item below in at most ten keywords, separated by commas.\n"
    "Title: {title}\nDescription: {text}\nKeywords:"
)
CACHE = "cache/keywords"
ADAPTER = "base"  # the summariser is used as it is


class LLMExtractor:
    """``Extractor`` over the configured generator (``generation.*``), behind the prompt cache."""

    name = "llm"

    def __init__(self, cfg: Any, generator: Any = None) -> None:
        self.gen = CachedGenerator(
            generator or make_generator(cfg), Storage.from_config(cfg), CACHE, enabled=cfg.generation.cache
        )
        k = cfg.keywords
        # Beam search is greedy at temperature 0; the defaults are the reference decoding.
        self.decoding = Decoding(
            max_new_tokens=k.llm_max_new_tokens,
            temperature=0.0,
            repetition_penalty=k.llm_repetition_penalty,
            num_beams=k.llm_num_beams,
        )

    def settings(self) -> dict[str, Any]:
        return {
            "backend": self.gen.name,
            "model": self.gen.model,
            "adapter": ADAPTER,
            "prompt": PROMPT,
            "decoding": self.decoding.hash(),
        }

    @property
    def label(self) -> str:
        """What produced the keywords, for each output row: ``llm:<backend>:<model>:<adapter>:<decoding hash>``."""
        return f"llm:{self.gen.name}:{self.gen.model}:{ADAPTER}:{self.decoding.hash()}"

    def __call__(self, items: list[ItemText]) -> list[list[str] | Failed]:
        reqs = [GenRequest(str(it.item_id), PROMPT.format(title=it.title, text=it.text)) for it in items]
        out: list[list[str] | Failed] = []
        for r in self.gen.generate(reqs, self.decoding):
            if r.error is not None:
                out.append(Failed(r.error))
                continue
            text = (r.text or "").split("\n", 1)[0]
            out.append([w.strip() for w in text.split(",") if w.strip()])
        return out
