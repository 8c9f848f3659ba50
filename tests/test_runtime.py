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
