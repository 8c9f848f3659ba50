"""train stage: global LoRA -> CF projector -> user groups -> expert LoRAs, on Ray Train.

1. global: one LoRA over text-only prompts (titles, labels, keywords; reasoning mix), lr train.lr.
2. projector: CF tokens on, the projector trained (lr train.projector_lr) with the LoRA frozen, or
   with train.projector_lora the LoRA too (lr train.lr), starting from stage 1's adapter and then
   replacing it as adapters/global; skipped when model.cf_tokens is false.
3. groups: the train users' CF embeddings clustered (thinkrec.cf.grouping); prototypes = mean raw
   embedding per group.
4. experts: per group, a LoRA initialised from the global one with only its last
   train.expert_last_layers layers trainable (lr train.expert_lr), on that group's users' samples;
   skipped when train.experts is false.

Outputs under <output_root>/train/: adapters/global/, adapters/expert-<g>/ (peft, safetensors),
projector.safetensors, fusion.json, groups.json (sizes, separation, each train user's group),
curves.json, committed with mark_success. Each
phase is one TorchTrainer run with a stable name under train/_ray, so a resubmitted job resumes the
phase it was in from its last checkpoint; finished phases are recorded in train/_phases and not rerun.
Both helper folders are removed before the commit.

Variants from config: TALLRec-style (model.cf_tokens=false, train.reasoning=false,
train.experts=false), CoLLM-style (cf tokens, no reasoning, no experts), ThinkRec without experts,
ThinkRec.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from thinkrec.config import Config
from thinkrec.data.items import keywords_inputs
from thinkrec.io.commit import SUCCESS, fingerprint, is_complete, mark_success
from thinkrec.io.fs import Storage
from thinkrec.model.fusion import save_fusion
from thinkrec.model.prompt import PromptBuilder
from thinkrec.model.thinkrec import ADAPTERS, FUSION, GLOBAL, PROJECTOR, CFTable, expert_name
from thinkrec.runtime import fit
from thinkrec.scoring.base import (
    BASE_MODEL_DIR,
    CF_EMBEDDINGS,
    CF_MODEL_DIR,
    TRAIN_DIR,
    base_model_path,
)
from thinkrec.train import data as D
from thinkrec.train import loop as L

log = logging.getLogger(__name__)

GROUPS = "groups.json"
CURVES = "curves.json"
RAY_DIR = "_ray"
PHASES_DIR = "_phases"
STAGE1_ADAPTER = "global-adapter"  # stage 1's LoRA under _phases (stage 2 may replace adapters/global)
# Fields that steer fault tolerance only; they never change what is trained.
_NOT_FINGERPRINTED = (
    "fail_at_step",
    "max_failures",
    "num_workers",
    "use_gpu",
    "backend",
    "zero_stage",
    "offload",
)


def stage_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    d = cfg.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in _NOT_FINGERPRINTED}
    sections = {
        "model": d["model"],
        "train": train,
        "fusion": d["fusion"],
        "cf": d["cf"],
        "data": d["data"],
        "seed": d["seed"],
        "stage": "train/v1",
    }
    inputs = [storage.uri(D.INTERACTIONS), storage.uri(D.ITEMS), *keywords_inputs(storage)]
    if cfg.model.cf_tokens or cfg.train.experts:
        inputs.append(storage.uri(CF_MODEL_DIR))
    if cfg.train.reasoning and storage.exists(storage.uri(D.TRACES, SUCCESS)):
        inputs.append(storage.uri(D.TRACES))
    return fingerprint(sections, inputs, storage)


def ensure_base_model(cfg: Config) -> str:
    """The configured base model, or the tiny one: built once (and warmed up on the train split's
    text when model.warmup_steps asks, thinkrec/train/warmup.py) and committed under the run root's
    ``base_model`` (an S3 root gets an upload), so every node's scorer reads the same files.
    Returns a local directory with the model."""
    from thinkrec.train import warmup

    if cfg.model.base:
        if cfg.model.warmup_steps:
            log.info("model.warmup_steps ignored: %s is not a locally built model", cfg.model.base)
        return cfg.model.base
    storage = Storage.from_config(cfg)
    uri = storage.uri(BASE_MODEL_DIR)
    if storage.exists(f"{uri}/{SUCCESS}") and warmup.is_current(base_model_path(cfg), cfg, storage):
        return base_model_path(cfg)
    from thinkrec.model.base import build_tiny_model

    def build(path: str) -> None:
        build_tiny_model(path, cfg.model.tiny, seed=cfg.seed)
        if cfg.model.warmup_steps:
            warmup.warm_up(cfg, storage, path)

    local = storage.local_path(uri)
    if local is not None:
        tmp = f"{local}.tmp-{os.getpid()}"
        build(tmp)
        shutil.rmtree(local, ignore_errors=True)  # one built or warmed for another config
        os.replace(tmp, local)  # never a half-written model dir under the final name
    else:
        with tempfile.TemporaryDirectory(prefix="thinkrec-tiny-") as tmp:
            build(tmp)
            if storage.exists(uri):
                storage.delete(uri)
            storage.copy_tree(tmp, uri)
    mark_success(storage, uri, {"stage": "base_model", "tiny": dataclasses.asdict(cfg.model.tiny)})
    return base_model_path(cfg)


def _publish_file(storage: Storage, local: str, uri: str) -> None:
    with open(local, "rb") as f:
        storage.write_bytes(uri, f.read())


class _Phases:
    """Finished phases of this exact run (same fingerprint): their curves, under train/_phases."""

    def __init__(self, storage: Storage, out: str, meta: dict[str, str]) -> None:
        self.storage, self.out, self.meta = storage, out, meta

    def _uri(self, name: str) -> str:
        return f"{self.out}/{PHASES_DIR}/{name}.json"

    def get(self, name: str) -> dict[str, Any] | None:
        uri = self._uri(name)
        if not self.storage.exists(uri):
            return None
        doc = self.storage.read_json(uri)
        return doc["curves"] if doc.get("meta") == self.meta else None

    def put(self, name: str, curves: dict[str, Any]) -> None:
        self.storage.write_json(self._uri(name), {"meta": self.meta, "curves": curves})


def fit_phase(
    cfg: Config,
    spec: dict[str, Any],
    train_rows: list[dict[str, Any]],
    valid_rows: list[dict[str, Any]],
    run_name: str,
) -> tuple[str, Any]:
    """One TorchTrainer run. Returns (local directory of the phase's result, the Ray Train result);
    the directory lives until the caller removes it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    storage = Storage.from_config(cfg)
    fs, path = storage.fs(storage.uri(TRAIN_DIR, RAY_DIR))
    datasets = {"train": D.to_dataset(train_rows, t.num_workers)}
    spec = {**spec, "has_valid": bool(valid_rows)}
    if valid_rows:
        import ray.data

        datasets["valid"] = ray.data.from_items(valid_rows, override_num_blocks=t.num_workers)
    import pyarrow.fs as pafs

    local = isinstance(fs, pafs.LocalFileSystem)
    trainer = TorchTrainer(
        L.train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "spec": spec},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=None if local else fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    result = fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"train phase {spec['phase']}: the run {run_name} reported no result")
    d = result.checkpoint.to_directory(tempfile.mkdtemp(prefix="thinkrec-phase-"))
    if not os.path.isdir(os.path.join(d, L.FINAL)):
        raise RuntimeError(f"train phase {spec['phase']}: the last checkpoint of {run_name} is not final")
    return d, result


def run(cfg: Config) -> dict[str, Any]:
    storage = Storage.from_config(cfg)
    out = storage.uri(TRAIN_DIR)
    meta = stage_meta(cfg, storage)
    if is_complete(storage, out, meta):
        log.info("train: up to date, skipped (%s)", out)
        return {"skipped": True, "uri": out}
    if storage.exists(f"{out}/{SUCCESS}"):
        storage.delete(out)  # made from another config or other inputs
    t = cfg.train
    base = ensure_base_model(cfg)
    from thinkrec.model.base import load_prompt_tokenizer

    tok = load_prompt_tokenizer(base, cfg.model.trust_remote_code, cfg.model.use_chat_template)
    inputs = D.load_inputs(storage, with_traces=t.reasoning)
    samples = D.train_samples(inputs, cfg)
    vsamples = D.valid_samples(inputs, cfg)

    def builder(cf_tokens: bool) -> PromptBuilder:
        return PromptBuilder(
            tok,
            cf_tokens=cf_tokens,
            use_chat_template=cfg.model.use_chat_template,
            max_title_chars=cfg.model.max_title_chars,
        )

    def rows(pb: PromptBuilder, ss: list[D.Sample]) -> list[dict[str, Any]]:
        return D.encode_rows(
            pb, ss, inputs.items, history_len=cfg.data.history_len, max_answer_tokens=t.max_answer_tokens
        )

    text_pb = builder(False)
    phases = _Phases(storage, out, meta)
    prefix = f"{meta['config_hash']}-{meta['input_hash']}"
    curves: dict[str, Any] = {}
    common = {
        "base_model": base,
        "yes_id": text_pb.yes_id,
        "pad_id": text_pb.placeholder_id,
        "cf_dir": storage.uri(CF_MODEL_DIR),
        "cf_file": CF_EMBEDDINGS,
        "projector_dir": out,
        "projector_file": PROJECTOR,
        "init_adapter": storage.uri(TRAIN_DIR, ADAPTERS, GLOBAL),
    }

    def phase(
        name: str,
        spec: dict[str, Any],
        train_rows: list[dict[str, Any]],
        valid_rows: list[dict[str, Any]],
        publish: Any,
    ) -> None:
        done = phases.get(name)
        if done is not None:
            log.info("train: phase %s already finished, reused", name)
            curves[name] = done
            return
        log.info("train: phase %s on %d samples (%d valid)", name, len(train_rows), len(valid_rows))
        d, _ = fit_phase(cfg, {**common, **spec}, train_rows, valid_rows, f"{prefix}-{name}")
        try:
            final = os.path.join(d, L.FINAL)
            publish(final)
            with open(os.path.join(final, L.CURVES)) as f:
                curves[name] = json.load(f)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        phases.put(name, curves[name])

    def publish_adapter(adapter: str) -> Any:
        def publish(final: str) -> None:
            src = os.path.join(final, L.ADAPTER)
            # peft's generated model card is boilerplate; the adapter is its config and weights.
            if os.path.exists(os.path.join(src, "README.md")):
                os.remove(os.path.join(src, "README.md"))
            dst = storage.uri(TRAIN_DIR, ADAPTERS, adapter)
            storage.delete(dst)  # replace what an earlier attempt left
            storage.copy_tree(src, dst)

        return publish

    def publish_global(final: str) -> None:
        publish_adapter(GLOBAL)(final)
        src = storage.uri(TRAIN_DIR, ADAPTERS, GLOBAL)
        dst = storage.uri(TRAIN_DIR, PHASES_DIR, STAGE1_ADAPTER)
        storage.delete(dst)
        storage.copy_tree(src, dst)

    # 1. global LoRA, text-only prompts
    phase(
        GLOBAL,
        {"phase": "global", "cf_tokens": False, "lr": t.lr, "epochs": t.epochs},
        rows(text_pb, samples),
        rows(text_pb, vsamples),
        publish_global,
    )
    # 2. projector (LoRA frozen)
    pb = text_pb
    if cfg.model.cf_tokens:
        pb = builder(True)

        def publish_projector(final: str) -> None:
            _publish_file(storage, os.path.join(final, L.PROJECTOR_FILE), f"{out}/{PROJECTOR}")
            if t.projector_lora:  # stage 2's LoRA replaces stage 1's as the global adapter
                publish_adapter(GLOBAL)(final)

        phase(
            "projector",
            {
                "phase": "projector",
                "cf_tokens": True,
                "lr": t.projector_lr,
                "lora_lr": t.lr if t.projector_lora else None,
                "epochs": t.projector_epochs,
                # Stage 1's adapter, kept apart: a rerun of this phase must start from it, not from
                # the adapter this phase publishes over adapters/global.
                "init_adapter": storage.uri(TRAIN_DIR, PHASES_DIR, STAGE1_ADAPTER),
            },
            rows(pb, samples),
            rows(pb, vsamples),
            publish_projector,
        )
    # 3. groups and 4. experts
    report: dict[str, Any] = {}
    if t.experts:
        from thinkrec.cf.grouping import group_train_users
        from thinkrec.scoring.base import localize

        cf = CFTable.load(os.path.join(localize(storage, storage.uri(CF_MODEL_DIR)), CF_EMBEDDINGS))
        train_users = np.unique(
            np.array([s.user_id for s in D._samples(inputs.split("train"))], dtype=np.int64)
        )
        groups, protos, report = group_train_users(
            cf.user.numpy(), train_users, t.grouping, t.n_groups, cfg.seed
        )
        # Which group each train user is in, beside the sizes and separation (user id -> group).
        report["assignments"] = {str(int(u)): int(groups[u]) for u in train_users}
        storage.write_json(f"{out}/{GROUPS}", report)
        names = []
        for g in range(protos.shape[0]):
            name = expert_name(g)
            names.append(name)
            gs = [s for s in samples if groups[s.user_id] == g]
            gv = [s for s in vsamples if 0 <= s.user_id < len(groups) and groups[s.user_id] == g]
            if len(gs) < t.num_workers:
                raise ValueError(
                    f"train: group {g} has {len(gs)} training samples, fewer than train.num_workers="
                    f"{t.num_workers}; raise train.max_train_samples or lower train.n_groups"
                )
            phase(
                name,
                {
                    "phase": "expert",
                    "cf_tokens": cfg.model.cf_tokens,
                    "lr": t.expert_lr,
                    "epochs": t.expert_epochs,
                },
                rows(pb, gs),
                rows(pb, gv),
                publish_adapter(name),
            )
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, FUSION)
            save_fusion(local, protos, cfg.fusion, names, {"group_sizes": report["sizes"]})
            _publish_file(storage, local, f"{out}/{FUSION}")

    storage.write_json(f"{out}/{CURVES}", curves)
    storage.delete(f"{out}/{RAY_DIR}")
    storage.delete(f"{out}/{PHASES_DIR}")
    mark_success(storage, out, meta, cfg.to_dict())
    summary = {
        "uri": out,
        "phases": list(curves),
        "train_samples": len(samples),
        "reasoning_samples": sum(s.kind == D.KIND_REASONING for s in samples),
        "valid_samples": len(vsamples),
        "groups": report.get("sizes"),
        "valid": {k: (v["valid"][-1] if v.get("valid") else None) for k, v in curves.items()},
    }
    log.info("train: done %s", json.dumps(summary, default=str))
    return summary
