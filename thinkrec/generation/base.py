"""The generator interface every backend implements (beside ``scoring.base.Scorer``).

A generator gets a batch of requests (a text prompt, or an encoded prompt with CF slots, plus the
row's gate over [global, expert-0, ...]) and returns one result per request, in order. A request
that fails (after the backend's retries) comes back with ``error`` set and no text: the caller
quarantines it with that reason; a generator never raises for one bad row.

Every output row records what produced it (``Provenance``): backend, model, adapter label and a
hash of the decoding settings, so a rerun with other settings never reuses a stale cached text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from thinkrec.model.prompt import Encoded

_LATER_SETTINGS = (
    "first_token_ids",
    "after_first_ids",
    "min_new_tokens",
    "first_token_binary",
    "answer_temperature",
)
"""Decoding settings added after hashes were stored: left out of the hash at their defaults, so it is
as before."""


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of one generation stage (each stage has its own defaults)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # hf only; servers without it ignore it (recorded in the hash)
    num_beams: int = 1  # hf only
    # The first new token is one of these (the explain stage's Yes/No: an explanation states the
    # model's answer first, drawn from the answer tokens' logits as the score reads them). Empty: any.
    first_token_ids: tuple[int, ...] = ()
    # Tokens forced right after the first one (the explain stage's "." after the answer: only the
    # rationale samples' answers go on with it; the label-only ones end after the answer).
    after_first_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0  # no end of text before this many new tokens
    # With two first_token_ids (Yes, No): the first is drawn with probability sigmoid(logit / T) of
    # its own raw logit, the second's read as 0. The recommendation loss trains the Yes logit alone
    # (BCE), so this is the probability p_yes reports; the No logit, trained only by the LM term,
    # dwarfs it, and a draw between the two logits said "No" on every row.
    first_token_binary: bool = False
    # first_token_binary's draw at this temperature instead of ``temperature`` (when sampling; greedy
    # decoding answers greedily): an explanation's rationale can be sampled for variety while its
    # stated answer stays close to the score's decision. 0: the answer is Yes iff the Yes logit > 0.
    answer_temperature: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.first_token_binary and len(self.first_token_ids) != 2:
            raise ValueError(
                f"first_token_binary needs two first_token_ids, got {list(self.first_token_ids)}"
            )
        if self.answer_temperature is not None and self.answer_temperature < 0:
            raise ValueError(f"answer_temperature must be >= 0, got {self.answer_temperature}")

    def answer_draw_temperature(self) -> float:
        """The temperature of first_token_binary's draw: 0 (greedy) when decoding is greedy."""
        if self.temperature <= 0:
            return 0.0
        return self.temperature if self.answer_temperature is None else self.answer_temperature

    def hash(self) -> str:
        """Short content hash of the settings, recorded on every output row and in the cache key."""
        d = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for k in _LATER_SETTINGS:
            if d[k] == defaults[k]:
                del d[k]
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class GenRequest:
    key: str  # the caller's row key (e.g. "user_id:item_id"), echoed back for joins
    prompt: str = ""  # text prompt (used when ``encoded`` is None)
    encoded: Encoded | None = None  # token ids with CF slots (hf, vllm only)
    gate: np.ndarray | None = None  # (1 + N,) weights over [global, expert-0, ...]; None: base model
    adapter: str = "base"  # label recorded with the output ("global", "expert-2", "mix", "base")


@dataclass
class GenResult:
    key: str
    text: str | None  # None when ``error`` is set
    error: str | None = None  # quarantine reason, e.g. "http_500 after 4 tries: ..."
    tries: int = 1  # requests sent for this row (0: served from the prompt cache)
    new_tokens: int = 0
    cached: bool = False  # served from the prompt-hash cache (generation/cache.py), no generation
    token_ids: list[int] | None = None  # the new tokens, where the backend has them (vllm)


@dataclass(frozen=True)
class Provenance:
    backend: str
    model: str
    decoding_hash: str
    extra: dict[str, Any] = field(default_factory=dict)


class Generator(Protocol):
    name: str  # backend name: "hf", "vllm", "openai"
    model: str  # what generated: a model path or a served model name

    def generate(self, requests: list[GenRequest], decoding: Decoding) -> list[GenResult]:
        """One result per request, in the order of ``requests``."""
        ...


def prompt_hash(request: GenRequest, model: str, decoding: Decoding) -> str:
    """Cache key of one request: the prompt (text or ids + CF slots), its gate, the model and decoding."""
    h = hashlib.sha256()
    h.update(model.encode())
    h.update(decoding.hash().encode())
    h.update(request.prompt.encode())
    if request.encoded is not None:
        h.update(np.asarray(request.encoded.ids, dtype=np.int64).tobytes())
        h.update(np.asarray(request.encoded.cf_id, dtype=np.int64).tobytes())
    if request.gate is not None:
        h.update(np.round(np.asarray(request.gate, dtype=np.float64), 6).tobytes())
    return h.hexdigest()


def make_generator(cfg: Any) -> Generator:
    """The configured backend (imported lazily: vllm and torch are heavy)."""
    backend = cfg.generation.backend
    if backend == "openai":
        from thinkrec.generation.openai import OpenAIGenerator

        return OpenAIGenerator(cfg)
    if backend == "hf":
        from thinkrec.generation.hf import HFGenerator

        return HFGenerator(cfg)
    if backend == "vllm":
        from thinkrec.generation.vllm import VLLMGenerator

        return VLLMGenerator(cfg)
    raise ValueError(f"generation.backend={backend!r}: expected hf, vllm or openai")
