"""The explain stage on the prepared 40-user run with random (non-trivial) trained artifacts."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.conftest import small_config
from thinkrec.data import schema as S
from thinkrec.io.commit import TableWriter, read_table
from thinkrec.io.fs import Storage
from thinkrec.model.prompt import Encoded
from thinkrec.scoring import explain

N_SAMPLES = 3


def _config(prepared, root, tiny_qwen, **over):
    """A fresh output root holding a copy of the prepared tables and random train/cf artifacts."""
    from artifacts import make_artifacts

    shutil.copytree(f"{prepared.storage.output_root}/prepare", f"{root}/prepare")
    cfg = small_config(
        str(root),
        **{"model.base": tiny_qwen, "explain.n_samples": N_SAMPLES, "explain.max_new_tokens": 6, **over},
    )
    storage = Storage.from_config(cfg)
    inter = read_table(storage, storage.uri("prepare/interactions"), columns=[S.USER_ID]).column(0)
    items = read_table(storage, storage.uri("prepare/items"), columns=[S.ITEM_ID]).column(0)
    make_artifacts(
        cfg,
        tiny_qwen,
        n_users=int(pa.compute.max(inter).as_py()),
        n_items=int(pa.compute.max(items).as_py()),
        n_experts=2,
    )
    return cfg, storage


@pytest.fixture(scope="module")
def explained(prepared, tiny_qwen, tmp_path_factory):
    cfg, storage = _config(prepared, tmp_path_factory.mktemp("explain"), tiny_qwen)
    sample = explain.sample_rows(storage, N_SAMPLES, cfg.seed)
    # A reference trace for the second sampled row only.
    traced = sample.iloc[1]
    w = TableWriter(storage, storage.uri("reason/traces"), num_shards=1, schema=S.REASONING_TABLE)
    w.write(
        [
            pa.table(
                {
                    S.USER_ID: [int(traced[S.USER_ID])],
                    S.ITEM_ID: [int(traced[S.ITEM_ID])],
                    S.TIMESTAMP: [int(traced[S.TIMESTAMP])],
                    S.LABEL: [int(traced[S.LABEL])],
                    S.REASONING: ["the user likes this genre"],
                    S.TEACHER: ["grounded"],
                },
                schema=S.REASONING_TABLE,
            )
        ]
    )
    w.commit(rows_in=1)
    manifest = explain.run(cfg)
    return cfg, storage, sample, manifest


def test_explanations_table(explained):
    cfg, storage, sample, manifest = explained
    assert manifest["rows"] == N_SAMPLES and manifest["rows_quarantined"] == 0
    out = read_table(storage, storage.uri(explain.EXPLANATIONS)).to_pandas()
    assert list(out.columns) == S.EXPLANATIONS.names
    assert len(out) == N_SAMPLES
    got = sorted(zip(out[S.USER_ID], out[S.ITEM_ID], strict=True))
    assert got == sorted(zip(sample[S.USER_ID], sample[S.ITEM_ID], strict=True))
    assert all(isinstance(t, str) and t.strip() for t in out[S.EXPLANATION])
    labels = dict(zip(zip(sample[S.USER_ID], sample[S.ITEM_ID], strict=True), sample[S.LABEL], strict=True))
    assert all(
        labels[(u, i)] == lab for u, i, lab in zip(out[S.USER_ID], out[S.ITEM_ID], out[S.LABEL], strict=True)
    )
    # reasoning = the reference trace where reason/traces has one; elsewhere the configured teacher's
    # rationale for the row and its true label, written by the explain stage.
    from thinkrec.reasoning.teachers import GroundedTeacher

    traced = (int(sample.iloc[1][S.USER_ID]), int(sample.iloc[1][S.ITEM_ID]))
    refs = {
        (int(u), int(i)): r for u, i, r in zip(out[S.USER_ID], out[S.ITEM_ID], out[S.REASONING], strict=True)
    }
    assert refs.pop(traced) == "the user likes this genre"
    teacher = GroundedTeacher(cfg)
    rest = sample[
        [(int(u), int(i)) in refs for u, i in zip(sample[S.USER_ID], sample[S.ITEM_ID], strict=True)]
    ]
    assert len(rest) == N_SAMPLES - 1
    for r in rest.to_dict("records"):
        want = teacher.rationale(
            int(r[S.ITEM_ID]), int(r[S.LABEL]), list(r[S.HISTORY_ITEMS]), list(r[S.HISTORY_LABELS])
        )
        assert refs[(int(r[S.USER_ID]), int(r[S.ITEM_ID]))] == want and want.strip()


def test_rerun_skips(explained):
    cfg, storage, _, manifest = explained
    before = storage.local_path(storage.uri(explain.EXPLANATIONS)) + "/_manifest.json"
    with open(before) as f:
        text = f.read()
    assert explain.run(cfg) == manifest
    with open(before) as f:
        assert f.read() == text


def test_sample_is_deterministic_and_test_only(explained):
    cfg, storage, sample, _ = explained
    again = explain.sample_rows(storage, N_SAMPLES, cfg.seed)
    assert again[[S.USER_ID, S.ITEM_ID, S.TIMESTAMP]].equals(sample[[S.USER_ID, S.ITEM_ID, S.TIMESTAMP]])
    other = explain.sample_rows(storage, 10, cfg.seed + 1)
    assert len(other) == 10
    inter = read_table(storage, storage.uri("prepare/interactions")).to_pandas()
    test_keys = set(
        zip(
            *(inter.loc[inter[S.SPLIT] == "test", c] for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP)),
            strict=True,
        )
    )
    for df in (sample, other):
        assert set(zip(df[S.USER_ID], df[S.ITEM_ID], df[S.TIMESTAMP], strict=True)) <= test_keys
    # more samples than test rows: all of them, once each
    n_test = len(test_keys)
    assert len(explain.sample_rows(storage, n_test + 5, cfg.seed)) == n_test


def test_left_padded_batch_generates_like_single_rows(explained):
    """Batched generation (left-padded) starts from the same logits as an unpadded forward pass."""
    from thinkrec.model.thinkrec import collate, input_embeddings

    cfg, storage, sample, _ = explained
    needed = set(sample[S.ITEM_ID].tolist()) | {int(i) for h in sample[S.HISTORY_ITEMS] for i in h}
    ex = explain.Explainer(cfg.to_dict(), explain.item_infos(storage, needed))
    assert ex.projector is not None and ex.cf is not None  # CF slots are filled
    encs = [ex.encode(r) for r in sample.to_dict("records")]
    assert len({len(e.ids) for e in encs}) > 1, "rows of different lengths exercise the padding"
    pad = ex.builder.placeholder_id
    T = max(len(e.ids) for e in encs)
    shifted = [
        Encoded([pad] * (T - len(e.ids)) + e.ids, [p + T - len(e.ids) for p in e.cf_pos], e.cf_kind, e.cf_id)
        for e in encs
    ]
    batch = collate(shifted, pad)
    for r, e in enumerate(encs):
        batch.attention_mask[r, : T - len(e.ids)] = 0
    with torch.inference_mode():
        out = ex.model.generate(
            inputs_embeds=input_embeddings(ex.model, batch, ex.cf, ex.projector),
            attention_mask=batch.attention_mask,
            max_new_tokens=1,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
        )
        first = out.scores[0]  # (B, V)
        for r, e in enumerate(encs):
            one = collate([e], pad)
            ref = ex.model(
                inputs_embeds=input_embeddings(ex.model, one, ex.cf, ex.projector),
                attention_mask=one.attention_mask,
            ).logits[0, -1]
            torch.testing.assert_close(first[r], ref, atol=1e-4, rtol=1e-4)
    texts = ex.generate(encs)
    assert texts == [ex.generate([e])[0] for e in encs]
    assert np.all([len(t) > 0 for t in texts])


def test_missing_train_names_the_stage(prepared, tmp_path):
    shutil.copytree(f"{prepared.storage.output_root}/prepare", f"{tmp_path}/prepare")
    cfg = small_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        explain.run(cfg)
