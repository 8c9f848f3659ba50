"""The explain stage on the prepared 40-user run with random (non-trivial) trained artifacts: per-row
gates, joins by key, resubmission over committed shards and the prompt cache."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tests.conftest import small_config
from thinkrec.data import schema as S
from thinkrec.explain import stage as explain
from thinkrec.generation.base import GenRequest
from thinkrec.io.commit import SUCCESS, TableWriter, part_name, read_table
from thinkrec.io.fs import Storage
from thinkrec.model.base import load_tokenizer
from thinkrec.model.prompt import PromptBuilder

N_SAMPLES = 6
NUM_SHARDS = 4


def _config(prepared, root, tiny_qwen, **over):
    """A fresh output root holding a copy of the prepared tables and random train/cf artifacts."""
    from artifacts import make_artifacts

    shutil.copytree(f"{prepared.storage.output_root}/prepare", f"{root}/prepare")
    cfg = small_config(
        str(root),
        **{
            "model.base": tiny_qwen,
            "explain.n_samples": N_SAMPLES,
            "explain.max_new_tokens": 6,
            "explain.shards_per_wave": 2,
            "storage.num_shards": NUM_SHARDS,
            **over,
        },
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
                    **{c: [None] for c in (S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH)},
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
    # provenance: what generated each row
    assert set(out[S.BACKEND]) == {"hf"} and set(out[S.GEN_MODEL]) == {cfg.model.base}
    pb = PromptBuilder(load_tokenizer(cfg.model.base))
    assert set(out[S.DECODING_HASH]) == {explain.decoding(cfg, pb).hash()}
    # Every explanation states an answer first (explain.answer_first), then the rationale's ".".
    assert all(t.startswith(("Yes.", "No.")) for t in out[S.EXPLANATION]), out[S.EXPLANATION].tolist()
    assert out[S.PROMPT_HASH].nunique() == N_SAMPLES
    assert manifest["rows_generated"] == N_SAMPLES and manifest["rows_cached"] == 0
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


def test_reference_decoding_defaults():
    from thinkrec.config import Config

    d = explain.decoding(Config())
    assert (d.temperature, d.no_repeat_ngram_size, d.repetition_penalty) == (0.4, 2, 1.2)


def test_all_rows_when_n_samples_is_zero(explained):
    cfg, storage, _, _ = explained
    inter = read_table(storage, storage.uri("prepare/interactions"), columns=[S.SPLIT]).column(0)
    assert len(explain.sample_rows(storage, 0, cfg.seed)) == inter.to_pylist().count("test")


def test_each_row_generated_with_its_own_gate(explained):
    """The gate fed to the generator is the fusion rule's for the row's user (global, an expert or
    a mixture): the recorded adapter label and the prompt hash (which covers the gate) both match
    an independent computation; users with different gates get different prompt hashes."""
    from thinkrec.model.fusion import gate, load_fusion
    from thinkrec.model.thinkrec import CFTable
    from thinkrec.scoring.base import load_artifacts

    cfg, storage, sample, _ = explained
    out = read_table(storage, storage.uri(explain.EXPLANATIONS)).to_pandas()
    art = load_artifacts(cfg)
    cf, fusion = CFTable.load(art.cf_embeddings), load_fusion(art.fusion)
    assert fusion is not None and len(art.adapter_names) == 3  # global + 2 experts
    w, labels = gate(cf.user[list(sample[S.USER_ID])], fusion, "thinkrec")
    want = {
        (int(u), int(i)): lab for u, i, lab in zip(sample[S.USER_ID], sample[S.ITEM_ID], labels, strict=True)
    }
    got = {
        (int(u), int(i)): a for u, i, a in zip(out[S.USER_ID], out[S.ITEM_ID], out[S.ADAPTER], strict=True)
    }
    assert got == want
    assert any(lab != "global" for lab in labels), "random experts should not all fall back to global"

    needed = set(sample[S.ITEM_ID].tolist()) | {int(i) for h in sample[S.HISTORY_ITEMS] for i in h}
    actor = explain.ExplainActor(cfg.to_dict(), explain.item_infos(storage, needed))
    hashes = dict(zip(zip(out[S.USER_ID], out[S.ITEM_ID], strict=True), out[S.PROMPT_HASH], strict=True))
    for r, g in zip(sample.to_dict("records"), w, strict=True):
        req = GenRequest("k", encoded=actor.encode(r), gate=g)
        assert actor.gen.key(req, actor.decoding) == hashes[(int(r[S.USER_ID]), int(r[S.ITEM_ID]))]
        other = GenRequest("k", encoded=actor.encode(r), gate=np.eye(len(g))[0 if g[0] < 1 else 1])
        assert actor.gen.key(other, actor.decoding) != hashes[(int(r[S.USER_ID]), int(r[S.ITEM_ID]))]


def test_references_join_by_key_not_order():
    gen = pd.DataFrame({S.USER_ID: [1, 2, 3, 4], S.ITEM_ID: [10, 20, 30, 40], S.EXPLANATION: list("abcd")})
    refs = {(u, i): f"ref {u}-{i}" for u, i in zip(gen[S.USER_ID], gen[S.ITEM_ID], strict=True)}
    del refs[(3, 30)]
    shuffled = gen.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert list(shuffled[S.USER_ID]) != [1, 2, 3, 4]
    out = explain.join_references(shuffled, refs)
    for u, i, r in zip(out[S.USER_ID], out[S.ITEM_ID], out[S.REASONING], strict=True):
        assert pd.isna(r) if (u, i) == (3, 30) else r == f"ref {u}-{i}"


def test_resubmission_skips_committed_shards(explained):
    """A run that died after publishing some shards: the resubmission generates only the rest."""
    cfg, storage, _, _ = explained
    root = storage.local_path(storage.uri(explain.EXPLANATIONS))
    before = read_table(storage, storage.uri(explain.EXPLANATIONS)).to_pandas()
    os.remove(f"{root}/{SUCCESS}")
    os.remove(f"{root}/_manifest.json")
    import pyarrow.parquet as pq

    sizes = {s: pq.ParquetFile(f"{root}/{part_name(s)}").metadata.num_rows for s in range(NUM_SHARDS)}
    lost = max(sizes, key=sizes.get)
    assert sizes[lost] > 0
    os.remove(f"{root}/{part_name(lost)}")
    kept = {s: os.stat(f"{root}/{part_name(s)}").st_mtime_ns for s in range(NUM_SHARDS) if s != lost}
    manifest = explain.run(cfg)
    assert manifest["shards_skipped"] == NUM_SHARDS - 1
    # only the lost shard's rows went through the actors (served by the cache: same prompts)
    assert manifest["rows_cached"] + manifest["rows_generated"] == sizes[lost]
    assert manifest["rows_generated"] == 0
    assert {s: os.stat(f"{root}/{part_name(s)}").st_mtime_ns for s in kept} == kept
    after = read_table(storage, storage.uri(explain.EXPLANATIONS)).to_pandas()
    key = [S.USER_ID, S.ITEM_ID]
    pd.testing.assert_frame_equal(
        after.sort_values(key).reset_index(drop=True), before.sort_values(key).reset_index(drop=True)
    )


def test_cache_hit_on_a_rerun(explained):
    """The whole table gone (e.g. a fresh output table after a config change that keeps the prompts):
    every row comes from the prompt cache, none is generated, and the texts are the same."""
    cfg, storage, _, _ = explained
    uri = storage.uri(explain.EXPLANATIONS)
    before = read_table(storage, uri).to_pandas()
    storage.delete(uri)
    manifest = explain.run(cfg)
    assert manifest["rows_cached"] == N_SAMPLES and manifest["rows_generated"] == 0
    assert manifest["shards_skipped"] == 0
    after = read_table(storage, uri).to_pandas()
    key = [S.USER_ID, S.ITEM_ID]
    pd.testing.assert_frame_equal(
        after.sort_values(key).reset_index(drop=True), before.sort_values(key).reset_index(drop=True)
    )


def test_missing_train_names_the_stage(prepared, tmp_path):
    shutil.copytree(f"{prepared.storage.output_root}/prepare", f"{tmp_path}/prepare")
    cfg = small_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        explain.run(cfg)
