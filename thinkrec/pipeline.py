"""pipeline: every stage in order on one output root. Finished stages skip themselves (their output
holds the config and input hashes it was made from), so rerunning after a failure resumes."""

from __future__ import annotations

import logging
import time
from typing import Any

from thinkrec.cli import STAGES, _resolve
from thinkrec.config import Config
from thinkrec.io.fs import Storage

log = logging.getLogger("thinkrec.pipeline")

ORDER = ("prepare", "keywords", "cf", "reason", "train", "score", "explain", "evaluate")


def run(cfg: Config) -> dict[str, Any]:
    storage = Storage.from_config(cfg)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for i, name in enumerate(ORDER, 1):
        log.info("[%d/%d] %s: %s", i, len(ORDER), name, STAGES[name][1])
        t0 = time.perf_counter()
        _resolve(STAGES[name][0])(cfg)
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("[%d/%d] %s done in %.1fs", i, len(ORDER), name, timings[name])
    report = storage.uri("report")
    metrics = storage.read_json(f"{report}/metrics.json")
    print(summary(report, metrics, timings, time.perf_counter() - t_all))
    return {"report": report, "metrics": metrics, "timings": timings}


def summary(report: str, metrics: dict[str, Any], timings: dict[str, float], total: float) -> str:
    lines = ["", f"Report: {report}/report.html  (also report.md, metrics.json)"]

    def fmt(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else "n/a"

    models = metrics.get("metrics", {}).get("all", {})
    for model, m in models.items():
        mm = m.get("metrics", {})
        auc, uauc = fmt((mm.get("auc") or {}).get("value")), fmt((mm.get("uauc") or {}).get("value"))
        lines.append(
            f"  {model:>12}: AUC {auc}  UAUC {uauc}  ({m.get('counts', {}).get('rows', '?')} test rows)"
        )
    best = metrics.get("strongest_baseline") or {}
    if best.get("model") and best.get("thinkrec_margin"):
        lines.append(
            f"  strongest baseline {best['model']}: ThinkRec AUC margin {best['thinkrec_margin']['diff']:+.4f}"
        )
    text = metrics.get("explanations")
    if text:
        lines.append(
            f"  explanations: BLEU-4 {fmt(text['bleu4'])}  ROUGE-L F {fmt(text['rouge_l_f'])}  "
            f"METEOR {fmt(text['meteor'])}  ({text['with_reference']} rows with a reference)"
        )
        lines.append(
            f"  explanations: distinct-2 {fmt(text.get('distinct_2'))}  states Yes/No "
            f"{fmt(text.get('states_answer_share'))}  agrees with the score's decision "
            f"{fmt(text.get('answer_agrees_share'))}"
        )
    lines.append(
        "  stage seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()) + f"; total {total:.0f}"
    )
    return "\n".join(lines)
