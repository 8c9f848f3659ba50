"""Exact per-row mixtures of K LoRA adapters in one layer.

For every LoRA target Linear the K adapters' factors are concatenated once at load time,

    A_cat = [A_0; A_1; ...; A_{K-1}]          (K*r, in)
    B_cat = [B_0, B_1, ..., B_{K-1}]          (out, K*r)

and a forward over a batch whose row b has gate weights g_b (K,) computes

    y = W x + B_cat((A_cat x) * g_row),       g_row = repeat(g_b * s, r)   (K*r,)

which is exactly ``W x + sum_k g_bk s_k B_k A_k x`` (s_k = adapter k's alpha / r). One rank-K*r LoRA
serves every row of a batch, whatever mixture each row wants: no merge, no per-row weights, and the
extra cost is two thin matmuls per target layer (DESIGN.md, scoring rule 3).

Gate modes:
- ``exact`` (ThinkRec's gate, a single adapter, global, or any mixture per row): the formula above.
- ``linear``: reproduces peft's ``add_weighted_adapter(..., combination_type="linear")`` per row, i.e.
  A_mix = sum_k sign_k sqrt(|g_k s_k|) A_k and B_mix = sum_k sqrt(|g_k s_k|) B_k, so the row's delta is
  B_mix A_mix (cross terms included; NOT the exact mixture). For comparison with the reference code.

Dropout is not applied: this module exists for inference only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
GateMode = Literal["exact", "linear"]


@dataclass
class GateState:
    """The per-row gates for the next forward, shared by every fused layer of a model."""

    gates: torch.Tensor | None = None  # (B, K) weights over adapters, in adapter order
    mode: GateMode = "exact"
    _cache: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    def set(self, gates: torch.Tensor | None) -> None:
        self.gates = gates
        self._cache.clear()

    def coefficients(
        self, scaling: tuple[float, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Per-row coefficients over adapters (B, K) for layers with this ``scaling`` (K,): the gate
        times the scaling (exact) or its signed square root (linear). Cached per forward, since every
        layer of a model usually shares one scaling vector. ``scaling`` is a tuple of Python floats,
        not a tensor, so ``torch.compile`` traces this without a graph break."""
        if self.gates is None:
            raise RuntimeError("fused LoRA: no gates set; call FusedLoRA.gates(...) around the forward")
        key = (device, dtype, *scaling)
        hit = self._cache.get(key)
        if hit is None:
            ws = self.gates.double() * torch.tensor(scaling, dtype=torch.float64, device=self.gates.device)
            hit = ws if self.mode == "exact" else torch.sign(ws) * ws.abs().sqrt()
            hit = hit.to(device=device, dtype=dtype)
            self._cache[key] = hit
        return hit


class FusedLoRALinear(nn.Module):
    """A Linear plus K concatenated LoRA adapters, mixed per row by the shared ``GateState``."""

    def __init__(
        self,
        base: nn.Linear,
        lora_a: Sequence[torch.Tensor | None],
        lora_b: Sequence[torch.Tensor | None],
        scaling: Sequence[float],
        state: GateState,
    ) -> None:
        super().__init__()
        self.base = base
        self.state = state
        ranks = [a.shape[0] if a is not None else 0 for a in lora_a]
        r = max(ranks)
        if r == 0:
            raise ValueError("FusedLoRALinear needs at least one adapter with weights for this layer")
        w = base.weight
        # A missing adapter (one that does not target this layer) is a zero block of the common rank,
        # so every layer has the same (K*r) layout and one gate expansion serves all of them.
        a_blocks, b_blocks = [], []
        for a, b in zip(lora_a, lora_b, strict=True):
            if a is None or b is None:
                a = torch.zeros(r, w.shape[1])
                b = torch.zeros(w.shape[0], r)
            elif a.shape[0] != r:
                pad = r - a.shape[0]
                a = torch.cat([a, torch.zeros(pad, a.shape[1], dtype=a.dtype)])
                b = torch.cat([b, torch.zeros(b.shape[0], pad, dtype=b.dtype)], dim=1)
            if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
                raise ValueError(
                    f"LoRA shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not fit Linear {tuple(w.shape)}"
                )
            a_blocks.append(a)
            b_blocks.append(b)
        self.k, self.r = len(a_blocks), r
        self.register_buffer("lora_a", torch.cat(a_blocks).to(w.device, w.dtype))  # (K*r, in)
        self.register_buffer("lora_b", torch.cat(b_blocks, dim=1).to(w.device, w.dtype))  # (out, K*r)
        self.scaling = tuple(float(s) for s in scaling)  # (K,)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects q_proj.weight (dtype, device) still works
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        return self.base(x) + self.delta(nn.functional.linear(x, self.lora_a))

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The mixed LoRA output from ``h = A_cat x`` (B, T, K*r) -> (B, T, out). Separate from
        ``forward`` so a fused projection group (fused_proj.py) can compute ``h`` for several layers
        in one matmul."""
        c = self.state.coefficients(self.scaling, h.device, h.dtype)  # (B, K)
        if c.shape[0] != h.shape[0]:
            raise RuntimeError(f"fused LoRA: gates for {c.shape[0]} rows, batch has {h.shape[0]}")
        B, T = h.shape[0], h.shape[1]
        h = h.reshape(B, T, self.k, self.r)
        if self.state.mode == "exact":
            h = h * c[:, None, :, None]  # each adapter's r columns times g_k s_k
        else:
            # peft's linear merge per row: A_mix x = sum_k c_k A_k x, then B_mix = sum_k |c_k| B_k.
            mixed = (h * c[:, None, :, None]).sum(2, keepdim=True)  # (B, T, 1, r)
            h = mixed * c.abs()[:, None, :, None]  # (B, T, K, r)
        return nn.functional.linear(h.reshape(B, T, self.k * self.r), self.lora_b)


@dataclass
class AdapterWeights:
    """One peft adapter read from its directory: per-module (A, B) and its scaling."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r))
    scaling: float
    rank: int


def read_adapter(path: str) -> AdapterWeights:
    """Read a peft LoRA adapter directory (safetensors only) without peft."""
    cfg_path, w_path = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.exists(w_path):
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (adapters are loaded as safetensors only)")
    with open(cfg_path) as f:
        conf = json.load(f)
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {conf.get('peft_type')!r} is not LORA")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern/alpha_pattern is not supported")
    if conf.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not supported by the fused layer")
    r, alpha = int(conf["r"]), float(conf["lora_alpha"])
    scaling = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    tensors = load_file(w_path)
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" -> module "model.layers.0...q_proj"
        mod = key.removeprefix("base_model.model.")
        if ".lora_A." in mod:
            a[mod.split(".lora_A.")[0]] = t
        elif ".lora_B." in mod:
            b[mod.split(".lora_B.")[0]] = t
        else:
            raise ValueError(f"{path}: unsupported tensor {key!r} (only Linear LoRA A/B are fused)")
    if set(a) != set(b):
        raise ValueError(f"{path}: modules with A but no B (or B but no A): {sorted(set(a) ^ set(b))}")
    return AdapterWeights(os.path.basename(path.rstrip("/")), {m: (a[m], b[m]) for m in a}, scaling, r)


class FusedLoRA:
    """Handle over the fused layers installed in a model; sets the per-row gates of each forward."""

    def __init__(self, state: GateState, names: tuple[str, ...], layers: dict[str, FusedLoRALinear]) -> None:
        self.state, self.names, self.layers = state, names, layers

    @property
    def k(self) -> int:
        return len(self.names)

    def set_gates(self, gates: torch.Tensor | Sequence[Sequence[float]] | None) -> None:
        """(B, K) weights over adapters, in ``names`` order, for the next forward(s)."""
        if gates is None:
            self.state.set(None)
            return
        g = torch.as_tensor(gates, dtype=torch.float64)
        if g.ndim != 2 or g.shape[1] != self.k:
            raise ValueError(f"gates must be (batch, {self.k}) over {list(self.names)}; got {tuple(g.shape)}")
        self.state.set(g)

    @contextmanager
    def gates(self, gates: torch.Tensor | Sequence[Sequence[float]]) -> Iterator[None]:
        self.set_gates(gates)
        try:
            yield
        finally:
            self.state.set(None)


def install(model: nn.Module, adapter_dirs: Sequence[str], mode: GateMode = "exact") -> FusedLoRA:
    """Replace every LoRA target Linear of a plain (un-peft'd) HF model by a ``FusedLoRALinear`` over
    the adapters in ``adapter_dirs`` (in gate order). A/B are read from the adapters' safetensors."""
    if mode not in ("exact", "linear"):
        raise ValueError(f"fused LoRA mode must be 'exact' or 'linear', got {mode!r}")
    adapters = [read_adapter(d) for d in adapter_dirs]
    if not adapters:
        raise ValueError("install: no adapters given")
    if mode == "linear" and len({a.rank for a in adapters}) > 1:
        # peft refuses a linear merge of adapters of different ranks; so do we.
        raise ValueError(f"linear merge needs equal ranks; got {[a.rank for a in adapters]}")
    state = GateState(mode=mode)
    targets = sorted(set().union(*(a.layers for a in adapters)))
    modules = dict(model.named_modules())
    layers: dict[str, FusedLoRALinear] = {}
    for path in targets:
        base = modules.get(path)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"adapter targets {path!r}, which is not a Linear of this model ({type(base)})")
        fused = FusedLoRALinear(
            base,
            [a.layers[path][0] if path in a.layers else None for a in adapters],
            [a.layers[path][1] if path in a.layers else None for a in adapters],
            [a.scaling for a in adapters],
            state,
        )
        parent_name, _, child = path.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, fused)
        layers[path] = fused
    return FusedLoRA(state, tuple(a.name for a in adapters), layers)


def merge_into(model: nn.Module, adapter_dirs: Sequence[str], weights: Sequence[float]) -> None:
    """Merge ``W += sum_k w_k s_k B_k A_k`` into a plain model's weights (in the model's dtype). Used
    by the reference-style benchmark (one merged adapter per user) and by tests as the explicit
    reference of the exact mixture."""
    adapters = [read_adapter(d) for d in adapter_dirs]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path in sorted(set().union(*(a.layers for a in adapters))):
            lin = modules[path]
            assert isinstance(lin, nn.Linear), path
            w = lin.weight
            delta = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
            for a, wk in zip(adapters, weights, strict=True):
                if path in a.layers and wk:
                    A, B = (t.to(w.device, w.dtype) for t in a.layers[path])
                    delta += (wk * a.scaling) * (B @ A)  # (out, r) @ (r, in)
            w += delta
