"""Key/value caches for the prefix-shared candidate pass (torch + transformers only, so the GPU
benchmark script uses the scorer's own code)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


def prefix_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], groups: Sequence[int], extra: int) -> Any:
    """A key/value cache for a candidate pass: row r starts with its group's prefix keys/values
    ``kv[layer][groups[r]]`` (each (G, kv_heads, P, d)) and has room for ``extra`` more positions.

    One copy of the prefix per row and layer, written straight into a buffer the candidate pass then
    fills in place. (``DynamicCache(ddp_cache_data=[(k[groups], ...)])`` made three: the gather, a
    concatenation onto its empty cache, and a concatenation of the candidates' keys; on CPU with a
    small model those copies took about 40% of the prefix-shared scoring time.) Rows of one group
    that sit together (as in the scorer's chunks) are filled by one broadcast copy."""
    runs: list[tuple[int, int, int]] = []  # (group, first row, end row)
    for r, g in enumerate(groups):
        if runs and runs[-1][0] == g:
            runs[-1] = (g, runs[-1][1], r + 1)
        else:
            runs.append((g, r, r + 1))
    layers = []
    for k, v in kv:
        _, heads, P, d = k.shape
        keys = k.new_empty((len(groups), heads, P + extra, d))
        values = v.new_empty((len(groups), heads, P + extra, v.shape[-1]))
        for g, a, b in runs:
            keys[a:b, :, :P] = k[g]  # broadcast over the group's rows: no gathered temporary
            values[a:b, :, :P] = v[g]
        layers.append(FilledLayer(keys, values, P))
    return Cache(layers=layers)


class FilledLayer(DynamicLayer):
    """A cache layer over preallocated (n, kv_heads, P + C, d) buffers whose first ``filled``
    positions are set; ``update`` writes the new positions in place instead of concatenating."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        super().__init__()
        self.keys, self.values, self.filled = keys, values, filled
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        s, e = self.filled, self.filled + key_states.shape[-2]
        if e > self.keys.shape[-2]:
            raise RuntimeError(f"prefix cache: {e} positions written into room for {self.keys.shape[-2]}")
        self.keys[..., s:e, :] = key_states
        self.values[..., s:e, :] = value_states
        self.filled = e
        return self.keys[..., :e, :], self.values[..., :e, :]

    def get_seq_length(self) -> int:
        return self.filled
