"""reason stage: hard samples are exactly MF's mistakes, traces end in the label's conclusion,
the teacher is recorded, a rerun skips; the grounded teacher and the registry in isolation."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from thinkrec import config as C
from thinkrec.cf import mf
from thinkrec.cf import stage as cf_stage
from thinkrec.data import prepare
from thinkrec.data import schema as S
from thinkrec.io.commit import REASON, read_table
from thinkrec.io.fs import Storage
from thinkrec.reasoning import stage as reason_stage
from thinkrec.reasoning.teachers import TEACHERS, GroundedTeacher, get_teacher

KEY = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP]
LIKE, DISLIKE = "So the user would like it.", "So the user would not like it."


@pytest.fixture(scope="module")
def reasoned(prepared):
    cf_stage.run(prepared)  # skips itself when test_cf already made it
    man = reason_stage.run(prepared)
    return prepared, Storage.from_config(prepared), man


def _train_with_logits(storage: Storage) -> pd.DataFrame:
    inter = read_table(storage, storage.uri(prepare.INTERACTIONS)).to_pandas()
    train = inter[inter[S.SPLIT] == "train"].reset_index(drop=True)
    table, biases = cf_stage.load_model(storage)
    return train.assign(
        logit=mf.logits(table, train[S.USER_ID].to_numpy(), train[S.ITEM_ID].to_numpy(), biases)
    )


def _keys(df: pd.DataFrame) -> set[tuple[int, int, int]]:
    return set(map(tuple, df[KEY].to_numpy().tolist()))


@pytest.mark.integration
def test_traces_are_mfs_mistakes(reasoned):
    cfg, storage, man = reasoned
    train = _train_with_logits(storage)
    sigmoid = 1 / (1 + np.exp(-train["logit"].to_numpy(np.float64)))
    hard = train[(sigmoid >= 0.5) != (train[S.LABEL].to_numpy() == 1)]
    assert 0 < len(hard) < len(train)
    assert man["hard_samples"] == len(hard)
    traces = read_table(storage, storage.uri(reason_stage.TRACES)).to_pandas()
    assert list(traces.columns) == S.REASONING_TABLE.names
    assert len(traces) == man["rows"] == min(len(hard), cfg.reason.max_traces)
    assert man["rows_quarantined"] == 0
    if len(hard) <= cfg.reason.max_traces:
        assert _keys(traces) == _keys(hard)
    else:
        assert _keys(traces) <= _keys(hard)
    # Labels copied through; teacher recorded; every conclusion matches its label.
    merged = traces.merge(hard, on=KEY, suffixes=("", "_p"))
    assert len(merged) == len(traces)
    np.testing.assert_array_equal(merged[S.LABEL].to_numpy(), merged[f"{S.LABEL}_p"].to_numpy())
    assert set(traces[S.TEACHER]) == {GroundedTeacher.name}
    assert man["teacher"] == GroundedTeacher.name
    ends = traces[S.REASONING].map(
        lambda r: LIKE if r.endswith(LIKE) else DISLIKE if r.endswith(DISLIKE) else None
    )
    expected = np.where(traces[S.LABEL].to_numpy() == 1, LIKE, DISLIKE)
    np.testing.assert_array_equal(ends.to_numpy(), expected)


@pytest.mark.integration
def test_limited_choice_is_deterministic_by_priority(reasoned):
    cfg, storage, _ = reasoned
    train = _train_with_logits(storage)
    hard = train[reason_stage.is_hard(train["logit"].to_numpy(), train[S.LABEL].to_numpy())]
    prio = reason_stage.priority(
        hard[S.USER_ID].to_numpy(), hard[S.ITEM_ID].to_numpy(), hard[S.TIMESTAMP].to_numpy(), cfg.seed
    )
    expected = _keys(hard.assign(p=prio).sort_values(["p", *KEY]).head(7))
    # The pipeline (Ray's split and order of rows) picks exactly the 7 smallest priorities.
    ds, total = reason_stage.hard_samples(cfg, storage, max_traces=7)
    assert total == len(hard)
    assert _keys(ds.to_pandas()) == expected and len(expected) == 7
    # Another seed picks another subset of the same hard set.
    other = reason_stage.priority(
        hard[S.USER_ID].to_numpy(), hard[S.ITEM_ID].to_numpy(), hard[S.TIMESTAMP].to_numpy(), cfg.seed + 1
    )
    assert _keys(hard.assign(p=other).sort_values(["p", *KEY]).head(7)) != expected


@pytest.mark.integration
def test_reason_rerun_skips(reasoned):
    cfg, storage, man = reasoned
    root = storage.local_path(storage.uri(reason_stage.TRACES))

    def files() -> dict[str, int]:
        return {
            os.path.relpath(os.path.join(d, n), root): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(root)
            for n in names
        }

    before = files()
    assert reason_stage.run(cfg) == man
    assert files() == before


# -- the grounded teacher, without Ray -------------------------------------------------------------
ITEMS = {
    1: ("Alpha", ["Comedy", "Drama"]),
    2: ("Beta", ["Comedy"]),
    3: ("Gamma", ["Horror"]),
    4: ("Delta", ["Drama"]),
    5: ("Epsilon", ["Horror", "Thriller"]),
    6: ("Zeta", []),
}


@pytest.fixture
def teacher() -> GroundedTeacher:
    return GroundedTeacher(C.Config(), items=ITEMS)


@pytest.mark.parametrize(
    ("item", "label", "hist", "hist_labels", "expected"),
    [
        # Evidence (keywords shared with liked items) agrees with a positive label.
        (
            1,
            1,
            [2, 3, 4],
            [1, 0, 1],
            "The user liked 2 of their last 3 movies. Its keywords in liked ones: Comedy (1), Drama (1); "
            'in disliked ones: none. It resembles "Delta", a liked one. ' + LIKE,
        ),
        # Evidence leans positive, the label is negative: the reflect sentence names the counter-evidence.
        (
            1,
            0,
            [2, 4, 1],
            [1, 1, 0],
            "The user liked 2 of their last 3 movies. Its keywords in liked ones: Comedy (1), Drama (1); "
            "in disliked ones: Comedy (1), Drama (1). Yet Comedy movies have disappointed them. " + DISLIKE,
        ),
        (
            2,
            0,
            [1, 4],
            [1, 0],
            "The user liked 1 of their last 2 movies. Its keywords in liked ones: Comedy (1); in disliked ones: "
            "none. Yet they disliked 1, so they are selective. " + DISLIKE,
        ),
        # Evidence leans negative, the label is positive.
        (
            5,
            1,
            [3, 3, 2],
            [0, 0, 1],
            "The user liked 1 of their last 3 movies. Its keywords in liked ones: none; in disliked ones: "
            "Horror (2). Yet they liked 1 of 3, so a new one can still please them. " + LIKE,
        ),
        (5, 0, [], [], "The user rated no movies before. It is Horror, Thriller. " + DISLIKE),
        (
            6,
            1,
            [1],
            [1],
            "The user liked 1 of their last 1 movies. No earlier movie shares it (no keywords). " + LIKE,
        ),
    ],
)
def test_grounded_rationale(teacher, item, label, hist, hist_labels, expected):
    assert teacher.rationale(item, label, hist, hist_labels) == expected


def test_grounded_batch_quarantines_unknown_items(teacher):
    batch = pd.DataFrame(
        {
            S.USER_ID: [1, 2],
            S.ITEM_ID: [1, 99],
            S.LABEL: [1, 0],
            S.HISTORY_ITEMS: [[2], [1]],
            S.HISTORY_LABELS: [[1], [0]],
        }
    )
    out = teacher(batch)
    assert out[S.REASONING].iloc[0].endswith(LIKE) and out[S.REASONING].iloc[1] is None
    assert out[REASON].tolist() == [None, "unknown_item"]
    assert set(out[S.TEACHER]) == {GroundedTeacher.name}


@pytest.mark.parametrize(
    ("name", "expected", "match"),
    [
        ("grounded", GroundedTeacher, None),
        ("thinkrec.reasoning.teachers:GroundedTeacher", GroundedTeacher, None),
        ("qwq", None, "not a registered teacher"),
        ("thinkrec.reasoning.teachers:Missing", None, "cannot import"),
        ("no_such_module:Teacher", None, "cannot import"),
    ],
)
def test_get_teacher(name, expected, match):
    if expected is not None:
        assert get_teacher(name) is expected and TEACHERS["grounded"] is GroundedTeacher
    else:
        with pytest.raises(ValueError, match=match):
            get_teacher(name)
