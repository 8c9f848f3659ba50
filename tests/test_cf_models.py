"""LightGCN and SASRec as CF encoders through the cf stage (a real local Ray Train, 2 workers): the
exported CF-token vectors and their layout, every trained model's ``cf_<model>`` column, a baseline
trained beside the configured model; each driver resumes from its Ray Train checkpoint; and a
ThinkRec projector step (the train stage's model builder, batch and loss) on each of the three
models' vectors. Seeds: the config's (0)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from eval.metrics import auc
from tests.conftest import small_config
from thinkrec.cf import lightgcn, loop, mf, sasrec
from thinkrec.cf import stage as cf_stage
from thinkrec.data import schema as S
from thinkrec.io.commit import read_table
from thinkrec.io.fs import Storage

pytestmark = pytest.mark.integration

META = {"_SUCCESS", "_config.json", "_manifest.json"}
EPOCHS = 2


def _root(prepared, path) -> str:
    """A fresh output root holding the session's prepare/ output."""
    src = Storage.from_config(prepared).local_path(prepared.storage.output_root)
    shutil.copytree(os.path.join(src, "prepare"), os.path.join(str(path), "prepare"))
    return str(path)


@pytest.fixture(scope="module")
def sasrec_run(prepared, tmp_path_factory):
    """cf.model=sasrec with LightGCN as a baseline."""
    root = _root(prepared, tmp_path_factory.mktemp("cf-sasrec"))
    cfg = small_config(root, **{"cf.model": "sasrec", "cf.baselines": ["lightgcn"], "cf.epochs": EPOCHS})
    return cfg, cf_stage.run(cfg)


@pytest.fixture(scope="module")
def lightgcn_run(prepared, tmp_path_factory):
    root = _root(prepared, tmp_path_factory.mktemp("cf-lightgcn"))
    cfg = small_config(root, **{"cf.model": "lightgcn", "cf.epochs": EPOCHS})
    return cfg, cf_stage.run(cfg)


def _inputs(storage: Storage):
    inter = read_table(storage, storage.uri("prepare/interactions")).to_pandas()
    n_users = read_table(storage, storage.uri("prepare/users")).num_rows
    n_items = read_table(storage, storage.uri("prepare/items")).num_rows
    return inter, n_users, n_items


def _embeddings(storage: Storage):
    path = os.path.join(storage.local_path(storage.uri(cf_stage.MODEL)), cf_stage.EMBEDDINGS)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return load_file(path), meta


def _check_cold_rows(emb, inter, n_users, n_items):
    train = inter[inter[S.SPLIT] == "train"]
    seen_u = np.zeros(n_users + 1, bool)
    seen_u[train[S.USER_ID].to_numpy()] = True
    seen_i = np.zeros(n_items + 1, bool)
    seen_i[train[S.ITEM_ID].to_numpy()] = True
    np.testing.assert_array_equal((emb["user"] == 0).all(dim=1).numpy(), ~seen_u)
    np.testing.assert_array_equal((emb["item"] == 0).all(dim=1).numpy(), ~seen_i)


def test_lightgcn_stage(lightgcn_run):
    cfg, metrics = lightgcn_run
    storage = Storage.from_config(cfg)
    inter, n_users, n_items = _inputs(storage)
    root = storage.local_path(storage.uri("cf"))
    assert set(os.listdir(root)) == {"model", "scores"}  # Ray Train's runs removed
    assert set(os.listdir(os.path.join(root, "model"))) == META | {cf_stage.EMBEDDINGS, cf_stage.METRICS}
    emb, meta = _embeddings(storage)
    assert meta == {"model": "lightgcn", "dim": "64", "layout": lightgcn.LAYOUT}
    assert tuple(emb["user"].shape) == (n_users + 1, 64) and tuple(emb["item"].shape) == (n_items + 1, 64)
    _check_cold_rows(emb, inter, n_users, n_items)

    scores = read_table(storage, storage.uri(cf_stage.SCORES)).to_pandas()
    assert list(scores.columns) == [*S.CF_SCORES.names, "cf_lightgcn"]
    assert len(scores) == int(inter[S.SPLIT].isin(["valid", "test"]).sum())
    # cf_score is LightGCN's logit, the dot product of the exported vectors.
    u, i = scores[S.USER_ID].to_numpy(), scores[S.ITEM_ID].to_numpy()
    dot = (emb["user"][torch.as_tensor(u)] * emb["item"][torch.as_tensor(i)]).sum(-1).numpy()
    np.testing.assert_allclose(scores["cf_lightgcn"].to_numpy(), dot, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(scores[S.CF_SCORE].to_numpy(), scores["cf_lightgcn"].to_numpy())
    test = scores[scores[S.SPLIT] == "test"]
    assert metrics["test"]["auc"] == pytest.approx(auc(test[S.LABEL], test[S.CF_SCORE]), abs=1e-6)
    assert metrics["model"] == "lightgcn" and [h["epoch"] for h in metrics["history"]] == [1, 2]
    # What the reason stage reads back: the vectors, no biases; mf.logits of them is the logit.
    table, biases = cf_stage.load_model(storage)
    assert biases == {}
    np.testing.assert_allclose(mf.logits(table, u, i), dot, rtol=0, atol=1e-5)


def test_sasrec_stage_with_lightgcn_baseline(sasrec_run):
    cfg, metrics = sasrec_run
    storage = Storage.from_config(cfg)
    inter, n_users, n_items = _inputs(storage)
    model_dir = storage.local_path(storage.uri(cf_stage.MODEL))
    assert set(os.listdir(model_dir)) == META | {
        cf_stage.EMBEDDINGS,
        cf_stage.METRICS,
        cf_stage.SASREC_WEIGHTS,
    }
    emb, meta = _embeddings(storage)
    assert meta == {"model": "sasrec", "dim": "64", "layout": sasrec.LAYOUT}
    assert tuple(emb["user"].shape) == (n_users + 1, 64) and tuple(emb["item"].shape) == (n_items + 1, 64)
    _check_cold_rows(emb, inter, n_users, n_items)

    # The committed weights: paper sizes, and they reproduce cf_sasrec from each row's own sequence.
    model = sasrec.SASRec(n_items, hidden=64, blocks=2, max_len=25).eval()
    model.load_state_dict(load_file(os.path.join(model_dir, cf_stage.SASREC_WEIGHTS)))
    assert len(model.blocks) == 2 and model.max_len == 25
    scores = read_table(storage, storage.uri(cf_stage.SCORES)).to_pandas()
    assert list(scores.columns) == [*S.CF_SCORES.names, "cf_sasrec", "cf_lightgcn"]
    rows = scores.merge(
        inter[[S.USER_ID, S.ITEM_ID, S.SPLIT, S.TIMESTAMP]], on=[S.USER_ID, S.ITEM_ID, S.SPLIT]
    )
    assert len(rows) == len(scores)
    seq = sasrec.sequences(
        inter[S.USER_ID], inter[S.ITEM_ID], inter[S.TIMESTAMP], rows[S.USER_ID], rows[S.TIMESTAMP], 25
    )
    want = sasrec.scores(model, seq, rows[S.ITEM_ID].to_numpy())
    np.testing.assert_allclose(rows["cf_sasrec"].to_numpy(), want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(scores[S.CF_SCORE].to_numpy(), scores["cf_sasrec"].to_numpy())
    # A user's CF vector is SASRec's state after the user's train sequence.
    train = inter[inter[S.SPLIT] == "train"]
    user = int(train[S.USER_ID].iloc[0])
    last = sasrec.sequences(
        train[S.USER_ID], train[S.ITEM_ID], train[S.TIMESTAMP], [user], [np.iinfo(np.int64).max], 25
    )
    with torch.no_grad():
        torch.testing.assert_close(emb["user"][user], model.user_vectors(torch.as_tensor(last))[0])
    torch.testing.assert_close(emb["item"][1:], model.item.weight.detach()[1:])

    # The baseline: its column, its metrics on the same rows, and no exported vectors.
    base = metrics["baselines"]["lightgcn"]
    test = scores[scores[S.SPLIT] == "test"]
    assert base["test"]["auc"] == pytest.approx(auc(test[S.LABEL], test["cf_lightgcn"]), abs=1e-6)
    assert base["model"] == "lightgcn" and len(base["history"]) == EPOCHS
    assert metrics["test"]["auc"] == pytest.approx(auc(test[S.LABEL], test["cf_sasrec"]), abs=1e-6)
    # A rerun skips: nothing retrained.
    assert cf_stage.run(cfg)["best_epoch"] == metrics["best_epoch"]


@pytest.mark.parametrize("name", ["lightgcn", "sasrec"])
def test_driver_resumes_from_its_checkpoint(prepared, tmp_path, name):
    """A second run under the same name with more epochs starts from the first run's checkpoint:
    epoch 1 is not retrained (a different learning rate would change its loss), epoch 2 is new."""
    root = _root(prepared, tmp_path / "root")
    storage = Storage(root)
    data = cf_stage._Data(storage, cf_stage._read_ids(storage))
    runs = str(tmp_path / "runs")

    def fit(epochs: int, lr: float):
        cfg = small_config(root, **{"cf.model": name, "cf.epochs": epochs, "cf.lr": lr})
        if name == "lightgcn":
            pos = data.train[data.train[S.LABEL] > 0]
            return lightgcn.train(
                cfg,
                data.pairs(),
                data.valid_triple(),
                positives=(pos[S.USER_ID].to_numpy(), pos[S.ITEM_ID].to_numpy()),
                num_users=data.num_users,
                num_items=data.num_items,
                run_name="resume",
                storage_path=runs,
            )
        u, i, y = data.valid_triple()
        return sasrec.train(
            cfg,
            data.sequence_dataset(25, cfg.cf.num_workers),
            (u, i, y, data.sequences(data.valid, 25)),
            num_items=data.num_items,
            run_name="resume",
            storage_path=runs,
        )

    first = fit(1, 1e-2)
    second = fit(2, 3e-2)
    assert [h["epoch"] for h in first.history] == [1]
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.history[0] == first.history[0]
    assert np.isfinite(second.history[1]["train_loss"])


def test_one_run_trains_every_model_and_resumes_each(prepared, tmp_path):
    """The cf stage's jobs (MF, LightGCN, SASRec) train in one Ray Train run whose checkpoints hold
    one folder per model. Resubmitted under the same name with more epochs, every model keeps its
    first epoch (a different learning rate would change it) and trains the second."""
    root = _root(prepared, tmp_path / "root")
    storage = Storage(root)
    data = cf_stage._Data(storage, cf_stage._read_ids(storage))
    runs, names = str(tmp_path / "runs"), ["mf", "lightgcn", "sasrec"]

    def fit(epochs: int, lr: float):
        cfg = small_config(root, **{"cf.epochs": epochs, "cf.lr": lr})
        return loop.train(cf_stage._jobs(cfg, data, names), cfg, run_name="resume", storage_path=runs)

    first = fit(1, 1e-2)
    run = os.path.join(runs, "resume")
    last = max(
        d for d in os.listdir(run) if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run, d))
    )
    assert set(names) <= set(os.listdir(os.path.join(run, last)))
    second = fit(2, 3e-2)
    for name in names:
        (_, one), (_, two) = first[name], second[name]
        assert [h["epoch"] for h in one["history"]] == [1], name
        assert [h["epoch"] for h in two["history"]] == [1, 2], name
        assert two["history"][0] == one["history"][0], name
        assert np.isfinite(two["history"][1]["train_loss"]), name
    # Each model's best weights are its own.
    assert "user.weight" in second["mf"][0] and "item.weight" in second["sasrec"][0]
    assert "embedding.weight" in second["lightgcn"][0]


@pytest.fixture(scope="module")
def global_adapter(tiny_qwen, tmp_path_factory) -> str:
    """A fresh global LoRA (what the train stage's phase 1 publishes) for the projector phase."""
    from peft import LoraConfig, get_peft_model

    from thinkrec.model.base import load_model

    path = str(tmp_path_factory.mktemp("global-adapter"))
    cfg = small_config(path)
    t = cfg.train
    lora = LoraConfig(
        r=t.lora_r, lora_alpha=t.lora_alpha, target_modules=list(t.lora_targets), task_type="CAUSAL_LM"
    )
    get_peft_model(load_model(tiny_qwen), lora).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["mf", "lightgcn", "sasrec"])
def test_thinkrec_projector_step_on_each_cf_model(
    request, prepared, tiny_qwen, global_adapter, one_torch_thread, name
):
    """The train stage's projector phase (its model builder, encoder, batch and loss) reads each
    model's committed vectors: the projector's input width is theirs, and one AdamW step moves it."""
    from thinkrec.model.base import load_tokenizer
    from thinkrec.model.prompt import PromptBuilder
    from thinkrec.scoring.base import CF_EMBEDDINGS, CF_MODEL_DIR
    from thinkrec.train import data as D
    from thinkrec.train.loop import build_model
    from thinkrec.train.loss import loss_fn, make_batch

    if name == "mf":
        cf_stage.run(prepared)  # skips itself when test_cf already made it
        cfg = prepared
    else:
        cfg = request.getfixturevalue(f"{name}_run")[0]
    cfg = small_config(cfg.storage.output_root, **{"cf.model": name, "model.base": tiny_qwen})
    storage = Storage.from_config(cfg)
    emb, meta = _embeddings(storage)
    assert meta["model"] == name
    width = emb["user"].shape[1]

    pb = PromptBuilder(load_tokenizer(tiny_qwen), cf_tokens=True)
    inputs = D.load_inputs(storage, with_traces=False)
    samples = D._samples(inputs.split("train"))[:6]
    rows = D.encode_rows(pb, samples, inputs.items, history_len=cfg.data.history_len, max_answer_tokens=4)
    assert all(r["cf_pos"] for r in rows)
    spec = {
        "phase": "projector",
        "base_model": tiny_qwen,
        "cf_tokens": True,
        "cf_dir": storage.uri(CF_MODEL_DIR),
        "cf_file": CF_EMBEDDINGS,
        "init_adapter": global_adapter,
    }
    model = build_model(cfg, spec, pb.yes_id)
    assert model.projector.cf_dim == width
    batch = make_batch(rows, pb.placeholder_id, rec_weight_reasoning=0.1, rec_weight_label=0.9)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = loss_fn(model, batch)
    loss.backward()
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().max()) > 0 for g in grads)
    opt.step()
    with torch.no_grad():
        after, _ = loss_fn(model, batch)
    assert torch.isfinite(loss) and float(after) != float(loss)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"cf.model": "bpr"}, "cf.model"),
        ({"cf.baselines": ["sasrec", "sasrec"]}, "cf.baselines"),
        ({"cf.sasrec.hidden": 64, "cf.sasrec.heads": 3}, "cf.sasrec.heads"),
    ],
)
def test_cf_config_errors_name_the_key(overrides, key):
    from thinkrec import config as C

    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load("configs/demo.yaml", overrides)
    # A baseline equal to cf.model is that model, trained once: not an error.
    assert C.load("configs/demo.yaml", {"cf.model": "lightgcn"}).cf.baselines == ("lightgcn", "sasrec")
