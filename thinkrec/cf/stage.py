"""cf stage: train the configured CF model (and any baselines) on Ray Train; write the CF-token
vectors and every trained model's scores of every valid/test sample.

Models (``cf.model``, ``cf.baselines``): ``mf`` (thinkrec/cf/mf.py), ``lightgcn`` (cf/lightgcn.py),
``sasrec`` (cf/sasrec.py), each a module, a Ray Train job and a driver, with checkpoints and resume
(the shared epoch loop of cf/loop.py).

Outputs (each committed with the protocol of thinkrec.io.commit):
- ``cf/model/``: ``embeddings.safetensors`` (``CFTable``: ``user`` (U+1, D), ``item`` (I+1, D); U and
  I are the row counts of prepare/users and prepare/items), the vectors the LLM's CF projector reads,
  from ``cf.model`` only (the projector's input width is D); ``bias.safetensors`` (the raw
  ``user``/``item``/``global`` biases) for MF with ``cf.bias``; ``sasrec.safetensors`` (SASRec's
  weights, to score rows from their own sequences) for SASRec; ``metrics.json`` (valid/test AUC and
  UAUC, per-epoch history);
- ``cf/scores``: schema.CF_SCORES, the configured CF model's logit of every valid and test sample in
  ``cf_score``, plus one ``cf_<model>`` column per CF model trained (``cf_mf``, and ``cf_mf_nobias``:
  the same MF's dot product without its biases; ``cf_lightgcn``; ``cf_sasrec``), sharded by user_id;
  rows_in = the valid + test row count prepare committed. Baselines' validation/test AUC are logged
  and returned by ``run``; evaluate reports every ``cf_<model>`` column on the test rows.

Layout of embeddings.safetensors (also in its metadata, key ``layout``), per model:

- MF without biases, D = d: the rows are MF's p_u and q_i. With biases D = d + 2 and the biases ride
  along, so the CF tokens carry all MF knows (on a time split the biases hold most of it):

      user u: [p_u (d), b_u, 1]        item i: [q_i (d), 1, b_i]
      <user u, item i> = p_u . q_i + b_u + b_i = MF's logit - the global bias

- LightGCN, D = cf.lightgcn.dim: the propagated embeddings [e_u], [e_i]; <user, item> = its logit.
- SASRec, D = cf.sasrec.hidden: user [h_u], SASRec's last state after the user's last
  cf.sasrec.max_len train items; item [e_i], its embedding; <user, item> = SASRec's logit for the
  item after the train sequence (``cf_sasrec`` scores each row from its own sequence instead).

Row 0 (padding, unknown ids) is all zeros. ``load_model`` returns the raw table (MF: (p, q)) and
biases (empty but for MF with biases).

Users and items that never occur in train keep no trained vector: their rows (and MF's biases) are
zeroed, so a cold entity reads "no collaborative signal" instead of its random initialisation (MF's
constant-1 column stays, so the dot product still equals MF's logit); a cold user's MF logit is then
the item bias plus the global bias.

The configured model and its baselines train one after another in one Ray Train run
(``thinkrec.cf.loop``: one worker group for all). cf/model is committed before cf/scores, and
cf/scores' fingerprint covers cf/model's manifest, so a rerun after a failure between the two reuses
the committed model and trains the baselines alone; the Ray Train runs are kept until cf/scores is
committed, so a rerun resumes them from their checkpoints.
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
from thinkrec.cf import lightgcn, loop, mf, sasrec
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
SASREC_WEIGHTS = "sasrec.safetensors"
"""SASRec's weights in cf/model when it is cf.model (cf_sasrec scores each row from its sequence)."""
INPUTS = (prepare.INTERACTIONS, prepare.ITEMS, prepare.USERS)


def _sections(cfg: Config, baselines: bool = True) -> dict[str, Any]:
    d = cfg.to_dict()
    cf = d["cf"] if baselines else {k: v for k, v in d["cf"].items() if k != "baselines"}
    return {"cf": cf, "data": d["data"], "seed": d["seed"], "stage": "cf/v3"}


def model_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    """cf/model depends on everything but cf.baselines (adding a baseline keeps the CF tokens)."""
    return fingerprint(_sections(cfg, baselines=False), [storage.uri(t) for t in INPUTS], storage)


def scores_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    return fingerprint(
        {**_sections(cfg), "storage.num_shards": cfg.storage.num_shards},
        [storage.uri(t) for t in (*INPUTS, MODEL)],
        storage,
    )


def load_model(storage: Storage) -> tuple[CFTable, dict[str, torch.Tensor]]:
    """The committed CF vectors: the CFTable (MF: the raw (p, q); LightGCN, SASRec: the exported
    vectors) and MF's biases (empty without them, and for the other models); ``mf.logits`` of the two
    is the model's logit (SASRec's after each user's train sequence). Reads through the storage layer,
    so it works for s3:// roots too."""
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


_ID_COLUMNS = [S.USER_ID, S.ITEM_ID, S.LABEL, S.SPLIT, S.TIMESTAMP, S.NOT_COLD]


def _read_ids(storage: Storage) -> pd.DataFrame:
    """Every interaction's ids, label, split, timestamp and not_cold. These columns are small even
    for millions of rows: the driver reads them once for the train-entity sets, the validation rows,
    SASRec's sequences and the scored rows; the MF and LightGCN workers stream the train rows."""
    return read_table(storage, storage.uri(prepare.INTERACTIONS), columns=_ID_COLUMNS).to_pandas()


def _eval_rows(storage: Storage, ids: pd.DataFrame | None = None) -> pd.DataFrame:
    t = _read_ids(storage) if ids is None else ids
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


class _Data:
    """What every model's training reads, computed once per run."""

    def __init__(self, storage: Storage, ids: pd.DataFrame) -> None:
        self.storage, self.ids = storage, ids
        self.num_users, self.num_items = _count(storage, prepare.USERS), _count(storage, prepare.ITEMS)
        self.train = ids[ids[S.SPLIT] == "train"]
        self.valid = ids[ids[S.SPLIT] == "valid"]
        if self.train.empty:
            raise ValueError(f"cf: {storage.uri(prepare.INTERACTIONS)} has no train rows")
        self.train_users = np.unique(self.train[S.USER_ID].to_numpy(np.int64))
        self.train_items = np.unique(self.train[S.ITEM_ID].to_numpy(np.int64))
        self._pairs: Any = None

    def seen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U+1,), (I+1,) bool: users/items with a train row; padding never."""
        seen_u = torch.zeros(self.num_users + 1, dtype=torch.bool)
        seen_u[torch.as_tensor(self.train_users)] = True
        seen_i = torch.zeros(self.num_items + 1, dtype=torch.bool)
        seen_i[torch.as_tensor(self.train_items)] = True
        seen_u[0] = seen_i[0] = False
        return seen_u, seen_i

    def valid_triple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        v = self.valid
        return v[S.USER_ID].to_numpy(), v[S.ITEM_ID].to_numpy(), v[S.LABEL].to_numpy()

    def pairs(self) -> Any:
        """The train rows (user_id, item_id, label) as a Ray Dataset, materialised before the
        trainer takes every CPU (the workers then only split blocks); shared by MF and LightGCN."""
        if self._pairs is None:
            cols = [S.USER_ID, S.ITEM_ID, S.LABEL, S.SPLIT]
            self._pairs = (
                read_dataset(self.storage, self.storage.uri(prepare.INTERACTIONS), columns=cols)
                .filter(lambda r: r[S.SPLIT] == "train")
                .select_columns([S.USER_ID, S.ITEM_ID, S.LABEL])
                .materialize()
            )
        return self._pairs

    def sequence_dataset(self, max_len: int, num_workers: int) -> Any:
        """SASRec's training rows as a Ray Dataset: ``seq`` (max_len,) (a tensor column), item_id,
        label; a few blocks per worker, materialised."""
        import ray.data
        from ray.data.extensions import ArrowTensorArray

        t = pa.table(
            {
                sasrec.SEQ: ArrowTensorArray.from_numpy(self.sequences(self.train, max_len)),
                S.ITEM_ID: pa.array(self.train[S.ITEM_ID].to_numpy(np.int64)),
                S.LABEL: pa.array(self.train[S.LABEL].to_numpy(np.int64)),
            }
        )
        step = -(-t.num_rows // (4 * num_workers))
        return ray.data.from_arrow([t.slice(lo, step) for lo in range(0, t.num_rows, step)]).materialize()

    def sequences(self, rows: pd.DataFrame, max_len: int, train_only: bool = False) -> np.ndarray:
        """Each row's SASRec sequence: its user's last ``max_len`` items strictly before its timestamp
        (among the train rows only with ``train_only``). -> (len(rows), max_len)."""
        src = self.train if train_only else self.ids
        return sasrec.sequences(
            src[S.USER_ID].to_numpy(),
            src[S.ITEM_ID].to_numpy(),
            src[S.TIMESTAMP].to_numpy(),
            rows[S.USER_ID].to_numpy(),
            rows[S.TIMESTAMP].to_numpy(),
            max_len,
        )


class _Trained:
    """One trained CF model: its exported CF-token vectors (``export``, ``layout``), the raw table
    and biases ``load_model`` returns, its ``cf_<model>`` columns for scored rows, and its info."""

    def __init__(
        self,
        name: str,
        table: CFTable,
        biases: dict[str, torch.Tensor],
        info: dict[str, Any],
        model: sasrec.SASRec | None = None,
    ) -> None:
        self.name, self.table, self.biases, self.info, self.model = name, table, biases, info, model

    @property
    def export(self) -> CFTable:
        return projector_table(self.table, self.biases) if self.name == "mf" else self.table

    @property
    def layout(self) -> str:
        if self.name == "mf":
            return LAYOUT_BIAS if self.biases else LAYOUT_PLAIN
        return lightgcn.LAYOUT if self.name == "lightgcn" else sasrec.LAYOUT

    def columns(self, data: _Data, rows: pd.DataFrame, cfg: Config) -> dict[str, np.ndarray]:
        """{cf_<model>: logit} for ``rows``; MF also gives ``cf_mf_nobias`` (its dot product alone)."""
        users, items = rows[S.USER_ID].to_numpy(), rows[S.ITEM_ID].to_numpy()
        if self.name == "mf":
            return {
                S.cf_column("mf"): mf.logits(self.table, users, items, self.biases),
                S.cf_column("mf_nobias"): mf.logits(self.table, users, items),
            }
        if self.name == "lightgcn":
            return {S.cf_column("lightgcn"): mf.logits(self.table, users, items)}  # <e_u, e_i>
        assert self.model is not None
        seq = data.sequences(rows, cfg.cf.sasrec.max_len)
        return {S.cf_column("sasrec"): sasrec.scores(self.model, seq, items)}


def _info(cfg: Config, data: _Data, name: str, dim: int, best_epoch: int, history: list) -> dict[str, Any]:
    return {
        "model": name,
        "dim": dim,
        "bias": cfg.cf.bias if name == "mf" else False,
        "num_users": data.num_users,
        "num_items": data.num_items,
        "train_rows": len(data.train),
        "train_users": len(data.train_users),
        "train_items": len(data.train_items),
        "num_workers": cfg.cf.num_workers,
        "epochs": cfg.cf.epochs,
        "best_epoch": best_epoch,
        "history": history,
    }


def _jobs(cfg: Config, data: _Data, names: list[str]) -> list[loop.Job]:
    """The named CF models' Ray Train jobs, in order."""
    jobs = []
    for name in names:
        if name == "mf":
            jobs.append(
                mf.job(
                    cfg, data.pairs(), data.valid_triple(), num_users=data.num_users, num_items=data.num_items
                )
            )
        elif name == "lightgcn":
            pos = data.train[data.train[S.LABEL] > 0]
            positives = (pos[S.USER_ID].to_numpy(), pos[S.ITEM_ID].to_numpy())
            jobs.append(
                lightgcn.job(
                    cfg,
                    data.pairs(),
                    data.valid_triple(),
                    positives=positives,
                    num_users=data.num_users,
                    num_items=data.num_items,
                )
            )
        else:
            c = cfg.cf.sasrec
            u, i, y = data.valid_triple()
            valid = (u, i, y, data.sequences(data.valid, c.max_len))
            jobs.append(
                sasrec.job(
                    cfg, data.sequence_dataset(c.max_len, cfg.cf.num_workers), valid, num_items=data.num_items
                )
            )
    return jobs


def _train(cfg: Config, data: _Data, names: list[str]) -> dict[str, _Trained]:
    """Train the named CF models one after another in one Ray Train run (one worker group for all;
    the run's name covers the models and the fingerprint, so a rerun resumes it)."""
    meta = model_meta(cfg, data.storage)
    fs, path = data.storage.fs(data.storage.uri(TRAIN_RUNS))
    jobs = _jobs(cfg, data, names)
    runs = loop.train(
        jobs,
        cfg,
        run_name=f"{'+'.join(names)}-{meta['config_hash']}-{meta['input_hash']}",
        storage_path=path,
        storage_filesystem=fs,
    )
    seen_u, seen_i = data.seen()
    out = {}
    for j in jobs:
        best, state = runs[j.name]
        if j.name == "mf":
            m = mf.result(j, best, state)
            table, biases = m.table, m.biases
            # Cold entities (and padding) carry no trained signal: zero them.
            table.user[~seen_u] = 0
            table.item[~seen_i] = 0
            if biases:
                biases["user"][~seen_u] = 0
                biases["item"][~seen_i] = 0
            info = _info(cfg, data, j.name, cfg.cf.dim, m.best_epoch, m.history)
            out[j.name] = _Trained(j.name, table, biases, info)
        elif j.name == "lightgcn":
            g = lightgcn.result(j, best, state)
            g.table.user[~seen_u] = 0
            g.table.item[~seen_i] = 0
            info = _info(cfg, data, j.name, cfg.cf.lightgcn.dim, g.best_epoch, g.history)
            out[j.name] = _Trained(j.name, g.table, {}, info)
        else:
            r = sasrec.result(j, best, state)
            out[j.name] = _from_sasrec(cfg, data, r.model, r.best_epoch, r.history)
    return out


def _from_sasrec(cfg: Config, data: _Data, model: sasrec.SASRec, best_epoch: int, history: list) -> _Trained:
    """Cold items' embeddings zeroed in the model itself (they are inputs and targets alike), then
    the export from each train user's last train items."""
    _, seen_i = data.seen()
    with torch.no_grad():
        model.item.weight[~seen_i] = 0
    last = pd.DataFrame(
        {S.USER_ID: data.train_users, S.TIMESTAMP: np.full(len(data.train_users), np.iinfo(np.int64).max)}
    )
    seq = data.sequences(last, cfg.cf.sasrec.max_len, train_only=True)
    table = sasrec.export(model, data.train_users, seq, data.num_users)
    info = _info(cfg, data, "sasrec", cfg.cf.sasrec.hidden, best_epoch, history)
    return _Trained("sasrec", table, {}, info, model=model.eval())


def _load_trained(cfg: Config, storage: Storage, data: _Data) -> _Trained:
    """cf.model as committed in cf/model (a rerun after a failure before cf/scores)."""
    table, biases = load_model(storage)
    info = storage.read_json(f"{storage.uri(MODEL)}/{METRICS}")
    model = None
    if cfg.cf.model == "sasrec":
        fs, root = storage.fs(storage.uri(MODEL))
        with fs.open_input_stream(f"{root}/{SASREC_WEIGHTS}") as f:
            weights = load_safetensors(f.read())
        model = sasrec.build_model(sasrec.sizes(cfg, data.num_items))
        model.load_state_dict(weights)
        model.eval()
    return _Trained(cfg.cf.model, table, biases, info, model=model)


def _save_model(cfg: Config, storage: Storage, trained: _Trained, metrics: dict[str, Any]) -> None:
    uri = storage.uri(MODEL)
    if storage.exists(uri):
        storage.delete(uri)  # a half-written or stale directory: start clean
    with tempfile.TemporaryDirectory(prefix="thinkrec-cf-") as d:
        out = trained.export
        save_file(
            {"user": out.user.contiguous(), "item": out.item.contiguous()},
            os.path.join(d, EMBEDDINGS),
            metadata={"model": trained.name, "dim": str(trained.table.dim), "layout": trained.layout},
        )
        if trained.biases:
            save_file({k: v.contiguous() for k, v in trained.biases.items()}, os.path.join(d, BIASES))
        if trained.model is not None:
            state = {k: v.detach().contiguous() for k, v in trained.model.state_dict().items()}
            save_file(state, os.path.join(d, SASREC_WEIGHTS))
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

    ids = _read_ids(storage)
    data = _Data(storage, ids)
    rows = _eval_rows(storage, ids)
    fresh = not is_complete(storage, model_uri, model_meta(cfg, storage))
    others = [b for b in cfg.cf.baselines if b != cfg.cf.model]
    names = [cfg.cf.model, *others] if fresh else others
    models = _train(cfg, data, names) if names else {}
    trained = models[cfg.cf.model] if fresh else _load_trained(cfg, storage, data)
    # One column per CF model trained (contract with evaluate): the configured one, then baselines.
    extra = trained.columns(data, rows, cfg)
    scores = extra[S.cf_column(cfg.cf.model)]
    metrics = {**trained.info, **_metrics(rows, scores)} if fresh else trained.info
    if fresh:
        _save_model(cfg, storage, trained, metrics)
    baselines: dict[str, Any] = {}
    for name in others:
        other = models[name]
        cols = other.columns(data, rows, cfg)
        extra.update(cols)
        baselines[name] = {**other.info, **_metrics(rows, cols[S.cf_column(name)])}
        log.info(
            "cf: baseline %s: valid AUC %.4f UAUC %.4f, test AUC %.4f UAUC %.4f",
            name,
            baselines[name]["valid"]["auc"],
            baselines[name]["valid"]["uauc"],
            baselines[name]["test"]["auc"],
            baselines[name]["test"]["uauc"],
        )
    users, items = rows[S.USER_ID].to_numpy(), rows[S.ITEM_ID].to_numpy()
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
    storage.delete(storage.uri(TRAIN_RUNS))  # every model's Ray Train run, once cf/scores is in
    log.info(
        "cf: %s valid AUC %.4f UAUC %.4f, test AUC %.4f UAUC %.4f (best epoch %s of %s)",
        cfg.cf.model,
        metrics["valid"]["auc"],
        metrics["valid"]["uauc"],
        metrics["test"]["auc"],
        metrics["test"]["uauc"],
        metrics.get("best_epoch"),
        metrics.get("epochs"),
    )
    return {**metrics, "baselines": baselines} if baselines else metrics
