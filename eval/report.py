"""The evaluate stage: metrics for MF and ThinkRec on the same test rows, plots, and a report that says
exactly what was measured (model, data, split, teacher, config hash).

Inputs (all under the output root, tables read only through their manifests):
- ``score/scores`` (required): ThinkRec's Yes logit, P(Yes) and gate per candidate;
- ``cf/scores`` (MF logit; its ``test`` split is the baseline), ``prepare/interactions`` (split
  accounting, ``not_cold``), ``reason/traces`` (teacher), ``explain/explanations`` (BLEU-4 and
  ROUGE-L of each explanation against its row's reference reasoning), ``train/curves.json``,
  ``train/groups.json``, ``cf/model/metrics.json``: each optional, and the report says so when one
  is missing.

Outputs under ``report/``: metrics.json, report.md, report.html and PNG plots, committed with
``mark_success`` (so a rerun with the same config and inputs skips itself).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from eval import metrics as M
from thinkrec.data import schema as S
from thinkrec.io.commit import MANIFEST, SUCCESS, fingerprint, is_complete, mark_success, read_table
from thinkrec.io.fs import Storage

log = logging.getLogger(__name__)

SCORES = "score/scores"
CF_SCORES = "cf/scores"
INTERACTIONS = "prepare/interactions"
TRACES = "reason/traces"
EXPLANATIONS = "explain/explanations"
CURVES = "train/curves.json"
GROUPS = "train/groups.json"
CF_METRICS = "cf/model/metrics.json"
REPORT = "report"
QUARANTINE_TABLES = (INTERACTIONS, "prepare/items", "prepare/users", CF_SCORES, TRACES, SCORES, EXPLANATIONS)

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


TEXT_METRICS_NOT_COMPUTED = (
    "METEOR needs WordNet data and BERTScore/BLEURT need pretrained scoring models, none of which this "
    "project installs"
)


class MissingInputError(FileNotFoundError):
    """A required input table is not committed; the message names the stage that writes it."""


# -- reading -------------------------------------------------------------------------------------
def _committed(storage: Storage, rel: str) -> bool:
    return storage.exists(f"{storage.uri(rel)}/{SUCCESS}")


def _read_json(storage: Storage, rel: str) -> Any | None:
    uri = storage.uri(rel)
    return storage.read_json(uri) if storage.exists(uri) else None


def _dedupe(df: pd.DataFrame, name: str, notes: list[str]) -> pd.DataFrame:
    """One row per (user, item): a candidate scored twice would count twice in every metric."""
    dup = df.duplicated([S.USER_ID, S.ITEM_ID], keep="first")
    if dup.any():
        notes.append(f"{name}: {int(dup.sum())} repeated (user_id, item_id) rows dropped (first kept)")
    return df[~dup]


def load_inputs(cfg: Any, storage: Storage) -> dict[str, Any]:
    """Every table and JSON the report reads; absent optional inputs are None."""
    if not _committed(storage, SCORES):
        raise MissingInputError(
            f"{storage.uri(SCORES)} is not committed (no _SUCCESS): run the score stage first "
            "(`thinkrec score --config ...`)"
        )
    notes: list[str] = []
    scores = read_table(storage, storage.uri(SCORES)).to_pandas()
    unlabelled = int(scores[S.LABEL].isna().sum())
    if unlabelled:
        notes.append(f"score/scores: {unlabelled} rows without a label are not evaluated")
    scores = _dedupe(scores[scores[S.LABEL].notna()], "score/scores", notes)
    cf = None
    if _committed(storage, CF_SCORES):
        cf = read_table(storage, storage.uri(CF_SCORES)).to_pandas()
        cf = _dedupe(cf[cf[S.SPLIT] == "test"], "cf/scores", notes)
    inter = None
    if _committed(storage, INTERACTIONS):
        cols = [S.USER_ID, S.ITEM_ID, S.SPLIT, S.NOT_COLD]
        inter = read_table(storage, storage.uri(INTERACTIONS), columns=cols).to_pandas()
        inter = inter[inter[S.SPLIT] == "test"]
    traces = None
    if _committed(storage, TRACES):
        traces = read_table(storage, storage.uri(TRACES), columns=[S.TEACHER]).to_pandas()
    expl = None
    if _committed(storage, EXPLANATIONS):
        expl = read_table(storage, storage.uri(EXPLANATIONS)).to_pandas()
    manifests = {
        t: storage.read_json(f"{storage.uri(t)}/{MANIFEST}")
        for t in QUARANTINE_TABLES
        if _committed(storage, t)
    }
    return {
        "scores": scores,
        "cf": cf,
        "interactions": inter,
        "traces": traces,
        "explanations": expl,
        "curves": _read_json(storage, CURVES),
        "groups": _read_json(storage, GROUPS),
        "cf_metrics": _read_json(storage, CF_METRICS),
        "manifests": manifests,
        "notes": notes,
    }


# -- metrics -------------------------------------------------------------------------------------
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


def common_rows(scores: pd.DataFrame, cf: pd.DataFrame | None, inter: pd.DataFrame | None) -> pd.DataFrame:
    """ThinkRec rows joined with the MF test rows on (user_id, item_id): the pairs both models scored
    (all ThinkRec rows when there is no MF table). Adds ``not_cold`` when prepare/interactions has it."""
    cols = [S.USER_ID, S.ITEM_ID, S.LABEL, S.SCORE, S.P_YES, S.GATE]
    df = scores[cols].copy()
    df[S.LABEL] = df[S.LABEL].astype(np.int64)
    if cf is not None:
        mf = cf[[S.USER_ID, S.ITEM_ID, S.LABEL, S.CF_SCORE]].rename(columns={S.LABEL: "mf_label"})
        df = df.merge(mf, on=[S.USER_ID, S.ITEM_ID], how="inner")
        bad = df[S.LABEL] != df["mf_label"].astype(np.int64)
        if bad.any():
            raise ValueError(
                f"score/scores and cf/scores disagree on the label of {int(bad.sum())} common pairs, e.g. "
                f"{df.loc[bad, [S.USER_ID, S.ITEM_ID]].head(3).to_dict('records')}: they were made from "
                "different prepare outputs"
            )
        df = df.drop(columns=["mf_label"])
    if inter is not None:
        nc = inter[[S.USER_ID, S.ITEM_ID, S.NOT_COLD]].drop_duplicates([S.USER_ID, S.ITEM_ID])
        df = df.merge(nc, on=[S.USER_ID, S.ITEM_ID], how="left")
    return df.sort_values([S.USER_ID, S.ITEM_ID], kind="stable").reset_index(drop=True)


def compute_metrics(df: pd.DataFrame, k_values: tuple[int, ...], has_mf: bool) -> dict[str, Any]:
    """{subset: {model: metrics}} for ``all`` rows and, when known, the ``not_cold`` rows."""
    subsets = {"all": df}
    if S.NOT_COLD in df.columns:
        subsets["not_cold"] = df[df[S.NOT_COLD].fillna(False).astype(bool)]
    out: dict[str, Any] = {}
    for name, sub in subsets.items():
        u, y = sub[S.USER_ID].to_numpy(), sub[S.LABEL].to_numpy()
        res = {
            "thinkrec": M.all_metrics(u, y, sub[S.SCORE].to_numpy(), k_values),
            "thinkrec_p_yes": M.all_metrics(u, y, sub[S.P_YES].to_numpy(), k_values),
        }
        if has_mf:
            res["mf"] = M.all_metrics(u, y, sub[S.CF_SCORE].to_numpy(), k_values)
        out[name] = res
    return out


def gate_usage(scores: pd.DataFrame, df: pd.DataFrame) -> dict[str, Any]:
    """Rows per gate value (all scored rows) and ThinkRec's AUC within each gate (common rows)."""
    counts = scores[S.GATE].fillna("none").value_counts().sort_index()
    by_gate = {}
    for gate, sub in df.groupby(df[S.GATE].fillna("none"), sort=True):
        by_gate[str(gate)] = {"rows": len(sub), "auc": M.auc(sub[S.LABEL], sub[S.SCORE])}
    return {"counts": {str(k): int(v) for k, v in counts.items()}, "by_gate": by_gate}


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


# -- what was measured ---------------------------------------------------------------------------
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


def describe_data(cfg: Any, manifests: dict[str, Any]) -> dict[str, Any]:
    man = manifests.get(INTERACTIONS, {})
    cuts = man.get("split_cut_timestamps")
    return {
        "dataset": cfg.data.dataset,
        "source": cfg.data.source or "embedded copy",
        "max_users": cfg.data.max_users,
        "label_rule": f"rating >= {cfg.data.label_threshold}",
        "split_rule": (
            f"by time over one timeline: latest {cfg.data.test_frac:.0%} of interactions = test, the "
            f"{cfg.data.valid_frac:.0%} before = valid, the rest = train (cuts are timestamps)"
        ),
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


# -- plots ---------------------------------------------------------------------------------------
def _series(curves: Any, prefix: str = "") -> dict[str, tuple[list[float], list[float]]]:
    """Numeric series in a curves document, by dotted name: a list of numbers is plotted against its
    index, a list of records against their ``step`` (or ``epoch``, else index)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    if isinstance(curves, dict):
        for k, v in curves.items():
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


def make_plots(df: pd.DataFrame, has_mf: bool, curves: Any, gates: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    pngs: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[name] = buf.getvalue()

    y = df[S.LABEL].to_numpy()
    models = [("ThinkRec (Yes logit)", S.SCORE)] + ([("MF", S.CF_SCORE)] if has_mf else [])
    if len(np.unique(y)) == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        for name, col in models:
            fpr, tpr, _ = roc_curve(y, df[col].to_numpy())
            ax.plot(fpr, tpr, label=f"{name}, AUC {M.auc(y, df[col].to_numpy()):.4f}")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, common test rows")
        ax.legend(loc="lower right")
        save(fig, "roc.png")

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, (name, col) in zip(axes[0], models, strict=True):
        for label, color in ((0, "tab:red"), (1, "tab:green")):
            vals = df.loc[df[S.LABEL] == label, col].to_numpy()
            if len(vals):
                ax.hist(vals, bins=30, alpha=0.55, color=color, label=f"label {label} ({len(vals)})")
        ax.set(title=name, xlabel="score", ylabel="rows")
        ax.legend()
    save(fig, "score_hist.png")

    if gates["counts"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names, counts = list(gates["counts"]), list(gates["counts"].values())
        ax.bar(names, counts, color="tab:blue")
        ax.set(title="gate usage (scored rows)", ylabel="rows")
        ax.tick_params(axis="x", rotation=30)
        save(fig, "gate_usage.png")

    series = _series(curves) if curves is not None else {}
    if series:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
        ax.set(title="training curves", xlabel="step")
        ax.legend(fontsize=7)
        save(fig, "curves.png")
    return pngs


# -- report text ---------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _metrics_table(res: dict[str, Any], k_values: tuple[int, ...]) -> list[str]:
    names = [("MF", "mf"), ("ThinkRec (Yes logit)", "thinkrec"), ("ThinkRec (P(Yes))", "thinkrec_p_yes")]
    names = [(n, k) for n, k in names if k in res]
    keys = ["rows", "positives", "auc", "uauc", "uauc_users", "ranking_users"]
    keys += [f"{m}@{k}" for m in ("hr", "ndcg", "map") for k in k_values]
    lines = ["| metric | " + " | ".join(n for n, _ in names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {key} | " + " | ".join(_fmt(res[k].get(key)) for _, k in names) + " |" for key in keys]
    return lines


def render_markdown(doc: dict[str, Any], pngs: dict[str, bytes], expl: pd.DataFrame | None) -> str:
    k_values = tuple(doc["k_values"])
    model, data, teacher = doc["model"], doc["data"], doc["teacher"]
    md = [
        "# ThinkRec offline evaluation",
        "",
        f"Config hash `{doc['config_hash']}`; generated {doc['generated_at']}.",
        "",
        "## What was measured",
        "",
    ]
    if model["base"]:
        md.append(f"- **Model**: base `{model['base']}` ({model['dtype']}), LoRA {model['lora']}.")
    else:
        tiny = model.get("tiny", {})
        md.append(
            f"- **Model**: {model['kind']}: {tiny.get('num_layers')} layers, hidden {tiny.get('hidden_size')}, "
            f"built at `{model['path']}`. Its numbers say whether the pipeline works, not how good ThinkRec is."
        )
    if "architecture" in model:
        md.append(f"- **Architecture** (config.json): {model['architecture']}")
    md.append(
        f"- **CF tokens**: {'on' if model['cf_tokens'] else 'off (text only)'}; fusion mode `{model['fusion_mode']}`."
    )
    md.append(
        f"- **Data**: `{data['dataset']}` ({data['source']}), label {data['label_rule']}"
        + (f", first {data['max_users']} users" if data["max_users"] else "")
        + "."
    )
    md.append(f"- **Split**: {data['split_rule']}.")
    if data["split_rows"]:
        md.append(
            f"- **Rows per split**: {data['split_rows']}; cut timestamps {data['split_cut_timestamps']} "
            f"({', '.join(data['split_cut_dates'] or [])})."
        )
    else:
        md.append("- **Rows per split**: not available (prepare/interactions manifest absent).")
    if teacher["present"]:
        md.append(
            f"- **Teacher**: reasoning traces by {', '.join(f'`{k}` ({v})' for k, v in teacher['by_teacher'].items())}; "
            f"configured teacher `{teacher['configured']}`."
        )
    else:
        md.append(
            f"- **Teacher**: no reasoning traces found (reason/traces absent); configured teacher "
            f"`{teacher['configured']}`."
        )
    rows = doc["rows"]
    md += [
        "",
        "## Accuracy (this run)",
        "",
        f"Both models are measured on the same rows: the {rows['common']} test pairs scored by both "
        f"(ThinkRec scored {rows['thinkrec']} labelled pairs, MF {rows['mf_test'] if rows['mf_test'] is not None else 'none'}). "
        "UAUC averages per-user AUC over users with both classes; ranking metrics rank each user's "
        "rows by score (ties in input order) over users with at least one positive.",
        "",
    ]
    if rows["mf_test"] is None:
        md += ["> cf/scores is absent: no MF baseline in this report (run the cf stage).", ""]
    for subset, res in doc["metrics"].items():
        md += [
            f"### {'All common test rows' if subset == 'all' else 'not_cold rows (user and item seen in train)'}",
            "",
        ]
        md += _metrics_table(res, k_values) + [""]
    if "not_cold" not in doc["metrics"]:
        md += ["> not_cold subset not reported: prepare/interactions is absent.", ""]
    md += (
        ["![ROC](roc.png)", ""]
        if "roc.png" in pngs
        else ["> ROC curves need both classes in the test rows.", ""]
    )
    md += ["![Score histograms by label](score_hist.png)", ""]

    md += ["## Gate usage", "", "| gate | rows scored | rows evaluated | AUC |", "|---|---|---|---|"]
    for gate, n in doc["gate_usage"]["counts"].items():
        g = doc["gate_usage"]["by_gate"].get(gate, {})
        md.append(f"| {gate} | {n} | {g.get('rows', 0)} | {_fmt(g.get('auc'))} |")
    md += ["", "![Gate usage](gate_usage.png)", ""] if "gate_usage.png" in pngs else [""]
    if doc["groups"] is not None:
        md += [
            "User groups (train/groups.json):",
            "",
            "```json",
            json.dumps(doc["groups"], indent=1)[:3000],
            "```",
            "",
        ]

    md += ["## Training", ""]
    if "curves.png" in pngs:
        md += ["![Training curves](curves.png)", ""]
    else:
        md += ["> No training curves: train/curves.json is absent or holds no numeric series.", ""]
    if doc["cf_model_metrics"] is not None:
        md += [
            f"CF model metrics (cf/model/metrics.json): `{json.dumps(doc['cf_model_metrics'], sort_keys=True)[:1500]}`",
            "",
        ]
    else:
        md += ["> cf/model/metrics.json is absent.", ""]

    md += ["## Explanations", ""]
    if expl is None:
        md += ["> No explanations: explain/explanations is absent (run the explain stage).", ""]
    else:
        e = doc["explanations"]
        t = e["text_metrics"]
        md += [
            f"{e['rows']} generated explanations, {e['with_reference']} with a reference trace. "
            "Each explanation is compared with the reference reasoning of its (user, item) row; both "
            "are lower-cased and split into words at every non-alphanumeric character.",
            "",
            "| BLEU-4 (corpus) | ROUGE-L F (mean over rows) | rows compared | skipped: no reference "
            "| skipped: empty explanation |",
            "|---|---|---|---|---|",
            f"| {_fmt(t['bleu4'])} | {_fmt(t['rouge_l_f'])} | {t['rows']} | {t['skipped_no_reference']} "
            f"| {t['skipped_no_explanation']} |",
            "",
        ]
        if t["rows"] == 0:
            md += ["> No row has both a reference and an explanation: BLEU-4 and ROUGE-L are n/a.", ""]
        md += [
            f"Not computed: {e['not_computed']}. The paper's explanation scores (METEOR, BLEURT) are "
            "therefore not reproduced here, and BLEU-4 / ROUGE-L are not comparable to them.",
            "",
        ]
        for r in expl.head(3).to_dict("records"):
            text = (r.get(S.EXPLANATION) or "").replace("\n", " ")[:300]
            md.append(f"- user {r[S.USER_ID]}, item {r[S.ITEM_ID]}, label {r[S.LABEL]}: “{text}”")
        md.append("")

    md += ["## Quarantine", "", "| table | rows | quarantined | reasons |", "|---|---|---|---|"]
    for t, q in doc["quarantine"].items():
        md.append(f"| {t} | {q['rows']} | {q['rows_quarantined']} | {q['reasons'] or ''} |")
    md.append("")
    if doc["notes"]:
        md += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]

    md += [
        "## Reference: the paper's numbers (not this run)",
        "",
        "From Yu et al., *ThinkRec* (WWW 2026), ML-1M with Llama-3-8B-Instruct, AUC / UAUC. These are the "
        "paper's results, quoted for orientation only; this report did not produce them"
        + (" and its model is a tiny random-init one" if not model["base"] else "")
        + ".",
        "",
        "| method (paper, ML-1M) | AUC | UAUC |",
        "|---|---|---|",
    ]
    md += [f"| {m} | {a:.4f} | {u:.4f} |" for m, (a, u) in PAPER_ML1M.items()]
    md.append("")
    return "\n".join(md)


def render_html(markdown_text: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    style = (
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "blockquote{color:#8a5a00;border-left:4px solid #e0b050;margin-left:0;padding-left:1em}"
        "img{max-width:100%}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>ThinkRec evaluation</title>'
        f"<style>{style}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


# -- the stage -----------------------------------------------------------------------------------
def stage_meta(cfg: Any, storage: Storage) -> dict[str, str]:
    inputs = [
        storage.uri(t)
        for t in (SCORES, CF_SCORES, INTERACTIONS, TRACES, EXPLANATIONS)
        if _committed(storage, t)
    ]
    sections = {k: v for k, v in cfg.to_dict().items() if k not in ("ray", "storage")}
    # The version changes with the report's contents, so a report of an older kind is never up to date.
    return fingerprint({**sections, "stage": "report/v2"}, inputs, storage)


def run(cfg: Any) -> dict[str, Any]:
    """Evaluate score/scores (and cf/scores) and write report/. Returns the metrics document."""
    storage = Storage.from_config(cfg)
    out = storage.uri(REPORT)
    if not _committed(storage, SCORES):
        raise MissingInputError(
            f"{storage.uri(SCORES)} is not committed (no _SUCCESS): run the score stage first "
            "(`thinkrec score --config ...`)"
        )
    meta = stage_meta(cfg, storage)
    if is_complete(storage, out, meta):
        log.info("evaluate: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/metrics.json")
    storage.delete(out)  # never mix files of an older report into this one's manifest

    inp = load_inputs(cfg, storage)
    has_mf = inp["cf"] is not None
    df = common_rows(inp["scores"], inp["cf"], inp["interactions"])
    k_values = tuple(cfg.eval.k_values)
    expl = inp["explanations"]
    gates = gate_usage(inp["scores"], df)
    doc: dict[str, Any] = {
        "config_hash": cfg.hash(),
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "k_values": list(k_values),
        "model": describe_model(cfg),
        "data": describe_data(cfg, inp["manifests"]),
        "teacher": describe_teacher(cfg, inp["traces"]),
        "rows": {
            "thinkrec": len(inp["scores"]),
            "mf_test": len(inp["cf"]) if has_mf else None,
            "common": len(df),
            "not_cold": int(df[S.NOT_COLD].fillna(False).astype(bool).sum()) if S.NOT_COLD in df else None,
        },
        "metrics": compute_metrics(df, k_values, has_mf),
        "gate_usage": gates,
        "quarantine": quarantine_counts(inp["manifests"]),
        "groups": inp["groups"],
        "cf_model_metrics": inp["cf_metrics"],
        "explanations": None
        if expl is None
        else {
            "rows": len(expl),
            "with_reference": int(expl[S.REASONING].notna().sum()),
            "text_metrics": M.explanation_text_metrics(
                expl[S.EXPLANATION].tolist(), expl[S.REASONING].tolist()
            ),
            "not_computed": TEXT_METRICS_NOT_COMPUTED,
        },
        "paper_reference_ml1m_llama3_8b": {m: {"auc": a, "uauc": u} for m, (a, u) in PAPER_ML1M.items()},
        "notes": inp["notes"],
    }
    if len(df) == 0:
        doc["notes"].append("no common rows between score/scores and the MF test rows: every metric is n/a")
    doc = _clean(doc)
    pngs = make_plots(df, has_mf, inp["curves"], gates) if len(df) else {}
    markdown_text = render_markdown(doc, pngs, expl)
    for name, data in pngs.items():
        storage.write_bytes(f"{out}/{name}", data)
    storage.write_json(f"{out}/metrics.json", doc)
    storage.write_bytes(f"{out}/report.md", markdown_text.encode())
    storage.write_bytes(f"{out}/report.html", render_html(markdown_text).encode())
    mark_success(storage, out, meta, config=cfg.to_dict())
    log.info(
        "evaluate: %s (ThinkRec AUC %s on %d rows)", out, doc["metrics"]["all"]["thinkrec"]["auc"], len(df)
    )
    return doc
