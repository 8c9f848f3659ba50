"""The Ray Train loop shared by every training phase (global LoRA, projector, expert LoRAs).

One ``TorchTrainer`` run for all phases, in order: Ray Train's actors (controller, workers, data
split coordinators) start once per stage rather than once per phase, about 13 s each on 2 cores.
Each worker reads its own shard of every phase's examples (``ray.train.get_dataset_shard``, rows
tagged with their phase), and per phase builds the model (base + peft LoRA + CF projector), marks
the phase's parameters trainable, and trains with AdamW, linear warm-up then cosine decay, and
gradient accumulation, under DDP (gloo on CPU) or DeepSpeed ZeRO-2/3 (bf16 on GPU, fp32 + torch
Adam on CPU). Rank 0 publishes each finished phase's result (adapter, projector, curves) to the
run's storage, then a marker; the next phase starts from what was published.

Fault tolerance: every ``train.checkpoint_every`` optimizer steps and at each epoch's end, rank 0
reports a checkpoint of the current phase (trainable weights, best weights, optimizer, scheduler,
step, RNG, curves) via ``ray.train.report``; a restarted worker group (``FailureConfig``) or a
resubmitted job (same run name and storage path) skips the phases with a marker and resumes the
phase named in ``ray.train.get_checkpoint()``. Randomness (batch order, LoRA
dropout) is derived from (seed, epoch, step, data shard), so a resumed run replays exactly what an
uninterrupted one would have done. Weights are safetensors; optimizer state is ``torch.save`` of
tensors and numbers, read back with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from thinkrec import config as C
from thinkrec.io.fs import Storage
from thinkrec.model.base import load_model
from thinkrec.model.layout import CURVES
from thinkrec.model.thinkrec import CFProjector, CFTable
from thinkrec.train.data import shard_rows
from thinkrec.train.loss import ThinkRecLM, TrainBatch, loss_fn, make_batch, yes_logits

log = logging.getLogger(__name__)

PHASES = ("global", "projector", "expert")
ADAPTER = "adapter"
PROJECTOR_FILE = "projector.safetensors"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


# -- model ------------------------------------------------------------------------------------------
def lr_lambda(warmup: int, total: int) -> Any:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _localize(storage: Storage, uri: str) -> str:
    from thinkrec.scoring.base import localize

    return localize(storage, uri)


def _base_model(cfg: C.Config, path: str) -> str:
    """The driver's base model path, or, for the tiny model built under the run root, this node's
    own copy of it when the driver's local directory is not on this node (a worker elsewhere)."""
    if cfg.model.base or os.path.isdir(path):
        return path
    from thinkrec.scoring.base import base_model_path

    return base_model_path(cfg)


def build_model(cfg: C.Config, spec: dict[str, Any], yes_id: int) -> ThinkRecLM:
    """Base model + LoRA + projector for one phase, with exactly that phase's parameters trainable:
    global -> every LoRA weight; projector -> the projector (and every LoRA weight when the spec
    has a ``lora_lr``, train.projector_lora); expert -> the LoRA of the last
    ``train.expert_last_layers`` layers only."""
    from peft import LoraConfig, PeftModel, get_peft_model

    storage = Storage.from_config(cfg)
    phase = spec["phase"]
    # Same LoRA/projector init on every rank and every resume; a stage-2 restart brings its own seed.
    torch.manual_seed(int(spec.get("seed", cfg.seed)))
    base = load_model(_base_model(cfg, spec["base_model"]), cfg.model.dtype, cfg.model.trust_remote_code)
    if phase == "global":
        t = cfg.train
        llm = get_peft_model(
            base,
            LoraConfig(
                r=t.lora_r,
                lora_alpha=t.lora_alpha,
                lora_dropout=t.lora_dropout,
                target_modules=list(t.lora_targets),
                task_type="CAUSAL_LM",
            ),
        )
    else:
        adapter = _localize(storage, spec["init_adapter"])
        lora_too = phase == "expert" or (phase == "projector" and spec.get("lora_lr") is not None)
        llm = PeftModel.from_pretrained(base, adapter, is_trainable=lora_too)
    projector = cf = None
    if spec["cf_tokens"]:
        cf = CFTable.load(os.path.join(_localize(storage, spec["cf_dir"]), spec["cf_file"]))
        if phase == "projector":
            projector = CFProjector(
                cf.dim, base.config.hidden_size, cfg.model.cf_history, cfg.model.cf_history_item
            )
            if cfg.model.cf_scale:
                projector.fit_scale(cf)  # a function of the table: the same again on resume
        else:
            proj_dir = _localize(storage, spec["projector_dir"])
            projector = CFProjector.load(os.path.join(proj_dir, spec["projector_file"]))
        projector.to(dtype=base.dtype)
        projector.requires_grad_(phase == "projector")
    if phase == "expert":
        n_layers = int(base.config.num_hidden_layers)
        first = n_layers - cfg.train.expert_last_layers
        for name, p in llm.named_parameters():
            m = _LAYER.search(name)
            p.requires_grad_("lora_" in name and m is not None and int(m.group(1)) >= first)
    model = ThinkRecLM(llm, projector, cf, yes_id)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train phase {phase!r}: no trainable parameters (check train.lora_targets)")
    return model


def _export_names(model: ThinkRecLM) -> list[str]:
    """Parameters a phase's result consists of: every LoRA weight and the projector."""
    return [n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("projector.")]


def _gathered_state(model: ThinkRecLM, names: list[str], zero3: bool) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) CPU copies of the named parameters. Under ZeRO-3 every rank must call
    this (the gather is a collective)."""
    params = dict(model.named_parameters())
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None):
            return {n: params[n].detach().float().cpu().clone() for n in names}
    return {n: params[n].detach().float().cpu().clone() for n in names}


def _load_state(model: ThinkRecLM, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"checkpoint holds parameters the model lacks: {unknown[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].dtype))


# -- metrics ----------------------------------------------------------------------------------------
def auc_uauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """AUC over all rows and UAUC = mean per-user AUC over users with both classes (NaN if none)."""
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")
    per = []
    for u in np.unique(users):
        m = users == u
        if len(np.unique(labels[m])) == 2:
            per.append(roc_auc_score(labels[m], scores[m]))
    return auc, float(np.mean(per)) if per else float("nan")


def selection_score(auc: float, uauc: float, weights: tuple[float, float]) -> float:
    """a * AUC + b * UAUC; an undefined UAUC counts as 0.5 (chance), an undefined AUC likewise."""
    a = 0.5 if math.isnan(auc) else auc
    u = 0.5 if math.isnan(uauc) else uauc
    return weights[0] * a + weights[1] * u


# -- the loop ---------------------------------------------------------------------------------------
def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_mean(value: float) -> float:
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / dist.get_world_size()


def _all_gather(obj: Any) -> list[Any]:
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _batches(
    rows: list[dict[str, Any]], bs: int, n_micro: int, seed: int, epoch: int, key: int
) -> list[list[dict[str, Any]]]:
    """This epoch's micro-batches: a permutation seeded by (seed, epoch), applied to the shard.

    The permutation does not depend on the worker's rank, so which rank holds which shard never
    changes the per-step samples as a whole."""
    order = np.random.default_rng([seed, 1000 + epoch]).permutation(len(rows))
    return [[rows[k] for k in order[m * bs : (m + 1) * bs]] for m in range(n_micro)]


def _validate(model: Any, rows: list[dict[str, Any]], pad_id: int, bs: int) -> tuple[float, float]:
    """Yes logit of every validation row (one forward pass each), gathered from all ranks."""
    model.eval()
    users, labels, scores = [], [], []
    for k in range(0, len(rows), bs):
        chunk = rows[k : k + bs]
        batch = make_batch(chunk, pad_id, rec_weight_reasoning=0.0, rec_weight_label=1.0)
        scores += yes_logits(model, batch).tolist()
        users += [int(r["user_id"]) for r in chunk]
        labels += [int(r["label"]) for r in chunk]
    model.train()
    parts = _all_gather((users, labels, scores))
    u = np.array([x for p in parts for x in p[0]])
    y = np.array([x for p in parts for x in p[1]])
    s = np.array([x for p in parts for x in p[2]])
    if len(u) == 0:
        return float("nan"), float("nan"), (0, 0)
    return (*auc_uauc(u, y, s), (int(y.sum()), int(len(y) - y.sum())))


def chance_band(n_pos: int, n_neg: int) -> float:
    """0.5 plus two standard deviations of the AUC of scores that ignore the labels, on ``n_pos``
    positive and ``n_neg`` negative rows: the Mann-Whitney U statistic's variance under the null
    hypothesis, (n_pos + n_neg + 1) / (12 n_pos n_neg), in AUC units (no ties)."""
    return 0.5 + 2 * math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))


def stalled(auc: float, n_pos: int, n_neg: int) -> bool:
    """A validation AUC no better than chance (``chance_band``); False when it is undefined."""
    return n_pos > 0 and n_neg > 0 and not math.isnan(auc) and auc < chance_band(n_pos, n_neg)


def _save_rng() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state()}


def phase_result(storage: Storage, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The curves of a phase that has already published its result for exactly this run
    (``spec["meta"]``), else None. The marker ``<out>.json`` is written after the result itself."""
    uri = f"{spec['out']}.json"
    if not storage.exists(uri):
        return None
    doc = storage.read_json(uri)
    return doc["curves"] if doc.get("meta") == spec["meta"] else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker. ``config`` = {"cfg": Config.to_dict(), "phases": [spec]}.

    The phases run in order in one worker group (one Ray Train run: its actors start once, not once
    per phase). Each phase's result is published by rank 0 under ``spec["out"]`` with a marker; a
    restarted group skips the phases with a marker and resumes the one its checkpoint belongs to."""
    import ray.train

    cfg = C.from_dict(config["cfg"])
    specs = config["phases"]
    storage = Storage.from_config(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    if cfg.train.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    train_all = shard_rows(ray.train.get_dataset_shard("train"))
    valid_all = shard_rows(ray.train.get_dataset_shard("valid")) if any(s["has_valid"] for s in specs) else []
    ckpt = ray.train.get_checkpoint()
    ckpt_dir: str | None = None
    ckpt_phase, ckpt_attempt = None, 0
    if ckpt is not None:
        # A private local copy per worker (the storage may be remote, and ranks on one node must
        # not share a copy that the first to finish removes).
        ckpt_dir = ckpt.to_directory(tempfile.mkdtemp(prefix=f"thinkrec-restore-{rank}-"))
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            saved = json.load(f)
        ckpt_phase, ckpt_attempt = saved.get("name"), int(saved.get("attempt", 0))
    try:
        for spec in specs:
            if phase_result(storage, spec) is not None:
                log.info("train %s: already published, skipped", spec["name"])
                continue
            rows = _equal_shards([r for r in train_all if r["phase"] == spec["name"]], spec["name"])
            valid = [r for r in valid_all if r["phase"] == spec["name"]]
            restore = ckpt_dir if ckpt_phase == spec["name"] else None
            attempt, restarts = (ckpt_attempt if restore else 0), []
            while True:
                stall = _train_phase(
                    cfg, spec, rows, valid, restore, rank, world, device, storage, attempt, restarts
                )
                if not stall:
                    break
                # Stage 2 stalled: start over (train.projector_restarts) with every stalled record so far.
                attempt, restore, restarts = attempt + 1, None, stall
                gc.collect()
            gc.collect()  # the phase's model, optimizer and DDP/DeepSpeed engine
            dist = _dist()
            if dist is not None:
                dist.barrier()  # the next phase may start from this one's published result
    finally:
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _equal_shards(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """This phase's rows of the shard, cut to the smallest rank's count: DDP needs the same number
    of steps on every rank. ``phases_dataset`` already lays the rows out so that they are equal."""
    counts = _all_gather(len(rows))
    if min(counts) == 0:
        raise ValueError(f"train phase {name!r}: a worker got no training samples (counts {counts})")
    if len(set(counts)) > 1:
        log.warning("train %s: unequal shards %s, each cut to %d rows", name, counts, min(counts))
    return rows[: min(counts)]


def _train_phase(
    cfg: C.Config,
    spec: dict[str, Any],
    rows: list[dict[str, Any]],
    valid: list[dict[str, Any]],
    ckpt_dir: str | None,
    rank: int,
    world: int,
    device: torch.device,
    storage: Storage,
    attempt: int = 0,
    restarts: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]] | None:
    """One phase: build its model, restore from ``ckpt_dir`` when the checkpoint is this phase's,
    train with checkpoints, and publish the best (or last) weights under ``spec["out"]``.

    Returns the stalled attempts' records, this one's last, having published nothing, when a stage-2
    ``attempt`` stalled: no epoch's validation AUC was above chance (``stalled``), and
    ``train.projector_restarts`` allows another attempt, which the caller starts from a fresh model
    with its own seed (``restarts``: the records before it, kept in the curves). A checkpoint carries
    its attempt and the records before it, so a resumed phase goes on with the attempt it was in."""
    import ray.train

    t = cfg.train
    phase, name = spec["phase"], spec["name"]
    use_ds = t.backend == "deepspeed"
    # The driver's tokenizer ids: a worker loads no tokenizer (1-2 s of every phase's start-up).
    pad_id, yes_id = int(spec["pad_id"]), int(spec["yes_id"])
    data_key = int(rows[0]["idx"])  # identifies the shard, whichever rank holds it
    bs = min(t.batch_size, len(rows))
    n_micro_all = len(rows) // bs
    grad_accum = max(1, min(t.grad_accum, n_micro_all))
    n_micro = n_micro_all // grad_accum * grad_accum
    steps_per_epoch = n_micro // grad_accum
    epochs = int(spec["epochs"])
    total_steps = steps_per_epoch * epochs
    warmup = min(t.warmup_steps, max(0, total_steps - 1))
    seed = cfg.seed if attempt == 0 else hash_seed(cfg.seed, "restart", attempt) % 2**31
    spec = {**spec, "seed": seed}

    model = build_model(cfg, spec, yes_id)
    names = _export_names(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    # -- restore (weights before the optimizer exists: ZeRO builds its fp32 partitions from them)
    state: dict[str, Any] = {
        "name": name,
        "step": 0,
        "epoch": 0,
        "micro": 0,
        "loss": [],
        "grad_norm": [],
        "valid": [],
        "best_score": None,
        "bad_epochs": 0,
        "attempt": attempt,
        "restarts": list(restarts or []),
    }
    best: dict[str, torch.Tensor] | None = None
    if ckpt_dir is not None:
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            state = json.load(f)
        _load_state(model, load_file(os.path.join(ckpt_dir, "trainable.safetensors")))
        if os.path.exists(os.path.join(ckpt_dir, "best.safetensors")):
            best = load_file(os.path.join(ckpt_dir, "best.safetensors"))
        torch.set_rng_state(load_file(os.path.join(ckpt_dir, "rng.safetensors"))["torch"])
        state.setdefault("resumed_at", []).append(state["step"])
        log.info("train %s: rank %d resumed at step %d (epoch %d)", name, rank, state["step"], state["epoch"])

    model.to(device)
    lr = float(spec["lr"])
    flat = [p for p in model.parameters() if p.requires_grad]  # also what the clip measures
    params: list[Any] = flat
    if spec.get("lora_lr") is not None:  # projector phase with the LoRA: one lr each
        lora = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")]
        proj = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("projector.")]
        params = [{"params": proj, "lr": lr}, {"params": lora, "lr": float(spec["lora_lr"])}]
    zero3 = use_ds and t.zero_stage == 3
    if use_ds:
        engine, optimizer, scheduler = _deepspeed(model, params, cfg, lr, bs, grad_accum, warmup, total_steps)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
        engine = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            engine = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    inner_opt = optimizer.optimizer if use_ds and hasattr(optimizer, "optimizer") else optimizer
    if ckpt_dir is not None:
        opt_file = os.path.join(ckpt_dir, f"optimizer-rank{rank}.pt" if use_ds else "optimizer.pt")
        inner_opt.load_state_dict(torch.load(opt_file, weights_only=True))
        with open(os.path.join(ckpt_dir, "scheduler.json")) as f:
            scheduler.load_state_dict(json.load(f))

    def checkpoint(metrics: dict[str, Any]) -> None:
        cur = _gathered_state(model, trainable, zero3)  # collective under ZeRO-3
        with tempfile.TemporaryDirectory(prefix="thinkrec-ckpt-") as d:
            if use_ds:  # ZeRO partitions the optimizer: every rank writes its own part
                torch.save(inner_opt.state_dict(), os.path.join(d, f"optimizer-rank{rank}.pt"))
            if rank == 0:
                save_file(cur, os.path.join(d, "trainable.safetensors"))
                if best is not None:
                    save_file(best, os.path.join(d, "best.safetensors"))
                save_file(_save_rng(), os.path.join(d, "rng.safetensors"))
                if not use_ds:
                    torch.save(optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
                with open(os.path.join(d, "scheduler.json"), "w") as f:
                    json.dump(_json_safe(scheduler.state_dict()), f)
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump(state, f)
            from ray.train import Checkpoint

            has_files = bool(os.listdir(d))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if has_files else None)

    resumed = ckpt_dir is not None
    counts = (0, 0)  # the validation rows' positives and negatives, once validated
    n_tokens = n_samples = 0
    t_start = time.perf_counter()
    engine.train()
    for epoch in range(state["epoch"], epochs):
        batches = _batches(rows, bs, n_micro, seed, epoch, data_key)
        acc_loss, acc_n = 0.0, 0
        for m in range(state["micro"], n_micro):
            # Dropout and any other randomness: a function of where we are, not of history.
            torch.manual_seed(hash_seed(seed, phase, epoch, m, data_key))
            batch: TrainBatch = make_batch(
                batches[m],
                pad_id,
                rec_weight_reasoning=t.rec_weight_reasoning,
                rec_weight_label=t.rec_weight_label,
            )
            boundary = (m + 1) % grad_accum == 0
            grad_norm = None
            if use_ds:
                loss, _ = loss_fn(engine, batch)
                engine.backward(loss)
                engine.step()
                if boundary:
                    grad_norm = engine.get_global_grad_norm()
            else:
                sync = boundary or world == 1
                ctx_mgr = engine.no_sync() if (not sync and hasattr(engine, "no_sync")) else _null()
                with ctx_mgr:
                    loss, _ = loss_fn(engine, batch)
                    (loss / grad_accum).backward()
                if boundary:
                    # After the DDP all-reduce: every rank sees (and clips) the same gradient.
                    grad_norm = torch.nn.utils.clip_grad_norm_(flat, t.max_grad_norm or math.inf)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            acc_loss += float(loss.detach())
            acc_n += 1
            n_tokens += batch.n_tokens
            n_samples += len(batch.label)
            if not boundary:
                continue
            state["step"] += 1
            state["micro"] = m + 1
            state["loss"].append(_all_mean(acc_loss / acc_n))
            if grad_norm is not None:
                state.setdefault("grad_norm", []).append(float(grad_norm))  # absent: older checkpoints
            acc_loss, acc_n = 0.0, 0
            if (
                t.fail_at_step is not None
                and phase == t.fail_in_phase
                and attempt == t.fail_at_attempt
                and not resumed
                and state["step"] == t.fail_at_step
                and rank == min(1, world - 1)
            ):
                log.warning(
                    "train: fail_at_step=%d reached; worker %d exits (chaos test hook)", t.fail_at_step, rank
                )
                os._exit(1)
            last_in_epoch = m + 1 == n_micro
            if state["step"] % t.checkpoint_every == 0 and not last_in_epoch:
                checkpoint({"phase": name, "step": state["step"], "loss": state["loss"][-1]})
        # -- end of epoch: validate, keep the best, maybe stop early
        state["epoch"], state["micro"] = epoch + 1, 0
        metrics: dict[str, Any] = {"phase": name, "step": state["step"], "epoch": epoch + 1}
        if valid:
            auc, uauc, counts = _validate(engine, valid, pad_id, max(bs, 16))  # counts: (pos, neg)
            score = selection_score(auc, uauc, t.selection)
            state["valid"].append(
                {"epoch": epoch + 1, "step": state["step"], "auc": auc, "uauc": uauc, "score": score}
            )
            metrics.update(auc=auc, uauc=uauc, score=score)
            if state["best_score"] is None or score > state["best_score"]:
                state["best_score"], state["bad_epochs"] = score, 0
                best = _gathered_state(model, trainable, zero3)
            else:
                state["bad_epochs"] += 1
        stop = state["bad_epochs"] >= t.patience
        if stop or epoch + 1 == epochs:
            break
        checkpoint(metrics)

    aucs = [v["auc"] for v in state["valid"]]
    if (
        phase == "projector"
        and attempt < t.projector_restarts
        and aucs
        and all(stalled(a, *counts) for a in aucs)
    ):
        band = chance_band(*counts)
        log.warning(
            "train %s: no epoch's validation AUC is above chance (best %.4f, chance band below %.4f on %d"
            " positive and %d negative rows); restart %d of %d from a new projector initialisation",
            name, max(aucs), band, *counts, attempt + 1, t.projector_restarts,
        )  # fmt: skip
        record = {
            "attempt": attempt,
            "epochs": len(aucs),
            "best_auc": max(aucs),
            "below": band,
            "positives": counts[0],
            "negatives": counts[1],
            "resumed_at": state.get("resumed_at"),
        }
        return [*state["restarts"], record]  # from the checkpoint too, after a resume
    seconds = time.perf_counter() - t_start
    # Throughput of this attempt (all ranks), for the training benchmark.
    state["throughput"] = {
        "tokens": _all_mean(float(n_tokens)) * world,
        "samples": _all_mean(float(n_samples)) * world,
        "seconds": max(_all_gather(seconds)),
        "workers": world,
    }
    # -- the result: best weights (or the last, without validation), saved as the phase's output
    # (Overlaid on the gathered copies rather than loaded into the model: under ZeRO-3 the module's
    # parameters are empty partitions outside a gather.)
    final_state = _gathered_state(model, names, zero3)
    if best is not None:
        final_state.update(best)
    if rank == 0:
        _publish(storage, spec, model, final_state, state)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def hash_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (stable across processes, unlike ``hash``)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _publish(
    storage: Storage,
    spec: dict[str, Any],
    model: ThinkRecLM,
    final_state: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    """The phase's result under ``spec["out"]``: the peft adapter directory, the projector, the
    curves; then the marker ``<out>.json`` (meta and curves) that says the phase is finished."""
    curves = {k: state.get(k) for k in ("loss", "grad_norm", "valid", "resumed_at", "throughput", "restarts")}
    with tempfile.TemporaryDirectory(prefix="thinkrec-final-") as d:
        # From the gathered copies: under ZeRO-3 the module's own parameters are partitions.
        llm_state = {n[len("llm.") :]: v for n, v in final_state.items() if n.startswith("llm.")}
        model.llm.save_pretrained(os.path.join(d, ADAPTER), safe_serialization=True, state_dict=llm_state)
        # peft's generated model card is boilerplate; the adapter is its config and weights.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(d, ADAPTER, "README.md"))
        if model.projector is not None:
            p = model.projector
            proj = CFProjector(p.cf_dim, p.hidden_size, p.history, p.history_item)
            proj.load_state_dict(
                {n[len("projector.") :]: v for n, v in final_state.items() if n.startswith("projector.")}
            )
            proj.save(os.path.join(d, PROJECTOR_FILE))
        with open(os.path.join(d, CURVES), "w") as f:
            json.dump(curves, f)
        storage.delete(spec["out"])  # what an interrupted attempt left
        storage.copy_tree(d, spec["out"])
    storage.write_json(f"{spec['out']}.json", {"meta": spec["meta"], "curves": curves})


def _deepspeed(
    model: ThinkRecLM,
    params: list[Any],
    cfg: C.Config,
    lr: float,
    bs: int,
    grad_accum: int,
    warmup: int,
    total_steps: int,
) -> tuple[Any, Any, Any]:
    """DeepSpeed ZeRO-2/3 over the process group Ray Train already set up. GPU: bf16. CPU: fp32 and
    torch's AdamW (DeepSpeed's fused CPU Adam needs a compiled extension)."""
    import deepspeed

    t = cfg.train
    gpu = t.use_gpu
    _cpu_comm_without_extension(gpu)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": bs,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": gpu},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": t.weight_decay, "torch_adam": not gpu},
        },
        # With torch_adam, offloaded optimizer state runs torch's AdamW on CPU instead of the
        # compiled DeepSpeedCPUAdam.
        "zero_force_ds_cpu_optimizer": gpu,
        "steps_per_print": 10**9,
    }
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps)),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler


def _cpu_comm_without_extension(gpu: bool) -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce (a C++
    toolchain and minutes per fresh node); plain gloo collectives do the same job for the small
    gradients of LoRA training, so that build is switched off."""
    if gpu:
        return
    import deepspeed.comm.torch as ds_torch

    ds_torch.build_shm_op = lambda: None
