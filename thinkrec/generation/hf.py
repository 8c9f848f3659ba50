"""The ``hf`` generation backend: batched ``generate`` in the actor, left padding, fused per-row gates.

- Prompts are left-padded (decoder-only generation continues at the last position of every row).
- With trained artifacts, the K adapters [global, expert-0, ...] are installed as one fused LoRA per
  target layer (scoring/engine/fused_lora.py, the same layers the scorer uses) and each row's gate mixes
  them for every generated token; under beam search each row's gate is repeated for its beams.
- Encoded prompts (token ids with CF slots) go in as ``inputs_embeds`` with the projected CF
  embeddings in their slots, left-padded the same way.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from thinkrec.generation.base import Decoding, GenRequest, GenResult
from thinkrec.model.base import load_model, load_tokenizer
from thinkrec.model.thinkrec import CFProjector, CFTable, collate, input_embeddings
from thinkrec.scoring.base import Artifacts
from thinkrec.scoring.engine import fused_lora


class HFGenerator:
    """``Generator`` over a Hugging Face causal LM, optionally with fused per-row LoRA experts."""

    name = "hf"

    def __init__(self, cfg: Any, artifacts: Artifacts | None = None, device: str | None = None) -> None:
        g = cfg.generation
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if g.torch_threads and self.device == "cpu":
            torch.set_num_threads(g.torch_threads)
        self.model = artifacts.base_model if artifacts else (g.model or cfg.model.base)
        self.batch_size = int(g.batch_size)
        lm = load_model(self.model, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                        device=self.device)  # fmt: skip
        self.lm = lm.eval().requires_grad_(False)
        self.tok = load_tokenizer(self.model, cfg.model.trust_remote_code)
        self.tok.padding_side = "left"
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.fused: fused_lora.FusedLoRA | None = None
        self.projector: CFProjector | None = None
        self.cf: CFTable | None = None
        if artifacts is not None:
            mode: fused_lora.GateMode = "linear" if cfg.fusion.mode == "linear" else "exact"
            dirs = [os.path.join(artifacts.adapters_dir, n) for n in artifacts.adapter_names]
            self.fused = fused_lora.install(self.lm, dirs, mode)
            if artifacts.projector and artifacts.cf_embeddings:
                self.projector = CFProjector.load(artifacts.projector).to(self.device).eval()
                self.cf = CFTable.load(artifacts.cf_embeddings)

    def generate(self, requests: list[GenRequest], decoding: Decoding) -> list[GenResult]:
        out: list[GenResult] = []
        for s in range(0, len(requests), self.batch_size):
            out.extend(self._batch(requests[s : s + self.batch_size], decoding))
        return out

    def _kwargs(self, d: Decoding, width: int) -> dict[str, Any]:
        from transformers import (
            LogitsProcessorList,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
        )

        processors: list[Any] = []
        penalty = d.repetition_penalty
        if d.first_token_binary and penalty != 1.0:
            # The answer is drawn from the raw logits, as the score reads them: generate() applies its
            # own penalty before any processor of ours, so it is applied here, from the second token.
            processors.append(_AfterFirst(RepetitionPenaltyLogitsProcessor(penalty), width))
            penalty = 1.0
        if d.first_token_ids:
            processors.append(
                _FirstTokenAmong(
                    d.first_token_ids,
                    width,
                    d.after_first_ids,
                    d.first_token_binary,
                    d.answer_draw_temperature() / d.temperature if d.temperature > 0 else 1.0,
                )
            )
        if d.no_repeat_ngram_size:
            processors.append(_NewTokensOnly(NoRepeatNGramLogitsProcessor(d.no_repeat_ngram_size), width))
        kw: dict[str, Any] = dict(
            max_new_tokens=d.max_new_tokens,
            min_new_tokens=d.min_new_tokens or None,
            num_beams=d.num_beams,
            repetition_penalty=penalty,
            logits_processor=LogitsProcessorList(processors),
            pad_token_id=self.pad_id,
        )
        if d.temperature > 0:
            kw.update(do_sample=True, temperature=d.temperature, top_p=d.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _inputs(self, reqs: list[GenRequest]) -> tuple[dict[str, torch.Tensor], int]:
        """generate()'s inputs, left-padded, and the prompt width output ids start after (0 for embeds)."""
        if all(r.encoded is None for r in reqs):
            enc = self.tok(
                [r.prompt for r in reqs], return_tensors="pt", padding=True, add_special_tokens=False
            )
            ids = enc["input_ids"].to(self.device)  # (B, T)
            return {"input_ids": ids, "attention_mask": enc["attention_mask"].to(self.device)}, ids.shape[1]
        if any(r.encoded is None for r in reqs):
            raise ValueError("a batch mixes text and encoded prompts")
        batch = collate([r.encoded for r in reqs], self.pad_id)  # right-padded
        emb = input_embeddings(self.lm, batch, self.cf, self.projector)  # (B, T, H)
        mask = batch.attention_mask.to(emb.device)  # (B, T)
        T = emb.shape[1]
        # Right padding -> left padding: roll each row right by its padding width.
        for b, n in enumerate(batch.lengths.tolist()):
            emb[b] = torch.roll(emb[b], T - n, dims=0)
            mask[b] = torch.roll(mask[b], T - n, dims=0)
        return {"inputs_embeds": emb, "attention_mask": mask}, 0

    def _batch(self, reqs: list[GenRequest], d: Decoding) -> list[GenResult]:
        if not reqs:
            return []
        torch.manual_seed(d.seed)
        inputs, width = self._inputs(reqs)
        with torch.inference_mode():
            if self.fused is not None:
                gates = torch.as_tensor(np.stack([self._gate(r) for r in reqs]))  # (B, K)
                # generate() expands rows to B * num_beams, beams of one row adjacent.
                with self.fused.gates(gates.repeat_interleave(d.num_beams, dim=0)):
                    ids = self.lm.generate(**inputs, **self._kwargs(d, width))
            else:
                ids = self.lm.generate(**inputs, **self._kwargs(d, width))
        new = ids[:, width:]  # (B, new)
        out = []
        for r, row in zip(reqs, new.tolist(), strict=True):
            toks = [t for t in row if t != self.pad_id]
            out.append(GenResult(r.key, self.tok.decode(toks, skip_special_tokens=True), None, 1, len(toks)))
        return out

    def _gate(self, r: GenRequest) -> np.ndarray:
        assert self.fused is not None
        if r.gate is None:
            g = np.zeros(self.fused.k)
            g[0] = 1.0  # the global adapter
            return g
        if len(r.gate) != self.fused.k:
            raise ValueError(f"row {r.key}: gate over {len(r.gate)} adapters; the model has {self.fused.k}")
        return np.asarray(r.gate, dtype=np.float64)


class _NewTokensOnly:
    """A logits processor applied to the generated tokens alone, never the prompt's.

    generate() hands its processors the whole sequence when the prompt goes in as token ids, and only
    the new tokens when it goes in as embeddings (every prompt with CF slots). ``no_repeat_ngram_size``
    is meant per text ("no n-gram twice in one explanation"): over a text prompt, a rationale that
    quoted the prompt ("the user liked", a keyword list) was banned outright. vLLM has no such setting;
    its repetition penalty counts the prompt's tokens as hf's does, so that one is left as it is."""

    def __init__(self, processor: Any, width: int) -> None:
        self.processor, self.width = processor, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.processor(input_ids[:, self.width :], scores)


class _AfterFirst:
    """A logits processor left out at the first new token (``Decoding.first_token_binary``)."""

    def __init__(self, processor: Any, width: int) -> None:
        self.processor, self.width = processor, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores if input_ids.shape[1] == self.width else self.processor(input_ids, scores)


class _FirstTokenAmong:
    """The first new token is drawn among ``ids`` only, and ``then`` follows it
    (``Decoding.first_token_ids``, ``Decoding.after_first_ids``); with ``binary``, between the two ids
    with the second's logit read as 0, so P(first) = sigmoid(its logit / T) (temperature is applied
    after this processor; ``Decoding.first_token_binary``). ``ratio`` = the answer's temperature over
    the decoding's: the first id's logit is divided by it, so P(first) = sigmoid(logit / answer T);
    0 leaves the draw no choice (the first iff its logit > 0; ``Decoding.answer_temperature``)."""

    def __init__(
        self,
        ids: tuple[int, ...],
        width: int,
        then: tuple[int, ...] = (),
        binary: bool = False,
        ratio: float = 1.0,
    ) -> None:
        self.ids, self.width, self.then, self.binary = list(ids), width, list(then), binary
        self.ratio = ratio

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        if step > len(self.then):
            return scores
        allowed = self.ids if step == 0 else [self.then[step - 1]]
        out = torch.full_like(scores, float("-inf"))
        out[:, allowed] = scores[:, allowed]
        if step == 0 and self.binary:
            first, second = self.ids
            out[:, second] = 0.0
            if self.ratio == 0:
                yes = out[:, first] > 0  # no draw: the loser's logit is -inf
                out[:, first] = torch.where(yes, out[:, first], float("-inf"))
                out[:, second] = torch.where(yes, float("-inf"), 0.0)
            elif self.ratio != 1.0:
                out[:, first] = out[:, first] / self.ratio
        return out
