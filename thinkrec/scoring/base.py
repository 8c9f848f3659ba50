"""The scorer interface both backends implement, and where a trained model's files are.

A scorer gets rows that already carry their encoded prompt (prefix + candidate, with CF slots) and
their gate (weights over [global, expert-0, ...]); it returns the Yes logit and P(Yes) over {Yes, No}
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
from thinkrec.model.prompt import Encoded
from thinkrec.model.thinkrec import ADAPTERS, FUSION, GLOBAL, PROJECTOR

TRAIN_DIR = "train"
CF_MODEL_DIR = "cf/model"
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

    @property
    def version(self) -> str:
        """Content hash of the base model and adapters (from the train stage's manifest)."""
        import hashlib
        import json

        man = os.path.join(os.path.dirname(self.adapters_dir), "_manifest.json")
        h = hashlib.sha256(self.base_model.encode())
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
    """The configured base model, or the tiny one built by the pipeline (always on local disk, since
    Hugging Face loaders read local paths or hub ids)."""
    if cfg.model.base:
        return cfg.model.base
    storage = Storage.from_config(cfg)
    local = storage.local_path(storage.uri("base_model"))
    if local is not None:
        return local
    return os.path.join(os.path.expanduser("~/.cache/thinkrec"), f"tiny-{cfg.hash()}")


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
        adapters_dir=adapters,
        adapter_names=tuple(names),
        projector=projector if os.path.exists(projector) else None,
        cf_embeddings=os.path.join(cf_dir, CF_EMBEDDINGS),
        fusion=fusion if os.path.exists(fusion) else None,
    )
