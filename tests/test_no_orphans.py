"""No process outlives its job: a stage run on a local Ray in a subprocess leaves nothing behind, and
Ray Train's controller ends with its fit(). (The whole test session is checked the same way at its
end: conftest.py's ``pytest_sessionfinish``.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.processes import describe, survivors
from thinkrec.io.fs import Storage

ROOT = Path(__file__).resolve().parents[1]
MARK = "THINKREC_TEST_RUN_MARK"


def _start_cf(prepared, tmp_path) -> tuple[subprocess.Popen, str]:
    storage = Storage.from_config(prepared)
    root = tmp_path / "run"
    shutil.copytree(storage.local_path(storage.uri("prepare")), root / "prepare")
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT), MARK: mark, "THINKREC_PROGRESS": "0"}
    args = [
        f"storage.output_root={root}",
        "storage.num_shards=2",
        "ray.num_cpus=2",
        f"data.max_users={prepared.data.max_users}",
        "cf.epochs=3",
        "cf.baselines=[]",  # MF alone: the demo's LightGCN and SASRec baselines add nothing here
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cf", "--config", str(ROOT / "configs/demo.yaml"), *args],
        cwd=tmp_path,  # the run's own working directory, as `make demo` has
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, mark


@pytest.mark.integration
def test_stage_leaves_no_process(prepared, tmp_path):
    proc, mark = _start_cf(prepared, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    left = survivors(MARK, mark)
    assert not left, "processes of the finished cf stage still alive:\n" + describe(left)


DRIVER = textwrap.dedent(
    """
    import os
    import time
    from types import SimpleNamespace

    import psutil

    if __name__ == "__main__":
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer

        from thinkrec.runtime import fit, init_ray

        init_ray(SimpleNamespace(ray=SimpleNamespace(address=None, num_cpus=2, object_store_mb=None)))
        fit(TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1)))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            names = []
            for p in psutil.Process().children(recursive=True):
                try:  # the title "ray::TrainController" is in cmdline; name() is cut at 15 chars
                    names.append(" ".join(p.cmdline()).strip())
                except psutil.Error:
                    pass
            if not any("TrainController" in n for n in names):
                break
            time.sleep(0.5)
        print("after fit:", [n for n in names if n.startswith("ray::")])
    """
)


@pytest.mark.integration
def test_train_controller_ends_with_fit(tmp_path):
    """Ray Train's controller actor (~400 MB) ends when fit() returns, not when the driver exits:
    fit()'s SIGINT handler held its handle, so a pipeline carried one per stage until its end."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    mark = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), MARK: mark},
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("after fit:"))
    assert "TrainController" not in line, line
    left = survivors(MARK, mark)
    assert not left, "processes of the finished driver still alive:\n" + describe(left)
