"""Matrix factorisation (the reference CF model): score(u, i) = <e_u, e_i> (+ b_u + b_i + b), trained
with BCE-with-logits on the train split's labels through Ray Train (DDP over gloo on CPU).

Shape of every CF model module here: a ``torch.nn.Module`` (``MF``), a Ray Train loop
(``train_loop``) and a driver function (``train``) that returns the best epoch's weights as a
``CFTable`` (+ extras such as biases) and the per-epoch history.

Checkpoints are safetensors only: ``model.safetensors`` (the epoch's weights), ``optimizer.safetensors``
(AdamW moments, flattened), ``best.safetensors`` (the best epoch so far by validation AUC) and
``state.json``. A restarted worker group (``FailureConfig``) or a resubmitted job with the same run
name resumes from the latest one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from thinkrec.model.thinkrec import CFTable

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "state.json"


class MF(nn.Module):
    """User and item embeddings of size ``dim``; row 0 of each table is padding (never trained)."""

    def __init__(self, num_users: int, num_items: int, dim: int, bias: bool = False) -> None:
        """``num_users``/``num_items`` count real ids 1..N; the tables have N + 1 rows."""
        super().__init__()
        self.user = nn.Embedding(num_users + 1, dim, padding_idx=0)
        self.item = nn.Embedding(num_items + 1, dim, padding_idx=0)
        # Small init: logits start near 0 (p = 0.5), so early BCE gradients are well scaled.
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        with torch.no_grad():
            self.user.weight[0].zero_()
            self.item.weight[0].zero_()
        self.bias = bias
        if bias:
            self.user_bias = nn.Embedding(num_users + 1, 1, padding_idx=0)
            self.item_bias = nn.Embedding(num_items + 1, 1, padding_idx=0)
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
            self.global_bias = nn.Parameter(torch.zeros(1))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B,) user ids, (B,) item ids -> (B,) logits."""
        out = (self.user(users) * self.item(items)).sum(-1)  # (B,)
        if self.bias:
            out = out + self.user_bias(users)[:, 0] + self.item_bias(items)[:, 0] + self.global_bias
        return out

    def table(self) -> tuple[CFTable, dict[str, torch.Tensor]]:
        """The embeddings as a CFTable and the biases (empty without them), detached copies."""
        table = CFTable(self.user.weight.detach().clone(), self.item.weight.detach().clone())
        extras: dict[str, torch.Tensor] = {}
        if self.bias:
            extras = {
                "user": self.user_bias.weight.detach()[:, 0].clone(),
                "item": self.item_bias.weight.detach()[:, 0].clone(),
                "global": self.global_bias.detach().clone(),
            }
        return table, extras


def logits(
    table: CFTable,
    users: np.ndarray,
    items: np.ndarray,
    biases: dict[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """MF logits from saved weights: the same formula as ``MF.forward``. Ids beyond a table (unknown)
    read its zero row, like ``CFTable.lookup``. (n,), (n,) -> (n,) float32."""
    u = torch.from_numpy(np.array(users, dtype=np.int64))  # copies: inputs may be read-only views
    i = torch.from_numpy(np.array(items, dtype=np.int64))
    u = torch.where((u >= 0) & (u < len(table.user)), u, torch.zeros_like(u))
    i = torch.where((i >= 0) & (i < len(table.item)), i, torch.zeros_like(i))
    with torch.no_grad():
        out = (table.user[u] * table.item[i]).sum(-1)  # (n,)
        if biases:
            out = out + biases["user"][u] + biases["item"][i] + biases["global"]
    return out.float().numpy()


# -- checkpoint helpers (safetensors only) --------------------------------------------------------
def _save_optimizer(opt: torch.optim.Optimizer, path: str) -> None:
    """AdamW state as flat tensors ``<param index>.<key>``; hyper-parameters go in the metadata."""
    sd = opt.state_dict()
    tensors = {
        f"{idx}.{key}": (val if torch.is_tensor(val) else torch.tensor(val)).detach().contiguous()
        for idx, st in sd["state"].items()
        for key, val in st.items()
    }
    save_file(tensors, path, metadata={"param_groups": json.dumps(sd["param_groups"])})


def _load_optimizer(opt: torch.optim.Optimizer, path: str) -> None:
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


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


# -- Ray Train loop --------------------------------------------------------------------------------
def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. Each worker iterates its own shard of the ``train`` dataset
    (Ray Train splits it with ``equal=True``, so every worker takes the same number of steps, which
    DDP's all-reduce needs). Rank 0 evaluates on the validation rows and reports a checkpoint."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from eval.metrics import auc, uauc

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    torch.manual_seed(config["seed"])  # identical init on every rank (DDP also broadcasts rank 0's)
    model = MF(config["num_users"], config["num_items"], config["dim"], config["bias"])
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

    ddp = ray.train.torch.prepare_model(model)  # DDP over gloo when world > 1
    shard = ray.train.get_dataset_shard("train")
    valid_users, valid_items, valid_labels = ray.get(config["valid"]) if rank == 0 else (None, None, None)
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
            y = batch["label"].float()  # (B,)
            out = ddp(batch["user_id"], batch["item_id"])  # (B,)
            loss = loss_fn(out, y)
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
        table, biases = model.table()
        scores = logits(table, valid_users, valid_items, biases)
        metrics["valid_auc"] = auc(valid_labels, scores) if len(scores) else float("nan")
        metrics["valid_uauc"] = uauc(valid_users, valid_labels, scores)[0] if len(scores) else float("nan")
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
        with tempfile.TemporaryDirectory(prefix="thinkrec-mf-") as d:
            save_file(_cpu_state(model), os.path.join(d, MODEL_FILE))
            _save_optimizer(opt, os.path.join(d, OPTIMIZER_FILE))
            save_file(best, os.path.join(d, BEST_FILE))
            with open(os.path.join(d, STATE_FILE), "w") as f:
                json.dump(state, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# -- driver ----------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    table: CFTable
    """Best epoch's embeddings, (U+1, d) and (I+1, d)."""
    biases: dict[str, torch.Tensor]
    """user (U+1,), item (I+1,), global (1,); empty without ``cf.bias``."""
    best_epoch: int
    history: list[dict[str, Any]]


def train(
    cfg: Any,
    train_ds: Any,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    num_users: int,
    num_items: int,
    run_name: str,
    storage_path: str,
    storage_filesystem: Any = None,
) -> TrainResult:
    """Train MF on ``train_ds`` (a Ray Dataset of user_id, item_id, label) with ``cfg.cf.num_workers``
    workers; ``valid`` = (user ids, item ids, labels) for model selection. Ray Train keeps its run
    (checkpoints) under ``storage_path/run_name``; a rerun with the same name resumes there."""
    import ray

    from thinkrec.cf import loop  # below this module: it reuses MF's checkpoint helpers

    c = cfg.cf
    loop_config = {
        "num_users": num_users,
        "num_items": num_items,
        "dim": c.dim,
        "bias": c.bias,
        # By reference: only rank 0 fetches the validation rows.
        "valid": ray.put(tuple(np.asarray(a, dtype=np.int64) for a in valid)),
    }
    best, state = loop.train(
        train_loop,
        loop_config,
        cfg,
        train_ds,
        run_name=run_name,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
    )
    model = MF(num_users, num_items, c.dim, c.bias)
    model.load_state_dict(best)
    table, biases = model.table()
    return TrainResult(table, biases, int(state["best_epoch"]), list(state["history"]))
