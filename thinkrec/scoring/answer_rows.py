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
        self.positions: torch.Tensor | None = None  # (B,) long

    @contextmanager
    def at(self, positions: torch.Tensor) -> Iterator[None]:
        """Within this block, the body's last layer computes its MLP at ``positions`` (B,) only."""
        self.positions = positions
        try:
            yield
        finally:
            self.positions = None


class AnswerRowsNorm(nn.Module):
    """A post-attention norm that keeps each row's answer position only while positions are set."""

    def __init__(self, norm: nn.Module, rows: AnswerRows) -> None:
        super().__init__()
        self.norm, self.rows = norm, rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H) or (B, 1, H)
        pos = self.rows.positions
        if pos is not None:
            # The norm is per position, so selecting first gives exactly the selected rows of norm(h).
            h = h[torch.arange(h.shape[0], device=h.device), pos.to(h.device)].unsqueeze(1)
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
    return rows
