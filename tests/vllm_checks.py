"""Runs the vLLM scorer in its own process (vLLM starts worker processes and needs a __main__ guard)
and writes what it returned to a JSON file for tests/test_scoring_vllm.py to check.

    python tests/vllm_checks.py --base <tiny model dir> --root <output root with artifacts> --out out.json \
        [--table <raw-id candidate table> --stage-out <output dir>]

With ``--table``, the engine is the score stage's own: the table is partitioned by the stage, the
stage's scorer actor body (``stage.ShardStep``, score.backend=vllm) is built here, its engine serves
the checks below, and then it scores and publishes every shard of the table, which is committed;
one engine start covers both.

``build_rows`` is shared with the test, so both sides score the very same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

# Row sets: (name, user_id, gate over [global, expert-0, expert-1, expert-2], cf_tokens)
ROW_SETS: list[tuple[str, int, list[float], bool]] = [
    ("global", 1, [1, 0, 0, 0], True),
    ("expert", 2, [0, 0, 1, 0], True),
    ("mix_grid", 3, [0, 0.5, 0.3, 0.2], True),  # on the 0.1 grid: served exactly
    ("mix_off", 4, [0, 0.47, 0.33, 0.2], True),  # off the grid: served as [0, .5, .3, .2]
    ("mix_global", 5, [0.2, 0.4, 0, 0.4], True),  # the global adapter inside a mixture
    ("text_global", 6, [1, 0, 0, 0], False),  # token ids, no CF slots (model.cf_tokens=false)
    ("text_mix", 6, [0, 0.6, 0.4, 0], False),
]
N_CANDIDATES = 3


def checks_config(base: str, root: str) -> Any:
    from thinkrec import config as C

    return C.load(
        "configs/demo.yaml",
        {
            "storage.output_root": root,
            "model.base": base,
            "score.backend": "vllm",
            "score.mixture_step": 0.1,
            "score.max_mixtures": 16,
            "score.vllm_kv_cache_gib": 0.25,
            "score.vllm_max_model_len": 1024,
            "score.vllm_enforce_eager": True,
            "score.vllm_block_size": 32,  # below the prompts' shared prefix, so the prefix cache can hit
        },
    )


def build_rows(cfg: Any) -> tuple[list[Any], list[str]]:
    """The rows every check scores, and the row-set name of each."""
    from thinkrec.model.base import load_tokenizer
    from thinkrec.model.prompt import ItemInfo, PromptBuilder
    from thinkrec.scoring.base import ScoreRow

    tok = load_tokenizer(cfg.model.base)
    builders = {cf: PromptBuilder(tok, cf_tokens=cf) for cf in (True, False)}
    genres = ["drama", "comedy", "thriller", "romance", "action"]
    rows, names = [], []
    for name, user, gate, cf in ROW_SETS:
        pb = builders[cf]
        history = [
            (i, ItemInfo(f"Movie number {i}", (genres[i % 5], genres[(i + 2) % 5])), (user + i) % 2)
            for i in range(1 + user, 4 + user)
        ]
        prefix = pb.encode_prefix(user, history)
        for c in range(N_CANDIDATES):
            item = 10 + c + user
            cand = pb.encode_candidate(item, ItemInfo(f"Film {item}", (genres[c % 5],)))
            rows.append(ScoreRow(user, item, prefix, cand, np.array(gate, dtype=np.float64), name))
            names.append(name)
    return rows, names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", default="")
    ap.add_argument("--stage-out", default="")
    args = ap.parse_args()

    from thinkrec.scoring.base import load_artifacts
    from thinkrec.scoring.engine.vllm import VLLMScorer

    cfg = checks_config(args.base, args.root)
    rows, _ = build_rows(cfg)
    step = None
    if args.table:
        import ray

        from thinkrec.io.commit import TableWriter
        from thinkrec.io.fs import Storage
        from thinkrec.scoring import stage

        scfg = cfg.replace(
            **{"score.candidates": args.table, "score.output": args.stage_out, "score.num_shards": 2}
        )
        storage = Storage.from_config(scfg)
        out = stage.output_uri(scfg, storage)
        meta = stage.stage_meta(scfg, storage)
        schema = stage.first_schema(scfg, storage)
        writer = TableWriter(
            storage, out, num_shards=2, key=stage.shard_column("raw"), meta=meta, schema=schema
        )
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        staged, mode = stage.partition(scfg, storage, out, meta)
        ray.shutdown()  # the partition is staged; the engine below runs without Ray
    t0 = time.perf_counter()
    if args.table:
        step = stage.ShardStep(scfg.to_dict(), out, schema, mode)
        scorer = step.scorer
    else:
        scorer = VLLMScorer(cfg, load_artifacts(cfg))
    start_s = time.perf_counter() - t0
    seeded = dict(scorer.mixtures)
    served = scorer.adapters_for(rows)
    report = scorer.mixture_report.to_dict()  # this one call; it accumulates over calls
    t1 = time.perf_counter()
    score, p_yes = scorer.score(rows)
    first_s = time.perf_counter() - t1
    no_logit = scorer.last_no_logits
    first_cached = scorer.last_cached_tokens
    # The same rows again, shuffled: results must follow the caller's order and hit the prefix cache.
    perm = np.random.default_rng(0).permutation(len(rows))
    score2, p2 = scorer.score([rows[i] for i in perm])
    result = {
        "start_s": start_s,
        "first_call_s": first_s,
        "score": score.tolist(),
        "p_yes": p_yes.tolist(),
        "no_logit": no_logit.tolist(),
        "perm": perm.tolist(),
        "score_perm": score2.tolist(),
        "p_yes_perm": p2.tolist(),
        "served": served,
        "served_weights": {name: [u * scorer.step for u in key] for key, name in scorer.mixtures.items()},
        "seeded": [name for name in seeded.values()],
        "mixture_report": report,
        "mixture_report_total": scorer.mixture_report.to_dict(),
        "cached_tokens": [first_cached, scorer.last_cached_tokens],
        "yes_no_ids": [scorer.yes_id, scorer.no_id],
        "use_embeds": scorer.use_embeds,
    }
    # A scorer must reject a gate of the wrong width with the row named.
    try:
        bad = rows[0]
        scorer.adapters_for([type(bad)(bad.user_id, bad.item_id, bad.prefix, bad.candidate, np.ones(2), "x")])
        result["bad_gate_error"] = ""
    except ValueError as e:
        result["bad_gate_error"] = str(e)
    if step is not None:
        for shard in range(2):
            step.score_shard(shard)
        man = writer.commit(rows_in=int(staged.sum()), extra={"version": step.version, "backend": "vllm"})
        result["stage"] = {"out": out, "rows": man["rows"], "rows_quarantined": man["rows_quarantined"]}
    scorer.close()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
