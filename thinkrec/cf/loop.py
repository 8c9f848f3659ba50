"""The Ray Train epoch loop and driver that LightGCN and SASRec share: the same loop as MF's
(``thinkrec.cf.mf``): AdamW, BCE-with-logits on the train labels, rank 0 evaluates on the validation
rows after each epoch and reports a checkpoint, the best epoch by validation AUC is kept.

A model module supplies its ``torch.nn.Module``, a ``logits(module, batch)`` function for a training
batch and a ``valid_scores(module, valid)`` function for the validation rows; everything else
(checkpoints, resume, DDP, model selection) lives here once. Checkpoints use MF's files
(``model.safetensors``, ``optimizer.safetensors``, ``best.safetensors``, ``state.json``), so a restarted
worker group or a resubmitted job with the same run name resumes from the latest one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from thinkrec.cf.mf import (
    BEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    _cpu_state,
    _load_optimizer,
    _save_optimizer,
)
from thinkrec.data import schema as S
from thinkrec.runtime import fit

Logits = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""(model or its DDP wrapper, a batch of int64 tensors) -> (B,) logits."""
ValidScores = Callable[[nn.Module, Any], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""(model in eval mode, the validation object) -> (user ids, labels, scores) of the validation rows."""


def run_epochs(config: dict[str, Any], model: nn.Module, logits: Logits, valid_scores: ValidScores) -> None:
    """The body of a Ray Train worker: trains ``model`` for ``config["epochs"]`` epochs on this
    worker's shard of the ``train`` dataset (``equal=True`` split, so every rank takes the same number
    of steps, as DDP's all-reduce needs), resuming from the run's latest checkpoint."""
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

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, MODEL_FILE)))
            _load_optimizer(opt, os.path.join(d, OPTIMIZER_FILE))
            best = load_file(os.path.join(d, BEST_FILE))
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)

    # Buffers (LightGCN's sparse graph) are built identically on every rank; DDP would try to
    # broadcast them, which gloo cannot do for a sparse tensor.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [name for name, _ in model.named_buffers()]
    )
    ddp = ray.train.torch.prepare_model(model)  # DDP over gloo when world > 1
    shard = ray.train.get_dataset_shard("train")
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
            best = _cpu_state(model)
            state["best_epoch"], state["best_auc"] = epoch + 1, metrics["valid_auc"]
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        with tempfile.TemporaryDirectory(prefix="thinkrec-cf-") as d:
            save_file(_cpu_state(model), os.path.join(d, MODEL_FILE))
            _save_optimizer(opt, os.path.join(d, OPTIMIZER_FILE))
            save_file(best, os.path.join(d, BEST_FILE))
            with open(os.path.join(d, STATE_FILE), "w") as f:
                json.dump(state, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    cfg: Any,
    train_ds: Any,
    *,
    run_name: str,
    storage_path: str,
    storage_filesystem: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run ``train_loop`` on ``cfg.cf.num_workers`` Ray Train workers (DDP over gloo); ``loop_config``
    gets the shared settings (seed, lr, weight decay, epochs, batch size) added. Ray Train keeps its
    run (checkpoints) under ``storage_path/run_name``; a rerun with the same name resumes there.
    -> (the best epoch's state dict, the run's state: best_epoch, history)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cf
    config = {
        "seed": cfg.seed,
        "lr": c.lr,
        "weight_decay": c.weight_decay,
        "epochs": c.epochs,
        "batch_size": c.batch_size,
        **loop_config,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        datasets={"train": train_ds},
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
    with result.checkpoint.as_directory() as d:
        best = load_file(os.path.join(d, BEST_FILE))
        with open(os.path.join(d, STATE_FILE)) as f:
            state = json.load(f)
    return best, state
