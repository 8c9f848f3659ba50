"""keywords stage: the reference post-processing, tfidf against scikit-learn, genres equal to the
source (the demo's prompts unchanged), the cache (extractor calls counted), resume, and prompts
reading the committed table."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.conftest import small_config
from tests.keyword_counter import calls
from thinkrec.data import items as I
from thinkrec.data import schema as S
from thinkrec.io.commit import read_table
from thinkrec.io.fs import Storage
from thinkrec.keywords import base, stage
from thinkrec.keywords.tfidf import TfidfExtractor


@pytest.mark.parametrize(
    "raw,expect",
    [
        (["Drama, Comedy"], ["Drama", "Comedy"]),  # comma-separated strings are split
        (["the", "and", "Thriller"], ["Thriller"]),  # stopwords
        (["1999", "3.5", "War"], ["War"]),  # numbers dropped, 3 letters kept
        (["ab", "Sci-Fi"], ["Sci-Fi"]),  # under 3 letters
        (["Crime", "crime", "CRIME"], ["Crime"]),  # case-folded duplicates
        ([f"word{i:02d}x" for i in range(15)], [f"word{i:02d}x" for i in range(10)]),  # at most 10
    ],
)
def test_postprocess_reference_rules(raw, expect):
    assert base.postprocess(raw) == expect


def test_description_fields_are_cut_to_max_words():
    assert base.cut_words(" ".join(f"w{i}" for i in range(150)), 100).split() == [f"w{i}" for i in range(100)]


DOCS = [
    ("Space Opera", "A starship crew explores distant galaxies and alien worlds, starship battles."),
    ("Kitchen Basics", "Recipes for bread, soup and roasted vegetables; bread baking for beginners."),
    ("Galaxy Cookbook", "Alien recipes from distant worlds: soup, bread and starship snacks."),
    ("Garden Life", "Growing vegetables, herbs and flowers in a small garden through the seasons."),
    ("Deep Space", "Galaxies, black holes and the physics of distant stars explained."),
    ("Soup Season", "Warm soup recipes with roasted vegetables and herbs from the garden."),
]


def test_tfidf_matches_scikit_learn_and_ignores_blocks(ray_local):
    """Fitted per block and summed, the weights are scikit-learn's TfidfVectorizer on all items: the
    same top terms per item, whatever the number of blocks."""
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer

    cfg = small_config("/tmp/unused", **{"keywords.max_keywords": 4, "keywords.tfidf_max_df": 0.5})
    df = pd.DataFrame(
        {S.ITEM_ID: np.arange(1, 7), S.TITLE: [t for t, _ in DOCS], "text": [x for _, x in DOCS]}
    )
    states = [
        TfidfExtractor.fit(cfg, ray_local.data.from_pandas([df.iloc[k::n] for k in range(n)])) for n in (1, 3)
    ]
    assert states[0] == states[1]
    ex = TfidfExtractor(cfg, state=states[0])
    got = ex([base.ItemText(i + 1, t, x) for i, (t, x) in enumerate(DOCS)])

    vec = TfidfVectorizer(stop_words="english", max_df=0.5)
    m = vec.fit_transform([f"{t} {x}" for t, x in DOCS]).toarray()
    terms = vec.get_feature_names_out()
    for row, words in zip(m, got, strict=True):
        order = sorted((-w, t) for w, t in zip(row, terms, strict=True) if w > 0)
        expect = [t for _, t in order]
        assert words == expect[: len(words)] and len(words) == min(len(expect), 12)
    assert got[0][0] == "starship"  # twice in its text, in two items of six


def _root_from(prepared, root: str, **overrides):
    """A new output root holding a copy of the session's prepared tables."""
    src = Storage.from_config(prepared).local_path(Storage.from_config(prepared).uri("prepare"))
    shutil.copytree(src, os.path.join(root, "prepare"))
    return prepared.replace(**{"storage.output_root": root, **overrides})


def test_auto_extractor_per_dataset():
    assert base.extractor_name(small_config("/tmp/unused")) == "genres"
    assert base.extractor_name(small_config("/tmp/unused", **{"data.dataset": "yelp"})) == "tfidf"
    with pytest.raises(ValueError, match="keywords.extractor"):
        base.extractor_class("nope")


def test_genres_stage_cache_and_prompts(ray_local, prepared, tmp_path):
    """The genres through the stage are the source's genres (the demo's prompts unchanged); the
    extractor's own call count shows the cache: a first run asks for every item, a rerun of the
    stage (its table lost) and a second run root sharing the cache ask for none."""
    import pyarrow.parquet as pq

    cache = str(tmp_path / "cache")
    over = {"keywords.extractor": "tests.keyword_counter:CountingGenres", "keywords.cache": cache}
    a = _root_from(prepared, str(tmp_path / "a"), **over)
    man = stage.run(a)
    assert sorted(calls(a.storage.output_root)) == list(range(1, 1683))
    assert man["items_computed"] == 1682 and man["items_cached"] == 0 and man["rows"] == 1682
    st = Storage.from_config(a)
    kw = read_table(st, st.uri(I.KEYWORDS)).to_pandas().sort_values(S.ITEM_ID)
    src = read_table(st, st.uri(I.ITEMS)).to_pandas().sort_values(S.ITEM_ID)
    assert [list(k) for k in kw[S.KEYWORDS]] == [list(k) for k in src[S.KEYWORDS]]
    assert set(kw[S.EXTRACTOR]) == {"counting-genres"}
    # Each shard's rows are sorted by item id (the same bytes whatever the blocks were).
    d = st.local_path(st.uri(I.KEYWORDS))
    for f in sorted(os.listdir(d)):
        if f.startswith("part-"):
            assert (np.diff(pq.read_table(os.path.join(d, f)).column(S.ITEM_ID).to_numpy()) > 0).all()
    # Prompts read keywords/keywords once it is committed, and it joins their input fingerprint.
    assert I.read_items(st).column(S.KEYWORDS).to_pylist()[0] == ["Animation", "Children's", "Comedy"]
    assert I.keywords_inputs(st) == [st.uri(I.KEYWORDS)]

    # Rerun after losing the table (a failure before commit): everything from the cache.
    shutil.rmtree(os.path.join(a.storage.output_root, "keywords"))
    man2 = stage.run(a)
    assert len(calls(a.storage.output_root)) == 1682 and man2["items_cached"] == 1682
    assert man2["files"] == man["files"]  # byte-identical shards from the cache
    # A second run root (another dataset with the same items) sharing the cache.
    b = _root_from(prepared, str(tmp_path / "b"), **over)
    man3 = stage.run(b)
    assert len(calls(a.storage.output_root)) == 1682 and man3["items_computed"] == 0
    assert man3["files"] == man["files"]
    # A finished table is skipped outright.
    assert stage.run(b) == man3
