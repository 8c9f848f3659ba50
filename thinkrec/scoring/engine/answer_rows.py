"""The last decoder layer's MLP at the answer positions only (torch only, so the GPU benchmark script
uses the scorer's own code).

Scoring reads one final hidden state per row: the prompt's last token. Every layer but the last must
run at all positions, because later positions attend to their keys and values. In the last layer the
keys and values come from the attention's input, and nothing reads the MLP's output anywhere but at
the answer position. So, while ``AnswerRows.at(positions)`` is active, the last layer's
post-attention norm returns only each row's answer position, (B, 1, H) instead of (B, T, H): the norm
and the MLP run on B rows instead of B * T, and the layer's residual add broadcasts their (B, 1, H)
output over each row. The answer position gets what the full layer computes; the other positions of
the last layer's output then hold values nobody reads (a pass whose output is unused, like the
prefix pass that only fills the key/value cache, keeps position 0 of each row).

For Llama-3-8B the MLP is 81% of a layer's weights, so this skips about 2.5% of a forward's FLOPs
(1 of 32 layers); for the demo's 2-layer model, close to half of the second layer.

Packed scoring (packed.py) reads several answer positions per row: ``at`` then takes (B, M)
positions, the norm returns (B, M, H), and a forward hook on the last layer's MLP scatters its
(B, M, H) output back into zeros of the full (B, T, H) width, so the residual add gives the full
layer's output at every answer position (and the residual alone elsewhere, which nobody reads).

Only decoder layers known to compute ``h = h + attn(input_layernorm(h))`` then
``h = h + mlp(post_attention_layernorm(h))`` are changed (``PRE_NORM_LAYERS``); a model with any other
last layer (a norm after the MLP, parallel attention and MLP) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

PRE_NORM_LAYERS = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
)


class AnswerRows:
    """The answer position of each row for the next forward, read by the last layer's norm."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # (B,) or (B, M) long
        self.width = 0  # T of the forward in progress, for the packed MLP scatter

    @contextmanager
    def at(self, positions: torch.Tensor) -> Iterator[None]:
        """Within this block, the body's last layer computes its MLP at ``positions`` only: (B,) one
        answer per row, or (B, M) several (packed candidates)."""
        self.positions = positions
        try:
            yield
        finally:
            self.positions = None

    def scatter(self, module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor | None:
        """MLP forward hook: (B, M, H) at (B, M) positions -> (B, T, H), zeros elsewhere."""
        pos = self.positions
        if pos is None or pos.dim() != 2:
            return None  # (B, 1, H) broadcasts over the row as it is
        full = out.new_zeros((out.shape[0], self.width, out.shape[-1]))
        rows = torch.arange(out.shape[0], device=out.device)[:, None]  # (B, 1)
        full[rows, pos.to(out.device)] = out
        return full


class AnswerRowsNorm(nn.Module):
    """A post-attention norm that keeps each row's answer position only while positions are set."""

    def __init__(self, norm: nn.Module, rows: AnswerRows) -> None:
        super().__init__()
        self.norm, self.rows = norm, rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H) or (B, 1, H)
        pos = self.rows.positions
        if pos is not None:
            # The norm is per position, so selecting first gives exactly the selected rows of norm(h).
            rows = torch.arange(h.shape[0], device=h.device)
            if pos.dim() == 2:  # packed: (B, M) positions -> (B, M, H)
                self.rows.width = h.shape[1]
                h = h[rows[:, None], pos.to(h.device)]
            else:
                h = h[rows, pos.to(h.device)].unsqueeze(1)
        return self.norm(h)


def install(body: nn.Module) -> AnswerRows | None:
    """Wrap ``body``'s last decoder layer's post-attention norm; None (body unchanged) if that layer is
    not one of ``PRE_NORM_LAYERS``."""
    layers = getattr(body, "layers", None)
    last = layers[-1] if layers is not None and len(layers) else None
    if last is None or type(last).__name__ not in PRE_NORM_LAYERS:
        return None
    rows = AnswerRows()
    last.post_attention_layernorm = AnswerRowsNorm(last.post_attention_layernorm, rows)
    last.mlp.register_forward_hook(rows.scatter)
    return rows
