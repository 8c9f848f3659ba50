"""Pre-merged exact expert mixtures for backends that take one adapter per request (vLLM).

vLLM applies one LoRA per request, so a row whose gate mixes experts needs an adapter that computes
the mixture itself. Concatenating the experts' LoRAs does that exactly: for weights w_n and peft
scalings s_n,

    A_cat = [A_1; A_2; ...]                          (sum r_n, in)
    B_cat = [w_1 s_1 B_1, w_2 s_2 B_2, ...]          (out, sum r_n)
    B_cat A_cat x = sum_n w_n s_n B_n A_n x

which is the exact per-row mixture (REFERENCE.md), unlike peft's "linear" merge. The result is saved
as an ordinary peft adapter of rank R = sum r_n with lora_alpha = R (scaling 1, already folded into B).

Mixture weights are continuous, but every distinct mixture is one more adapter to hold, so weights are
quantised to a grid (``score.mixture_step``) and only the ``score.max_mixtures`` most frequent grid
points are kept; other rows use the nearest kept mixture. ``MixtureReport`` states the error this
introduces in the weights.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_A = ".lora_A.weight"
_B = ".lora_B.weight"


@dataclass
class LoraAdapter:
    """A peft LoRA adapter in memory: its adapter_config.json and its tensors by peft key."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def modules(self) -> list[str]:
        """Module prefixes that carry a LoRA pair (keys without the ``.lora_A.weight`` suffix)."""
        return sorted(k[: -len(_A)] for k in self.tensors if k.endswith(_A))

    @property
    def scaling(self) -> float:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def load_adapter(path: str) -> LoraAdapter:
    """Read a peft LoRA adapter directory (safetensors only). Features the exact merge cannot express
    (per-module rank/alpha patterns, DoRA, LoRA biases, extra saved modules) are refused by name."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{path}: adapter_config.{key} is set; the exact merge needs one rank and alpha")
    for key in ("use_dora", "lora_bias", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"{path}: adapter_config.{key} is set; only plain LoRA A/B pairs can be merged")
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} not found (adapters are read as safetensors only)")
    tensors = load_file(weights)
    for k in tensors:
        if not (k.endswith(_A) or k.endswith(_B)):
            raise ValueError(f"{path}: tensor {k!r} is not a LoRA A/B weight")
    return LoraAdapter(config, tensors)


def save_adapter(path: str, adapter: LoraAdapter) -> None:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, os.path.join(path, ADAPTER_WEIGHTS))
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter.config, f, indent=2, sort_keys=True)


def merge_exact(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], dtype: torch.dtype | None = None
) -> LoraAdapter:
    """One rank-(sum r_n) adapter computing sum_n w_n s_n B_n A_n x exactly (adapters with w_n = 0 are
    left out). A module that an adapter lacks contributes zeros there, so every module has the same
    rank R, as peft's config requires. ``dtype``: of the result (default: the first adapter's)."""
    if len(adapters) != len(weights):
        raise ValueError(f"merge_exact: {len(adapters)} adapters but {len(weights)} weights")
    parts = [(a, float(w)) for a, w in zip(adapters, weights, strict=True) if w != 0]
    if not parts:
        raise ValueError("merge_exact: all weights are zero")
    out_dtype = dtype or next(iter(parts[0][0].tensors.values())).dtype
    modules = sorted({m for a, _ in parts for m in a.modules})
    ranks = [int(a.config["r"]) for a, _ in parts]
    R = sum(ranks)
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        shapes = {
            (a.tensors[m + _A].shape[1], a.tensors[m + _B].shape[0]) for a, _ in parts if m + _A in a.tensors
        }
        if len(shapes) != 1:
            raise ValueError(f"merge_exact: module {m} has different shapes across adapters: {shapes}")
        d_in, d_out = shapes.pop()
        a_cat = torch.zeros(R, d_in, dtype=torch.float64)  # (R, in)
        b_cat = torch.zeros(d_out, R, dtype=torch.float64)  # (out, R)
        start = 0
        for (a, w), r in zip(parts, ranks, strict=True):
            if m + _A in a.tensors:
                a_cat[start : start + r] = a.tensors[m + _A].double()
                b_cat[:, start : start + r] = a.tensors[m + _B].double() * (w * a.scaling)
            start += r
        tensors[m + _A] = a_cat.to(out_dtype)
        tensors[m + _B] = b_cat.to(out_dtype)
    targets = sorted({t for a, _ in parts for t in _as_list(a.config.get("target_modules"))})
    config = dict(parts[0][0].config)
    config.update(
        r=R, lora_alpha=R, use_rslora=False, target_modules=targets, rank_pattern={}, alpha_pattern={}
    )
    return LoraAdapter(config, tensors)


def _as_list(targets: Any) -> list[str]:
    if targets is None:
        return []
    return [targets] if isinstance(targets, str) else list(targets)


# -- quantisation and the bounded set of mixtures ---------------------------------------------------


def quantise(w: np.ndarray, step: float) -> tuple[int, ...]:
    """Weights -> integer units of ``step`` on the grid, keeping the total (largest remainder): the
    quantised weights still sum to the original sum (rounded to the grid), and each differs from its
    weight by less than one step. Ties go to the lower index. Returns the units; weights = units*step."""
    x = np.asarray(w, dtype=np.float64) / step
    if (x < -1e-12).any():
        raise ValueError(f"quantise: negative mixture weight in {np.asarray(w).tolist()}")
    x = np.clip(x, 0, None)
    units = np.floor(x + 1e-9).astype(np.int64)  # the epsilon keeps 0.6/0.1 = 5.999... at 6
    missing = int(round(float(x.sum()))) - int(units.sum())
    if missing > 0:
        rem = x - units
        order = sorted(range(len(x)), key=lambda i: (-rem[i], i))
        for i in order[:missing]:
            units[i] += 1
    return tuple(int(u) for u in units)


@dataclass
class MixtureReport:
    """How far the served mixtures are from the rows' exact gate weights. Per row the error is
    max_n |w_n - w_served_n|; ``max_abs_err`` and ``mean_abs_err`` are its max and mean over mixture
    rows. ``snapped`` counts rows whose own grid point was not kept and that use the nearest kept one."""

    rows: int = 0
    snapped: int = 0
    max_abs_err: float = 0.0
    sum_abs_err: float = 0.0
    mixtures: int = 0

    @property
    def mean_abs_err(self) -> float:
        return self.sum_abs_err / self.rows if self.rows else 0.0

    def add(self, other: MixtureReport) -> None:
        self.rows += other.rows
        self.snapped += other.snapped
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.sum_abs_err += other.sum_abs_err
        self.mixtures = max(self.mixtures, other.mixtures)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "rows": self.rows,
            "snapped": self.snapped,
            "mixtures": self.mixtures,
            "max_abs_err": self.max_abs_err,
            "mean_abs_err": self.mean_abs_err,
        }


@dataclass
class MixturePlan:
    """The kept mixtures (grid units) and, per input row, the one it is served with."""

    kept: list[tuple[int, ...]]
    assigned: list[tuple[int, ...]]
    report: MixtureReport = field(default_factory=MixtureReport)


def plan_mixtures(
    weights: np.ndarray,
    step: float,
    max_mixtures: int,
    kept: Sequence[tuple[int, ...]] = (),
) -> MixturePlan:
    """Quantise each row's weights (R, A) and keep at most ``max_mixtures`` grid points: those already
    ``kept`` first (an engine holding merged adapters keeps them), then the most frequent new ones
    (ties: the smaller units tuple). Rows whose grid point is not kept use the kept point nearest to
    their exact weights (Euclidean; ties: the earlier kept)."""
    if max_mixtures < 1:
        raise ValueError(f"max_mixtures must be >= 1, got {max_mixtures}")
    W = np.asarray(weights, dtype=np.float64).reshape(len(weights), -1)  # (R, A)
    keys = [quantise(w, step) for w in W]
    out = list(dict.fromkeys(kept))
    if len(out) > max_mixtures:
        raise ValueError(f"{len(out)} mixtures already kept, more than max_mixtures={max_mixtures}")
    counts = Counter(keys)
    for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(out) >= max_mixtures:
            break
        if key not in out:
            out.append(key)
    report = MixtureReport(mixtures=len(out))
    assigned: list[tuple[int, ...]] = []
    grid = np.array(out, dtype=np.float64) * step if out else np.zeros((0, W.shape[1]))  # (M, A)
    kept_set = set(out)
    for w, key in zip(W, keys, strict=True):
        if key not in kept_set:
            i = int(np.argmin(((grid - w) ** 2).sum(-1)))
            key = out[i]
            report.snapped += 1
        served = np.array(key, dtype=np.float64) * step
        err = float(np.abs(w - served).max()) if len(w) else 0.0
        report.rows += 1
        report.max_abs_err = max(report.max_abs_err, err)
        report.sum_abs_err += err
        assigned.append(key)
    return MixturePlan(out, assigned, report)
