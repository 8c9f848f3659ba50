"""The Hugging Face scoring backend: one forward pass per pair, the answer position only.

- The base model is loaded once; the K adapters [global, expert-0, ...] are installed as one fused
  rank-K*r LoRA per target layer (fused_lora.py), and each row's gate mixes them exactly.
- No decoding: the final hidden state at the answer position (the prompt's last token) is projected
  onto the Yes and No rows of the output embedding only, ``h @ W[[yes, no]].T`` (2 dot products per
  row instead of a vocabulary-sized matmul). score = the Yes logit; p_yes = sigmoid(score) (``p_yes_of``).
- Full prompts run with ``use_cache=False`` (no key/value concatenation that plain scoring never reads)
  and without an attention mask (right padding under causal attention is invisible to real tokens);
  under ``torch.compile`` too, SDPA then takes its causal kernel (causal_attn.py).
- The last layer's MLP runs at the answer position only (answer_rows.py): nothing reads its output
  elsewhere. ``score.fuse_projections`` runs each layer's q/k/v and gate/up projections as one matmul
  each (fused_proj.py); ``score.compile`` runs the decoder under ``torch.compile``.
- Prefix sharing: rows with the same prefix (one user's instruction, history and CF token) are
  grouped; each prefix runs once, with its user's gate, and its keys/values are copied once into each
  of the user's candidate rows' cache (kv_cache.py), where the candidates continue at the prefix's
  positions. Several users' prefixes run in one batch (right-padded; the padding keys are masked out
  of the candidate pass).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from thinkrec.model.base import decoder_and_head, load_model, load_tokenizer
from thinkrec.model.prompt import Encoded, PromptBuilder
from thinkrec.model.thinkrec import (
    Batch,
    CFProjector,
    CFTable,
    collate,
    input_embeddings,
    p_yes_of,
    prefix_summary,
)
from thinkrec.scoring.base import Artifacts, ScoreRow
from thinkrec.scoring.engine import answer_rows, causal_attn, fused_lora, fused_proj, packed
from thinkrec.scoring.engine.kv_cache import prefix_cache


def pick_device(requested: str | None = None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class HFScorer:
    """``Scorer`` over a Hugging Face causal LM with fused per-row LoRA experts."""

    def __init__(
        self,
        cfg: Any,
        artifacts: Artifacts,
        device: str | None = None,
        tokenizer: Any | None = None,
        answer_ids: Callable[[], tuple[int, int, int]] | None = None,
    ) -> None:
        """``tokenizer``: one already loaded; ``answer_ids``: instead of any tokenizer, a call that
        returns the (Yes, No, CF placeholder) token ids (the scorer actor's prompt process sends them,
        so the actor skips its own tokenizer load)."""
        self.device = pick_device(device)
        if cfg.score.torch_threads and self.device == "cpu":
            torch.set_num_threads(cfg.score.torch_threads)
        self.batch_size = int(cfg.score.batch_size)
        self.prefix_sharing = bool(cfg.score.prefix_sharing)
        self.packed = self.prefix_sharing and cfg.score.prefix_mode == "packed"
        self.left_pad = False  # packs are right-padded; tests also run them left-padded
        model = load_model(
            artifacts.base_model,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            device=self.device,
        )
        model.eval().requires_grad_(False)
        self.model = model
        mode: fused_lora.GateMode = "linear" if cfg.fusion.mode == "linear" else "exact"
        dirs = [os.path.join(artifacts.adapters_dir, n) for n in artifacts.adapter_names]
        self.fused = fused_lora.install(model, dirs, mode)
        if cfg.score.fuse_projections:
            fused_proj.fuse(model)
        # Full prompts keep SDPA's causal kernel under torch.compile; packs may use FlexAttention.
        flex_ok = causal_attn.install(model)
        flex = cfg.score.packed_attention == "flex" or (
            cfg.score.packed_attention == "auto" and self.device.startswith("cuda") and flex_ok
        )  # auto falls back to the dense mask for a model on another attention; flex asked is an error
        if self.packed and flex and not flex_ok:
            raise ValueError(
                "score.packed_attention=flex needs a model on SDPA attention; this model uses "
                f"{model.config._attn_implementation!r} (set score.packed_attention=sdpa)"
            )
        self.flex = self.packed and flex
        body, _ = decoder_and_head(model)
        self.answer_rows = answer_rows.install(body)
        # dynamic=True: batches vary in rows and length; one symbolic-shape graph serves them
        # instead of a compilation per shape.
        self.body = torch.compile(body, dynamic=True) if cfg.score.compile else body
        self.projector: CFProjector | None = None
        self.cf: CFTable | None = None
        if cfg.model.cf_tokens and artifacts.projector and artifacts.cf_embeddings:
            self.projector = (
                CFProjector.load(artifacts.projector).to(self.device).eval().requires_grad_(False)
            )
            self.cf = CFTable.load(artifacts.cf_embeddings)
        if answer_ids is not None:
            self.yes_id, self.no_id, self.pad_id = answer_ids()
        else:
            tok = tokenizer or load_tokenizer(artifacts.base_model, cfg.model.trust_remote_code)
            pb = PromptBuilder(
                tok, cf_tokens=cfg.model.cf_tokens, use_chat_template=cfg.model.use_chat_template
            )
            self.yes_id, self.no_id, self.pad_id = pb.yes_id, pb.no_id, pb.placeholder_id
        _, head = decoder_and_head(model)
        idx = torch.tensor([self.yes_id, self.no_id], device=head.weight.device)
        self.w_yn = head.weight.index_select(0, idx).detach().float()  # (2, H)
        bias = getattr(head, "bias", None)
        self.b_yn = bias.index_select(0, idx).detach().float() if bias is not None else None  # (2,)
        self.last_no_logits = np.zeros(0, np.float32)  # the No logits of the last call (the checks read them)

    # -- public ---------------------------------------------------------------------------------
    def score(self, rows: list[ScoreRow]) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        with torch.inference_mode():
            if self.packed:
                logits = self._score_packed(rows)
            elif self.prefix_sharing:
                logits = self._score_shared(rows)
            else:
                logits = self._score_full(rows)
        yes = logits[:, 0].numpy()  # (n,)
        self.last_no_logits = logits[:, 1].numpy().astype(np.float32)  # for the checks, as vLLM's
        return yes.astype(np.float32), p_yes_of(yes).astype(np.float32)

    # -- pieces ---------------------------------------------------------------------------------
    def _gates(self, rows: Sequence[ScoreRow]) -> torch.Tensor:
        g = torch.as_tensor(np.stack([np.asarray(r.gate, dtype=np.float64) for r in rows]))  # (B, K)
        if g.shape[1] != self.fused.k:
            raise ValueError(
                f"rows carry gates over {g.shape[1]} adapters; the scorer has {list(self.fused.names)}"
            )
        return g

    def _only_at(self, positions: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """The last layer's MLP at ``positions`` (B,) only: the only hidden states the caller reads."""
        return self.answer_rows.at(positions) if self.answer_rows else contextlib.nullcontext()

    def _answer_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, H) final hidden states -> (n, 2) [Yes, No] logits."""
        out = h.float() @ self.w_yn.T  # (n, 2)
        return out + self.b_yn if self.b_yn is not None else out

    def _embed(
        self, encoded: Sequence[Encoded], summary: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._embed_batch(collate(encoded, self.pad_id), summary)

    def _embed_batch(
        self, batch: Batch, summary: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = input_embeddings(self.model, batch, self.cf, self.projector, summary)  # (B, T, H)
        return emb, batch.attention_mask.to(emb.device), batch.lengths.to(emb.device)

    def _score_full(self, rows: list[ScoreRow]) -> torch.Tensor:
        out = torch.empty(len(rows), 2)
        # Similar lengths together: less padding. A row's result does not depend on its batch.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prefix.ids) + len(rows[i].candidate.ids))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            chunk = [rows[i] for i in idx]
            emb, _, lengths = self._embed([r.prefix + r.candidate for r in chunk])
            answer = lengths - 1  # (B,) each row's last real token
            # No attention mask: rows are right-padded and attention is causal, so no real token sees a
            # pad, and without a mask SDPA takes its causal (flash) kernel on a GPU.
            with self.fused.gates(self._gates(chunk)), self._only_at(answer):
                out_b = self.body(inputs_embeds=emb, attention_mask=None, use_cache=False)
            hs = out_b.last_hidden_state  # (B, T, H)
            last = hs[torch.arange(len(idx), device=hs.device), answer]  # (B, H)
            out[idx] = self._answer_logits(last).cpu()
        return out

    @staticmethod
    def _groups(rows: Sequence[ScoreRow]) -> list[list[int]]:
        """Rows sharing a prefix (same user, same history, same gate) form one group."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(rows):
            key = (r.user_id, tuple(r.prefix.ids), tuple(r.prefix.cf_id), tuple(np.asarray(r.gate).tolist()))
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _score_packed(self, rows: list[ScoreRow]) -> torch.Tensor:
        out = torch.empty(len(rows), 2)
        # A pack holds at most batch_size candidates (a larger group is split into several packs, each
        # with its own prefix copy); packs are batched until their candidates fill a scoring batch.
        packs = [
            m[s : s + self.batch_size] for m in self._groups(rows) for s in range(0, len(m), self.batch_size)
        ]
        pos = 0
        while pos < len(packs):
            end, n = pos, 0
            while end < len(packs) and (end == pos or n + len(packs[end]) <= self.batch_size):
                n += len(packs[end])
                end += 1
            batch = packs[pos:end]
            pos = end
            heads = [rows[m[0]] for m in batch]
            seqs = [
                functools.reduce(operator.add, (rows[i].candidate for i in m), rows[m[0]].prefix)
                for m in batch
            ]
            lay = packed.layout(
                [len(h.prefix.ids) for h in heads],
                [[len(rows[i].candidate.ids) for i in m] for m in batch],
                left_pad=self.left_pad,
            )
            emb, _, _ = self._embed(seqs)  # (B, T, H), right-padded
            emb = packed.shift_rows(emb, lay.shift)
            dev = emb.device
            answer = lay.answer.to(dev)  # (B, M)
            with self.fused.gates(self._gates(heads)), self._only_at(answer):
                hs = self.body(
                    inputs_embeds=emb,
                    attention_mask=lay.block_mask(dev) if self.flex else lay.mask().to(dev),
                    position_ids=lay.positions.to(dev),
                    use_cache=False,
                ).last_hidden_state  # (B, T, H)
            last = hs[torch.arange(len(batch), device=dev)[:, None], answer]  # (B, M, H)
            logits = self._answer_logits(last).cpu()  # (B, M, 2)
            for b, m in enumerate(batch):
                out[m] = logits[b, : len(m)]
        return out

    def _score_shared(self, rows: list[ScoreRow]) -> torch.Tensor:
        members = self._groups(rows)
        out = torch.empty(len(rows), 2)
        # Prefix batches: groups until their candidates fill a scoring batch (or B prefixes).
        pos = 0
        while pos < len(members):
            end, n = pos, 0
            while end < len(members) and (
                end == pos or (n < self.batch_size and end - pos < self.batch_size)
            ):
                n += len(members[end])
                end += 1
            batch_groups = members[pos:end]
            pos = end
            heads = [rows[m[0]] for m in batch_groups]
            pbatch = collate([r.prefix for r in heads], self.pad_id)
            emb, pmask, plen = self._embed_batch(pbatch)  # (G, P, H), (G, P), (G,)
            # The candidates' item slots may carry their prefix's history summary (CFProjector).
            summary = prefix_summary(pbatch, self.cf, self.projector)
            # This pass is read for its keys/values only, so no position's last-layer MLP is needed
            # (position 0 of each row is kept).
            with self.fused.gates(self._gates(heads)), self._only_at(torch.zeros_like(plen)):
                cache = self.body(inputs_embeds=emb, attention_mask=pmask, use_cache=True).past_key_values
            layers = getattr(cache, "layers", None)
            if layers is None or any(getattr(layer, "is_sliding", False) for layer in layers):
                # Sliding-window caches may drop prefix keys; score these rows without sharing.
                flat = [i for m in batch_groups for i in m]
                out[flat] = self._score_full([rows[i] for i in flat])
                continue
            kv = [(layer.keys, layer.values) for layer in layers]  # each (G, kv_heads, P, d)
            flat = [(gi, i) for gi, m in enumerate(batch_groups) for i in m]
            for s in range(0, len(flat), self.batch_size):
                part = flat[s : s + self.batch_size]
                gidx = torch.tensor([g for g, _ in part], device=pmask.device)  # (n,)
                ridx = [i for _, i in part]
                chunk = [rows[i] for i in ridx]
                csum = None if summary is None else tuple(t[gidx.cpu()] for t in summary)
                cemb, cmask, clen = self._embed([r.candidate for r in chunk], csum)  # (n, C, H)
                C = cemb.shape[1]
                # Candidate tokens continue at their own prefix's length, not at the padded width.
                positions = plen[gidx][:, None] + torch.arange(C, device=cemb.device)[None, :]  # (n, C)
                mask = torch.cat([pmask[gidx], cmask], dim=1)  # (n, P + C)
                past = prefix_cache(kv, [g for g, _ in part], C)
                answer = clen - 1  # (n,) each candidate's last real token
                with self.fused.gates(self._gates(chunk)), self._only_at(answer):
                    hs = self.body(
                        inputs_embeds=cemb,
                        attention_mask=mask,
                        position_ids=positions,
                        past_key_values=past,
                        use_cache=True,
                    ).last_hidden_state  # (n, C, H)
                last = hs[torch.arange(len(part), device=hs.device), answer]  # (n, H)
                out[ridx] = self._answer_logits(last).cpu()
        return out
