"""The ThinkRec loss: a recommendation term on the Yes logit plus a thinking (causal-LM) term.

For a sequence ``prompt (P tokens) + answer (A tokens)`` the logits at position ``P-1+j`` predict
answer token ``j``. Then

    y_hat  = logit of "Yes" at position P-1            (the score read at serving time)
    L_rec  = BCE-with-logits(y_hat, label)
    L_think = mean over j of CE(logits[P-1+j], answer[j])
    L      = w_rec * L_rec + (1 - w_rec) * L_think,  w_rec = 0.1 (reasoning) or 0.9 (label sample)

Vocabulary logits are computed only at the answer positions (``logits_at``), never as (B, T, V).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thinkrec.model.prompt import Encoded
from thinkrec.model.thinkrec import Batch, CFProjector, CFTable, collate, hidden_states, input_embeddings
from thinkrec.model.thinkrec import logits_at as _logits_at
from thinkrec.train.data import KIND_REASONING


@dataclass
class TrainBatch:
    tokens: Batch  # prompt + answer, right-padded
    prompt_len: torch.Tensor  # (B,)
    answer_len: torch.Tensor  # (B,)
    label: torch.Tensor  # (B,) float
    w_rec: torch.Tensor  # (B,) weight of L_rec per sample
    user_id: torch.Tensor  # (B,)
    n_tokens: int  # real (unpadded) tokens in the batch


def make_batch(
    rows: Sequence[dict[str, Any]], pad_id: int, *, rec_weight_reasoning: float, rec_weight_label: float
) -> TrainBatch:
    enc = [
        Encoded(
            list(r["prompt_ids"]) + list(r["answer_ids"]),
            list(r["cf_pos"]),
            list(r["cf_kind"]),
            list(r["cf_id"]),
        )
        for r in rows
    ]
    tokens = collate(enc, pad_id)
    w = [rec_weight_reasoning if int(r["kind"]) == KIND_REASONING else rec_weight_label for r in rows]
    return TrainBatch(
        tokens=tokens,
        prompt_len=torch.tensor([len(r["prompt_ids"]) for r in rows]),
        answer_len=torch.tensor([len(r["answer_ids"]) for r in rows]),
        label=torch.tensor([float(r["label"]) for r in rows]),
        w_rec=torch.tensor(w, dtype=torch.float32),
        user_id=torch.tensor([int(r["user_id"]) for r in rows]),
        n_tokens=int(tokens.lengths.sum()),
    )


def answer_positions(
    prompt_len: torch.Tensor, answer_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, offsets) of the positions predicting answer tokens: for sample b and j < A_b,
    row b, col P_b - 1 + j, and j. Sample b's first entry (j = 0) is its Yes-logit position."""
    rows = torch.repeat_interleave(torch.arange(len(prompt_len)), answer_len)  # (n,)
    starts = torch.cumsum(answer_len, 0) - answer_len  # (B,)
    j = torch.arange(int(answer_len.sum())) - torch.repeat_interleave(starts, answer_len)  # (n,)
    cols = prompt_len[rows] - 1 + j
    return rows, cols, j


def combine(
    y_hat: torch.Tensor, think_ce: torch.Tensor, label: torch.Tensor, w_rec: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample weighted mix, averaged over the batch. All inputs (B,)."""
    l_rec = F.binary_cross_entropy_with_logits(y_hat.float(), label.float(), reduction="none")  # (B,)
    per = w_rec * l_rec + (1 - w_rec) * think_ce.float()  # (B,)
    parts = {"l_rec": l_rec.detach().mean().item(), "l_think": think_ce.detach().float().mean().item()}
    return per.mean(), parts


class ThinkRecLM(nn.Module):
    """The trained model: the (peft-wrapped) LLM and the CF projector, with the frozen CF table.

    ``forward`` returns per-sample (y_hat, L_think) so DDP and DeepSpeed see one forward call
    (their gradient hooks and ZeRO gathering are tied to it)."""

    def __init__(self, llm: Any, projector: CFProjector | None, cf: CFTable | None, yes_id: int) -> None:
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.cf = cf  # plain tensors, not parameters: never trained, never sharded
        self.yes_id = yes_id

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        tok = batch.tokens
        dev = self.llm.get_input_embeddings().weight.device
        x = input_embeddings(self.llm, tok, self.cf, self.projector)  # (B, T, H)
        out = hidden_states(self.llm, x, tok.attention_mask.to(dev))
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)
        rows, cols, j = answer_positions(batch.prompt_len, batch.answer_len)
        logits = _logits_at(self.llm, h, rows.to(dev), cols.to(dev)).float()  # (n, V)
        targets = tok.input_ids[rows, cols + 1].to(dev)  # (n,) the answer tokens
        ce = F.cross_entropy(logits, targets, reduction="none")  # (n,)
        B = len(batch.prompt_len)
        rows_d = rows.to(dev)
        ce_sum = torch.zeros(B, device=dev).index_add(0, rows_d, ce)  # (B,)
        think = ce_sum / batch.answer_len.to(dev).float()  # (B,)
        first = (j == 0).to(dev)
        y_hat = logits[first, self.yes_id]  # (B,) rows are in sample order
        return y_hat, think


def loss_fn(model: nn.Module, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
    y_hat, think = model(batch)
    dev = y_hat.device
    return combine(y_hat, think, batch.label.to(dev), batch.w_rec.to(dev))


def yes_logits(model: nn.Module, batch: TrainBatch) -> torch.Tensor:
    """(B,) Yes logit at the first answer position (validation: one forward pass, no decoding)."""
    with torch.no_grad():
        y_hat, _ = model(batch)
    return y_hat.float().cpu()
