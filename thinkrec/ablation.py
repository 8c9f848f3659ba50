"""ablation: the ThinkRec ablations of the paper, on one split, in one comparison table.

Each variant is the full pipeline under ``<output_root>/ablation/<variant>/`` with a few overrides.
The stages no variant changes (prepare, cf, reason, and the tiny base model) run once: the first
variant's committed outputs are copied into the others' roots before they run, and their fingerprints
(relative to the output root) let each pipeline skip them. Every variant sees the same split and the
same test rows; the table is written to ``<output_root>/ablation/comparison.{md,json}``, and
``thinkrec compare`` over the variants (paired intervals) to ``<output_root>/ablation/compare/``.
"""

from __future__ import annotations

import logging
from typing import Any

from thinkrec.config import Config
from thinkrec.io.fs import Storage

log = logging.getLogger("thinkrec.ablation")

VARIANTS: dict[str, dict[str, Any]] = {
    "tallrec": {"model.cf_tokens": False, "train.reasoning": False, "train.experts": False},
    "collm": {"model.cf_tokens": True, "train.reasoning": False, "train.experts": False},
    "thinkrec-no-experts": {"model.cf_tokens": True, "train.reasoning": True, "train.experts": False},
    "thinkrec": {"model.cf_tokens": True, "train.reasoning": True, "train.experts": True},
}
"""TALLRec-style: text only. CoLLM-style: CF tokens, no reasoning, no experts. Then ThinkRec without
and with experts."""


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "n/a"


def _flat(model: dict[str, Any] | None) -> dict[str, Any]:
    """Point values and the row count of one model in metrics.json (eval/SCHEMA.md)."""
    if not model:
        return {}
    return {k: v["value"] for k, v in model["metrics"].items()} | {"rows": model["counts"]["rows"]}


def variant_config(cfg: Config, name: str) -> Config:
    storage = Storage.from_config(cfg)
    return cfg.replace(**{"storage.output_root": storage.uri("ablation", name), **VARIANTS[name]})


SHARED = ("base_model", "prepare", "keywords", "cf", "reason")
"""Outputs that depend on nothing a variant overrides (their fingerprints cover data, cf, reason)."""


def share_upstream(storage: Storage, src_root: str, dst_root: str) -> None:
    """Copy the first variant's committed shared outputs into another variant's root."""
    for part in SHARED:
        src, dst = f"{src_root}/{part}", f"{dst_root}/{part}"
        if storage.exists(src) and not storage.exists(dst):
            n = storage.copy_tree(src, dst)
            log.info("ablation: reused %s (%d files) from %s", part, n, src_root)


def run(cfg: Config) -> dict[str, Any]:
    from thinkrec import pipeline

    storage = Storage.from_config(cfg)
    rows = {}
    first: str | None = None
    for name in cfg.ablation.variants:
        log.info("ablation: %s (%s)", name, VARIANTS[name])
        vcfg = variant_config(cfg, name)
        if first is None:
            first = vcfg.storage.output_root
        else:
            share_upstream(storage, first, vcfg.storage.output_root)
        out = pipeline.run(vcfg)
        models = out["metrics"].get("metrics", {}).get("all", {})
        rows[name] = {
            "thinkrec": _flat(models.get("thinkrec")),
            "mf": _flat(models.get(f"cf_{cfg.cf.model}")),
            "timings": out["timings"],
        }
    lines = [
        "# Ablations",
        "",
        f"Config hash {cfg.hash()}; every variant on the same split and test rows (MF: the same CF",
        "model in every variant, scored on those rows). Train seconds: this run's train stage (0 when",
        "a finished stage was reused).",
        "",
        "| variant | CF tokens | reasoning | experts | AUC | UAUC | MF AUC | MF UAUC | rows | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        v = VARIANTS[name]
        m, mf = r["thinkrec"], r["mf"]
        lines.append(
            f"| {name} | {v['model.cf_tokens']} | {v['train.reasoning']} | {v['train.experts']} "
            f"| {_fmt(m.get('auc'))} | {_fmt(m.get('uauc'))} | {_fmt(mf.get('auc'))} "
            f"| {_fmt(mf.get('uauc'))} | {m.get('rows', 'n/a')} | {r['timings'].get('train', 'n/a')} |"
        )
    table = "\n".join(lines) + "\n"
    storage.write_bytes(storage.uri("ablation", "comparison.md"), table.encode())
    storage.write_json(storage.uri("ablation", "comparison.json"), rows)
    print(table)
    roots = [variant_config(cfg, n).storage.output_root for n in rows]
    if len(roots) >= 2:
        from eval.compare import compare

        # Paired intervals: every variant against the first on the rows all of them scored.
        compare(
            roots,
            storage.uri("ablation", "compare"),
            resamples=cfg.eval.bootstrap_resamples,
            seed=cfg.seed,
            k_values=tuple(cfg.eval.k_values),
            s3_endpoint=cfg.storage.s3_endpoint,
        )
    return rows
