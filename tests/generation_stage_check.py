"""Runs the generation stage (Ray Data actors, ``openai`` backend) under its own local Ray, the way a
job driver does, for tests/test_generation_openai.py: the API key reaches the actors through the
environment the Ray processes inherit, never through a runtime_env.

    python tests/generation_stage_check.py --url URL --model NAME --key-env VAR --root DIR --out out.json \
        [--rows N] [--max-new-tokens N] [--set generation.max_tries=100 ...]
    python tests/generation_stage_check.py ... --keywords CLEAN_URL

With ``--keywords``, the keywords stage (``keywords.extractor=llm``) runs instead, over a small
written prepare: first against URL (a faulty proxy, one try per row), then, its table deleted and the
cache kept, against CLEAN_URL. out.json has both manifests and the first run's quarantine reasons.
"""

from __future__ import annotations

import argparse
import json
import os

import ray


def prompt(i: int) -> str:
    return f"User {i} liked movie {i % 7}. Next they watch"


def main() -> None:
    ap = argparse.ArgumentParser()
    for a in ("--url", "--model", "--key-env", "--root", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value (YAML values)")
    ap.add_argument("--keywords", default="", help="run the keywords stage, then again against this URL")
    args = ap.parse_args()
    import pandas as pd

    from thinkrec import config as C
    from thinkrec.data import schema as S
    from thinkrec.generation.base import Decoding
    from thinkrec.generation.stage import generate
    from thinkrec.runtime import init_ray

    cfg = C.load(
        "configs/demo.yaml",
        {"storage.output_root": args.root, "ray.num_cpus": 2, "generation.backend": "openai",
         "generation.base_url": args.url, "generation.model": args.model, "generation.api_key_env": args.key_env,
         "generation.batch_size": 4, **C.parse_overrides(args.set)},
    )  # fmt: skip
    init_ray(cfg)
    if args.keywords:
        keywords(cfg, args.rows, args.keywords, args.out)
        ray.shutdown()
        return
    rows = pd.DataFrame({S.ROW_KEY: [f"r{i}" for i in range(args.rows)],
                         S.PROMPT: [prompt(i) for i in range(args.rows)]})  # fmt: skip
    out = generate(ray.data.from_pandas(rows), cfg, Decoding(max_new_tokens=args.max_new_tokens)).to_pandas()

    @ray.remote
    def runtime_env() -> str:
        return json.dumps(ray.get_runtime_context().runtime_env)

    result = {
        "rows": json.loads(out.to_json(orient="records")),
        "runtime_env": ray.get(runtime_env.remote()),
        "job_runtime_env": json.dumps(ray.get_runtime_context().runtime_env),
        "logs": os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs"),
        "config": json.dumps(cfg.to_dict()),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    ray.shutdown()


def keywords(cfg, n_items: int, clean_url: str, out: str) -> None:
    import shutil

    import pyarrow.parquet as pq
    from artifacts import write_prepared

    from thinkrec.io.fs import Storage
    from thinkrec.keywords import stage

    cfg = cfg.replace(**{"keywords.extractor": "llm", "data.max_quarantine_rate": 1.0})
    write_prepared(cfg, n_users=4, n_items=n_items)
    storage = Storage.from_config(cfg)
    first = stage.run(cfg)
    table = storage.local_path(storage.uri("keywords", "keywords"))
    reasons = [
        r for f in sorted(os.listdir(os.path.join(table, "quarantine")))
        for r in pq.read_table(os.path.join(table, "quarantine", f)).column("reason").to_pylist()
    ]  # fmt: skip
    shutil.rmtree(table)  # the table is lost; the keyword and prompt caches stay
    second = stage.run(cfg.replace(**{"generation.base_url": clean_url}))
    with open(out, "w") as f:
        json.dump({"first": first, "second": second, "reasons": reasons}, f)


if __name__ == "__main__":
    main()
