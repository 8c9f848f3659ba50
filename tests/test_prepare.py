"""prepare: labels, time split, histories, id remapping, quarantine, rerun."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.conftest import small_config
from thinkrec.data import movielens as ml
from thinkrec.data import prepare
from thinkrec.data import schema as S
from thinkrec.io.commit import SUCCESS, CommitError, read_table
from thinkrec.io.fs import Storage


def _tables(cfg):
    st = Storage.from_config(cfg)
    inter = read_table(st, st.uri(prepare.INTERACTIONS)).to_pandas()
    items = read_table(st, st.uri(prepare.ITEMS)).to_pandas()
    users = read_table(st, st.uri(prepare.USERS)).to_pandas()
    return st, inter, items, users


def test_prepare_outputs(prepared):
    st, inter, items, users = _tables(prepared)
    man = st.read_json(st.uri(prepare.INTERACTIONS, "_manifest.json"))
    assert len(users) == 40 and users[S.USER_ID].tolist() == list(range(1, 41))
    assert len(items) == 1682 and sorted(items[S.ITEM_ID]) == list(range(1, 1683))
    assert man["rows"] == len(inter) and man["rows_quarantined"] == 0
    assert sum(man["split_rows"].values()) == len(inter)
    assert set(inter[S.SPLIT]) == set(S.SPLITS)
    # Labels follow the threshold.
    assert (inter[S.LABEL] == (inter[S.RATING] >= 4).astype(int)).all()
    # Time windows: every train row precedes every valid row, every valid row precedes every test row.
    lo, hi = man["split_cut_timestamps"]
    by = inter.groupby(S.SPLIT)[S.TIMESTAMP]
    assert by.max()["train"] < lo <= by.min()["valid"] and by.max()["valid"] < hi <= by.min()["test"]
    # Genres are the keywords.
    toy = items[items[S.RAW_ITEM_ID] == "1"].iloc[0]
    assert toy[S.TITLE] == "Toy Story" and list(toy[S.KEYWORDS]) == ["Animation", "Children's", "Comedy"]


def test_histories_are_strictly_earlier_and_capped(prepared):
    _, inter, _, _ = _tables(prepared)
    inter = inter.sort_values([S.USER_ID, S.TIMESTAMP, S.ITEM_ID])
    for _, g in list(inter.groupby(S.USER_ID))[:10]:
        seq = g[[S.ITEM_ID, S.TIMESTAMP, S.LABEL]].to_numpy()
        for row in g.itertuples():
            earlier = seq[seq[:, 1] < row.timestamp]
            expect = earlier[-10:]
            assert list(row.history_items) == expect[:, 0].tolist()
            assert list(row.history_labels) == expect[:, 2].tolist()


def test_not_cold(prepared):
    _, inter, _, _ = _tables(prepared)
    train = inter[inter[S.SPLIT] == "train"]
    expect = inter[S.USER_ID].isin(set(train[S.USER_ID])) & inter[S.ITEM_ID].isin(set(train[S.ITEM_ID]))
    assert (inter[S.NOT_COLD] == expect).all()
    assert inter[S.NOT_COLD].any() and not inter[S.NOT_COLD].all()


def test_rerun_skips(prepared):
    st = Storage.from_config(prepared)
    path = st.local_path(st.uri(prepare.INTERACTIONS))
    before = {
        f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path) if f.endswith(".parquet")
    }
    man = st.read_json(st.uri(prepare.INTERACTIONS, "_manifest.json"))
    prepare.run(prepared)
    after = {
        f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path) if f.endswith(".parquet")
    }
    assert before == after
    assert st.read_json(st.uri(prepare.INTERACTIONS, "_manifest.json")) == man


BAD_LINES = [
    ("1\t2\t3", ml.MALFORMED),
    ("7\t\t3\t881250949", ml.MALFORMED),
    ("1\t2\tgood\t881250949", ml.BAD_RATING),
    ("1\t2\t9\t881250949", ml.BAD_RATING),
    ("1\t2\t3\tyesterday", ml.BAD_TIMESTAMP),
    ("1\t99999\t3\t881250949", ml.UNKNOWN_ITEM),
]


@pytest.fixture(scope="module")
def dirty_source(tmp_path_factory):
    src = ml.embedded_dir("ml-100k")
    d = tmp_path_factory.mktemp("dirty")
    shutil.copy(os.path.join(src, "ml-100k.item"), d / "ml-100k.item")
    with open(os.path.join(src, "ml-100k.inter")) as f:
        lines = f.readlines()[:3001]  # header + 3000 interactions
    dup = lines[1]
    with open(d / "ml-100k.inter", "w") as f:
        f.writelines(lines)
        f.writelines(line + "\n" for line, _ in BAD_LINES)
        f.write(dup)
    return str(d)


def test_bad_rows_are_quarantined_with_reasons(ray_local, dirty_source, tmp_path):
    cfg = small_config(str(tmp_path), **{"data.source": dirty_source, "data.max_users": None})
    man = prepare.run(cfg)
    st = Storage.from_config(cfg)
    q = read_table(st, st.uri(prepare.INTERACTIONS), quarantine=True).to_pandas()
    expected = {}
    for _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    expected[ml.DUPLICATE] = 1
    assert man["quarantine_reasons"] == expected
    assert man["rows"] + man["rows_quarantined"] == 3000 + len(BAD_LINES) + 1
    assert sorted(q["reason"]) == sorted(r for r, n in expected.items() for _ in range(n))


def test_too_many_bad_rows_fail_without_success(ray_local, dirty_source, tmp_path):
    cfg = small_config(
        str(tmp_path),
        **{"data.source": dirty_source, "data.max_users": None, "data.max_quarantine_rate": 0.001},
    )
    with pytest.raises(CommitError, match="quarantined") as err:
        prepare.run(cfg)
    # The error names the top reasons, each with an example row (its text, file and line).
    msg = str(err.value)
    assert "top reasons: bad_rating: 2 rows, e.g. " in msg and '"source_line": 3004' in msg
    assert "ml-100k.inter" in msg
    st = Storage.from_config(cfg)
    assert not st.exists(st.uri(prepare.INTERACTIONS, SUCCESS))


def test_remap_orders_numeric_ids():
    import pyarrow as pa

    assert prepare.id_order(pa.array(["10", "2", "2", "1"])).to_pylist() == ["1", "2", "10"]
    assert prepare.id_order(pa.array(["b", "a", "10"])).to_pylist() == ["10", "a", "b"]


def test_embedded_dataset_is_found():
    assert os.path.exists(os.path.join(ml.embedded_dir("ml-100k"), "ml-100k.inter"))
    with pytest.raises(ValueError, match="no embedded copy"):
        ml.embedded_dir("ml-1m")
    assert np.isfinite(ml.parse_interaction_lines(["1\t2\t3\t4"], "atomic")[S.RATING]).all()


def test_reviews_of_unknown_items_can_be_kept(ray_local, dirty_source, tmp_path):
    cfg = small_config(
        str(tmp_path),
        **{"data.source": dirty_source, "data.max_users": None, "data.unknown_items": "keep"},
    )
    man = prepare.run(cfg)
    assert ml.UNKNOWN_ITEM not in man["quarantine_reasons"] and man["items_without_metadata"] == 1
    st = Storage.from_config(cfg)
    items = read_table(st, st.uri(prepare.ITEMS)).to_pandas()
    extra = items[items[S.RAW_ITEM_ID] == "99999"]
    assert len(items) == 1683 and extra[S.TITLE].tolist() == ["99999"]
    inter = read_table(st, st.uri(prepare.INTERACTIONS)).to_pandas()
    assert (inter[S.ITEM_ID] == int(extra[S.ITEM_ID].iloc[0])).sum() == 1
