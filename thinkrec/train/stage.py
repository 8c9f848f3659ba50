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
curves.json, committed with mark_success. The groups come from the CF embeddings alone, so every
phase is known before training starts, and all phases run in order in one TorchTrainer run with a
stable name under train/_ray (Ray Train's actors start once per stage). Each finished phase publishes
its result under train/_phases/<phase>/ with a marker; a resubmitted job skips the published phases
and resumes the one it was in from its last checkpoint. The driver then copies the results to their
places; both helper folders are removed before the commit.

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

from thinkrec.config import Config, FusionConfig
from thinkrec.data.items import keywords_inputs
from thinkrec.io.commit import SUCCESS, fingerprint, is_complete, mark_success
from thinkrec.io.fs import Storage
from thinkrec.model.fusion import save_fusion
from thinkrec.model.layout import CURVES
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
RAY_DIR = "_ray"
PHASES_DIR = "_phases"
# Fields that steer fault tolerance only; they never change what is trained.
_NOT_FINGERPRINTED = (
    "fail_at_step",
    "fail_in_phase",
    "fail_at_attempt",
    "max_failures",
    "num_workers",
    "use_gpu",
    "backend",
    "zero_stage",
    "offload",
)


_HASHED_WHEN_ON = ("cf_history_item", "cf_scale", "max_grad_norm")
"""Model and train keys added after models were trained: hashed only when on, so those models keep
their fingerprint."""


def stage_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    d = cfg.to_dict()
    train = {
        k: v for k, v in d["train"].items() if k not in _NOT_FINGERPRINTED and (k not in _HASHED_WHEN_ON or v)
    }
    model = {k: v for k, v in d["model"].items() if k not in _HASHED_WHEN_ON or v}
    sections = {
        "model": model,
        "train": train,
        # The gate (fusion.*) is applied at inference from the scoring config, so it never changes
        # what is trained: a model scored with another fusion.mode or tau is not retrained. Hashed as
        # the defaults, which keeps the fingerprints of runs made before this unchanged.
        "fusion": dataclasses.asdict(FusionConfig()),
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


@dataclasses.dataclass
class Phase:
    """One training phase: its spec for the loop (``name`` and ``out`` included) and its rows."""

    spec: dict[str, Any]
    train_rows: list[dict[str, Any]]
    valid_rows: list[dict[str, Any]]


def fit_phases(cfg: Config, phases: list[Phase], run_name: str) -> dict[str, dict[str, Any]]:
    """One TorchTrainer run over the phases, in order (thinkrec/train/loop.py). Each phase publishes
    its result under ``spec["out"]``; phases already published for this ``spec["meta"]`` are
    skipped. Returns every phase's curves by name."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    storage = Storage.from_config(cfg)
    todo = [p for p in phases if L.phase_result(storage, p.spec) is None]
    if todo:
        fs, path = storage.fs(storage.uri(TRAIN_DIR, RAY_DIR))
        datasets = {
            "train": D.phases_dataset({p.spec["name"]: p.train_rows for p in todo}, t.num_workers, trim=True)
        }
        if any(p.valid_rows for p in todo):
            datasets["valid"] = D.phases_dataset(
                {p.spec["name"]: p.valid_rows for p in todo}, t.num_workers, trim=False
            )
        import pyarrow.fs as pafs

        local = isinstance(fs, pafs.LocalFileSystem)
        trainer = TorchTrainer(
            L.train_loop_per_worker,
            # Only the phases left: the rows and "valid" dataset above are theirs alone.
            train_loop_config={
                "cfg": cfg.to_dict(),
                "phases": [{**p.spec, "has_valid": bool(p.valid_rows)} for p in todo],
            },
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
        fit(trainer)
    curves = {}
    for p in phases:
        c = L.phase_result(storage, p.spec)
        if c is None:
            raise RuntimeError(f"train phase {p.spec['name']}: the run {run_name} ended without its result")
        curves[p.spec["name"]] = c
    return curves


def fit_phase(
    cfg: Config,
    spec: dict[str, Any],
    train_rows: list[dict[str, Any]],
    valid_rows: list[dict[str, Any]],
    run_name: str,
) -> tuple[str, dict[str, Any]]:
    """One phase in its own run, its result under train/_phases/<run_name>. Returns (a local
    directory with the result: adapter/, curves.json and the projector if any, its curves)."""
    from thinkrec.scoring.base import localize

    storage = Storage.from_config(cfg)
    spec = {"name": run_name, "out": storage.uri(TRAIN_DIR, PHASES_DIR, run_name), "meta": run_name, **spec}
    curves = fit_phases(cfg, [Phase(spec, train_rows, valid_rows)], run_name)
    return localize(storage, spec["out"]), curves[run_name]


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
    prefix = f"{meta['config_hash']}-{meta['input_hash']}"

    def result(name: str) -> str:
        return storage.uri(TRAIN_DIR, PHASES_DIR, name)

    common = {
        "meta": meta,
        "base_model": base,
        "yes_id": text_pb.yes_id,
        "pad_id": text_pb.placeholder_id,
        "cf_dir": storage.uri(CF_MODEL_DIR),
        "cf_file": CF_EMBEDDINGS,
    }

    def spec(name: str, **kw: Any) -> dict[str, Any]:
        return {**common, "name": name, "out": result(name), **kw}

    # 1. global LoRA, text-only prompts
    phases = [
        Phase(
            spec(GLOBAL, phase="global", cf_tokens=False, lr=t.lr, epochs=t.epochs),
            rows(text_pb, samples),
            rows(text_pb, vsamples),
        )
    ]
    global_from = GLOBAL  # the phase whose adapter is the global one
    # 2. projector (LoRA frozen, or trained too with train.projector_lora)
    pb = text_pb
    if cfg.model.cf_tokens:
        pb = builder(True)
        phases.append(
            Phase(
                spec(
                    "projector",
                    phase="projector",
                    cf_tokens=True,
                    lr=t.projector_lr,
                    lora_lr=t.lr if t.projector_lora else None,
                    epochs=t.projector_epochs,
                    init_adapter=f"{result(GLOBAL)}/{L.ADAPTER}",
                ),
                rows(pb, samples),
                rows(pb, vsamples),
            )
        )
        if t.projector_lora:  # stage 2's LoRA replaces stage 1's as the global adapter
            global_from = "projector"
    # 3. groups (from the CF embeddings alone, so known before any training) and 4. experts
    report: dict[str, Any] = {}
    names: list[str] = []
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
            extra: dict[str, Any] = {}
            if cfg.model.cf_tokens:
                extra = {"projector_dir": result("projector"), "projector_file": L.PROJECTOR_FILE}
            phases.append(
                Phase(
                    spec(
                        name,
                        phase="expert",
                        cf_tokens=cfg.model.cf_tokens,
                        lr=t.expert_lr,
                        epochs=t.expert_epochs,
                        init_adapter=f"{result(global_from)}/{L.ADAPTER}",
                        **extra,
                    ),
                    rows(pb, gs),
                    rows(pb, gv),
                )
            )
    for p in phases:
        log.info(
            "train: phase %s on %d samples (%d valid)", p.spec["name"], len(p.train_rows), len(p.valid_rows)
        )
    curves = fit_phases(cfg, phases, f"{prefix}-phases")

    # -- publish: the adapters, the projector, the groups and the fusion config
    def publish_adapter(src: str, adapter: str) -> None:
        dst = storage.uri(TRAIN_DIR, ADAPTERS, adapter)
        storage.delete(dst)  # replace what an earlier attempt left
        storage.copy_tree(f"{result(src)}/{L.ADAPTER}", dst)

    publish_adapter(global_from, GLOBAL)
    if cfg.model.cf_tokens:
        storage.write_bytes(
            f"{out}/{PROJECTOR}", storage.read_bytes(f"{result('projector')}/{L.PROJECTOR_FILE}")
        )
    if t.experts:
        for name in names:
            publish_adapter(name, name)
        storage.write_json(f"{out}/{GROUPS}", report)
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
