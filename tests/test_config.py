import dataclasses
import os

import pytest

from thinkrec import config as C


def test_defaults_and_overrides():
    cfg = C.load("configs/demo.yaml", ["train.lr=3e-4", "score.backend=vllm", "train.lora_targets=[q_proj]"])
    assert cfg.train.lr == 3e-4
    assert cfg.score.backend == "vllm"
    assert cfg.train.lora_targets == ("q_proj",)
    # Relative local paths are resolved here: Ray workers run in other directories.
    assert os.path.isabs(cfg.storage.output_root) and cfg.storage.output_root.endswith("runs/demo")
    assert C.load(None, ["storage.output_root=s3://bucket/run"]).storage.output_root == "s3://bucket/run"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("nosuch.x=1", "nosuch: unknown key"),
        ("train.lr=abc", "train.lr:"),
        ("train.lr=-1", "train.lr:"),
        ("fusion.mode=foo", "fusion.mode:"),
        ("model.tiny.num_heads=4", "model.tiny"),
        ("score.backend=onnx", "score.backend:"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(C.ConfigError) as err:
        C.load("configs/demo.yaml", [override])
    assert key in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(C.ConfigError, match="not key=value"):
        C.load(None, ["train.lr"])


def test_frozen_and_hash_stable():
    a, b = C.load("configs/demo.yaml"), C.load("configs/demo.yaml")
    assert a.hash() == b.hash()
    assert a.replace(**{"train.lr": 0.5}).hash() != a.hash()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.train.lr = 1.0  # type: ignore[misc]


def test_every_shipped_config_loads():
    import glob

    paths = glob.glob("configs/*.yaml")
    assert paths
    for p in paths:
        C.load(p)
