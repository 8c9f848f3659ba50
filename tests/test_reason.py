"""reason stage: hard samples are exactly MF's mistakes, traces end in the label's conclusion,
the teacher is recorded, a rerun skips; the grounded teacher and the registry in isolation."""

from __future__ import annotations

import json
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
    assert (
        traces[list(reason_stage.PROVENANCE)].isna().all().all()
    )  # the rule-based teacher generates nothing
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


# -- the llm teacher ---------------------------------------------------------------------------------
from generation_servers import Counting  # noqa: E402

from thinkrec.generation.base import GenResult  # noqa: E402
from thinkrec.reasoning import llm as L  # noqa: E402

LLM_ITEMS = {
    1: ("Heat", ["crime"]),
    2: ("Alien", ["space"]),
    3: ("Fargo", ["crime"]),
    9: ("Ronin", ["crime"]),
}


@pytest.mark.parametrize(
    "text,mode,expected",
    [
        ("<think>hmm, crime</think>They like crime films. Answer: Yes", "strip", (1, "They like crime films.")),
        ("<think>hmm, crime</think>They like crime films. Answer: Yes", "keep", (1, "hmm, crime\nThey like crime films.")),
        ("Space is not their thing.\nAnswer: **No**", "strip", (0, "Space is not their thing.")),
        ("Answer: No at first, but on reflection... Answer: yes", "strip", (1, "Answer: No at first, but on reflection...")),
        ("<think>the budget ran out mid-thought", "strip", (None, "")),
        ("I cannot tell.", "strip", (None, "I cannot tell.")),
    ],
)  # fmt: skip
def test_think_blocks_and_answer(text, mode, expected):
    assert L.parse_answer(L.split_think(text, mode)) == expected


@pytest.mark.parametrize(
    "trace,leaks",
    [
        ("The correct answer is Yes, because they like crime.", True),
        ("As I was told, the user liked it.", True),
        ("Given the hint, they would like it.", True),
        ("In fact the user liked this movie, so crime wins.", True),  # echoes the hint's claim
        ("The user actually liked it; crime films dominate.", True),
        ("Looking at the history again, crime films dominate.", False),
        ("They liked 3 of 4 crime films, so this one fits.", False),
        ("The answer was obvious from the history.", True),
    ],
)
def test_hint_leak_filter(trace, leaks):
    assert L.leaks_hint(trace) is leaks


def test_hints_rotate_and_each_leaks_if_echoed():
    seen = {L.hint(1, "movie", turn, row) for turn in range(3) for row in range(3)}
    assert len(seen) == len(L.HINTS)
    assert all(L.leaks_hint(h) for h in seen)  # a trace echoing a hint is always caught


class Scripted:
    """A generator answering from a script per row and turn (the teacher logic under test; a real
    model cannot be told what to say). Records every prompt it got."""

    name, model = "scripted", "script"

    def __init__(self, script: dict[int, list[str | None]]) -> None:
        self.script, self.prompts, self.turn = script, [], {}

    def generate(self, requests, decoding):
        out = []
        for r in requests:
            k = int(r.key)
            t = self.turn.get(k, 0)
            self.turn[k] = t + 1
            self.prompts.append((k, r.prompt))
            text = self.script[k][t]
            out.append(GenResult(r.key, text, None if text is not None else "http_500 (after 4 tries)"))
        return out


def _teacher(tmp_path, tiny_qwen, gen, **over):
    from conftest import small_config

    cfg = small_config(str(tmp_path), **{"model.base": tiny_qwen, "reason.teacher": "llm", **over})
    return L.LLMTeacher(cfg, items=LLM_ITEMS, generator=gen)


def test_llm_teacher_reflects_and_quarantines(tmp_path, tiny_qwen):
    long = "crime " * 200
    script = {
        0: ["Crime fans like this. Answer: Yes"],  # agrees at once
        1: ["Space bores them. Answer: No", "On reflection crime dominates. Answer: Yes"],  # reflects
        2: ["No. Answer: No", "Still no. Answer: No", "No. Answer: No"],  # still disagrees
        3: ["Answer: No", "The correct answer is Yes. Answer: Yes"],  # leaks the hint
        4: ["Answer: Yes"],  # empty rationale
        5: [f"{long} Answer: Yes"],  # over the token budget
        6: [None],  # the generator failed the row
        7: ["<think>???", "<think>still thinking", "<think>..."],  # never answers
    }
    gen = Scripted(script)
    # Rows 0 and 4-7 ask the same question, scripted to answer differently: no prompt cache here.
    teacher = _teacher(tmp_path, tiny_qwen, gen, **{"reason.max_reflections": 2, "generation.cache": False})
    batch = pd.DataFrame(
        {
            S.USER_ID: range(9),
            S.ITEM_ID: [9, 2, 2, 2, 9, 9, 9, 9, 404],
            S.LABEL: [1, 1, 1, 1, 1, 1, 1, 1, 1],
            S.HISTORY_ITEMS: [[1, 2, 3]] * 9,
            S.HISTORY_LABELS: [[1, 0, 1]] * 9,
        }
    )
    out = teacher(batch)
    assert out[S.REASONING].tolist()[:2] == ["Crime fans like this.", "On reflection crime dominates."]
    assert out[REASON].tolist() == [
        None, None, L.DISAGREES, L.HINT_LEAK, L.EMPTY, L.OVER_BUDGET,
        f"{L.GEN_FAILED}: http_500 (after 4 tries)", L.NO_ANSWER, "unknown_item",
    ]  # fmt: skip
    assert out[S.REASONING].isna().tolist()[2:] == [True] * 7
    # Reflection turns went to the disagreeing rows only, with the conversation and a hint.
    turns = {k: [p for j, p in gen.prompts if j == k] for k in script}
    assert [len(turns[k]) for k in range(8)] == [1, 2, 3, 2, 1, 1, 1, 3]
    assert turns[1][1].startswith(turns[1][0] + "Space bores them. Answer: No\n\n")
    hints = [p.rsplit("\n\n", 1)[1].strip() for p in turns[2][1:]]
    assert len(set(hints)) == 2 and all("liked" in h for h in hints)  # rotating phrasings
    assert '"Ronin" (crime)' in turns[0][0] and "- Alien (space): disliked" in turns[0][0]


def test_reflection_prompts_do_not_depend_on_the_batch(tmp_path, tiny_qwen):
    """A sample's reflection hint is fixed by the sample, not by its place in a batch, so a rerun
    that batches rows differently asks the same prompts (and hits the prompt cache)."""
    script = {k: ["Dull. Answer: No", "Crime after all. Answer: Yes"] for k in range(2)}
    rows = pd.DataFrame(
        {S.USER_ID: [1, 2], S.ITEM_ID: [9, 2], S.LABEL: [1, 1],
         S.HISTORY_ITEMS: [[1, 2, 3], [3]], S.HISTORY_LABELS: [[1, 0, 1], [0]]}
    )  # fmt: skip
    together, alone = Scripted(script), Scripted(script)
    _teacher(tmp_path, tiny_qwen, together, **{"generation.cache": False})(rows)
    _teacher(tmp_path, tiny_qwen, alone, **{"generation.cache": False})(rows.iloc[1:])
    assert [p for k, p in together.prompts if k == 1] == [p for _, p in alone.prompts]


def test_llm_teacher_on_the_tiny_model(tmp_path, tiny_qwen, one_torch_thread):
    """Real disagreements: the random tiny model never gives the label's answer, so every row goes
    through each reflection turn and ends in quarantine."""
    from conftest import small_config

    from thinkrec.generation.hf import HFGenerator

    cfg = small_config(
        str(tmp_path),
        **{"model.base": tiny_qwen, "reason.teacher": "llm", "reason.max_reflections": 1,
           "reason.max_new_tokens": 6, "reason.temperature": 0.0, "generation.torch_threads": 1},
    )  # fmt: skip
    hf = HFGenerator(cfg)
    first = Counting(hf)
    teacher = L.LLMTeacher(cfg, items=LLM_ITEMS, generator=first)
    batch = pd.DataFrame(
        {S.USER_ID: [1, 2], S.ITEM_ID: [9, 2], S.LABEL: [1, 0],
         S.HISTORY_ITEMS: [[1, 2], [3]], S.HISTORY_LABELS: [[1, 0], [1]]}
    )  # fmt: skip
    out = teacher(batch)
    assert teacher.stats["reflections"] == 2
    assert set(out[REASON]) <= {L.DISAGREES, L.NO_ANSWER} and out[S.REASONING].isna().all()
    assert out[S.TEACHER].tolist() == [f"llm:hf:{tiny_qwen}"] * 2
    assert get_teacher("llm") is L.LLMTeacher
    # What produced each row, and the turns each took (a question and one reflection).
    prov = out[[S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH]].drop_duplicates().values.tolist()
    assert prov == [["hf", tiny_qwen, "base", teacher.decoding.hash()]]
    assert first.rows == 4 and out[L.GENERATED].tolist() == [2, 2] and out[L.CACHED].tolist() == [0, 0]
    # A rerun (a new teacher on the same output root) is answered from the prompt cache: no generation.
    rerun = Counting(hf)
    again = L.LLMTeacher(cfg, items=LLM_ITEMS, generator=rerun)(batch)
    assert rerun.rows == 0 and again[L.CACHED].tolist() == [2, 2] and again[L.GENERATED].tolist() == [0, 0]
    cols = [S.REASONING, REASON, S.TEACHER, S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH]
    pd.testing.assert_frame_equal(again[cols], out[cols])


@pytest.mark.integration
def test_llm_teacher_stage_records_provenance_and_rerun_is_cached(prepared, tiny_qwen, tmp_path):
    """reason.teacher=llm through the reason stage (Ray Data actors, hf backend). The output is lost
    and the stage run again: every turn is served from the prompt cache, no generation."""
    import shutil

    import pyarrow.parquet as pq
    from conftest import small_config

    cf_stage.run(prepared)  # skips itself when done
    src = Storage.from_config(prepared)
    for d in ("prepare", "cf"):
        shutil.copytree(src.local_path(src.uri(d)), os.path.join(tmp_path, d))
    cfg = small_config(
        str(tmp_path),
        **{"model.base": tiny_qwen, "reason.teacher": "llm", "reason.max_traces": 3, "reason.batch_size": 2,
           "reason.max_reflections": 1, "reason.max_new_tokens": 6, "generation.torch_threads": 1,
           "data.max_quarantine_rate": 1.0},
    )  # fmt: skip
    storage = Storage.from_config(cfg)
    man = reason_stage.run(cfg)
    # The random tiny model never gives the label's answer: each row asks, reflects once, is dropped.
    assert man["rows"] == 0 and man["rows_quarantined"] == 3 and man["teacher"] == "llm"
    assert (man["turns_generated"], man["turns_cached"]) == (6, 0)
    root = storage.local_path(storage.uri(reason_stage.TRACES))
    rows = pq.read_table(os.path.join(root, "quarantine")).column("row").to_pylist()
    prov = {
        tuple(json.loads(r)[c] for c in (S.BACKEND, S.GEN_MODEL, S.ADAPTER, S.DECODING_HASH)) for r in rows
    }
    assert len(prov) == 1 and list(prov)[0][:3] == ("hf", tiny_qwen, "base")
    shutil.rmtree(root)
    again = reason_stage.run(cfg)
    assert (again["turns_generated"], again["turns_cached"]) == (0, 6)
    assert again["quarantine_reasons"] == man["quarantine_reasons"] and again["rows"] == man["rows"]


def test_llm_teacher_model_is_reason_model(tmp_path, tiny_qwen):
    from conftest import small_config

    over = {"model.base": tiny_qwen, "reason.teacher": "llm", "generation.backend": "openai"}
    named = L.LLMTeacher(small_config(str(tmp_path), **over, **{"reason.model": "qwq-32b"}), items=LLM_ITEMS)
    assert (named.gen.name, named.gen.model, named.label) == ("openai", "qwq-32b", "llm:openai:qwq-32b")
    unnamed = L.LLMTeacher(
        small_config(str(tmp_path), **over, **{"generation.model": "served"}), items=LLM_ITEMS
    )
    assert unnamed.gen.model == "served"
