"""The ``thinkrec`` command: one subcommand per stage, ``pipeline`` for all of them, and ``bench``.

Every stage subcommand takes ``--config FILE`` and any number of ``key=value`` overrides, e.g.
``thinkrec score --config configs/demo.yaml score.backend=vllm storage.output_root=s3://bucket/run``.
``python -m jobs.<stage>`` is the same command for ``ray job submit``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

# stage -> (callable "module:function", one-line help). Order = pipeline order.
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("thinkrec.data.prepare:run", "read raw logs; label, time-split, build histories -> prepare/"),
    "keywords": (
        "thinkrec.keywords.stage:run",
        "up to 10 keywords per item (genres | tfidf | llm), cached by text -> keywords/",
    ),
    "cf": ("thinkrec.cf.stage:run", "train the CF model (MF) on Ray Train; embeddings + CF scores -> cf/"),
    "reason": ("thinkrec.reasoning.stage:run", "reasoning traces for hard training samples -> reason/"),
    "train": ("thinkrec.train.stage:run", "global LoRA, CF projector, user groups, expert LoRAs -> train/"),
    "score": ("thinkrec.scoring.stage:run", "score candidate pairs with the gated experts -> score/"),
    "explain": ("thinkrec.explain.stage:run", "generate explanations for sampled test rows -> explain/"),
    "evaluate": ("eval.stage:run", "metrics, plots and the report -> report/"),
    "pipeline": ("thinkrec.pipeline:run", "every stage above, in order, skipping finished work"),
    "ablation": (
        "thinkrec.ablation:run",
        "TALLRec / CoLLM / ThinkRec-without-experts / ThinkRec on one split",
    ),
}
BENCHES: dict[str, tuple[str, str]] = {
    "scoring": (
        "thinkrec.scoring.bench:run",
        "scoring throughput ratios (prefix sharing, fusion, reference)",
    ),
    "training": ("thinkrec.train.bench:run", "training tokens/s with 1 and 2 CPU workers"),
    "generation": (
        "thinkrec.generation.bench:run",
        "generated tokens/s: hf, vLLM offline, openai -> vllm serve, at batch 1 and 32",
    ),
    "evaluate": ("eval.bench:run", "evaluate rows/s and peak RSS at 1M and 10M scored rows"),
    "prepare": (
        "thinkrec.data.bench:run",
        "prepare on synthetic Yelp-shaped logs of 200k and 2M interactions: rows/s, wall, peak RSS",
    ),
}


def _resolve(target: str) -> Any:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see configs/); defaults apply where it is silent")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thinkrec",
        description="Train ThinkRec recommenders on Ray and score and evaluate them offline.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_) in STAGES.items():
        _add_config_args(sub.add_parser(name, help=help_, description=help_))
    cmp_ = sub.add_parser(
        "compare",
        help="several runs' ThinkRec scores in one table with paired intervals (Markdown + HTML)",
        description="Evaluate the score tables of several output roots on the rows they all scored; "
        "each run's difference to the first is a paired user bootstrap.",
    )
    cmp_.add_argument("roots", nargs="+", metavar="RUN_ROOT", help="output roots (local paths or s3://...)")
    cmp_.add_argument("--out", default="compare", help="directory for comparison.{md,html,json}")
    cmp_.add_argument("--resamples", type=int, default=200, help="bootstrap resamples (default 200)")
    cmp_.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    cmp_.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint for s3:// roots")
    bench = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (_, help_) in BENCHES.items():
        b = bsub.add_parser(name, help=help_, description=help_)
        b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        b.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    return p


def run_stage(name: str, argv: list[str] | None = None) -> Any:
    """Parse --config and overrides, start Ray, run one stage (or the pipeline)."""
    from thinkrec import config as C
    from thinkrec.runtime import init_ray, setup_logging

    p = argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=STAGES[name][1])
    _add_config_args(p)
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = C.load(args.config, args.overrides)
    except (C.ConfigError, FileNotFoundError) as err:
        p.error(str(err))
    init_ray(cfg)
    return _resolve(STAGES[name][0])(cfg)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "compare":
        from eval.compare import compare

        compare(args.roots, args.out, resamples=args.resamples, seed=args.seed, s3_endpoint=args.s3_endpoint)
        return
    if args.command == "bench":
        result = _resolve(BENCHES[args.bench][0])(quick=args.quick)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return
    run_stage(args.command, argv[1:])
