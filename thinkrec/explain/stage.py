"""The explain stage: generated explanations for a deterministic sample of test rows.

    sampled rows -> per wave of output shards: Ray Data map_batches(ExplainActor) -> explain/explanations

Rows: the test rows of prepare/interactions (only those of score/scores when that table is
committed), ``explain.n_samples`` of them chosen by ``seed`` (0: all). The prompt is the scorer's and
the trainer's (``PromptBuilder``: user prefix, then the candidate, ending at "Answer:"), CF slots
filled with projected CF embeddings; each row is generated with its own gate over [global,
expert-0, ...] (thinkrec/model/fusion.py, the score stage's rule: an expert, the global adapter or a
mixture) by the configured ``Generator`` (thinkrec/generation), with ``explain.*`` decoding settings.

Resumable: output shards are generated and published a wave at a time (``explain.shards_per_wave``),
so a resubmitted run skips the published shards; a prompt-hash cache (thinkrec/generation/cache.py,
``cache/explain``) serves any prompt generated before with the same model, adapters, gate and
decoding, so a rerun costs no generation. Each row records backend, model, adapter (gate label),
decoding hash and prompt hash.

``reasoning`` holds the reference the report scores the explanation against (BLEU-4, ROUGE-L): the
teacher's trace for the same (user, item) when reason/traces has one, else the configured teacher
(``reason.teacher``) run here on the row with its true label, as the paper makes reference reasoning
for test rows. It is null only where the teacher cannot explain the row. Generated rows are joined to
their references by (user_id, item_id), never by order (Ray Data does not keep it).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.data.items import keywords_inputs, read_items
from thinkrec.generation import cache
from thinkrec.generation.base import Decoding, GenRequest
from thinkrec.io.commit import REASON, SUCCESS, TableWriter, fingerprint, read_table, stable_shard
from thinkrec.io.fs import Storage
from thinkrec.model.prompt import Encoded, ItemInfo, PromptBuilder

log = logging.getLogger(__name__)

EXPLANATIONS = "explain/explanations"
INTERACTIONS = "prepare/interactions"
ITEMS = "prepare/items"
TRACES = "reason/traces"
SCORES = "score/scores"
CACHE = "cache/explain"
TRAIN = "train"
CF_MODEL = "cf/model"


def sample_rows(storage: Storage, n: int, seed: int) -> pd.DataFrame:
    """``n`` test rows (0: all) chosen by ``seed``; the same rows on every run whatever the shard
    layout (rows are put in a canonical order before sampling). Only the rows of score/scores when it
    is committed (the rows the report scores). Returned in that canonical order."""
    cols = [S.USER_ID, S.ITEM_ID, S.LABEL, S.TIMESTAMP, S.SPLIT, S.HISTORY_ITEMS, S.HISTORY_LABELS]
    table = read_table(storage, storage.uri(INTERACTIONS), columns=cols)
    df = table.to_pandas()
    df = df[df[S.SPLIT] == "test"].drop(columns=[S.SPLIT])
    scores = storage.uri(SCORES)
    if storage.exists(f"{scores}/{SUCCESS}"):
        keys = read_table(storage, scores, columns=[S.USER_ID, S.ITEM_ID]).to_pandas().drop_duplicates()
        df = df.merge(keys, on=[S.USER_ID, S.ITEM_ID], how="inner")
    df = df.sort_values([S.USER_ID, S.ITEM_ID, S.TIMESTAMP], kind="stable").reset_index(drop=True)
    k = len(df) if n == 0 else min(n, len(df))
    idx = np.sort(np.random.default_rng(seed).choice(len(df), size=k, replace=False))
    return df.iloc[idx].reset_index(drop=True)


def item_infos(storage: Storage, item_ids: set[int]) -> dict[int, tuple[str, list[str]]]:
    """(title, keywords) of the given items only, so actors carry what they need, not the catalogue."""
    items = read_items(storage).to_pandas()
    items = items[items[S.ITEM_ID].isin(item_ids)]
    return {
        int(r[S.ITEM_ID]): (
            str(r[S.TITLE]),
            [str(k) for k in (r[S.KEYWORDS] if r[S.KEYWORDS] is not None else [])],
        )
        for r in items.to_dict("records")
    }


def reference_traces(storage: Storage) -> dict[tuple[int, int], str]:
    """(user_id, item_id) -> the teacher's reasoning, when reason/traces is committed."""
    uri = storage.uri(TRACES)
    if not storage.exists(f"{uri}/{SUCCESS}"):
        return {}
    t = read_table(storage, uri, columns=[S.USER_ID, S.ITEM_ID, S.REASONING]).to_pandas()
    return {(int(u), int(i)): r for u, i, r in zip(t[S.USER_ID], t[S.ITEM_ID], t[S.REASONING], strict=True)}


def teacher_references(cfg: Config, rows: pd.DataFrame) -> dict[tuple[int, int], str | None]:
    """(user_id, item_id) -> the configured teacher's rationale for each row and its true label. The
    teacher runs in a Ray Data actor, as in the reason stage, so an LLM teacher gets its GPUs there."""
    import ray

    from thinkrec.teachers import get_teacher

    if not len(rows):
        return {}
    out = (
        ray.data.from_pandas(rows)
        .map_batches(
            get_teacher(cfg.reason.teacher),
            fn_constructor_kwargs={"cfg": cfg},
            batch_format="pandas",
            batch_size=cfg.reason.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),  # a handful of rows: one teacher
            num_gpus=cfg.reason.num_gpus_per_actor or None,
        )
        .to_pandas()
    )
    return {
        (int(u), int(i)): (r if isinstance(r, str) else None)
        for u, i, r in zip(out[S.USER_ID], out[S.ITEM_ID], out[S.REASONING], strict=True)
    }


def decoding(cfg: Config, builder: PromptBuilder | None = None) -> Decoding:
    """The explain stage's decoding settings (``explain.*``; seeded by the run's ``seed``). With
    ``explain.answer_first``, ``builder``'s Yes and No tokens are the first token's choices, Yes drawn
    with probability sigmoid(Yes logit / T) (T: ``explain.answer_temperature``, else
    ``explain.temperature``; at T = 1 the p_yes the score stage reports)
    (``Decoding.first_token_binary``), and its ``separator_ids`` (the "." before a rationale) are
    forced after it."""
    e = cfg.explain
    first = e.answer_first and builder is not None
    return Decoding(
        first_token_ids=(builder.yes_id, builder.no_id) if first else (),
        after_first_ids=builder.separator_ids if first else (),
        first_token_binary=first,
        answer_temperature=e.answer_temperature if first else None,
        min_new_tokens=e.min_new_tokens,
        max_new_tokens=e.max_new_tokens,
        temperature=e.temperature,
        top_p=e.top_p,
        repetition_penalty=e.repetition_penalty,
        no_repeat_ngram_size=e.no_repeat_ngram_size,
        seed=cfg.seed,
    )


def row_key(user_id: int, item_id: int) -> str:
    return f"{int(user_id)}:{int(item_id)}"


class ExplainActor:
    """Ray Data callable class: loads the generator (base model with every adapter fused, projector,
    CF table), the prompt builder, fusion.json and the prompt cache once per actor; ``__call__``
    explains one pandas batch, each row with its own gate, and serves cached prompts without
    generating them."""

    def __init__(
        self, config: dict[str, Any], items: dict[int, tuple[str, list[str]]], device: str | None = None
    ) -> None:
        from thinkrec.model.base import load_tokenizer
        from thinkrec.model.fusion import load_fusion, user_embeddings
        from thinkrec.scoring.base import load_artifacts

        cfg = from_dict(config)
        self.cfg = cfg
        art = load_artifacts(cfg)
        backend = cfg.generation.backend
        if backend == "hf":
            from thinkrec.generation.hf import HFGenerator

            self.gen = HFGenerator(cfg, art, device=device)
        elif backend == "vllm":
            from thinkrec.generation.vllm import VLLMGenerator

            self.gen = VLLMGenerator(cfg, art)
        else:
            raise ValueError(
                f"generation.backend={backend!r}: explain needs the trained adapters and each row's "
                "gate, so generation.backend=hf or vllm"
            )
        # The cache key's model names the adapters too: a retrained model never hits stale texts.
        self.gen = cache.CachedGenerator(
            self.gen,
            Storage.from_config(cfg),
            CACHE,
            model_key=f"{self.gen.model}@{art.version}",
            enabled=cfg.generation.cache,
        )
        tok = load_tokenizer(art.base_model, cfg.model.trust_remote_code)
        self.builder = PromptBuilder(
            tok,
            cf_tokens=cfg.model.cf_tokens,
            use_chat_template=cfg.model.use_chat_template,
            max_title_chars=cfg.model.max_title_chars,
        )
        self.decoding = decoding(cfg, self.builder)
        self.dhash = self.decoding.hash()
        self.cf_users = user_embeddings(art.cf_embeddings) if art.cf_embeddings else None
        self.fusion = load_fusion(art.fusion, self.cfg.fusion) if art.fusion else None
        self.n_adapters = len(art.adapter_names)
        self.items = {int(k): ItemInfo(t, tuple(kw)) for k, (t, kw) in items.items()}

    def _info(self, item_id: int) -> ItemInfo:
        # An item missing from prepare/items still gets a prompt line (its CF slot reads the zero row).
        return self.items.get(int(item_id), ItemInfo(f"item {int(item_id)}"))

    def encode(self, row: dict[str, Any]) -> Encoded:
        hist = [
            (int(i), self._info(i), int(lab))
            for i, lab in zip(row[S.HISTORY_ITEMS], row[S.HISTORY_LABELS], strict=True)
        ]
        item = int(row[S.ITEM_ID])
        return self.builder.encode_prefix(int(row[S.USER_ID]), hist) + self.builder.encode_candidate(
            item, self._info(item)
        )

    def gate(self, user_id: int) -> tuple[np.ndarray, str]:
        """(1 + N,) weights over [global, expert-0, ...] and their label, by the score stage's rule."""
        from thinkrec.model.fusion import user_gate

        return user_gate(self.cf_users, self.fusion, self.n_adapters, user_id, self.cfg.fusion.mode)

    def requests(self, batch: pd.DataFrame) -> list[GenRequest]:
        out = []
        for r in batch.to_dict("records"):
            g, label = self.gate(int(r[S.USER_ID]))
            key = row_key(r[S.USER_ID], r[S.ITEM_ID])
            out.append(GenRequest(key, encoded=self.encode(r), gate=g, adapter=label))
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        reqs = self.requests(batch)
        res = self.gen.generate(reqs, self.decoding)  # cached prompts are served, not generated
        return pd.DataFrame(
            {
                S.USER_ID: batch[S.USER_ID].astype(np.int64).to_numpy(),
                S.ITEM_ID: batch[S.ITEM_ID].astype(np.int64).to_numpy(),
                S.LABEL: batch[S.LABEL].astype(np.int8).to_numpy(),
                S.EXPLANATION: [r.text.strip() if r.text is not None else None for r in res],
                S.BACKEND: self.gen.name,
                S.GEN_MODEL: self.gen.model,
                S.ADAPTER: [q.adapter for q in reqs],
                S.DECODING_HASH: self.dhash,
                S.PROMPT_HASH: [self.gen.key(q, self.decoding) for q in reqs],
                S.NEW_TOKENS: np.array([r.new_tokens for r in res], dtype=np.int32),
                CACHED: [r.cached for r in res],
                REASON: [None if r.error is None else f"generation_failed: {r.error}" for r in res],
            }
        )


CACHED = "_cached"
"""Per-row flag of the actor's output (not stored): served from the prompt cache."""


def join_references(generated: pd.DataFrame, refs: dict[tuple[int, int], str | None]) -> pd.DataFrame:
    """``generated`` with each row's reference reasoning, looked up by (user_id, item_id)."""
    out = generated.copy()
    out[S.REASONING] = [
        refs.get((int(u), int(i))) for u, i in zip(out[S.USER_ID], out[S.ITEM_ID], strict=True)
    ]
    return out


def stage_meta(cfg: Config, storage: Storage) -> dict[str, str]:
    d = cfg.to_dict()
    sections = {
        "seed": d["seed"],
        "model": d["model"],
        "fusion": d["fusion"],
        "explain": {k: v for k, v in d["explain"].items() if k != "shards_per_wave"},
        "generation": {k: d["generation"][k] for k in ("backend", "model")},
        "teacher": {k: d["reason"][k] for k in ("teacher", "model")},
        "stage": "explain/v5",
    }
    inputs = [storage.uri(t) for t in (INTERACTIONS, ITEMS, TRACES, TRAIN, CF_MODEL, SCORES)]
    inputs += keywords_inputs(storage)
    return fingerprint(sections, [u for u in inputs if storage.exists(f"{u}/{SUCCESS}")], storage)


def run(cfg: Config) -> dict[str, Any]:
    """Sample ``explain.n_samples`` test rows, explain them wave by wave, commit explain/explanations."""
    import ray

    storage = Storage.from_config(cfg)
    for rel, stage in ((INTERACTIONS, "prepare"), (ITEMS, "prepare"), (TRAIN, "train"), (CF_MODEL, "cf")):
        if not storage.exists(f"{storage.uri(rel)}/{SUCCESS}"):
            raise FileNotFoundError(f"{storage.uri(rel)} is not committed: run the {stage} stage first")
    out = storage.uri(EXPLANATIONS)
    meta = stage_meta(cfg, storage)
    writer = TableWriter.for_stage(cfg, storage, out, meta, S.EXPLANATIONS)
    if writer.complete:
        log.info("explain: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/_manifest.json")

    sample = sample_rows(storage, cfg.explain.n_samples, cfg.seed)
    shard = stable_shard(sample[S.USER_ID].to_numpy(np.int64), writer.num_shards)
    pending = writer.pending_shards()
    skipped = writer.num_shards - len(pending)
    todo = sample[np.isin(shard, pending)]
    needed = set(todo[S.ITEM_ID].tolist())
    for h in todo[S.HISTORY_ITEMS]:
        needed.update(int(i) for i in h)
    items = item_infos(storage, needed)
    refs = reference_traces(storage)
    untraced = [(int(u), int(i)) not in refs for u, i in zip(todo[S.USER_ID], todo[S.ITEM_ID], strict=True)]
    refs.update(teacher_references(cfg, todo[untraced]))

    n_cached = n_generated = 0
    todo_shard = shard[np.isin(shard, pending)]
    for wave in writer.waves(cfg.explain.shards_per_wave):
        rows = todo[np.isin(todo_shard, wave)]
        generated = pd.DataFrame()
        if len(rows):
            ds = ray.data.from_pandas(rows).map_batches(
                ExplainActor,
                fn_constructor_kwargs={"config": cfg.to_dict(), "items": items},
                batch_size=cfg.generation.batch_size,
                batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=cfg.generation.actors),
                num_cpus=cfg.score.num_cpus_per_actor,
                num_gpus=cfg.score.num_gpus_per_actor,
            )
            generated = join_references(ds.to_pandas(), refs)
            # The actors cached their new texts before returning them: what is published is cached.
            hit = generated[CACHED].to_numpy(bool)
            n_cached += int(hit.sum())
            n_generated += int((~hit).sum())
        writer.write([generated] if len(generated) else [], shards=wave)
    extra = {"shards_skipped": skipped, "rows_generated": n_generated, "rows_cached": n_cached}
    manifest = writer.commit(rows_in=len(sample), extra=extra)
    log.info("explain: %d explanations -> %s (%s)", manifest["rows"], out, extra)
    return manifest
