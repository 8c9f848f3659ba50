"""What was measured: model, data, teacher, quarantine, training curves, and the paper's table."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from thinkrec.data import schema as S

INTERACTIONS = "prepare/interactions"

# The paper's numbers (Yu et al., WWW 2026, Table: ML-1M, Llama-3-8B-Instruct; AUC / UAUC). Shown only
# as the paper's reference, never as a result of this run.
PAPER_ML1M: dict[str, tuple[float, float]] = {
    "MF": (0.6401, 0.6079),
    "LightGCN": (0.6140, 0.6230),
    "SASRec": (0.6956, 0.6687),
    "TALLRec": (0.6872, 0.6553),
    "CoLLM": (0.7141, 0.6672),
    "ThinkRec": (0.7764, 0.6775),
}


def _clean(obj: Any) -> Any:
    """JSON-safe: nan/inf -> None, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def quarantine_counts(manifests: dict[str, Any]) -> dict[str, Any]:
    return {
        t: {
            "rows": m.get("rows"),
            "rows_quarantined": m.get("rows_quarantined", 0),
            "reasons": m.get("quarantine_reasons", {}),
        }
        for t, m in manifests.items()
        if "rows" in m
    }


def describe_model(cfg: Any) -> dict[str, Any]:
    from thinkrec.scoring.base import base_model_path

    path = base_model_path(cfg)
    desc: dict[str, Any] = {
        "base": cfg.model.base or None,
        "path": path,
        "kind": "configured base model"
        if cfg.model.base
        else "tiny random-init Qwen2-style model built locally (not a pretrained LLM)",
        "dtype": cfg.model.dtype,
        "cf_tokens": cfg.model.cf_tokens,
        "fusion_mode": cfg.fusion.mode,
        "lora": {
            "r": cfg.train.lora_r,
            "alpha": cfg.train.lora_alpha,
            "targets": list(cfg.train.lora_targets),
        },
    }
    if not cfg.model.base:
        desc["tiny"] = cfg.to_dict()["model"]["tiny"]
    config_json = os.path.join(path, "config.json")
    if os.path.exists(config_json):
        with open(config_json) as f:
            hf = json.load(f)
        desc["architecture"] = {
            k: hf.get(k)
            for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        }
    return desc


def split_rule(data: Any) -> str:
    """data.split in words, for the report."""
    window = ""
    if data.split_start or data.split_end:
        window = f"; only rows in [{data.split_start or 'start'}, {data.split_end or 'end'})"
    if data.split == "dates":
        return f"calendar slots: valid from {data.split_dates[0]}, test from {data.split_dates[1]}{window}"
    if data.split == "cut_halve":
        return (
            f"train before {data.split_dates[0]}; the later rows sorted by time and halved by count into "
            f"valid / test (cuts are timestamps){window}"
        )
    return (
        f"by time over one timeline: latest {data.test_frac:.0%} of interactions = test, the "
        f"{data.valid_frac:.0%} before = valid, the rest = train (cuts are timestamps){window}"
    )


def describe_data(cfg: Any, manifests: dict[str, Any]) -> dict[str, Any]:
    man = manifests.get(INTERACTIONS, {})
    cuts = man.get("split_cut_timestamps")
    return {
        "dataset": cfg.data.dataset,
        "source": cfg.data.source or "embedded copy",
        "max_users": cfg.data.max_users,
        "label_rule": f"rating >= {cfg.data.label_threshold}",
        "split_rule": split_rule(cfg.data),
        "split_rows": man.get("split_rows"),
        "split_cut_timestamps": cuts,
        "split_cut_dates": [_iso(t) for t in cuts] if cuts else None,
    }


def _iso(ts: Any) -> str:
    return dt.datetime.fromtimestamp(int(ts), tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_teacher(cfg: Any, traces: pd.DataFrame | None) -> dict[str, Any]:
    if traces is None:
        return {"configured": cfg.reason.teacher, "traces": 0, "by_teacher": {}, "present": False}
    counts = traces[S.TEACHER].fillna("unknown").value_counts().sort_index()
    return {
        "configured": cfg.reason.teacher,
        "traces": len(traces),
        "by_teacher": {str(k): int(v) for k, v in counts.items()},
        "present": True,
    }


def restarts(curves: Any) -> dict[str, list[dict[str, Any]]]:
    """The train stage's curves document -> {phase: its stalled attempts' records}, for the phases
    that started over (``train.projector_restarts``); empty when none did."""
    if not isinstance(curves, dict):
        return {}
    return {k: v["restarts"] for k, v in curves.items() if isinstance(v, dict) and v.get("restarts")}


def _series(curves: Any, prefix: str = "") -> dict[str, tuple[list[float], list[float]]]:
    """Numeric series in a curves document, by dotted name: a list of numbers is plotted against its
    index, a list of records against their ``step`` (or ``epoch``, else index)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    if isinstance(curves, dict):
        for k, v in curves.items():
            if k != "restarts":  # a record per stalled attempt, not a series (``training_restarts``)
                out.update(_series(v, f"{prefix}{k}."))
    elif isinstance(curves, list) and curves:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in curves):
            out[prefix.rstrip(".")] = (list(range(len(curves))), [float(v) for v in curves])
        elif all(isinstance(v, dict) for v in curves):
            xkey = next((k for k in ("step", "global_step", "epoch") if k in curves[0]), None)
            keys = {
                k
                for r in curves
                for k, v in r.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            for key in sorted(keys - {"step", "global_step", "epoch", "time", "timestamp"}):
                pts = [(r.get(xkey, i) if xkey else i, r[key]) for i, r in enumerate(curves) if key in r]
                pts = [(x, y) for x, y in pts if y is not None and math.isfinite(float(y))]
                if pts:
                    out[f"{prefix}{key}"] = ([float(x) for x, _ in pts], [float(y) for _, y in pts])
    return out
