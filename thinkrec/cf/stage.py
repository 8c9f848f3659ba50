"""cf stage: train MF on Ray Train; write the embeddings and the MF scores of every valid/test sample.

Outputs (each committed with the protocol of thinkrec.io.commit):
- ``cf/model/``: ``embeddings.safetensors`` (``CFTable``: ``user`` (U+1, D), ``item`` (I+1, D); U and
  I are the row counts of prepare/users and prepare/items), the vectors the LLM's CF projector reads;
  ``bias.safetensors`` (the raw ``user``/``item``/``global`` biases) when ``cf.bias`` is set, and
  ``metrics.json`` (valid/test AUC and UAUC, per-epoch history);
- ``cf/scores``: schema.CF_SCORES, the configured CF model's logit of every valid and test sample in
  ``cf_score``, plus one ``cf_<model>`` column per CF model trained (``cf_mf``, and ``cf_mf_nobias``:
  the same MF's dot product without its biases), sharded by user_id; rows_in = the valid + test row
  count prepare committed.

Layout of embeddings.safetensors (also in its metadata, key ``layout``): without biases D = d and the
rows are MF's p_u and q_i. With biases D = d + 2 and the biases ride along, so the CF tokens carry all
MF knows (on a time split the biases hold most of it):

    user u: [p_u (d), b_u, 1]        item i: [q_i (d), 1, b_i]
    <user u, item i> = p_u . q_i + b_u + b_i = MF's logit - the global bias

Row 0 (padding, unknown ids) is all zeros. ``load_model`` returns the raw (p, q) table and biases.

Users and items that never occur in train keep no trained vector: their p/q rows and biases are
zeroed, so a cold entity reads "no collaborative signal" instead of its random initialisation (its
constant-1 column stays, so the dot product still equals MF's logit); a cold user's logit is then
the item bias plus the global bias.

cf/model is committed before cf/scores, and cf/scores' fingerprint covers cf/model's manifest, so a
rerun after a failure between the two reuses the committed embeddings instead of retraining.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from eval.metrics import auc, uauc
from thinkrec.cf import mf
from thinkrec.config import Config
from thinkrec.data import prepare
from thinkrec.data import schema as S
from thinkrec.io.commit import (
    TableWriter,
    fingerprint,
    is_complete,
    mark_success,
    read_dataset,
    read_table,
    stable_shard,
)
from thinkrec.io.fs import Storage
from thinkrec.model.thinkrec import CFTable

log = logging.getLogger(__name__)

MODEL = "cf/model"
SCORES = "cf/scores"
TRAIN_RUNS = "cf/_ray_train"
"""Ray Train's run directory (checkpoints); scratch, removed once cf/model is committed."""
EMBEDDINGS = "embeddings.safetensors"
BIASES = "bias.safetensors"
METRICS = "metrics.json"
LAYOUT_BIAS = "user=[p_u, b_u, 1]; item=[q_i, 1, b_i]"
"""embeddings.safetensors ``layout`` metadata with biases (see the module docstring)."""
LAYOUT_PLAIN = "user=[p_u]; item=[q_i]"
INPUTS = (prepare.INTERACTIONS, prepare.ITEMS, prepare.USERS)


def _sections(cfg: Config) -> dict[str, Any]:
    d = cfg.to_dict()
    return {"cf": d["cf"], "data": d["data"], "seed": d["seed"], "stage": "cf/v2"}


def model_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    return fingerprint(_sections(cfg), [storage.uri(t) for t in INPUTS], storage)


def scores_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    return fingerprint(
        {**_sections(cfg), "storage.num_shards": cfg.storage.num_shards},
        [storage.uri(t) for t in (*INPUTS, MODEL)],
        storage,
    )


def load_model(storage: Storage) -> tuple[CFTable, dict[str, torch.Tensor]]:
    """The committed MF weights: the CFTable and the biases (empty when trained without them).
    Reads through the storage layer, so it works for s3:// roots too."""
    fs, root = storage.fs(storage.uri(MODEL))
    with fs.open_input_stream(f"{root}/{EMBEDDINGS}") as f:
        t = load_safetensors(f.read())
    biases: dict[str, torch.Tensor] = {}
    if storage.exists(storage.uri(MODEL, BIASES)):
        with fs.open_input_stream(f"{root}/{BIASES}") as f:
            biases = {k: v.float() for k, v in load_safetensors(f.read()).items()}
    # With biases the file holds [p_u, b_u, 1] / [q_i, 1, b_i]: the raw table is the first d columns.
    d = t["user"].shape[1] - (2 if biases else 0)
    return CFTable(t["user"][:, :d].float(), t["item"][:, :d].float()), biases


def projector_table(table: CFTable, biases: dict[str, torch.Tensor]) -> CFTable:
    """The vectors the CF projector reads (module docstring): with biases [p_u, b_u, 1] and
    [q_i, 1, b_i], so <user, item> = p_u . q_i + b_u + b_i; row 0 stays zero. (U+1, d) -> (U+1, d+2)."""
    if not biases:
        return table
    ones_u, ones_i = torch.ones(len(table.user), 1), torch.ones(len(table.item), 1)
    ones_u[0] = ones_i[0] = 0  # padding / unknown ids: no entity, no constant
    user = torch.cat([table.user, biases["user"][:, None], ones_u], dim=1)  # (U+1, d+2)
    item = torch.cat([table.item, ones_i, biases["item"][:, None]], dim=1)  # (I+1, d+2)
    return CFTable(user.contiguous(), item.contiguous())


def _count(storage: Storage, table: str) -> int:
    return int(storage.read_json(f"{storage.uri(table)}/_manifest.json")["rows"])


def _eval_rows(storage: Storage) -> pd.DataFrame:
    cols = [S.USER_ID, S.ITEM_ID, S.LABEL, S.SPLIT, S.NOT_COLD]
    t = read_table(storage, storage.uri(prepare.INTERACTIONS), columns=cols).to_pandas()
    return t[t[S.SPLIT].isin(["valid", "test"])].reset_index(drop=True)


def _metrics(rows: pd.DataFrame, scores: np.ndarray) -> dict[str, Any]:
    """AUC/UAUC per split over all rows, and AUC over the warm rows (user and item both seen in
    train), where MF has a learned vector for both sides; on a time split most rows can be cold."""
    out = {}
    for split in ("valid", "test"):
        m = (rows[S.SPLIT] == split).to_numpy()
        u, y, s = rows[S.USER_ID].to_numpy()[m], rows[S.LABEL].to_numpy()[m], scores[m]
        warm = rows[S.NOT_COLD].to_numpy(bool)[m]
        value, users = uauc(u, y, s) if m.any() else (float("nan"), 0)
        out[split] = {
            "auc": auc(y, s) if m.any() else float("nan"),
            "uauc": value,
            "uauc_users": users,
            "rows": int(m.sum()),
            "warm_auc": auc(y[warm], s[warm]) if warm.any() else float("nan"),
            "warm_rows": int(warm.sum()),
        }
    return out


def _train(cfg: Config, storage: Storage) -> tuple[CFTable, dict[str, torch.Tensor], dict[str, Any]]:
    num_users, num_items = _count(storage, prepare.USERS), _count(storage, prepare.ITEMS)
    cols = [S.USER_ID, S.ITEM_ID, S.LABEL, S.SPLIT]
    # The four id/label columns are small even for millions of rows: the driver reads them once
    # for the train-entity sets and the validation rows; the workers stream the train rows.
    ids = read_table(storage, storage.uri(prepare.INTERACTIONS), columns=cols).to_pandas()
    train = ids[ids[S.SPLIT] == "train"]
    valid = ids[ids[S.SPLIT] == "valid"]
    if train.empty:
        raise ValueError(f"cf: {storage.uri(prepare.INTERACTIONS)} has no train rows")
    train_users = np.unique(train[S.USER_ID].to_numpy(np.int64))
    train_items = np.unique(train[S.ITEM_ID].to_numpy(np.int64))
    train_ds = (
        read_dataset(storage, storage.uri(prepare.INTERACTIONS), columns=cols)
        .filter(lambda r: r[S.SPLIT] == "train")
        .select_columns([S.USER_ID, S.ITEM_ID, S.LABEL])
        # Materialised before the trainer takes every CPU: the workers then only split blocks.
        .materialize()
    )

    meta = model_meta(cfg, storage)
    fs, path = storage.fs(storage.uri(TRAIN_RUNS))
    result = mf.train(
        cfg,
        train_ds,
        (valid[S.USER_ID].to_numpy(), valid[S.ITEM_ID].to_numpy(), valid[S.LABEL].to_numpy()),
        num_users=num_users,
        num_items=num_items,
        run_name=f"mf-{meta['config_hash']}-{meta['input_hash']}",
        storage_path=path,
        storage_filesystem=fs,
    )
    table, biases = result.table, result.biases
    # Cold entities (and padding) carry no trained signal: zero them.
    seen_u = torch.zeros(num_users + 1, dtype=torch.bool)
    seen_u[torch.as_tensor(train_users)] = True
    seen_i = torch.zeros(num_items + 1, dtype=torch.bool)
    seen_i[torch.as_tensor(train_items)] = True
    seen_u[0] = seen_i[0] = False
    table.user[~seen_u] = 0
    table.item[~seen_i] = 0
    if biases:
        biases["user"][~seen_u] = 0
        biases["item"][~seen_i] = 0
    info = {
        "model": cfg.cf.model,
        "dim": cfg.cf.dim,
        "bias": cfg.cf.bias,
        "num_users": num_users,
        "num_items": num_items,
        "train_rows": len(train),
        "train_users": len(train_users),
        "train_items": len(train_items),
        "num_workers": cfg.cf.num_workers,
        "epochs": cfg.cf.epochs,
        "best_epoch": result.best_epoch,
        "history": result.history,
    }
    return table, biases, info


def _save_model(
    cfg: Config, storage: Storage, table: CFTable, biases: dict[str, torch.Tensor], metrics: dict[str, Any]
) -> None:
    uri = storage.uri(MODEL)
    if storage.exists(uri):
        storage.delete(uri)  # a half-written or stale directory: start clean
    with tempfile.TemporaryDirectory(prefix="thinkrec-cf-") as d:
        out = projector_table(table, biases)
        save_file(
            {"user": out.user, "item": out.item},
            os.path.join(d, EMBEDDINGS),
            metadata={
                "model": cfg.cf.model,
                "dim": str(table.dim),
                "layout": LAYOUT_BIAS if biases else LAYOUT_PLAIN,
            },
        )
        if biases:
            save_file({k: v.contiguous() for k, v in biases.items()}, os.path.join(d, BIASES))
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                storage.write_bytes(f"{uri}/{name}", f.read())
    storage.write_json(f"{uri}/{METRICS}", metrics)
    mark_success(storage, uri, model_meta(cfg, storage), cfg.to_dict())


def run(cfg: Config) -> dict[str, Any]:
    storage = Storage.from_config(cfg)
    model_uri, scores_uri = storage.uri(MODEL), storage.uri(SCORES)
    if is_complete(storage, model_uri, model_meta(cfg, storage)) and is_complete(
        storage, scores_uri, scores_meta(cfg, storage)
    ):
        log.info("cf: up to date, skipped (%s)", storage.uri("cf"))
        return storage.read_json(f"{model_uri}/{METRICS}")

    rows = _eval_rows(storage)
    if is_complete(storage, model_uri, model_meta(cfg, storage)):
        table, biases = load_model(storage)
        metrics = storage.read_json(f"{model_uri}/{METRICS}")
    else:
        table, biases, info = _train(cfg, storage)
        scores = mf.logits(table, rows[S.USER_ID].to_numpy(), rows[S.ITEM_ID].to_numpy(), biases)
        metrics = {**info, **_metrics(rows, scores)}
        _save_model(cfg, storage, table, biases, metrics)
        storage.delete(storage.uri(TRAIN_RUNS))

    users, items = rows[S.USER_ID].to_numpy(), rows[S.ITEM_ID].to_numpy()
    scores = mf.logits(table, users, items, biases)
    # One column per CF model trained (contract with evaluate): the configured model is MF.
    extra = {S.cf_column("mf"): scores, S.cf_column("mf_nobias"): mf.logits(table, users, items)}
    schema = S.cf_scores_schema(extra)
    out = pa.table(
        {
            S.USER_ID: pa.array(users, pa.int64()),
            S.ITEM_ID: pa.array(items, pa.int64()),
            S.LABEL: pa.array(rows[S.LABEL].to_numpy(), pa.int8()),
            S.SPLIT: pa.array(rows[S.SPLIT].to_numpy(), pa.string()),
            S.CF_SCORE: pa.array(scores, pa.float32()),
            **{name: pa.array(v, pa.float32()) for name, v in extra.items()},
        },
        schema=schema,
    )
    split_rows = storage.read_json(f"{storage.uri(prepare.INTERACTIONS)}/_manifest.json")["split_rows"]
    w = TableWriter.for_stage(cfg, storage, scores_uri, scores_meta(cfg, storage), schema)
    if not w.complete:
        pending = set(w.pending_shards())
        keep = np.isin(stable_shard(out.column(S.USER_ID), cfg.storage.num_shards), list(pending))
        w.write([out.filter(pa.array(keep))], sorted(pending))
        w.commit(rows_in=int(split_rows["valid"]) + int(split_rows["test"]))
    log.info(
        "cf: valid AUC %.4f UAUC %.4f, test AUC %.4f UAUC %.4f (best epoch %s of %s)",
        metrics["valid"]["auc"],
        metrics["valid"]["uauc"],
        metrics["test"]["auc"],
        metrics["test"]["uauc"],
        metrics.get("best_epoch"),
        metrics.get("epochs"),
    )
    return metrics
