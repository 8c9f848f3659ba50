"""``thinkrec bench evaluate``: rows/s and peak RSS of the evaluate metrics at 1M and 10M scored rows.

Synthetic committed tables (prepare/interactions with train/valid/test rows and short histories,
cf/scores with cf_mf and cf_mf_nobias, score/scores with gates) are written under a temporary root;
``eval.stage.evaluate`` (reading, alignment, six models, bootstrap, slices, plots) then runs in a
fresh child process so its peak RSS (``ru_maxrss`` of that child) is its own. Bootstrap resamples are
set low (``--quick``: 1M only) and printed, because their cost is linear in rows x resamples x models.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

CHILD = r"""
import json, sys, time
from thinkrec import config as C
from thinkrec.io.fs import Storage
from eval import stage
cfg = C.load(None, {"storage.output_root": sys.argv[1], "eval.bootstrap_resamples": int(sys.argv[2]),
                    "eval.slice_resamples": int(sys.argv[3])})
t0 = time.perf_counter()
doc, pngs, _ = stage.evaluate(cfg, Storage.from_config(cfg))
m = doc["metrics"]["all"]["thinkrec"]["metrics"]
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": doc["rows"]["evaluated"],
                  "auc": m["auc"]["value"], "auc_ci": [m["auc"]["lo"], m["auc"]["hi"]]}))
"""


def write_tables(root: str, n: int, seed: int = 0, chunk: int = 1_000_000) -> None:
    """``n`` scored test rows: prepare/interactions holds them plus a train and a valid row for every
    eight (n * 10 / 8 rows in all); score/scores and cf/scores hold the test rows only. Each chunk's
    labels and scores come from a generator seeded by the chunk, so the three tables agree."""
    from thinkrec.data import schema as S
    from thinkrec.io.commit import TableWriter
    from thinkrec.io.fs import Storage

    storage = Storage(root=root)
    n_items = 5000
    cf_schema = S.CF_SCORES.append(pa.field("cf_mf", pa.float32())).append(
        pa.field("cf_mf_nobias", pa.float32())
    )

    def chunks(kind: str):
        total = -(-n * 10 // 8)
        for start in range(0, total, chunk):
            m = min(chunk, total - start)
            rows = np.arange(start, start + m)
            u = (rows // 25 + 1).astype(np.int64)  # 25 rows per user, 20 of them test candidates
            it = (rows % n_items + 1).astype(np.int64)
            r0 = np.random.default_rng([seed, start])
            y = (r0.random(m) < 0.4).astype(np.int8)
            s = (r0.normal(size=m) + y).astype(np.float32)
            rng = np.random.default_rng([seed, start, 1])
            split = np.where(rows % 10 == 0, "train", np.where(rows % 10 == 1, "valid", "test"))
            if kind != "inter":
                test = split == "test"
                rows, u, it, y, s, m = rows[test], u[test], it[test], y[test], s[test], int(test.sum())
            if kind == "inter":
                hl = rng.integers(0, 11, m)
                off = np.r_[0, np.cumsum(hl)].astype(np.int32)
                flat = (rng.random(int(off[-1])) < 0.5).astype(np.int8)
                hist = pa.ListArray.from_arrays(pa.array(off), pa.array(flat, pa.int8()))
                hitems = pa.ListArray.from_arrays(pa.array(off), pa.array(np.ones(int(off[-1]), np.int64)))
                yield pa.table(
                    {
                        S.USER_ID: u,
                        S.ITEM_ID: it,
                        S.RATING: np.full(m, 4.0, np.float32),
                        S.LABEL: y,
                        S.TIMESTAMP: rows.astype(np.int64),
                        S.SPLIT: split,
                        S.HISTORY_ITEMS: hitems,
                        S.HISTORY_LABELS: hist,
                        S.NOT_COLD: rng.random(m) < 0.7,
                    },
                    schema=S.INTERACTIONS,
                )
            elif kind == "cf":
                yield pa.table(
                    {
                        S.USER_ID: u,
                        S.ITEM_ID: it,
                        S.LABEL: y,
                        S.SPLIT: np.full(m, "test"),
                        S.CF_SCORE: s,
                        "cf_mf": s,
                        "cf_mf_nobias": (s + rng.normal(size=m)).astype(np.float32),
                    },
                    schema=cf_schema,
                )
            else:
                gate = np.array(["global", "expert-0", "expert-1", "mix:0.55,0.45"])[rows % 4]
                t = (s + rng.normal(size=m)).astype(np.float32)
                yield pa.table(
                    {
                        S.USER_ID: u,
                        S.ITEM_ID: it,
                        S.LABEL: y,
                        S.SCORE: t,
                        S.P_YES: (1 / (1 + np.exp(-t))).astype(np.float32),
                        S.GATE: gate,
                        S.VERSION: np.full(m, "bench"),
                    },
                    schema=S.SCORES,
                )

    for rel, kind, schema in (
        ("prepare/interactions", "inter", S.INTERACTIONS),
        ("cf/scores", "cf", cf_schema),
        ("score/scores", "score", S.SCORES),
    ):
        w = TableWriter(storage, storage.uri(rel), num_shards=8, schema=schema, meta={"stage": "bench"})
        w.write(chunks(kind))
        w.commit()


def measure(n: int, resamples: int, slice_resamples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="thinkrec-bench-eval-") as root:
        t0 = time.perf_counter()
        write_tables(root, n)
        gen = time.perf_counter() - t0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        load_before = os.getloadavg()[0]
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, root, str(resamples), str(slice_resamples)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"evaluate child failed with {proc.returncode}")
        res = json.loads(out.strip().splitlines()[-1])
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB, the largest child so far
    return {
        "scored_rows": n,
        "evaluated_rows": res["rows"],
        "seconds": round(res["seconds"], 1),
        "rows_per_s": round(res["rows"] / res["seconds"]),
        "peak_rss_mib": round(rss),
        "bootstrap_resamples": resamples,
        "slice_resamples": slice_resamples,
        "models": 6,
        "write_seconds": round(gen, 1),
        "thinkrec_auc": res["auc"],
        # The machine may be shared: its 1-minute load average before and after the child ran.
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def run(quick: bool = False) -> dict[str, Any]:
    sizes = [1_000_000] if quick else [1_000_000, 10_000_000]
    results = []
    for n in sizes:
        r = measure(n, resamples=20, slice_resamples=0)
        print(json.dumps(r))
        results.append(r)
    import platform

    cpu = platform.processor() or platform.machine()
    return {"bench": "evaluate", "hardware": f"{os.cpu_count()}-core {cpu} CPU, no GPU", "results": results}
