"""The local Ray that jobs start (thinkrec.runtime.init_ray), as a job driver sees it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DRIVER = textwrap.dedent(
    """
    import time
    from types import SimpleNamespace


    def train_fn():
        print("hello from the training worker")
        time.sleep(4)  # the placement-group cleaner polls once a second meanwhile


    if __name__ == "__main__":
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer

        from thinkrec.runtime import init_ray

        init_ray(SimpleNamespace(ray=SimpleNamespace(address=None, num_cpus=2, object_store_mb=None)))
        TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=1)).fit()
        time.sleep(1.5)  # let the log monitor forward the last lines
    """
)


@pytest.mark.integration
def test_local_ray_forwards_worker_output_without_dashboard_noise(tmp_path):
    """A training run on the local Ray (no dashboard) prints its workers' output, but not Ray Train's
    once-a-second "Failed to query Ray Train Controller actor state" warning (9 of them in this run
    before the worker setup hook silenced it)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "hello from the training worker" in out  # worker logs still reach the driver
    assert "Failed to query Ray Train Controller" not in out


PINNED = textwrap.dedent(
    """
    import json, os, sys, threading
    from thinkrec.runtime import CorePin

    threading.Thread(target=sys.stdin.read, daemon=True).start()  # a thread started before the pin
    pin = CorePin(1)
    tids = os.listdir("/proc/self/task")
    masks = sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in tids})
    print(json.dumps({"cores": pin.cores, "masks": masks}), flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores"
)
def test_core_pins_are_distinct_and_freed_when_the_process_ends(tmp_path):
    """Two processes each pin one core: different cores, every thread of each bound to its own; with
    every core held a third is left unpinned; once a holder exits, its core is claimed again."""
    import json

    cores = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start() -> tuple[subprocess.Popen, dict]:
        p = subprocess.Popen(
            [sys.executable, "-c", PINNED], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        return p, json.loads(p.stdout.readline())

    held = [start() for _ in cores]
    try:
        got = [doc["cores"] for _, doc in held]
        assert sorted(c for cs in got for c in cs) == cores  # each core once
        for (_, doc), cs in zip(held, got, strict=True):
            assert doc["masks"] == [cs]  # all threads, the one started before the pin too
        extra, doc = start()
        assert doc["cores"] == [] and doc["masks"] == [cores]  # none free: left as it was
        extra.communicate("\n")
        first, _ = held.pop(0)
        first.communicate("\n")
        again, doc = start()
        held.append((again, doc))
        assert doc["cores"] == got[0]
    finally:
        for p, _ in held:
            p.communicate("\n")
