"""Fault tolerance of the train stage: a killed worker and a killed job both resume from the last
checkpoint and end with the same adapter as an uninterrupted run (same seed)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_train import make_train_inputs, train_config

# fp32 on CPU, the same samples, dropout masks and optimizer state after a resume: the replay is
# exact up to float summation order, far inside this tolerance.
ATOL = 1e-6
# TALLRec-style (text only, no experts): one training phase, enough to exercise resume.
FAST = {
    "model.cf_tokens": False,
    "train.reasoning": False,
    "train.experts": False,
    "train.max_train_samples": 48,
    "train.checkpoint_every": 2,
    "train.epochs": 2,
}


def _adapter(root: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(root, "train/adapters/global/adapter_model.safetensors"))


def _curves(root: str) -> dict:
    return json.loads(Path(os.path.join(root, "train/curves.json")).read_text())


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> dict[str, torch.Tensor]:
    from thinkrec.train import stage

    root = str(tmp_path_factory.mktemp("train-ref"))
    make_train_inputs(prepared, root)
    stage.run(train_config(root, **FAST))
    assert _curves(root)["global"].get("resumed_at") in (None, [])
    return _adapter(root)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0)


@pytest.mark.chaos
def test_killed_worker_resumes_from_checkpoint(prepared, tmp_path, reference):
    from thinkrec.train import stage

    make_train_inputs(prepared, str(tmp_path))
    # 48 samples / 2 workers / batch 4 = 6 steps per epoch; checkpoints at 2 and 4; worker 1 exits at 5.
    stage.run(train_config(str(tmp_path), **FAST, **{"train.fail_at_step": 5, "train.max_failures": 1}))
    curves = _curves(str(tmp_path))["global"]
    # The restart resumes from the last checkpoint the controller had registered when the worker
    # died: step 4, or step 2 if the step-4 reports were still in flight.
    assert len(curves["resumed_at"]) == 1 and curves["resumed_at"][0] in (2, 4)
    assert len(curves["loss"]) == 12
    _assert_same(_adapter(str(tmp_path)), reference)


def _has_registered_checkpoint(root: str) -> bool:
    """True once the run's checkpoint manager has recorded a checkpoint in storage (what a
    resubmitted run restores from), not merely once a checkpoint directory exists."""
    for snap in glob.glob(os.path.join(root, "train/_ray/*-phases/checkpoint_manager_snapshot.json")):
        try:
            doc = json.loads(Path(snap).read_text())
        except (OSError, ValueError):
            continue  # being written
        if doc.get("latest_checkpoint_result"):
            return True
    return False


@pytest.mark.chaos
def test_resubmitted_job_resumes_after_driver_dies(prepared, tmp_path, reference):
    """The job's driver (and the local Ray it started) is killed after the first checkpoint; the
    resubmitted job finds the run by name in storage and resumes."""
    from thinkrec.train import stage

    root = str(tmp_path / "run")
    make_train_inputs(prepared, root)
    cfg = train_config(root, **FAST)
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "THINKREC_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", "--config", str(cfg_file)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 600
        while not _has_registered_checkpoint(root):
            assert proc.poll() is None, "the job ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    assert not os.path.exists(os.path.join(root, "train/_SUCCESS"))
    stage.run(cfg)
    curves = _curves(root)["global"]
    assert curves["resumed_at"] and curves["resumed_at"][0] >= 2
    _assert_same(_adapter(root), reference)


DEEPSPEED = {**FAST, "train.backend": "deepspeed", "train.zero_stage": 2}


@pytest.mark.chaos
def test_deepspeed_killed_worker_resumes_from_checkpoint(prepared, tmp_path):
    """ZeRO-2 on 2 CPU workers: every rank checkpoints its optimizer partition; after worker 1 dies,
    the restarted group loads them and ends with the uninterrupted DeepSpeed run's adapter (atol
    1e-6)."""
    from thinkrec.train import stage

    ref_root, root = str(tmp_path / "ref"), str(tmp_path / "killed")
    for r in (ref_root, root):
        make_train_inputs(prepared, r)
    stage.run(train_config(ref_root, **DEEPSPEED))
    stage.run(train_config(root, **DEEPSPEED, **{"train.fail_at_step": 5, "train.max_failures": 1}))
    curves = _curves(root)["global"]
    assert len(curves["resumed_at"]) == 1 and curves["resumed_at"][0] in (2, 4)
    assert len(curves["loss"]) == len(_curves(ref_root)["global"]["loss"]) == 12
    _assert_same(_adapter(root), _adapter(ref_root))
