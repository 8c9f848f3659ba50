"""The ``tfidf`` keyword extractor: the terms of an item's title and description with the highest
TF-IDF weight, the IDF fitted on every item's text (extractive; the embedded default for datasets
whose items have text).

The weights are scikit-learn's ``TfidfVectorizer`` defaults (its analyzer: lower-cased ``\\w\\w+``
tokens, English stopwords removed; smooth IDF ``ln((1 + n) / (1 + df)) + 1``; terms in more than
``keywords.tfidf_max_df`` of the items dropped). Fitting is distributed: each block counts the items
each term occurs in and the per-term counts are summed across blocks, so the item table never
comes to one process; only the vocabulary's IDF table is shipped to the actors. Ties in weight go
to the alphabetically first term, so the result never depends on block order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from thinkrec.keywords.base import ItemText

TERM, DF = "term", "df"
CANDIDATES = 3
"""Terms ranked per keyword kept: post-processing may still drop some (numbers, short words)."""


def analyzer() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(stop_words="english").build_analyzer()


def document_text(title: str, text: str) -> str:
    return f"{title} {text}".strip()


class TfidfExtractor:
    name = "tfidf"

    def __init__(self, cfg: Any, state: dict[str, Any] | None = None) -> None:
        if state is None:
            raise ValueError("keywords.extractor=tfidf needs its fitted state (TfidfExtractor.fit)")
        self.idf: dict[str, float] = state["idf"]
        self.n_docs = int(state["n_docs"])
        self.max_keywords = cfg.keywords.max_keywords
        self.analyze = analyzer()

    @classmethod
    def fit(cls, cfg: Any, texts: Any) -> dict[str, Any]:
        """Document frequencies over a Ray Dataset with ``title`` and ``text`` columns -> the IDF
        of every term kept (``max_df``), and the number of items."""
        from thinkrec.data import schema as S

        def block_df(batch: pd.DataFrame) -> pd.DataFrame:
            analyze = analyzer()
            c: Counter[str] = Counter()
            for title, text in zip(batch[S.TITLE], batch["text"], strict=True):
                c.update(set(analyze(document_text(title or "", text or ""))))
            return pd.DataFrame({TERM: list(c), DF: np.fromiter(c.values(), np.int64, len(c))})

        n_docs = texts.count()
        per_block = texts.map_batches(block_df, batch_format="pandas", batch_size=None)
        if per_block.count() == 0:
            return {"n_docs": n_docs, "idf": {}}
        # Summed per term across blocks (a distributed aggregation): one row per distinct term.
        df = per_block.groupby(TERM).sum(DF).to_pandas()
        df = df.rename(columns={f"sum({DF})": DF})
        limit = cfg.keywords.tfidf_max_df * n_docs
        df = df[df[DF] <= limit]
        idf = {
            str(t): math.log((1 + n_docs) / (1 + int(d))) + 1.0
            for t, d in sorted(zip(df[TERM], df[DF], strict=True))
        }
        return {"n_docs": n_docs, "idf": idf}

    def settings(self) -> dict[str, Any]:
        # The IDF table decides the ranking: a corpus with other document frequencies gives other
        # keywords, so its hash is part of every cache key.
        blob = json.dumps(self.idf, sort_keys=True).encode()
        return {
            "extractor": self.name,
            "idf": hashlib.sha256(blob).hexdigest()[:16],
            "n_docs": self.n_docs,
            "max_keywords": self.max_keywords,
            "version": 1,
        }

    def __call__(self, items: list[ItemText]) -> list[list[str]]:
        out = []
        for it in items:
            tf = Counter(self.analyze(document_text(it.title, it.text)))
            scored = [(-n * self.idf[t], t) for t, n in tf.items() if t in self.idf]
            scored.sort()
            out.append([t for _, t in scored[: CANDIDATES * self.max_keywords]])
        return out
