"""The one prompt builder, used by training, scoring and explanation alike (train/serve skew is a bug).

Layout: everything user-specific first (instruction, history, the user's CF token), the candidate
item last, so all of a user's candidates share one token prefix:

    [template head] instruction / history lines ... / user <cf> | question, target line [template tail]
    \\_______________________ prefix (per user) ______________/   \\________ candidate (per pair) _______/

The target line comes last, right before the answer position, so the tokens that decide the answer
(the target's title, keywords and CF token) are the nearest ones to it; the user's CF token, which
carries the history's summary (``model.cf_history``), ends the prefix, a few tokens before them. With
the user's token before the history instead (300 tokens from the answer), the tiny random base read
it barely: the demo's ThinkRec AUC was 0.686 against 0.697 (seed 0, bench/results/demo-tuning-cpu.md).

The prefix and the candidate part are tokenized separately (and always so), which makes
``prefix_ids + cand_ids`` the exact token sequence in every code path, and lets the HF scorer reuse
the prefix's key/value cache and vLLM's prefix cache hit. CF slots are positions whose token
embedding is overwritten by the projected CF embedding of a user or an item; their token id is a
placeholder (the pad token) that is never looked up meaningfully.

The answer follows the candidate part: " Yes"/" No" (plain prompts, after "Answer:") or "Yes"/"No"
(chat template, at the start of the assistant turn), optionally ". <reasoning>", then EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CF_USER = 0
CF_ITEM = 1
# A history item's slot also says whether the user liked it: the item's CF vector either way, and the
# label for the user token's history summary (``thinkrec.model.thinkrec.with_history``).
CF_LIKED = 2
CF_DISLIKED = 3
_SLOT = "\x00"  # marks a CF slot in the text before tokenization
_SPLIT = "\x01"  # marks the prefix/candidate boundary inside a chat template


@dataclass(frozen=True)
class ItemInfo:
    title: str
    keywords: Sequence[str] = ()


@dataclass
class Encoded:
    """Token ids with CF slots. Slot positions are relative to the start of their own part."""

    ids: list[int]
    cf_pos: list[int] = field(default_factory=list)
    cf_kind: list[int] = field(default_factory=list)  # CF_USER, CF_ITEM, CF_LIKED or CF_DISLIKED
    cf_id: list[int] = field(default_factory=list)  # user_id or item_id

    def __add__(self, other: Encoded) -> Encoded:
        n = len(self.ids)
        return Encoded(
            self.ids + other.ids,
            self.cf_pos + [p + n for p in other.cf_pos],
            self.cf_kind + other.cf_kind,
            self.cf_id + other.cf_id,
        )


class PromptBuilder:
    """Builds the prefix for a user and the candidate part for an item, as token ids with CF slots."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        cf_tokens: bool = True,
        use_chat_template: bool = False,
        item_noun: str = "movie",
        max_title_chars: int = 60,
    ) -> None:
        self.tok = tokenizer
        # A fast tokenizer's Rust backend, called directly on a prompt's pieces: the same ids as the
        # tokenizer's own call (tests/test_train.py), without converting each piece's encoding.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.cf_tokens = cf_tokens
        self.use_chat_template = use_chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.noun = item_noun
        self.max_title_chars = max_title_chars
        self.placeholder_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if self.use_chat_template:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _SPLIT}], tokenize=False, add_generation_prompt=True
            )
            self.head, self.tail = rendered.split(_SPLIT)
            self.answer_lead = ""
        else:
            self.head, self.tail = "", ""
            self.answer_lead = " "
        # BOS: plain prompts get it only if the tokenizer adds one itself (Llama yes, Qwen no); chat
        # templates that need one spell it in the template text.
        probe = tokenizer("a", add_special_tokens=True).input_ids
        bos = tokenizer.bos_token_id
        self.bos = (
            [bos] if (not self.use_chat_template and bos is not None and probe and probe[0] == bos) else []
        )
        self.yes_id = self._single_token(self.answer_lead + "Yes")
        self.no_id = self._single_token(self.answer_lead + "No")
        # What comes between the answer token and a rationale in answer_ids (". " + reasoning).
        self.separator_ids = tuple(self.tok(". x", add_special_tokens=False).input_ids[:-1])

    def _single_token(self, text: str) -> int:
        ids = self.tok(text, add_special_tokens=False).input_ids
        return ids[0]

    # -- text ----------------------------------------------------------------------------------
    def _item_text(self, item: ItemInfo) -> str:
        title = item.title[: self.max_title_chars]
        kw = ", ".join(list(item.keywords)[:10])
        slot = f" {_SLOT}" if self.cf_tokens else ""
        return f'"{title}"{slot} [{kw}]'

    def prefix_text(self, history: Sequence[tuple[ItemInfo, int]]) -> str:
        user = f"User: {_SLOT}\n" if self.cf_tokens else ""
        lines = [
            f"Given a user's history of {self.noun}s, each marked with whether the user liked it, decide "
            f"whether the user will like the target {self.noun}. Answer Yes or No, then explain briefly.\n",
            "History:\n" if history else "History: none\n",
        ]
        for item, label in history:
            lines.append(f"- {self._item_text(item)}: {'Yes' if label else 'No'}\n")
        lines.append(user)
        return self.head + "".join(lines)

    def candidate_text(self, item: ItemInfo) -> str:
        # The question comes before the target so the target's text and CF token sit right before
        # the answer position: the few tokens after the history that the answer must attend to.
        return (
            f"Will the user like the target {self.noun}?\nTarget: {self._item_text(item)}\nAnswer:"
            + self.tail
        )

    # -- tokens --------------------------------------------------------------------------------
    def _encode(self, text: str, entities: list[tuple[int, int]]) -> Encoded:
        pieces = text.split(_SLOT)
        assert len(pieces) == len(entities) + 1, "one entity per CF slot"
        enc = Encoded([])
        # All pieces in one tokenizer call: the same ids as one call per piece (each piece is
        # tokenized on its own either way), without the per-call overhead twelve times a prefix.
        ids = iter(self.encode_texts([p for p in pieces if p]))
        for i, piece in enumerate(pieces):
            if piece:
                enc.ids.extend(next(ids))
            if i < len(entities):
                enc.cf_pos.append(len(enc.ids))
                enc.cf_kind.append(entities[i][0])
                enc.cf_id.append(entities[i][1])
                enc.ids.append(self.placeholder_id)
        return enc

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        if not texts:
            return []
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False).input_ids

    def encode_prefix(self, user_id: int, history: Sequence[tuple[int, ItemInfo, int]]) -> Encoded:
        """history: (item_id, info, label) oldest first."""
        ents = []
        if self.cf_tokens:
            ents = [(CF_LIKED if label else CF_DISLIKED, item_id) for item_id, _, label in history]
            ents.append((CF_USER, user_id))
        enc = self._encode(self.prefix_text([(info, label) for _, info, label in history]), ents)
        return Encoded(self.bos + enc.ids, [p + len(self.bos) for p in enc.cf_pos], enc.cf_kind, enc.cf_id)

    def encode_candidate(self, item_id: int, item: ItemInfo) -> Encoded:
        ents = [(CF_ITEM, item_id)] if self.cf_tokens else []
        return self._encode(self.candidate_text(item), ents)

    def answer_ids(self, label: int, reasoning: str | None = None, max_tokens: int = 64) -> list[int]:
        """Target tokens: the Yes/No token first (its logit is the recommendation score), then
        ". <reasoning>" when given, cut to the token budget, then EOS."""
        first = self.yes_id if label else self.no_id
        rest: list[int] = []
        if reasoning:
            rest = self.tok(". " + reasoning.strip(), add_special_tokens=False).input_ids
        eos = self.tok.eos_token_id
        return ([first] + rest)[: max(1, max_tokens - 1)] + ([eos] if eos is not None else [])
