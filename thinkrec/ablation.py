"""ablation: the ThinkRec ablations of the paper, on one split, in one comparison table.

Each variant is the full pipeline under ``<output_root>/ablation/<variant>/`` with a few overrides.
The stages no variant changes (prepare, cf, reason, and the tiny base model) run once: the first
variant's committed outputs are copied into the others' roots before they run, and their fingerprints
(relative to the output root) let each pipeline skip them. Every variant sees the same split and the
same test rows. ThinkRec without experts, when ThinkRec also runs, is ThinkRec's trained model scored
with the global adapter alone (``DERIVED``). The table is written to
``<output_root>/ablation/comparison.{md,json}``, and ``thinkrec compare`` over the variants (paired
intervals) to ``<output_root>/ablation/compare/``.

With ``ablation.seeds``, every variant runs once per seed under ``ablation/seed-<s>/<variant>``
(upstream outputs shared within a seed) and the table reports each AUC and UAUC as mean ± sample
standard deviation over the seeds, the simple baselines beside them, the strongest baseline and each
variant's margin to it, and whether the paper's ordering holds; comparison.json keeps every seed's
metrics and learning curves (train/curves.json).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from thinkrec.config import Config
from thinkrec.io.commit import MANIFEST, is_complete
from thinkrec.io.fs import Storage
from thinkrec.model.layout import CURVES
from thinkrec.scoring.base import TRAIN_DIR

log = logging.getLogger("thinkrec.ablation")

VARIANTS: dict[str, dict[str, Any]] = {
    "tallrec": {"model.cf_tokens": False, "train.reasoning": False, "train.experts": False},
    # CoLLM's input is the CF model's vectors alone: no history summary in the user's token. Stage 2
    # is its only CF learning, and it was still rising after two epochs: three took seed 0 from -0.0106
    # to +0.0012 AUC against MF on the same upstream outputs, and seed 1 to -0.0009
    # (bench/results/collm-projector-epochs-cpu.md). One run in six of this setting did not learn at
    # all (bench/results/collm-cf-scale-cpu.md); stage 2 now starts over when that happens
    # (train.projector_restarts, bench/results/collm-restart-cpu.md), though from that run's upstream
    # outputs the restarts' own draws fell short too (bench/results/collm-grad-norm-cpu.md).
    "collm": {
        "model.cf_tokens": True,
        "model.cf_history": False,
        "train.reasoning": False,
        "train.experts": False,
        "train.projector_epochs": 3,
    },
    "thinkrec-no-experts": {"model.cf_tokens": True, "train.reasoning": True, "train.experts": False},
    "thinkrec": {"model.cf_tokens": True, "train.reasoning": True, "train.experts": True},
}
"""TALLRec-style: text only. CoLLM-style: CF tokens (the CF model's vectors alone), no reasoning, no
experts, three epochs of stage 2 (the config's ``train.projector_epochs`` for the others). Then
ThinkRec without and with experts, whose user token also carries the history summary
(``model.cf_history``, the default)."""


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "n/a"


def _flat(model: dict[str, Any] | None) -> dict[str, Any]:
    """Point values and the row count of one model in metrics.json (eval/SCHEMA.md)."""
    if not model:
        return {}
    return {k: v["value"] for k, v in model["metrics"].items()} | {"rows": model["counts"]["rows"]}


def _spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max over the seeds (NaN-free values only)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def _mean_flat(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every numeric metric's mean over the seeds' flat rows (the row count is the first's)."""
    if len(runs) == 1:
        return runs[0]
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: _spread([r.get(k) for r in runs])["mean"] for k in keys} | {"rows": runs[0].get("rows")}


def _ms(sp: dict[str, Any]) -> str:
    """``mean ± sd`` of a spread, or the value alone for one seed."""
    if sp["mean"] is None:
        return "n/a"
    return f"{sp['mean']:.4f}" if sp["n"] == 1 else f"{sp['mean']:.4f} ± {sp['sd']:.4f}"


DERIVED: dict[str, tuple[str, dict[str, Any]]] = {
    "thinkrec-no-experts": ("thinkrec", {"fusion.mode": "global"})
}
"""Variants that are another variant's trained model, scored differently, when both run: ThinkRec
without experts is the ThinkRec model with its global adapter alone. Its global and projector phases
are the same computation with or without the expert phases after them (the same adapter and projector
tensors, checked on ML-100K), and the gate is applied at scoring, so its train output is copied from
ThinkRec's instead of trained again (about a quarter of an ablation seed's training). Alone, it trains
its own model without experts."""


def derived_from(name: str, variants: list[str]) -> str | None:
    """The variant whose trained model ``name`` is scored from in a run of ``variants``, or None."""
    src = DERIVED.get(name, (None, {}))[0]
    return src if src in variants else None


def variant_config(cfg: Config, name: str, seed: int | None = None, source: str | None = None) -> Config:
    """The variant's config: ``ablation/<name>``, or ``ablation/seed-<s>/<name>`` under a seed. With
    ``source`` (``derived_from``), the source variant's training settings and ``DERIVED``'s scoring
    overrides."""
    storage = Storage.from_config(cfg)
    overrides = {**VARIANTS[source], **DERIVED[name][1]} if source else VARIANTS[name]
    if seed is None:
        return cfg.replace(**{"storage.output_root": storage.uri("ablation", name), **overrides})
    root = storage.uri("ablation", f"seed-{seed}", name)
    return cfg.replace(**{"seed": seed, "storage.output_root": root, **overrides})


SHARED = ("base_model", "prepare", "keywords", "cf", "reason")
"""Outputs that depend on nothing a variant overrides (their fingerprints cover data, cf, reason)."""


def share_upstream(storage: Storage, src_root: str, dst_root: str) -> None:
    """Copy the first variant's committed shared outputs into another variant's root."""
    for part in SHARED:
        src, dst = f"{src_root}/{part}", f"{dst_root}/{part}"
        if storage.exists(src) and not storage.exists(dst):
            n = storage.copy_tree(src, dst)
            log.info("ablation: reused %s (%d files) from %s", part, n, src_root)


def share_trained(storage: Storage, src_root: str, dst_root: str) -> None:
    """Copy a source variant's committed train output into a derived variant's root. A train output
    the destination holds uncommitted (an interrupted training of its own), or committed from other
    settings or inputs, is replaced: the pipeline would otherwise train again."""
    src, dst = f"{src_root}/{TRAIN_DIR}", f"{dst_root}/{TRAIN_DIR}"
    if not is_complete(storage, src):
        return
    want = storage.read_json(f"{src}/{MANIFEST}")
    if is_complete(storage, dst, {k: want.get(k) for k in ("config_hash", "input_hash")}):
        return
    storage.delete(dst)
    n = storage.copy_tree(src, dst)
    log.info("ablation: reused %s (%d files) from %s", TRAIN_DIR, n, src_root)


def _curves(storage: Storage, root: str) -> dict[str, Any]:
    """The train stage's learning curves (train loss per step, validation AUC/UAUC per epoch)."""
    uri = f"{root}/{TRAIN_DIR}/{CURVES}"
    return storage.read_json(uri) if storage.exists(uri) else {}


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One variant's row of the comparison from its per-seed runs (seed -> flat metrics of thinkrec,
    mf and the baselines): every metric's mean, AUC and UAUC spreads per model, the runs kept."""
    rs = list(runs.values())

    def pick(r: dict[str, Any], m: str) -> dict[str, Any]:
        return r[m] if m in ("thinkrec", "mf") else r["baselines"].get(m, {})

    models = ["thinkrec", "mf", *rs[0]["baselines"]]
    return {
        "thinkrec": _mean_flat([r["thinkrec"] for r in rs]),
        "mf": _mean_flat([r["mf"] for r in rs]),
        "spread": {m: {k: _spread([pick(r, m).get(k) for r in rs]) for k in ("auc", "uauc")} for m in models},
        "timings": rs[0]["timings"],
        "seeds": runs,
    }


def table(cfg: Config, rows: dict[str, Any], seeds: list[int | None]) -> str:
    """The comparison's markdown: variants, the baselines beside them, the paper's ordering."""
    multi = len(seeds) > 1
    seed_txt = f"seeds {', '.join(map(str, seeds))}: mean ± sample sd" if multi else f"seed {cfg.seed}"
    lines = [
        "# Ablations",
        "",
        f"Config hash {cfg.hash()}; every variant on the same split and test rows ({seed_txt}). MF: the",
        "CF model of the same seed, scored on those rows. Train seconds: this run's train stage (0 when",
        "a finished stage was reused; the first seed's).",
        "",
        "| variant | CF tokens | reasoning | experts | AUC | UAUC | MF AUC | MF UAUC | rows | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        v, sp = VARIANTS[name], r["spread"]
        lines.append(
            f"| {name} | {v['model.cf_tokens']} | {v['train.reasoning']} | {v['train.experts']} "
            f"| {_ms(sp['thinkrec']['auc'])} | {_ms(sp['thinkrec']['uauc'])} | {_ms(sp['mf']['auc'])} "
            f"| {_ms(sp['mf']['uauc'])} | {r['thinkrec'].get('rows', 'n/a')} "
            f"| {r['timings'].get('train', 'n/a')} |"
        )
    first = next(iter(rows.values()))
    base = {m: s for m, s in first["spread"].items() if m not in ("thinkrec", "mf")}
    if base:
        lines += ["", "Baselines on the same rows (the first variant's runs):", ""]
        lines += ["| baseline | AUC | UAUC |", "|---|---|---|"]
        lines += [f"| {m} | {_ms(s['auc'])} | {_ms(s['uauc'])} |" for m, s in base.items()]
        best = max(base, key=lambda m: base[m]["auc"]["mean"] or -1)
        lines += ["", f"Strongest baseline by AUC: {best} ({_ms(base[best]['auc'])})."]
        for name, r in rows.items():
            m = r["spread"]["thinkrec"]["auc"]["mean"]
            if m is not None and base[best]["auc"]["mean"] is not None:
                lines.append(f"- {name}: AUC margin to it {m - base[best]['auc']['mean']:+.4f}")
    order = [n for n in reversed(VARIANTS) if n in rows]  # the paper's, strongest first
    if len(order) > 1:
        means = [rows[n]["spread"]["thinkrec"]["auc"]["mean"] or float("nan") for n in order]
        holds = all(a > b for a, b in zip(means, means[1:], strict=False))
        measured = " > ".join(
            f"{n} {rows[n]['spread']['thinkrec']['auc']['mean']:.4f}"
            for n in sorted(order, key=lambda n: -(rows[n]["spread"]["thinkrec"]["auc"]["mean"] or -1))
        )
        lines += [
            "",
            f"The paper's ordering by AUC ({' > '.join(order)}): {'holds' if holds else 'does not hold'}"
            f" here. Measured (mean AUC): {measured}.",
        ]

    from eval.describe import restarts

    def stalled_phases(curves: dict[str, Any]) -> str:
        return ", ".join(f"{ph} {len(r)}x" for ph, r in restarts(curves).items())

    restarted = [
        f"{name} seed {seed} ({stalled_phases(run['curves'])})"
        for name, r in rows.items()
        for seed, run in r["seeds"].items()
        if stalled_phases(run.get("curves", {}))
    ]
    if restarted:
        lines += [
            "",
            f"Stage 2 stalled and started over (train.projector_restarts) in: {'; '.join(restarted)}."
            " The stalled attempts are in each run's train/curves.json.",
        ]
    return "\n".join(lines) + "\n"


def run(cfg: Config) -> dict[str, Any]:
    from thinkrec import pipeline

    storage = Storage.from_config(cfg)
    seeds: list[int | None] = list(cfg.ablation.seeds) or [None]
    by_seed: dict[str, dict[str, Any]] = {name: {} for name in cfg.ablation.variants}
    variants = list(cfg.ablation.variants)
    # A variant scored from another's model runs after it (the table keeps the configured order).
    order = sorted(variants, key=lambda n: derived_from(n, variants) is not None)
    for seed in seeds:
        first: str | None = None  # upstream outputs are shared within a seed (its fingerprints)
        for name in order:
            source = derived_from(name, variants)
            vcfg = variant_config(cfg, name, seed, source)
            log.info("ablation: %s (%s) seed %s", name, VARIANTS[name], vcfg.seed)
            if source:
                src_root = variant_config(cfg, source, seed).storage.output_root
                log.info("ablation: %s scores %s's trained model with %s", name, source, DERIVED[name][1])
                share_upstream(storage, src_root, vcfg.storage.output_root)
                share_trained(storage, src_root, vcfg.storage.output_root)
            elif first is None:
                first = vcfg.storage.output_root
            else:
                share_upstream(storage, first, vcfg.storage.output_root)
            out = pipeline.run(vcfg)
            models = out["metrics"].get("metrics", {}).get("all", {})
            cf_name = f"cf_{cfg.cf.model}"
            by_seed[name][str(vcfg.seed)] = {
                "thinkrec": _flat(models.get("thinkrec")),
                "mf": _flat(models.get(cf_name)),
                "baselines": {m: _flat(v) for m, v in models.items() if m not in ("thinkrec", cf_name)},
                "timings": out["timings"],
                "curves": _curves(storage, vcfg.storage.output_root),
            }
    rows = {name: summarise(runs) for name, runs in by_seed.items()}
    text = table(cfg, rows, [s if s is not None else cfg.seed for s in seeds])
    storage.write_bytes(storage.uri("ablation", "comparison.md"), text.encode())
    storage.write_json(storage.uri("ablation", "comparison.json"), rows)
    print(text)
    # The first seed's variants (paired intervals need one run per model).
    roots = [variant_config(cfg, n, seeds[0]).storage.output_root for n in rows]
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
