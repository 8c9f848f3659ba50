"""The Ray Train epoch loop and driver every CF model shares (MF, LightGCN, SASRec): AdamW,
BCE-with-logits on the train labels, rank 0 evaluates on the validation rows after each epoch and
reports a checkpoint, the best epoch by validation AUC is kept.

A model module describes its training as a ``Job``: a function that builds its seeded
``torch.nn.Module`` from the job's settings, ``logits(module, batch)`` for a training batch,
``valid_scores(module, valid)`` for the validation rows, and the Ray Dataset it trains on. ``train``
runs any number of jobs one after another in one Ray Train run, so the cf stage starts one worker
group (a controller, the workers, their imports, gloo, the dataset splits) for MF and its baselines
instead of one per model, 15-20 s each on 2 CPU cores.

Checkpoints (safetensors and JSON only) hold one folder per job: ``<name>/model.safetensors`` (the
epoch's weights), ``optimizer.safetensors`` (AdamW moments, flattened), ``best.safetensors`` (the best
epoch so far by validation AUC) and ``state.json``; every checkpoint carries the finished jobs'
folders too. A restarted worker group (``FailureConfig``) or a resubmitted run with the same name
skips the finished jobs and resumes the current one from its latest epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from thinkrec.data import schema as S
from thinkrec.runtime import fit

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "state.json"

Logits = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""(model or its DDP wrapper, a batch of int64 tensors) -> (B,) logits."""
ValidScores = Callable[[nn.Module, Any], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""(model in eval mode, the validation object) -> (user ids, labels, scores) of the validation rows."""


@dataclass(frozen=True)
class Job:
    """One CF model's training inside a shared Ray Train run."""

    name: str
    """The model (``mf``, ``lightgcn``, ``sasrec``): its checkpoint folder."""
    build: Callable[[dict[str, Any]], nn.Module]
    """config -> the freshly initialised module; called on every worker after seeding."""
    logits: Logits
    valid_scores: ValidScores
    config: dict[str, Any]
    """The model's settings; large inputs (validation rows, graphs) as object refs."""
    data: str
    """Name of the Ray Dataset it trains on: jobs on the same rows share one split."""
    dataset: Any
    """That Ray Dataset (stays with the driver; the workers read their shard of it)."""


# -- checkpoint helpers (safetensors only) --------------------------------------------------------
def save_optimizer(opt: torch.optim.Optimizer, path: str) -> None:
    """AdamW state as flat tensors ``<param index>.<key>``; hyper-parameters go in the metadata."""
    sd = opt.state_dict()
    tensors = {
        f"{idx}.{key}": (val if torch.is_tensor(val) else torch.tensor(val)).detach().contiguous()
        for idx, st in sd["state"].items()
        for key, val in st.items()
    }
    save_file(tensors, path, metadata={"param_groups": json.dumps(sd["param_groups"])})


def load_optimizer(opt: torch.optim.Optimizer, path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    # JSON turned tuples (AdamW's betas) into lists; the optimizer expects them back as tuples.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in groups
    ]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in load_file(path).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": groups})


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


# -- Ray Train loop --------------------------------------------------------------------------------
def train_loop(config: dict[str, Any]) -> None:
    """The body of a Ray Train worker: every job in order, in one worker group. ``carry`` starts as a
    copy of the run's latest checkpoint; rank 0 writes each epoch's files into it and reports it, so
    each checkpoint holds the finished jobs' folders beside the current one's."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="thinkrec-cf-") as carry:
        if ckpt is not None:
            with ckpt.as_directory() as d:
                shutil.copytree(d, carry, dirs_exist_ok=True)
        for name, build, logits, valid_scores, job_config, data in config["jobs"]:
            job_config = {**config["shared"], **job_config}
            torch.manual_seed(job_config["seed"])  # identical init on every rank (DDP also broadcasts)
            model = build(job_config)
            run_epochs(job_config, model, logits, valid_scores, os.path.join(carry, name), data)


def run_epochs(
    config: dict[str, Any],
    model: nn.Module,
    logits: Logits,
    valid_scores: ValidScores,
    folder: str,
    data: str,
) -> None:
    """Trains ``model`` for ``config["epochs"]`` epochs on this worker's shard of the ``data``
    dataset (``equal=True`` split, so every rank takes the same number of steps, as DDP's all-reduce
    needs), resuming from ``folder`` when it holds an earlier attempt's files."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from eval.metrics import auc, uauc

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    state: dict[str, Any] = {"epoch": 0, "best_epoch": 0, "best_auc": None, "history": []}
    best: dict[str, torch.Tensor] | None = None
    if os.path.exists(os.path.join(folder, STATE_FILE)):
        model.load_state_dict(load_file(os.path.join(folder, MODEL_FILE)))
        load_optimizer(opt, os.path.join(folder, OPTIMIZER_FILE))
        best = load_file(os.path.join(folder, BEST_FILE))
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
    if state["epoch"] >= config["epochs"]:
        return  # finished in an earlier attempt: its folder rides along in the checkpoints

    # Buffers (LightGCN's sparse graph) are built identically on every rank; DDP would try to
    # broadcast them, which gloo cannot do for a sparse tensor.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [name for name, _ in model.named_buffers()]
    )
    ddp = ray.train.torch.prepare_model(model)  # DDP over gloo when world > 1
    shard = ray.train.get_dataset_shard(data)
    valid = ray.get(config["valid"]) if rank == 0 else None
    per_worker = max(1, config["batch_size"] // world)
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")

    for epoch in range(state["epoch"], config["epochs"]):
        ddp.train()
        total = torch.zeros(2, dtype=torch.float64)  # (sum of losses, rows)
        for batch in shard.iter_torch_batches(
            batch_size=per_worker,
            local_shuffle_buffer_size=8 * per_worker,
            local_shuffle_seed=config["seed"] * 100_003 + epoch * 101 + rank,
            dtypes=torch.int64,
        ):
            y = batch[S.LABEL].float()  # (B,)
            loss = loss_fn(logits(ddp, batch), y)
            opt.zero_grad(set_to_none=True)
            (loss / len(y)).backward()
            opt.step()
            total += torch.tensor([loss.item(), len(y)], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(total)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(total[0] / max(total[1], 1))}
        if rank != 0:
            ray.train.report(metrics)
            continue
        model.eval()
        with torch.no_grad():
            users, labels, scores = valid_scores(model, valid)
        metrics["valid_auc"] = auc(labels, scores) if len(scores) else float("nan")
        metrics["valid_uauc"] = uauc(users, labels, scores)[0] if len(scores) else float("nan")
        # nan (one-class or empty validation) never beats a number; the first epoch wins then.
        better = state["best_auc"] is None or (
            not np.isnan(metrics["valid_auc"])
            and (np.isnan(state["best_auc"]) or metrics["valid_auc"] > state["best_auc"])
        )
        if better or best is None:
            best = cpu_state(model)
            state["best_epoch"], state["best_auc"] = epoch + 1, metrics["valid_auc"]
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        os.makedirs(folder, exist_ok=True)
        save_file(cpu_state(model), os.path.join(folder, MODEL_FILE))
        save_optimizer(opt, os.path.join(folder, OPTIMIZER_FILE))
        save_file(best, os.path.join(folder, BEST_FILE))
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f)
        # A synchronous upload copies the directory into the run's storage and leaves it in place:
        # the next epoch and job write into it again.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(os.path.dirname(folder)),
            delete_local_checkpoint_after_upload=False,
        )


# -- driver ----------------------------------------------------------------------------------------
def train(
    jobs: list[Job],
    cfg: Any,
    *,
    run_name: str,
    storage_path: str,
    storage_filesystem: Any = None,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Run ``jobs`` in order on ``cfg.cf.num_workers`` Ray Train workers (DDP over gloo), one Ray
    Train run under ``storage_path/run_name``; a rerun with the same name resumes there. Every job
    gets the shared settings (seed, lr, weight decay, epochs, batch size) under its own.
    -> {job name: (the best epoch's state dict, the job's state: best_epoch, history)}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cf
    shared = {
        "seed": cfg.seed,
        "lr": c.lr,
        "weight_decay": c.weight_decay,
        "epochs": c.epochs,
        "batch_size": c.batch_size,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "shared": shared,
            "jobs": [(j.name, j.build, j.logits, j.valid_scores, j.config, j.data) for j in jobs],
        },
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        datasets={j.data: j.dataset for j in jobs},
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=c.max_failures),
        ),
    )
    result = fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"cf: Ray Train run {run_name!r} reported no checkpoint")
    out = {}
    with result.checkpoint.as_directory() as d:
        for j in jobs:
            with open(os.path.join(d, j.name, STATE_FILE)) as f:
                out[j.name] = (load_file(os.path.join(d, j.name, BEST_FILE)), json.load(f))
    return out
