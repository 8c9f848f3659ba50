"""prepare at two sizes, side by side: ``thinkrec bench prepare [--quick] [--json FILE]``.

A synthetic Yelp-shaped log (``review.json`` and ``business.json`` JSON lines, Zipf-distributed users
and items) of 200,000 and of 2,000,000 interactions (``--quick``: 20,000 and 200,000), each prepared
by ``python -m jobs.prepare`` in a fresh process with its own local Ray (2 CPUs). While it runs, the
driver process and every process below it (the raylet, Ray's workers) are sampled for RSS every
0.2 s: the driver's peak, and the peak of the sum over the others. Wall time includes Ray's
start-up, the same at both sizes.

Keys: ``scale_ratio`` (wall time at the larger size over the smaller; 10x the rows, target <= 12)
and ``driver_rss_ratio`` (peak driver RSS, larger over smaller; target <= 1.3).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np


def write_yelp(d: str, n: int, seed: int = 0) -> None:
    """``n`` reviews by Zipf(1.3)-distributed users and Zipf(1.2)-distributed businesses."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(50, n // 20), max(20, n // 50)
    users = (rng.zipf(1.3, n) - 1) % n_users
    items = (rng.zipf(1.2, n) - 1) % n_items
    stars = rng.integers(1, 6, n)
    secs = 1_420_070_400 + rng.integers(0, 5 * 365 * 86400, n)
    dates = np.datetime_as_string(secs.astype("datetime64[s]"), unit="s")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "review.json"), "w") as f:
        for k in range(n):
            date = str(dates[k]).replace("T", " ")
            f.write(
                f'{{"review_id": "r{k}", "user_id": "u{users[k]:07d}", "business_id": "b{items[k]:06d}", '
                f'"stars": {stars[k]}, "date": "{date}", "text": "Nice place."}}\n'
            )
    with open(os.path.join(d, "business.json"), "w") as f:
        for i in range(n_items):
            f.write(
                json.dumps({"business_id": f"b{i:06d}", "name": f"Place {i}", "categories": "Food, Bars"})
                + "\n"
            )


def _tree_rss(proc: Any) -> tuple[int, int]:
    """(driver RSS, summed RSS of every process below it), bytes."""
    import psutil

    try:
        driver = proc.memory_info().rss
        kids = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for k in kids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += k.memory_info().rss
    return driver, total


def prepare_once(src: str, out: str) -> dict[str, Any]:
    import psutil

    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "THINKREC_PROGRESS": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "jobs.prepare",
        "--config",
        "configs/demo.yaml",
        "data.dataset=yelp",
        f"data.source={src}",
        f"storage.output_root={out}",
        "data.max_users=null",
        "ray.num_cpus=2",
        "storage.num_shards=4",
    ]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(p.pid)
    peak_driver = peak_workers = 0
    while p.poll() is None:
        d, w = _tree_rss(proc)
        peak_driver, peak_workers = max(peak_driver, d), max(peak_workers, w)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    err = p.stderr.read() if p.stderr else ""
    if p.returncode:
        raise RuntimeError(f"prepare failed ({p.returncode}): {err[-2000:]}")
    with open(os.path.join(out, "prepare", "interactions", "_manifest.json")) as f:
        man = json.load(f)
    return {
        "wall_s": round(wall, 1),
        "rows_in": man["lines_read"],
        "rows_out": man["rows"],
        "rows_per_s": round(man["lines_read"] / wall),
        "peak_driver_rss_mib": round(peak_driver / 2**20),
        "peak_workers_rss_mib": round(peak_workers / 2**20),
        "phase_s": man.get("phase_s", {}),
    }


def run(quick: bool = False) -> dict[str, Any]:
    small, large = (20_000, 200_000) if quick else (200_000, 2_000_000)
    tmp = tempfile.mkdtemp(prefix="thinkrec-bench-prepare-")
    try:
        runs = {}
        for n in (small, large):
            src = os.path.join(tmp, f"raw-{n}")
            write_yelp(src, n)
            runs[str(n)] = prepare_once(src, os.path.join(tmp, f"out-{n}"))
            print(f"prepare {n:,} interactions: {runs[str(n)]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = runs[str(small)], runs[str(large)]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "sizes": [small, large],
        "runs": runs,
        "scale_ratio": round(b["wall_s"] / a["wall_s"], 2),
        "driver_rss_ratio": round(b["peak_driver_rss_mib"] / max(1, a["peak_driver_rss_mib"]), 2),
        "targets": {"scale_ratio": 12, "driver_rss_ratio": 1.3},
    }
    print(json.dumps({k: result[k] for k in ("scale_ratio", "driver_rss_ratio")}))
    return result
