"""``reason.teacher=llm``: an LLM teacher over the generation interface, with the paper's reflect step.

For each hard sample the teacher model is asked the reasoning question with the user's labelled
history and must end with "Answer: Yes" or "Answer: No". ``<think>...</think>`` blocks are stripped
or kept (``reason.think_blocks``). When the answer disagrees with the label (or there is none), a
reflection turn gives the correct answer in one of several rotating hint phrasings and asks for a
re-analysis, at most ``reason.max_reflections`` times. A trace is dropped to quarantine, with its
reason, when it still disagrees, leaks the hint, is empty or is over the token budget
(``train.max_answer_tokens`` of the student's tokenizer: the trace is a training target).

Every turn goes through the prompt-hash cache (``cache/reason``, generation/cache.py): a rerun, or a
question met again, is answered without generating. Each row records backend, model, adapter
("base") and the decoding hash; ``GENERATED`` / ``CACHED`` count the turns per row that went to the
backend / came from the cache (the reason stage sums them into its manifest).

The stored ``reasoning`` is the rationale only; the training target "Yes. <reasoning>" /
"No. <reasoning>" is built from it by PromptBuilder.answer_ids, as for every teacher.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from thinkrec.data import schema as S
from thinkrec.generation.base import Decoding, GenRequest, make_generator
from thinkrec.generation.cache import CachedGenerator
from thinkrec.io.commit import REASON
from thinkrec.io.fs import Storage
from thinkrec.reasoning.teachers import UNKNOWN_ITEM, item_noun, load_items, register

DISAGREES = "teacher_disagrees"
NO_ANSWER = "teacher_no_answer"
HINT_LEAK = "hint_leak"
EMPTY = "empty_trace"
OVER_BUDGET = "over_token_budget"
GEN_FAILED = "generation_failed"

CACHE = "cache/reason"
GENERATED = "_turns_generated"
CACHED = "_turns_cached"
"""Per-row counters of the teacher's output (not stored): turns sent to the backend / served cached."""
ADAPTER = "base"  # the teacher model is used as it is

HINTS: tuple[str, ...] = (
    "In fact the user {verdict} this {noun}. Look at the history again and explain why.",
    "Reconsider: this user {verdict} it. Re-analyse their history step by step.",
    "Your conclusion does not match what happened: the user {verdict} this {noun}. Think it over again.",
)
"""Reflection hints, rotated per sample and per turn (the paper varies the phrasing)."""

# Phrases a trace must not contain: it would teach the student to cite an answer it is never given.
LEAK_PATTERNS = re.compile(
    r"correct answer|the answer (is|was)|as (i was|you) (told|said)|\bhint\b|i was told|"
    r"we are told|(user|they) (in fact|actually) (liked|did not like|disliked)|"
    r"in fact the user (liked|did not like)|this user (liked|did not like) it|"
    r"does not match what happened|reconsider:|look at the history again|think it over again",
    re.IGNORECASE,
)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"answer\s*[:\-]\s*\**\s*(yes|no)\b", re.IGNORECASE)


def split_think(text: str, mode: str) -> str:
    """The text with ``<think>`` blocks removed (``strip``) or unwrapped into the text (``keep``).
    An unclosed ``<think>`` (the budget ran out mid-thought) leaves nothing after it."""
    keep = mode == "keep"
    out = _THINK.sub(lambda m: m.group(1).strip() + "\n" if keep else "", text)
    head, sep, _ = out.partition("<think>")
    return head.strip() if sep else out.strip()


def parse_answer(text: str) -> tuple[int | None, str]:
    """(label 1/0 or None, the rationale without the answer line) from a teacher's reply."""
    matches = list(_ANSWER.finditer(text))
    if not matches:
        return None, text.strip()
    m = matches[-1]
    label = 1 if m.group(1).lower() == "yes" else 0
    rationale = (text[: m.start()] + text[m.end() :]).strip().rstrip("*").strip()
    return label, rationale


def leaks_hint(trace: str) -> bool:
    return bool(LEAK_PATTERNS.search(trace))


def hint(label: int, noun: str, turn: int, row: int) -> str:
    verdict = "liked" if label else "did not like"
    return HINTS[(row + turn) % len(HINTS)].format(verdict=verdict, noun=noun)


@register("llm")
class LLMTeacher:
    """A teacher that asks an LLM (``generation.backend``; ``reason.model`` or ``generation.model``)."""

    name: ClassVar[str] = "llm"

    def __init__(
        self, cfg: Any, items: dict[int, tuple[str, list[str]]] | None = None, generator: Any = None
    ) -> None:
        from thinkrec.model.base import load_tokenizer

        self.cfg = cfg
        self.items = load_items(cfg) if items is None else items
        self.noun = item_noun(cfg.data.dataset)
        if generator is None:
            # ``reason.model`` names the teacher model; else ``generation.model`` (else model.base).
            gcfg = cfg
            if cfg.reason.model:
                gcfg = dataclasses.replace(
                    cfg, generation=dataclasses.replace(cfg.generation, model=cfg.reason.model)
                )
            generator = make_generator(gcfg)
        self.gen = CachedGenerator(generator, Storage.from_config(cfg), CACHE, enabled=cfg.generation.cache)
        r = cfg.reason
        self.decoding = Decoding(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, repetition_penalty=1.0, seed=cfg.seed
        )
        self.budget = int(cfg.train.max_answer_tokens)
        self.student_tok = load_tokenizer(cfg.model.base, cfg.model.trust_remote_code)
        self.label = f"llm:{self.gen.name}:{self.gen.model}"
        self.stats = {"reflections": 0}
        self.turns: list[tuple[int, int]] = []  # per row of the last traces() call: (generated, cached)

    def question(self, item: int, history: Sequence[int], labels: Sequence[int]) -> str:
        lines = []
        for h, lab in zip(history, labels, strict=True):
            title, kws = self.items.get(int(h), (f"{self.noun} {h}", []))
            extra = f" ({', '.join(kws[:4])})" if kws else ""
            lines.append(f"- {title}{extra}: {'liked' if lab else 'disliked'}")
        title, kws = self.items[int(item)]
        extra = f" ({', '.join(kws[:4])})" if kws else ""
        hist = "\n".join(lines) or "(no earlier ratings)"
        return (
            f"A user rated these {self.noun}s:\n{hist}\n\nWould the user like the {self.noun} "
            f'"{title}"{extra}? Reason about their taste step by step, then end with '
            '"Answer: Yes" or "Answer: No".\n'
        )

    def traces(
        self, rows: list[tuple[int, int, list[int], list[int]]]
    ) -> list[tuple[str | None, str | None]]:
        """(rationale, None) or (None, quarantine reason) per (item, label, history, labels) row."""
        mode = self.cfg.reason.think_blocks
        convo = [self.question(i, h, hl) for i, _, h, hl in rows]
        # The hint rotation starts at a point fixed by the question, not by the row's place in its
        # batch: the same sample gets the same reflection prompts (and cache hits) however Ray
        # Data batches the rows.
        start = [zlib.crc32(q.encode()) for q in convo]
        out: list[tuple[str | None, str | None] | None] = [None] * len(rows)
        pending = list(range(len(rows)))
        last: dict[int, tuple[int | None, str]] = {}
        turns = [[0, 0] for _ in rows]
        for turn in range(self.cfg.reason.max_reflections + 1):
            if not pending:
                break
            res = self.gen.generate([GenRequest(str(k), convo[k]) for k in pending], self.decoding)
            again = []
            for k, r in zip(pending, res, strict=True):
                turns[k][1 if r.cached else 0] += 1
                if r.error is not None:
                    out[k] = (None, f"{GEN_FAILED}: {r.error}")
                    continue
                label, rationale = parse_answer(split_think(r.text or "", mode))
                last[k] = (label, rationale)
                if label == rows[k][1]:
                    out[k] = self._check(rationale)
                    continue
                again.append(k)
                # The reflection turn: the conversation so far, then the rotating hint.
                convo[k] = f"{convo[k]}{r.text}\n\n{hint(rows[k][1], self.noun, turn, start[k])}\n"
            if turn < self.cfg.reason.max_reflections:
                self.stats["reflections"] += len(again)
            pending = again
        for k in pending:
            out[k] = (None, NO_ANSWER if last.get(k, (None, ""))[0] is None else DISAGREES)
        self.turns = [(g, c) for g, c in turns]
        return [o if o is not None else (None, NO_ANSWER) for o in out]

    def _check(self, rationale: str) -> tuple[str | None, str | None]:
        text = rationale.strip()
        if not text:
            return None, EMPTY
        if leaks_hint(text):
            return None, HINT_LEAK
        if len(self.student_tok(text, add_special_tokens=False)["input_ids"]) > self.budget:
            return None, OVER_BUDGET
        return text, None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows, idx = [], []
        texts: list[str | None] = [None] * len(batch)
        reasons: list[str | None] = [None] * len(batch)
        for n, (item, label, hist, hl) in enumerate(
            zip(
                batch[S.ITEM_ID], batch[S.LABEL], batch[S.HISTORY_ITEMS], batch[S.HISTORY_LABELS], strict=True
            )
        ):
            if int(item) not in self.items:
                reasons[n] = UNKNOWN_ITEM
                continue
            rows.append((int(item), int(label), list(hist), list(hl)))
            idx.append(n)
        generated, cached = np.zeros(len(batch), np.int64), np.zeros(len(batch), np.int64)
        for n, (text, why), (g, c) in zip(idx, self.traces(rows), self.turns, strict=True):
            texts[n], reasons[n] = text, why
            generated[n], cached[n] = g, c
        return batch.assign(
            **{
                S.REASONING: pd.Series(texts, index=batch.index, dtype=object),
                S.TEACHER: self.label,
                S.BACKEND: self.gen.name,
                S.GEN_MODEL: self.gen.model,
                S.ADAPTER: ADAPTER,
                S.DECODING_HASH: self.decoding.hash(),
                REASON: pd.Series(reasons, index=batch.index, dtype=object),
                GENERATED: generated,
                CACHED: cached,
            }
        )
