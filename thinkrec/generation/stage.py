"""Generation as a Ray Data actor stage: ``rows -> map_batches(GenerateActor) -> rows + text``.

Each actor builds the configured generator once (``__init__``) and maps batches of rows carrying
``row_key``, ``prompt`` and ``adapter`` (plus an optional ``gate``). Every output row keeps its input
columns and adds the text or the error that quarantines it, the tries it took and what produced it
(backend, model, adapter, decoding hash, prompt hash). A failing row never fails the stage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from thinkrec.data import schema as S
from thinkrec.generation.base import Decoding, GenRequest, make_generator, prompt_hash


class GenerateActor:
    def __init__(self, cfg: Any, decoding: Decoding) -> None:
        self.gen = make_generator(cfg)
        self.decoding = decoding
        self.dhash = decoding.hash()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        adapters = batch[S.ADAPTER] if S.ADAPTER in batch else pd.Series(["base"] * len(batch))
        gates = batch[S.GATE] if S.GATE in batch else [None] * len(batch)
        reqs = [
            GenRequest(
                str(k), str(p), gate=None if g is None else np.asarray(g, dtype=np.float64), adapter=str(a)
            )
            for k, p, a, g in zip(batch[S.ROW_KEY], batch[S.PROMPT], adapters, gates, strict=True)
        ]
        res = self.gen.generate(reqs, self.decoding)
        out = batch.copy()
        out[S.GENERATED] = [r.text for r in res]
        out[S.GEN_ERROR] = [r.error for r in res]
        out[S.GEN_TRIES] = np.array([r.tries for r in res], dtype=np.int32)
        out[S.NEW_TOKENS] = np.array([r.new_tokens for r in res], dtype=np.int32)
        out[S.BACKEND] = self.gen.name
        out[S.GEN_MODEL] = self.gen.model
        out[S.ADAPTER] = [r.adapter for r in reqs]
        out[S.DECODING_HASH] = self.dhash
        out[S.PROMPT_HASH] = [prompt_hash(r, self.gen.model, self.decoding) for r in reqs]
        return out


def generate(ds: Any, cfg: Any, decoding: Decoding) -> Any:
    """``ds`` (rows with row_key, prompt[, adapter, gate]) -> the same rows with generated text."""
    import ray.data

    return ds.map_batches(
        GenerateActor,
        fn_constructor_args=(cfg, decoding),
        batch_size=cfg.generation.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.generation.actors),
        num_cpus=1,
    )
