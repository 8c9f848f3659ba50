"""The scorer interface both backends implement, and where a trained model's files are.

A scorer gets rows that already carry their encoded prompt (prefix + candidate, with CF slots) and
their gate (weights over [global, expert-0, ...]); it returns the Yes logit and p_yes = sigmoid(Yes logit)
per row, from one forward pass and the answer position's logits only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from thinkrec.io.commit import SUCCESS
from thinkrec.io.fs import Storage
from thinkrec.model.layout import ADAPTERS, FUSION, GLOBAL, PROJECTOR
from thinkrec.model.prompt import Encoded

TRAIN_DIR = "train"
CF_MODEL_DIR = "cf/model"
BASE_MODEL_DIR = "base_model"
"""The tiny base model's place in the run root (the train stage builds and commits it there), so
every node reads it from the root, never from one node's local cache."""
CF_EMBEDDINGS = "embeddings.safetensors"


@dataclass
class ScoreRow:
    user_id: int
    item_id: int
    prefix: Encoded
    candidate: Encoded
    gate: np.ndarray  # (1 + N,) weights over [global, expert-0, ..., expert-(N-1)]
    gate_label: str


class Scorer(Protocol):
    def score(self, rows: list[ScoreRow]) -> tuple[np.ndarray, np.ndarray]:
        """(score, p_yes), each (len(rows),) float32, in the order of ``rows``."""
        ...


@dataclass(frozen=True)
class Artifacts:
    """Local paths of everything a scorer loads. Adapter names are peft adapter directories."""

    base_model: str
    adapters_dir: str  # holds GLOBAL and expert-<g> peft directories
    adapter_names: tuple[str, ...]  # ("global", "expert-0", ...) in gate order
    projector: str | None  # None for text-only (TALLRec-style) models
    cf_embeddings: str | None
    fusion: str | None  # fusion.json, None without experts
    base_model_id: str = ""
    """What identifies the base model in ``version`` (the configured name, or the run root's copy by
    its manifest); empty: ``base_model`` itself. A node-local copy's path never enters the hash."""

    @property
    def version(self) -> str:
        """Content hash of the base model and adapters (from the train stage's manifest)."""
        import hashlib
        import json

        man = os.path.join(os.path.dirname(self.adapters_dir), "_manifest.json")
        h = hashlib.sha256((self.base_model_id or self.base_model).encode())
        if os.path.exists(man):
            with open(man) as f:
                h.update(json.dumps(json.load(f)["files"], sort_keys=True).encode())
        return h.hexdigest()[:12]


def localize(storage: Storage, uri: str, cache: str | None = None) -> str:
    """A local directory with the contents of ``uri`` (itself when local; a cached copy from S3)."""
    local = storage.local_path(uri)
    if local is not None:
        return local
    import pyarrow.fs as pafs

    fs, root = storage.fs(uri)
    dest = cache or tempfile.mkdtemp(prefix="thinkrec-artifacts-")
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        out = os.path.join(dest, info.path[len(root) + 1 :])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return dest


def base_model_path(cfg: Any) -> str:
    """The configured base model, or the run root's ``base_model`` (the tiny one the train stage
    built), as a local directory (Hugging Face loaders read local paths or hub ids): the root's own
    directory when the root is local, else a copy on this node from the committed one."""
    if cfg.model.base:
        return cfg.model.base
    storage = Storage.from_config(cfg)
    uri = storage.uri(BASE_MODEL_DIR)
    local = storage.local_path(uri)
    if local is not None:
        return local
    if not storage.exists(f"{uri}/{SUCCESS}"):
        raise FileNotFoundError(f"{uri} is not committed: the train stage builds the tiny base model there")
    return localize(storage, uri)


def base_model_id(cfg: Any) -> str:
    """The base model's identity for ``Artifacts.version``: the configured name, or the run root's
    copy by its manifest (the same for a local and an S3 root holding the same files)."""
    if cfg.model.base:
        return cfg.model.base
    import json

    storage = Storage.from_config(cfg)
    man = f"{storage.uri(BASE_MODEL_DIR)}/_manifest.json"
    files = storage.read_json(man).get("files", {}) if storage.exists(man) else {}
    return f"{BASE_MODEL_DIR}:{json.dumps(files, sort_keys=True)}"


def load_artifacts(cfg: Any) -> Artifacts:
    storage = Storage.from_config(cfg)
    uri = storage.uri(TRAIN_DIR)
    if not storage.exists(f"{uri}/{SUCCESS}"):
        raise FileNotFoundError(f"{uri} is not committed: run the train stage first")
    train = localize(storage, uri)
    cf_dir = localize(storage, storage.uri(CF_MODEL_DIR))
    adapters = os.path.join(train, ADAPTERS)
    names = [GLOBAL] + sorted(
        (d for d in os.listdir(adapters) if d.startswith("expert-")), key=lambda d: int(d.split("-")[1])
    )
    projector = os.path.join(train, PROJECTOR)
    fusion = os.path.join(train, FUSION)
    return Artifacts(
        base_model=base_model_path(cfg),
        base_model_id=base_model_id(cfg),
        adapters_dir=adapters,
        adapter_names=tuple(names),
        projector=projector if os.path.exists(projector) else None,
        cf_embeddings=os.path.join(cf_dir, CF_EMBEDDINGS),
        fusion=fusion if os.path.exists(fusion) else None,
    )
