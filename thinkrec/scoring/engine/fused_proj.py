"""Sibling projections fused into one matmul: q/k/v of each attention block, gate/up of each MLP.

Hugging Face decoders run ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` (and ``gate_proj(x)``,
``up_proj(x)``) as separate GEMMs over the same input. With grouped-query attention the key and value
projections are narrow (Llama-3-8B: 1024 of 4096 columns); one GEMM over the concatenated weight
``W_cat = [W_q; W_k; W_v]`` is wider, and the kernel count per layer drops from 7 to 4. This is the
layout vLLM serves with (``QKVParallelLinear`` / ``MergedColumnParallelLinear``); here it is applied to
an unmodified HF model so the scorer keeps HF's attention code, key/value cache and prefix sharing.
Measured on an H100 with the Llama-3-8B shape at 16,384 tokens per batch, it gave 0.98x eager and
1.00-1.01x compiled: at that many rows the narrow GEMMs already run near the matmul rate, so the
scorer leaves it off unless ``score.fuse_projections`` is set (bench/README.md).

How, without touching the decoder's forward: the sibling modules are replaced by ``_Member`` modules
of one ``FusedGroup``. The first member called with an input computes every member's output in one
matmul (views of one output tensor) and keeps the others' for their own calls *with that same input
tensor*; a call with any other input recomputes. So the result never depends on call order, and a
model that calls the siblings on different inputs (cross-attention) is still exact, only unfused.

Fused LoRA layers (fused_lora.py) fuse too: the members' concatenated A factors become one thin GEMM,
and each member applies its own gate-scaled B factor to its slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate, pairwise

import torch
from torch import nn

from thinkrec.scoring.engine.fused_lora import FusedLoRALinear

SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Attribute names of projections that read the same input, per parent module."""


def _spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each block when blocks of these sizes are laid end to end."""
    return list(pairwise(accumulate(sizes, initial=0)))


class FusedGroup(nn.Module):
    """One matmul for several Linear (or ``FusedLoRALinear``) modules that read the same input."""

    def __init__(self, names: Sequence[str], modules: Sequence[nn.Module]) -> None:
        super().__init__()
        bases = [m.base if isinstance(m, FusedLoRALinear) else m for m in modules]
        for name, b in zip(names, bases, strict=True):
            if not isinstance(b, nn.Linear):
                raise TypeError(f"{name}: {type(b).__name__} is not a Linear")
        w0 = bases[0].weight
        if len({(b.in_features, b.weight.dtype, b.weight.device) for b in bases}) != 1:
            raise ValueError(f"{list(names)}: inputs, dtypes or devices differ; cannot fuse")
        self.names = tuple(names)
        self.bounds = _spans([b.out_features for b in bases])
        self.weight = nn.Parameter(torch.cat([b.weight.detach() for b in bases]), requires_grad=False)
        if any(b.bias is not None for b in bases):
            bias = [b.bias.detach() if b.bias is not None else w0.new_zeros(b.out_features) for b in bases]
            self.bias = nn.Parameter(torch.cat(bias), requires_grad=False)
        else:
            self.bias = None
        # LoRA members: one A GEMM for all of them, then each member's gate-scaled B on its slice.
        self.lora = nn.ModuleList(m for m in modules if isinstance(m, FusedLoRALinear))
        self.lora_at = [names[i] for i, m in enumerate(modules) if isinstance(m, FusedLoRALinear)]
        if self.lora:
            self.register_buffer("lora_a", torch.cat([m.lora_a for m in self.lora]), persistent=False)
            self.lora_bounds = _spans([m.lora_a.shape[0] for m in self.lora])
            for m in self.lora:
                m.base = None  # its weight now lives in W_cat; keeping it would hold the memory twice
        self._input: torch.Tensor | None = None
        self._pending: dict[str, torch.Tensor] = {}

    def output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x or name not in self._pending:
            self._compute(x)
        out = self._pending.pop(name)
        if not self._pending:
            self._input = None  # drop the references once every member has taken its output
        return out

    def _compute(self, x: torch.Tensor) -> None:
        y = nn.functional.linear(x, self.weight, self.bias)  # (..., sum of outs)
        outs = {n: y[..., a:b] for n, (a, b) in zip(self.names, self.bounds, strict=True)}
        if self.lora:
            h_all = nn.functional.linear(x, self.lora_a)  # (B, T, sum of K*r)
            for m, name, (a, b) in zip(self.lora, self.lora_at, self.lora_bounds, strict=True):
                outs[name] = outs[name] + m.delta(h_all[..., a:b])
        self._input, self._pending = x, outs


class _Member(nn.Module):
    """Stands in for one fused projection; its output comes from the group's shared matmul."""

    def __init__(self, group: FusedGroup, name: str) -> None:
        super().__init__()
        self.name = name
        self.__dict__["group"] = group  # not a submodule: the group is registered once, on the parent
        self.span = group.bounds[group.names.index(name)]
        self.out_features, self.in_features = self.span[1] - self.span[0], group.weight.shape[1]

    @property
    def weight(self) -> torch.Tensor:  # code that inspects e.g. q_proj.weight.dtype still works
        return self.group.weight[self.span[0] : self.span[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.name, x)


def fuse(model: nn.Module) -> int:
    """Fuse every sibling group (``SIBLINGS``) found in ``model``, in place. Returns the groups fused.

    Groups whose members are not plain or fused-LoRA Linears of one input size, dtype and device are
    left as they are. Inference only: the fused weights do not require gradients."""
    fused = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if any(m is None or isinstance(m, _Member) for m in members):
                continue
            try:
                group = FusedGroup(names, members)
            except (TypeError, ValueError):
                continue
            parent.add_module("fused_" + "_".join(n.split("_")[0] for n in names), group)
            for n in names:
                setattr(parent, n, _Member(group, n))
            fused += 1
    return fused
