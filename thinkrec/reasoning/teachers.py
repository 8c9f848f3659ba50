"""Teachers: backends that write a reasoning trace for each hard training sample.

A teacher is a callable class used with Ray Data's ``map_batches`` (the shape of Ray's batch
inference examples): ``__init__(cfg)`` loads whatever it needs once per actor (item table, model);
``__call__(batch)`` takes a pandas batch of hard samples (user_id, item_id, timestamp, label,
history_items, history_labels) and returns it with a ``reasoning`` column (the rationale only: the
training target is built as "Yes. <reasoning>" / "No. <reasoning>" by PromptBuilder.answer_ids) and a
``teacher`` column. A row the teacher cannot explain gets a non-null ``_reason`` (thinkrec.io.commit.REASON)
and goes to quarantine instead of being dropped.

Teachers are looked up by ``reason.teacher``: a name registered with ``@register("name")`` or a
``package.module:Class`` path, so a teacher can live outside thinkrec.

Plugging in an LLM teacher (the paper used QwQ-32B), e.g. with vLLM::

    @register("vllm")
    class VLLMTeacher:
        name = "vllm"

        def __init__(self, cfg):
            from vllm import LLM, SamplingParams
            self.items = load_items(cfg)                    # as GroundedTeacher does
            self.llm = LLM(cfg.reason.model, trust_remote_code=cfg.model.trust_remote_code)
            self.params = SamplingParams(max_tokens=512, temperature=0.6)
            self.label = f"vllm:{cfg.reason.model}"

        def __call__(self, batch):
            # 1. ask: history with liked/disliked labels + target -> "think, then answer Yes or No";
            # 2. for rows whose answer disagrees with the label, ask again with the correct answer
            #    and a (rotating) hint to reflect and re-analyse (the paper's reflect step);
            # 3. keep the final analysis; rows with no usable answer get _reason = "teacher_failed".
            ...
            return batch.assign(reasoning=texts, teacher=self.label)

and run it with ``reason.teacher=vllm reason.model=Qwen/QwQ-32B reason.num_gpus_per_actor=1
reason.concurrency=<GPUs>``: the stage gives each actor its GPUs and sizes the pool from
``reason.concurrency``; nothing else changes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import pandas as pd

from thinkrec.data import schema as S
from thinkrec.io.commit import REASON

# The registry lives below both the reason and explain stages (each looks teachers up by name).
from thinkrec.teachers import LAZY, TEACHERS, Teacher, get_teacher, register  # noqa: F401

UNKNOWN_ITEM = "unknown_item"
"""Quarantine reason: the target item is not in prepare/items."""


def item_noun(dataset: str) -> str:
    return "movie" if dataset.startswith("ml-") else "item"


def load_items(cfg: Any) -> dict[int, tuple[str, list[str]]]:
    """item_id -> (title, keywords) from the committed prepare/items table."""
    from thinkrec.data.items import read_items
    from thinkrec.io.fs import Storage

    storage = Storage.from_config(cfg)
    t = read_items(storage)
    return {
        int(i): (title or "", list(kw or []))
        for i, title, kw in zip(
            t.column(S.ITEM_ID).to_pylist(),
            t.column(S.TITLE).to_pylist(),
            t.column(S.KEYWORDS).to_pylist(),
            strict=True,
        )
    }


def _counts(counter: Counter[str], order: Sequence[str]) -> str:
    return ", ".join(f"{k} ({counter[k]})" for k in order if counter[k])


def _top(counter: Counter[str], order: Sequence[str]) -> str:
    """The most frequent keyword; ties go to the earlier one in ``order``."""
    return max((k for k in order if counter[k]), key=lambda k: (counter[k], -order.index(k)))


@register("grounded")
class GroundedTeacher:
    """A rationale written from the data, deterministic, no LLM.

    For a sample it states: how many of the shown history items the user liked and disliked; the
    target's keywords; how often each of those keywords occurs among the liked and among the
    disliked history items; which way that evidence leans (keyword matches with liked minus with
    disliked items, or the user's like rate when no keyword is shared); and a conclusion that matches
    the label. Like the paper's reflect step it is told the label: when the evidence leans the other
    way it says so and names what supports the label, if anything does. The conclusion is always
    the last sentence: "So the user would like it." or "So the user would not like it."
    """

    name: ClassVar[str] = "grounded (rule-based rationale from history, labels and keywords; no LLM)"
    MAX_TITLE = 30
    """Characters of a history title quoted as an example (the prompt already shows full titles)."""
    MAX_KEYWORDS = 4

    def __init__(self, cfg: Any, items: dict[int, tuple[str, list[str]]] | None = None) -> None:
        self.items = load_items(cfg) if items is None else items
        self.noun = item_noun(cfg.data.dataset)

    def rationale(
        self, item_id: int, label: int, history: Sequence[int], history_labels: Sequence[int]
    ) -> str:
        _, keywords = self.items[int(item_id)]
        kws = list(dict.fromkeys(keywords))[: self.MAX_KEYWORDS]
        liked_kw: Counter[str] = Counter()
        disliked_kw: Counter[str] = Counter()
        n_liked = n_disliked = 0
        liked_match: list[str] = []  # titles of liked items sharing a keyword (for one example)
        for h, lab in zip(history, history_labels, strict=True):
            h_title, h_kws = self.items.get(int(h), ("", []))
            # In the target's keyword order (never set order, which varies between processes).
            shared = [k for k in kws if k in h_kws]
            if lab:
                n_liked += 1
                liked_kw.update(shared)
                if shared and h_title:
                    liked_match.append(h_title[: self.MAX_TITLE].rstrip())
            else:
                n_disliked += 1
                disliked_kw.update(shared)
        n = n_liked + n_disliked
        noun = self.noun
        # Terse on purpose: the trace is a training target with a token budget
        # (train.max_answer_tokens), and the conclusion comes last.
        parts = [
            f"The user liked {n_liked} of their last {n} {noun}s."
            if n
            else f"The user rated no {noun}s before."
        ]
        pos, neg = sum(liked_kw.values()), sum(disliked_kw.values())
        if pos or neg:
            liked_s = _counts(liked_kw, kws) or "none"
            disliked_s = _counts(disliked_kw, kws) or "none"
            parts.append(f"Its keywords in liked ones: {liked_s}; in disliked ones: {disliked_s}.")
            lean = 1 if pos > neg else 0 if neg > pos else None
        else:
            named = f"its keywords ({', '.join(kws)})" if kws else "it (no keywords)"
            parts.append(
                f"No earlier {noun} shares {named}." if n else f"It is {', '.join(kws) or 'unlabelled'}."
            )
            lean = None
        if lean is None and n:
            lean = 1 if n_liked * 2 >= n else 0
        if lean == label or lean is None:
            if label and liked_match:
                parts.append(f'It resembles "{liked_match[-1]}", a liked one.')
        elif label:
            # Evidence leans negative, the user liked it: say what still supports liking it.
            if pos:
                parts.append(f"Yet liked ones share its {_top(liked_kw, kws)}.")
            elif n_liked:
                parts.append(f"Yet they liked {n_liked} of {n}, so a new one can still please them.")
            else:
                parts.append("The history argues against it, but their taste can extend to it.")
        else:
            # Evidence leans positive, the user disliked it: say what still argues against it.
            if neg:
                parts.append(f"Yet {_top(disliked_kw, kws)} {noun}s have disappointed them.")
            elif n_disliked:
                parts.append(f"Yet they disliked {n_disliked}, so they are selective.")
            else:
                parts.append("The history favours it, but this one falls short for them.")
        parts.append("So the user would like it." if label else "So the user would not like it.")
        return " ".join(parts)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts: list[str | None] = []
        reasons: list[str | None] = []
        for item, label, hist, hist_labels in zip(
            batch[S.ITEM_ID], batch[S.LABEL], batch[S.HISTORY_ITEMS], batch[S.HISTORY_LABELS], strict=True
        ):
            if int(item) not in self.items:
                texts.append(None)
                reasons.append(UNKNOWN_ITEM)
                continue
            texts.append(self.rationale(int(item), int(label), list(hist), list(hist_labels)))
            reasons.append(None)
        # object dtype keeps None as None (pandas' string dtype would turn it into NaN).
        return batch.assign(
            **{
                S.REASONING: pd.Series(texts, index=batch.index, dtype=object),
                S.TEACHER: self.name,
                REASON: pd.Series(reasons, index=batch.index, dtype=object),
            }
        )
