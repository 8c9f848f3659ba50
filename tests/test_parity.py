"""Train/serve parity: the score stage's Yes logit for a pair equals the training forward's.

Both sides are built from the same committed artifacts (base model, CF table, projector, global
adapter) and the same prepared rows; the training side goes through the train stage's own model
builder, sample encoder and batch collation, the serving side through the whole score stage on a
local Ray (prompt actors, prefix sharing, fused per-row LoRA, the answer-rows-only last layer). Any
skew between the two prompt paths (history window, CF-token slots, titles, padding, positions) shows
up here as a logit difference.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from conftest import scoring_root

from thinkrec.data import schema as S
from thinkrec.io.commit import read_table
from thinkrec.io.fs import Storage
from thinkrec.model.base import load_tokenizer
from thinkrec.model.prompt import PromptBuilder
from thinkrec.model.thinkrec import ADAPTERS, GLOBAL, PROJECTOR
from thinkrec.scoring import stage
from thinkrec.scoring.base import CF_EMBEDDINGS, CF_MODEL_DIR, TRAIN_DIR
from thinkrec.train import data as D
from thinkrec.train.loop import build_model
from thinkrec.train.loss import make_batch

pytestmark = pytest.mark.integration

N_ROWS = 24  # test rows compared (several users, so prefix sharing spans real groups)


@pytest.mark.parametrize("cf_tokens", [True, False], ids=["collm", "text-only"])
def test_score_stage_yes_logit_equals_training_forward(
    prepared, tiny_qwen, artifact_dirs, tmp_path, one_torch_thread, cf_tokens
):
    cfg = scoring_root(
        prepared,
        tiny_qwen,
        artifact_dirs,
        str(tmp_path),
        **{"fusion.mode": "global", "model.cf_tokens": cf_tokens},
    )
    stage.run(cfg)
    storage = Storage.from_config(cfg)
    scores = read_table(storage, storage.uri(stage.SCORES))
    served = {
        (u, i): s
        for u, i, s in zip(
            *(scores.column(c).to_pylist() for c in (S.USER_ID, S.ITEM_ID, S.SCORE)), strict=True
        )
    }

    # The training side: the train stage's inputs, encoder and model builder, unchanged.
    inputs = D.load_inputs(storage, with_traces=False)
    test = inputs.interactions.filter(pc.equal(inputs.interactions.column(S.SPLIT), "test"))
    test = test.slice(0, N_ROWS)
    samples = D._samples(test)
    tok = load_tokenizer(tiny_qwen)
    pb = PromptBuilder(
        tok,
        cf_tokens=cf_tokens,
        use_chat_template=cfg.model.use_chat_template,
        max_title_chars=cfg.model.max_title_chars,
    )
    rows = D.encode_rows(
        pb,
        samples,
        inputs.items,
        history_len=cfg.data.history_len,
        max_answer_tokens=cfg.train.max_answer_tokens,
    )
    spec = {
        "phase": "expert",  # loads the committed global adapter and projector as they are
        "base_model": tiny_qwen,
        "cf_tokens": cf_tokens,
        "cf_dir": storage.uri(CF_MODEL_DIR),
        "cf_file": CF_EMBEDDINGS,
        "projector_dir": storage.uri(TRAIN_DIR),
        "projector_file": PROJECTOR,
        "init_adapter": storage.uri(TRAIN_DIR, ADAPTERS, GLOBAL),
    }
    model = build_model(cfg, spec, pb.yes_id).eval()
    batch = make_batch(rows, pb.placeholder_id, rec_weight_reasoning=0.1, rec_weight_label=0.9)
    with torch.no_grad():
        y_hat, _ = model(batch)

    assert len(rows) == N_ROWS
    assert set(scores.column(S.GATE).to_pylist()) == {GLOBAL}
    if cf_tokens:  # every row carries the target item's CF slot, so the projector path is compared
        assert all(r["cf_pos"] for r in rows)
    diffs = [abs(served[(r["user_id"], r["item_id"])] - float(y)) for r, y in zip(rows, y_hat, strict=True)]
    assert max(diffs) < 1e-4, f"train/serve skew: max |Yes logit difference| {max(diffs):.2e}"
    # The comparison means something: the logits differ between pairs.
    assert float(pa.array(y_hat.tolist()).to_numpy().std()) > 1e-3
