"""cf stage: MF on Ray Train (real local Ray), exact artifacts, rerun skips; MF pieces in isolation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from eval.metrics import auc
from thinkrec.cf import loop, mf
from thinkrec.cf import stage as cf_stage
from thinkrec.data import prepare
from thinkrec.data import schema as S
from thinkrec.io.commit import read_table
from thinkrec.io.fs import Storage

META = {"_SUCCESS", "_config.json", "_manifest.json"}


def _files(root: str) -> dict[str, float]:
    """Relative path -> mtime of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = os.stat(p).st_mtime_ns
    return out


@pytest.fixture(scope="module")
def cf_run(prepared):
    metrics = cf_stage.run(prepared)
    return prepared, Storage.from_config(prepared), metrics


@pytest.mark.integration
def test_cf_stage_artifacts(cf_run):
    cfg, storage, metrics = cf_run
    root = storage.local_path(storage.uri("cf"))
    shards = cfg.storage.num_shards
    # Exact file sets; Ray Train's scratch run directory is gone once the model is committed.
    assert set(os.listdir(root)) == {"model", "scores"}
    biases = {"bias.safetensors"} if cfg.cf.bias else set()
    assert (
        set(_files(os.path.join(root, "model"))) == META | {"embeddings.safetensors", "metrics.json"} | biases
    )
    assert set(_files(os.path.join(root, "scores"))) == META | {
        f"{q}part-{s:05d}.parquet" for s in range(shards) for q in ("", "quarantine/")
    }

    num_users = read_table(storage, storage.uri(prepare.USERS)).num_rows
    num_items = read_table(storage, storage.uri(prepare.ITEMS)).num_rows
    emb = load_file(os.path.join(root, "model", "embeddings.safetensors"))
    assert set(emb) == {"user", "item"}
    # With biases the projector's vectors are [p_u, b_u, 1] and [q_i, 1, b_i] (cf/stage.py).
    width = cfg.cf.dim + (2 if cfg.cf.bias else 0)
    assert tuple(emb["user"].shape) == (num_users + 1, width)
    assert tuple(emb["item"].shape) == (num_items + 1, width)
    with safe_open(os.path.join(root, "model", "embeddings.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["dim"] == str(cfg.cf.dim) and meta["model"] == cfg.cf.model
    assert meta["layout"] == (cf_stage.LAYOUT_BIAS if cfg.cf.bias else cf_stage.LAYOUT_PLAIN)

    inter = read_table(storage, storage.uri(prepare.INTERACTIONS)).to_pandas()
    train = inter[inter[S.SPLIT] == "train"]
    # Padding and every user/item never seen in train are zero rows; every train entity is not.
    seen_u = np.zeros(num_users + 1, bool)
    seen_u[train[S.USER_ID].to_numpy()] = True
    seen_i = np.zeros(num_items + 1, bool)
    seen_i[train[S.ITEM_ID].to_numpy()] = True
    d = cfg.cf.dim
    user_zero = (emb["user"][:, :d] == 0).all(dim=1).numpy()
    item_zero = (emb["item"][:, :d] == 0).all(dim=1).numpy()
    np.testing.assert_array_equal(user_zero, ~seen_u)
    np.testing.assert_array_equal(item_zero, ~seen_i)
    assert not emb["user"][0].any() and not emb["item"][0].any()  # padding: all zeros

    scores = read_table(storage, storage.uri(cf_stage.SCORES)).to_pandas()
    evalrows = inter[inter[S.SPLIT].isin(["valid", "test"])]
    assert len(scores) == len(evalrows) > 0
    assert list(scores.columns) == [*S.CF_SCORES.names, "cf_mf", "cf_mf_nobias"]
    man = storage.read_json(f"{storage.uri(cf_stage.SCORES)}/_manifest.json")
    assert man["rows"] == len(evalrows) and man["rows_quarantined"] == 0
    # The stored logit is the MF formula on the committed embeddings (same float32 math).
    table, biases = cf_stage.load_model(storage)
    assert bool(biases) == cfg.cf.bias
    if biases:  # cold entities' biases are zeroed too
        assert not biases["user"][torch.as_tensor(~seen_u)].any()
        assert not biases["item"][torch.as_tensor(~seen_i)].any()
    expect = mf.logits(table, scores[S.USER_ID].to_numpy(), scores[S.ITEM_ID].to_numpy(), biases)
    np.testing.assert_allclose(scores[S.CF_SCORE].to_numpy(), expect, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(scores["cf_mf"].to_numpy(), scores[S.CF_SCORE].to_numpy())
    dot = mf.logits(table, scores[S.USER_ID].to_numpy(), scores[S.ITEM_ID].to_numpy())
    np.testing.assert_allclose(scores["cf_mf_nobias"].to_numpy(), dot, rtol=0, atol=1e-6)
    # The projector's vectors carry the whole MF logit: <user, item> + global bias = cf_score.
    u = torch.as_tensor(scores[S.USER_ID].to_numpy().copy())
    i = torch.as_tensor(scores[S.ITEM_ID].to_numpy().copy())
    full = (emb["user"][u] * emb["item"][i]).sum(-1) + (biases["global"] if biases else 0)
    np.testing.assert_allclose(full.numpy(), scores[S.CF_SCORE].to_numpy(), rtol=0, atol=1e-5)
    if biases:
        torch.testing.assert_close(emb["user"][1:, d], biases["user"][1:])
        torch.testing.assert_close(emb["item"][1:, d + 1], biases["item"][1:])
        assert (emb["user"][1:, d + 1] == 1).all() and (emb["item"][1:, d] == 1).all()
    # Same multiset of (user, item, split, label) as prepare's valid + test rows.
    key = [S.USER_ID, S.ITEM_ID, S.SPLIT, S.LABEL]
    a = scores[key].sort_values(key).reset_index(drop=True)
    b = evalrows[key].sort_values(key).reset_index(drop=True)
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())

    # metrics.json: AUC/UAUC per split recomputable from cf/scores; epochs; best epoch = best valid AUC.
    for split in ("valid", "test"):
        part = scores[scores[S.SPLIT] == split]
        assert metrics[split]["rows"] == len(part)
        assert 0 < metrics[split]["auc"] < 1
        assert metrics[split]["auc"] == pytest.approx(auc(part[S.LABEL], part[S.CF_SCORE]), abs=1e-6)
    hist = metrics["history"]
    assert [h["epoch"] for h in hist] == list(range(1, cfg.cf.epochs + 1))
    best = max(hist, key=lambda h: h["valid_auc"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["num_users"] == num_users and metrics["num_items"] == num_items
    assert metrics["train_rows"] == len(train)


@pytest.mark.integration
def test_cf_rerun_skips(cf_run):
    cfg, storage, metrics = cf_run
    root = storage.local_path(storage.uri("cf"))
    before = _files(root)
    manifests = {
        t: storage.read_json(f"{storage.uri(t)}/_manifest.json") for t in (cf_stage.MODEL, cf_stage.SCORES)
    }
    again = cf_stage.run(cfg)
    assert json.dumps(again, sort_keys=True) == json.dumps(metrics, sort_keys=True)  # NaN-safe
    assert _files(root) == before  # no new, removed or rewritten file
    for t, man in manifests.items():
        assert storage.read_json(f"{storage.uri(t)}/_manifest.json") == man


@pytest.mark.parametrize("bias", [False, True])
def test_logits_match_forward(bias):
    torch.manual_seed(0)
    model = mf.MF(7, 11, 4, bias=bias)
    if bias:  # non-zero biases, so the test sees them
        torch.nn.init.normal_(model.user_bias.weight)
        torch.nn.init.normal_(model.item_bias.weight)
        model.global_bias.data.fill_(0.3)
        with torch.no_grad():
            model.user_bias.weight[0] = 0
            model.item_bias.weight[0] = 0
    users = np.array([1, 2, 7, 3, 0])
    items = np.array([11, 1, 5, 5, 0])
    table, biases = model.table()
    got = mf.logits(table, users, items, biases)
    want = model(torch.as_tensor(users), torch.as_tensor(items)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got[-1] == pytest.approx(model.global_bias.item() if bias else 0.0)  # padding pair
    # Unknown ids (beyond the table, negative) read the zero row, like CFTable.lookup.
    unknown = mf.logits(table, np.array([99, -3]), np.array([1, 1]), biases)
    zero_user = mf.logits(table, np.array([0, 0]), np.array([1, 1]), biases)
    np.testing.assert_array_equal(unknown, zero_user)


def test_projector_table_layout():
    """[p_u, b_u, 1] . [q_i, 1, b_i] = p_u . q_i + b_u + b_i; padding row all zeros."""
    from thinkrec.model.thinkrec import CFTable

    g = torch.Generator().manual_seed(0)
    table = CFTable(torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g))
    table.user[0] = table.item[0] = 0
    biases = {"user": torch.tensor([0.0, 0.5, -1.0, 2.0]), "item": torch.tensor([0.0, 1, 2, 3, -4])}
    biases["global"] = torch.tensor([0.25])
    out = cf_stage.projector_table(table, biases)
    assert out.dim == 5
    torch.testing.assert_close(out.user[2], torch.cat([table.user[2], torch.tensor([-1.0, 1.0])]))
    torch.testing.assert_close(out.item[4], torch.cat([table.item[4], torch.tensor([1.0, -4.0])]))
    assert not out.user[0].any() and not out.item[0].any()
    users, items = np.array([1, 2, 3, 3]), np.array([4, 1, 2, 3])
    want = mf.logits(table, users, items, biases) - 0.25
    got = (out.user[users] * out.item[items]).sum(-1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert cf_stage.projector_table(table, {}) is table  # no biases: the plain vectors


def test_optimizer_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = mf.MF(5, 6, 3, bias=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    for _ in range(2):
        loss = model(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = str(tmp_path / "opt.safetensors")
    loop.save_optimizer(opt, path)
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.5)
    loop.load_optimizer(fresh, path)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        for k, v in a["state"][idx].items():
            torch.testing.assert_close(b["state"][idx][k], v, rtol=0, atol=0)
