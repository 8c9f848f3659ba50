"""Typed, frozen configuration for every stage.

One tree of frozen dataclasses, validated by pydantic at load time: an unknown key or a bad value
fails with the dotted name of the key (``train.lr``). Configs come from YAML plus ``key=value``
overrides (values parsed as YAML, so ``train.lr=3e-4`` is a float and ``score.backend=vllm`` a string).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

_STRICT = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the offending key."""


@dataclass(config=_STRICT)
class GenericConfig:
    """``data.dataset: generic``: which files under data.source hold the log and the items, and which
    of their columns are which (thinkrec/data/generic.py)."""

    interactions: str = "*.parquet"
    """File name or glob (``part-*.csv.gz``) of the interaction files under data.source."""
    items: str = ""
    """File name or glob of the item table. Empty: the items are those the log names (titled by id)."""
    format: Literal["auto", "parquet", "csv", "json"] = "auto"
    """``auto``: from each file's extension (``.parquet``, ``.csv``, ``.json``/``.jsonl``, plus
    ``.gz``). CSV files start with a header line and hold one record per line."""
    user: str = "user_id"
    """Column of the raw user id (any string or integer)."""
    item: str = "item_id"
    """Column of the raw item id in the log."""
    rating: str = "rating"
    """Column of the rating, within [rating_min, rating_max]; the label is rating >= data.label_threshold."""
    label: str = ""
    """Column of a 0/1 label instead of a rating (it becomes the rating; set data.label_threshold: 1)."""
    rating_min: float = 0.0
    rating_max: float = 5.0
    timestamp: str = "timestamp"
    """Column of the event time."""
    timestamp_unit: Literal["s", "ms", "iso"] = "s"
    """Unix seconds, Unix milliseconds, or ISO-8601 strings (no zone: UTC)."""
    item_id: str = ""
    """Column of the item id in the item table (empty: the same name as ``item``)."""
    title: str = "title"
    """Column of the item's title in the item table."""
    text: list[str] = dataclasses.field(default_factory=list)
    """Columns of the item table whose text the keywords stage reads (each cut to keywords.max_words)."""


@dataclass(config=_STRICT)
class DataConfig:
    dataset: Literal["ml-100k", "ml-1m", "amazon", "yelp", "generic"] = "ml-100k"
    """Which reader (thinkrec/data/<format>.py): ``ml-100k`` (RecBole atomic files; the copy shipped
    in the ``recbole`` wheel when data.source is empty), ``ml-1m`` (``ratings.dat``, ``movies.dat``),
    ``amazon`` (Amazon Reviews 2018: ``<Category>.json[.gz]`` and ``meta_<Category>.json[.gz]``),
    ``yelp`` (``review.json`` and ``business.json``, plain or ``.gz``), ``generic`` (Parquet, CSV or
    JSON lines with the columns data.generic names)."""
    generic: GenericConfig = dataclasses.field(default_factory=GenericConfig)
    source: str = ""
    """URI of the directory holding the raw files (local path, file:// or s3://, read through
    storage.s3_endpoint). Empty: the dataset's embedded copy."""
    label_threshold: float = 4.0
    """A rating >= this is a positive (label 1)."""
    history_len: int = Field(10, ge=1, le=50)
    """Interactions shown in the prompt: the user's last N strictly before the sample."""
    split: Literal["time_window", "dates", "cut_halve"] = "time_window"
    """How rows are split by time (thinkrec/data/splits.py): ``time_window``: the latest test_frac of
    all interactions (by count) is test, the valid_frac before it valid; ``dates``: consecutive
    calendar slots, split_dates = [valid start, test start] (the reference's ML-1M month slots);
    ``cut_halve``: train before split_dates[0], the later window sorted by time and halved by count
    into valid / test (the reference's Yelp rule; its Books rule with split_start 2017-01-01,
    split_dates [2017-11-01], split_end 2018-01-01)."""
    split_dates: tuple[str, ...] = ()
    """ISO dates (UTC unless a zone is given) of the ``dates`` and ``cut_halve`` splits."""
    split_start: str = ""
    """Rows before this ISO date are dropped (counted as rows_filtered ``outside_split_window``)
    before the activity filter; empty: none."""
    split_end: str = ""
    """Rows at or after this ISO date are dropped likewise; empty: none."""
    valid_frac: float = Field(0.1, gt=0, lt=1)
    """time_window: share of the timeline (by interaction count) in the validation window."""
    test_frac: float = Field(0.1, gt=0, lt=1)
    """time_window: share of the timeline (by interaction count) in the test window (the latest)."""
    min_interactions: int = Field(0, ge=0)
    """Keep only users and items with MORE than this many ratings (the reference's Yelp and Books
    rule: 20). 0 keeps all. Rows removed are counted per rule in the manifest's ``rows_filtered``."""
    filter_mode: Literal["single_pass", "fixed_point"] = "single_pass"
    """``single_pass``: count once and drop (the reference code; survivors may fall to N or fewer).
    ``fixed_point``: repeat until every remaining user and item has more than N. Recorded in the
    manifest."""
    max_users: int | None = Field(None, ge=2)
    """Keep only the first N users by id (small runs and tests). None keeps all."""
    unknown_items: Literal["quarantine", "keep"] = "quarantine"
    """Reviews of items with no usable metadata (no line in the item file, or one with an empty
    title): ``quarantine`` them (reason ``unknown_item``), or ``keep`` them, the item entering
    prepare/items titled by its raw id."""
    max_quarantine_rate: float = Field(0.01, ge=0, le=1)
    """A stage fails, writing no _SUCCESS, when more than this share of its input rows is malformed."""

    @model_validator(mode="after")
    def _fracs(self) -> DataConfig:
        if self.valid_frac + self.test_frac >= 0.9:
            raise ValueError("data.valid_frac + data.test_frac must leave at least 10% for training")
        from thinkrec.data.splits import epoch_seconds, window

        need = {"time_window": 0, "dates": 2, "cut_halve": 1}[self.split]
        if len(self.split_dates) != need:
            raise ValueError(
                f"data.split={self.split} takes {need} data.split_dates, got {list(self.split_dates)}"
            )
        dates = [epoch_seconds(d, "data.split_dates") for d in self.split_dates]
        lo, hi = window(self)
        if dates != sorted(dates) or any(not lo <= d < hi for d in dates) or lo >= hi:
            raise ValueError(
                f"data.split_dates {list(self.split_dates)} must be ascending and inside "
                f"[data.split_start={self.split_start!r}, data.split_end={self.split_end!r})"
            )
        return self


@dataclass(config=_STRICT)
class StorageConfig:
    output_root: str = "runs/demo"
    """Every stage reads and writes under this URI (local path, file:// or s3://bucket/prefix)."""
    s3_endpoint: str | None = None
    """Endpoint override for S3-compatible stores (MinIO, moto). Credentials come from the AWS chain."""
    s3_region: str = "us-east-1"
    num_shards: int = Field(4, ge=1, le=4096)
    """Output shards per table; rows are assigned by a stable hash of user_id."""


@dataclass(config=_STRICT)
class RayConfig:
    address: str | None = None
    """None or "local": start a local Ray; "auto" or ray://host:port joins a cluster."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs for a local Ray (None: all of this machine's)."""
    object_store_mb: int | None = Field(None, ge=128)
    """Object store (shared memory) of a local Ray, MiB (None: Ray's default, 30% of RAM). On a
    cluster, set it per node in the cluster config instead."""


@dataclass(config=_STRICT)
class TinyModelConfig:
    """The locally built base model used when ``model.base`` is empty (Qwen2-style, real Qwen vocabulary)."""

    hidden_size: int = Field(128, ge=64)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    num_kv_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_position_embeddings: int = 2048

    @model_validator(mode="after")
    def _head_dim(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 64:
            raise ValueError(
                "model.tiny: hidden_size / num_heads must be an integer >= 64 (vLLM CPU attention)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError("model.tiny.num_kv_heads must divide model.tiny.num_heads")
        return self


@dataclass(config=_STRICT)
class ModelConfig:
    base: str = ""
    """Hugging Face model id or path. Empty: build the tiny model under <output_root>/base_model."""
    trust_remote_code: bool = False
    """Only for a named model you trust; never on by default."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    use_chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template (instruction-tuned bases such as Llama-3-Instruct)."""
    cf_tokens: bool = True
    """Write projected CF embeddings over placeholder tokens (CoLLM/ThinkRec). False: text only (TALLRec)."""
    cf_history: bool = True
    """With CF tokens: the user's CF token also carries a summary of the prompt's history (its smoothed
    like-rate and the label-signed mean of its items' CF vectors), which a CF model's user vector, fixed
    at train time, does not know on a time split (thinkrec/model/thinkrec.py). False: the CF model's
    vectors alone, as in CoLLM."""
    cf_history_item: bool = False
    """With ``cf_history``: the target item's CF token carries the same summary, so one token holds
    the item and what the user's history says of it (thinkrec/model/thinkrec.py)."""
    cf_scale: bool = False
    """With CF tokens: scale each CF column to unit root-mean-square over the table before the
    projector (``CFProjector.fit_scale``), so that a biased MF's constant column does not drown the
    vectors' own columns. Off by default: on ML-100K's CoLLM-style model it stopped the stage-2
    collapse of one run and cost 0.005-0.008 AUC on the others
    (bench/results/collm-cf-scale-cpu.md)."""
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    max_title_chars: int = Field(60, ge=8)
    warmup_steps: int = Field(0, ge=0)
    """Locally built base only (``model.base`` empty; never applied to a pretrained model): before
    any LoRA training, this many full-parameter causal-LM steps on the train split's own text (the
    reasoning traces' prompts and rationales, item titles and keywords), so a random-weight model
    has a language to write explanations in (thinkrec/train/warmup.py). 0: off."""
    warmup_lr: float = Field(3e-3, gt=0)
    """AdamW learning rate of the warm-up (constant after a short linear ramp)."""
    warmup_batch_size: int = Field(16, ge=1)
    """Sequences per warm-up step (each ``warmup_seq_len`` tokens of packed text)."""
    warmup_seq_len: int = Field(128, ge=8)
    """Tokens per warm-up sequence."""


@dataclass(config=_STRICT)
class KeywordsConfig:
    """The keywords stage (between prepare and cf): up to 10 keywords per item -> keywords/keywords."""

    extractor: str = "auto"
    """``genres`` (the genres MovieLens ships), ``tfidf`` (the highest TF-IDF terms of the item's
    title and description, the IDF fitted on every item's text), ``llm`` (generation.*), a
    ``package.module:Class`` built as ``Cls(cfg)``, or ``auto``: ``genres`` for MovieLens, ``tfidf``
    for datasets whose items have text."""
    max_keywords: int = Field(10, ge=1, le=10)
    """Keywords kept per item (the reference keeps at most 10)."""
    max_words: int = Field(100, ge=1)
    """Each description field is cut to this many words before extraction (the reference: 100)."""
    cache: str = ""
    """URI of the keyword cache (entries keyed by a hash of the item's text and the extractor's
    settings). Point several runs or datasets at one cache so shared items are computed once.
    Empty: <output_root>/keywords/cache."""
    batch_size: int = Field(64, ge=1)
    """Items per extractor call."""
    concurrency: int | None = Field(None, ge=1)
    """Extractor actors (None: the cluster's CPUs, at most 4)."""
    tfidf_max_df: float = Field(0.5, gt=0, le=1)
    """tfidf: terms in more than this share of items carry no information and are never keywords
    (scikit-learn's ``max_df``)."""
    llm_max_new_tokens: int = Field(32, ge=1)
    """llm: new tokens per item summary (the reference: 32)."""
    llm_num_beams: int = Field(4, ge=1)
    """llm: beams of the beam search on the hf backend (vLLM and OpenAI-compatible servers decode
    greedily; the backend is recorded on each row)."""
    llm_repetition_penalty: float = Field(1.2, gt=0)
    """llm: the reference setting is 1.2."""


CFModel = Literal["mf", "lightgcn", "sasrec"]


@dataclass(config=_STRICT)
class LightGCNConfig:
    """LightGCN (thinkrec/cf/lightgcn.py), the paper's graph CF encoder."""

    dim: int = Field(64, ge=2)
    """Embedding size (the paper's 64)."""
    layers: int = Field(2, ge=0)
    """Propagation layers over the normalised graph of the positive train pairs (the reference's 2)."""


@dataclass(config=_STRICT)
class SASRecConfig:
    """SASRec (thinkrec/cf/sasrec.py), the paper's sequential CF encoder."""

    hidden: int = Field(64, ge=2)
    """Hidden size (the paper's 64); also the CF vectors' width."""
    blocks: int = Field(2, ge=1)
    """Self-attention blocks (the paper's 2)."""
    max_len: int = Field(25, ge=1)
    """Items in a sequence: the user's last N before the row (the paper's 25)."""
    heads: int = Field(1, ge=1)
    """Attention heads (the reference's 1); must divide ``hidden``."""
    dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout on the embeddings and in every block (the reference's 0.2)."""

    @model_validator(mode="after")
    def _heads(self) -> SASRecConfig:
        if self.hidden % self.heads:
            raise ValueError(f"cf.sasrec.heads={self.heads} must divide cf.sasrec.hidden={self.hidden}")
        return self


@dataclass(config=_STRICT)
class CFConfig:
    model: CFModel = "mf"
    """The CF model whose vectors feed the CF tokens (and pick the hard samples): ``mf`` (matrix
    factorisation, thinkrec/cf/mf.py), ``lightgcn`` or ``sasrec``. Its logit is cf/scores' ``cf_score``."""
    baselines: tuple[CFModel, ...] = ()
    """Further CF models trained in the same cf stage only for comparison: each adds its ``cf_<model>``
    column to cf/scores (and so a row in the evaluation report); their vectors are not exported.
    One equal to ``cf.model`` is that model itself, trained once."""
    dim: int = Field(64, ge=2)
    """MF's embedding size (the paper's MF uses 256; the demo uses 64)."""
    epochs: int = Field(20, ge=1)
    """Training epochs (every CF model); the epoch with the best validation AUC is kept."""
    batch_size: int = Field(1024, ge=1)
    """Global batch size, split evenly over the workers."""
    lr: float = Field(1e-2, gt=0)
    """AdamW learning rate (every CF model)."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW (decoupled) weight decay."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (DDP over gloo on CPU)."""
    bias: bool = True
    """MF only: add user, item and global biases to <u, i>, saved beside the embeddings in
    cf/model/bias.safetensors. The reference MF has none (false), but on a time split most valid/test
    rows have a cold user, which only the item bias can score (ML-100K valid AUC 0.67 vs 0.52)."""
    max_failures: int = Field(2, ge=0)
    """Times Ray Train restarts the workers from the last checkpoint after a worker fails."""
    lightgcn: LightGCNConfig = dataclasses.field(default_factory=LightGCNConfig)
    sasrec: SASRecConfig = dataclasses.field(default_factory=SASRecConfig)

    @model_validator(mode="after")
    def _baselines(self) -> CFConfig:
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"cf.baselines lists a model twice: {list(self.baselines)}")
        return self


@dataclass(config=_STRICT)
class GenerationConfig:
    """LLM text generation (keywords, teachers, explanations) over one Generator interface."""

    backend: Literal["hf", "vllm", "openai"] = "hf"
    """``hf``: batched ``generate`` in the actor; ``vllm``: the offline engine in the actor;
    ``openai``: any OpenAI-compatible HTTP server (``generation.base_url``)."""
    model: str = ""
    """The model to generate with: a local/HF path for ``hf``/``vllm`` (empty: ``model.base``), the
    served model name for ``openai`` (empty: ``model.base``)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """``openai`` only: the endpoint's base URL, up to and including ``/v1``."""
    api_key_env: str = "THINKREC_GENERATION_API_KEY"
    """``openai`` only: the name of the environment variable holding the API key. The key itself is
    never in config, logs or a Ray runtime_env; an unset variable sends no Authorization header."""
    batch_size: int = Field(8, ge=1)
    """Rows per ``generate`` call (hf, vllm) and per Ray Data batch."""
    concurrency: int = Field(8, ge=1)
    """``openai`` only: requests in flight per actor at most."""
    timeout_s: float = Field(60.0, gt=0)
    """``openai`` only: seconds one request may take (connect, write, read each) before it is retried."""
    max_tries: int = Field(4, ge=1)
    """``openai`` only: tries per row on 429, 5xx, timeouts and connection errors; a row failing all
    of them goes to quarantine with its last error (the job goes on)."""
    backoff_initial_s: float = Field(0.5, gt=0)
    """``openai`` only: first retry wait; it doubles each try (up to ``backoff_max_s``), plus a random
    jitter of up to this much, so clients that failed together do not retry together."""
    backoff_max_s: float = Field(8.0, gt=0)
    """``openai`` only: the longest wait between two tries."""
    torch_threads: int = Field(0, ge=0)
    """``hf`` on CPU: torch threads per actor (0: torch's default)."""
    actors: int = Field(1, ge=1)
    """Ray Data actors running the generator."""
    cache: bool = True
    """Serve a prompt generated before (same model, decoding settings, prompt and gate) from the
    prompt-hash cache under the output root (``cache/<stage>``) instead of generating it again, so a
    rerun or a repeated prompt costs nothing. Off: every prompt is generated (e.g. fresh samples)."""


@dataclass(config=_STRICT)
class ReasonConfig:
    teacher: str = Field("grounded", min_length=1)
    """A registered teacher name (``grounded``: a rationale written from the user's history, labels
    and keywords, no LLM) or ``package.module:Class`` for a teacher class outside thinkrec."""
    max_traces: int = Field(2000, ge=0)
    """Upper bound on hard samples given a trace."""
    model: str = ""
    """Model id or path for an LLM teacher (unused by ``grounded``)."""
    batch_size: int = Field(64, ge=1)
    """Rows per teacher call (Ray Data map_batches batch size)."""
    concurrency: int = Field(1, ge=1)
    """Teacher actors (each loads its model once)."""
    num_gpus_per_actor: float = Field(0, ge=0)
    """GPUs per teacher actor (an LLM teacher on a GPU cluster)."""
    think_blocks: Literal["strip", "keep"] = "strip"
    """``llm`` teacher: drop the model's ``<think>...</think>`` blocks from the trace, or keep their
    text (without the tags) in front of the final analysis."""
    max_reflections: int = Field(2, ge=0)
    """``llm`` teacher: reflection turns (with a rotating hint of the correct answer) for a row whose
    answer disagrees with the label; still disagreeing after them, the row goes to quarantine."""
    max_new_tokens: int = Field(256, ge=1)
    """``llm`` teacher: new tokens per turn (the kept trace must fit ``train.max_answer_tokens``)."""
    temperature: float = Field(0.6, ge=0)
    """``llm`` teacher: sampling temperature (0: greedy)."""


@dataclass(config=_STRICT)
class TrainConfig:
    num_workers: int = Field(2, ge=1)
    backend: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2
    offload: bool = False
    """DeepSpeed CPU offload of optimizer state."""
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = Field(1e-4, gt=0)
    projector_lr: float = Field(1e-3, gt=0)
    projector_lora: bool = False
    """Stage 2 trains the global LoRA (at ``lr``) together with the projector, and its LoRA replaces
    stage 1's. False: the reference's stage 2, LoRA frozen. A random-weight base (the tiny model)
    needs it: with frozen attention the CF tokens barely reach the answer position
    (tests/test_planted.py)."""
    expert_lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    warmup_steps: int = Field(200, ge=0)
    epochs: int = Field(1, ge=1)
    """Epochs for stage 1 (global LoRA)."""
    projector_epochs: int = Field(1, ge=1)
    projector_restarts: int = Field(1, ge=0)
    """Stage 2 starts over, from a new projector initialisation and sample order, when none of its
    epochs' validation AUC is above chance (0.5 plus two standard deviations of the AUC of random
    scores on the same validation rows); at most this many times. Whether stage 2 picks the CF
    tokens up can hang on rounding: one CoLLM-style run in six on ML-100K never did, and reruns of it
    did (bench/results/collm-restart-cpu.md). A run that learns never restarts. Needs validation rows
    (``max_valid_samples``). One restart is not always enough: that run's attempts 1 and 2 did not
    reach MF either (bench/results/collm-grad-norm-cpu.md)."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Clip the trainable parameters' gradient to this total L2 norm before each optimizer step
    (``torch.nn.utils.clip_grad_norm_``; DeepSpeed's ``gradient_clipping``). None: no clipping. The
    pre-clip norm of every step is recorded in the curves (``grad_norm``) either way. A clip above
    every norm of a run changes nothing; two CoLLM-style stage-2 collapses on ML-100K each followed
    one gradient spike (bench/results/collm-grad-norm-cpu.md)."""
    expert_epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    """Per-worker micro-batch."""
    grad_accum: int = Field(1, ge=1)
    max_answer_tokens: int = Field(64, ge=1)
    """Token budget for the answer ("Yes. <reasoning>")."""
    reasoning_ratio: float = Field(0.2, ge=0, le=1)
    """Share of reasoning samples in each epoch's mix (the rest are label samples)."""
    rec_weight_reasoning: float = 0.1
    rec_weight_label: float = 0.9
    """L = w_rec * L_rec + (1 - w_rec) * L_think, w_rec by sample kind."""
    max_train_samples: int | None = Field(None, ge=1)
    expert_last_layers: int = Field(8, ge=1)
    """Experts train only the LoRA of the last N transformer layers."""
    n_groups: int | None = Field(None, ge=1, le=10)
    """User groups. None: k-means with the count chosen by silhouette over 2..10."""
    grouping: Literal["kmeans", "ward"] = "kmeans"
    experts: bool = True
    reasoning: bool = True
    checkpoint_every: int = Field(50, ge=1)
    patience: int = Field(15, ge=1)
    selection: tuple[float, float] = (0.25, 1 / 3)
    """Validation score = a * AUC + b * UAUC (reference code: AUC/4 + UAUC/3)."""
    max_valid_samples: int = Field(512, ge=1)
    use_gpu: bool = False
    """One GPU per Ray Train worker (NCCL; bf16 under DeepSpeed). False: CPU workers over gloo."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts from the last checkpoint before a training phase fails."""
    fail_at_step: int | None = Field(None, ge=1)
    """Chaos-test hook: in phase ``fail_in_phase`` (attempt ``fail_at_attempt``), the last worker
    exits its process once at this optimizer step (never after a resume). Leave unset outside
    fault-tolerance tests."""
    fail_in_phase: Literal["global", "projector", "expert"] = "global"
    fail_at_attempt: int = Field(0, ge=0)
    """Chaos-test hooks: the phase and the attempt (``projector_restarts``) ``fail_at_step`` fires in."""


@dataclass(config=_STRICT)
class FusionConfig:
    mode: Literal["thinkrec", "global", "linear"] = "thinkrec"
    """thinkrec: the paper's gate, mixtures exact per row. global: the global adapter only.
    linear: peft's add_weighted_adapter "linear" merge (paper-compatible, inexact)."""
    tau: float = Field(0.1, gt=0)
    single_base: float = 0.5
    single_per_group: float = 0.6
    """One expert when max(w) > single_base + single_per_group / N."""
    entropy_frac: float = Field(0.95, gt=0, le=1)
    """The global adapter when entropy(w) >= entropy_frac * ln N."""


@dataclass(config=_STRICT)
class ScoreConfig:
    backend: Literal["hf", "vllm"] = "hf"
    candidates: str = ""
    """URI of a candidate table, one file or a prefix of many (local or ``s3://``; Parquet, CSV or JSON
    lines): ``user_id``, ``item_id`` (see ``id_space``), optional ``label`` and ``timestamp``; any other
    columns pass through to the output unchanged. Empty: the test split of prepare/interactions."""
    batch_size: int = Field(64, ge=1)
    concurrency: int = Field(1, ge=1)
    """Scorer actors; each scores and publishes whole shards."""
    num_shards: int | None = Field(None, ge=1, le=4096)
    """Shards of a scored table: the unit each scorer actor scores, publishes and a resubmitted job
    skips (a killed job redoes only the shards that were in flight). None: ``storage.num_shards``.
    A shard's candidates are held by one actor at a time, so a very large table wants more."""
    num_cpus_per_actor: float = Field(1, ge=0)
    num_gpus_per_actor: float = Field(0, ge=0)
    prefix_sharing: bool = True
    prefix_mode: Literal["cache", "packed"] = "cache"
    """hf backend, with prefix_sharing: "cache" runs each prefix once and copies its keys/values into
    each candidate row's cache (kv_cache.py); "packed" puts a user's candidates after one copy of the
    prefix in one sequence with a block attention mask (packed.py), with no per-candidate copies.
    Both equal full prompts (float32, atol 1e-5); bench/README.md has their pairs/s on a 2-core CPU."""
    packed_attention: Literal["auto", "sdpa", "flex"] = "auto"
    """hf backend, prefix_mode "packed": how the block mask is applied. "sdpa": a dense boolean mask
    (SDPA computes every query-key score, the masked ones too); "flex": a FlexAttention block mask
    that skips the key blocks no candidate sees (on a GPU the attention of 100 candidates of 56
    tokens runs about a twenty-fifth of the dense FLOPs; on an H200, 0.92 of the packed FLOP floor
    compiled against the dense mask's 0.54, bench/README.md). "auto": flex on CUDA (sdpa for a model
    on another attention than SDPA), sdpa on CPU, where FlexAttention compiles anew for each pack
    shape (10-20 s each with the tiny model) and the short packs leave few blocks to skip. Both equal
    full prompts."""
    fuse_projections: bool = False
    """hf backend: run each layer's q/k/v (and gate/up) projections as one matmul over concatenated
    weights; exact either way. Off by default: it measured 0.85-1.08x on a 2-core CPU with the tiny
    model, and on an H100 with the Llama-3-8B shape at 16,384 tokens per batch 0.98x eager and
    1.00-1.01x under ``compile`` (bench/README.md)."""
    compile: bool = False
    """hf backend: ``torch.compile`` the decoder (dynamic shapes). Fuses the norms, rotary embedding
    and gating that eager mode runs as separate kernels (plain HF Llama-3-8B shape: 140.6 -> 164.6
    pairs/s on an H200, 138.2 -> 165.8 on an H100, bench/README.md); each scorer actor spends its
    first batches compiling (seconds on CPU with a tiny model, about a minute for an 8B model)."""
    unknown: Literal["quarantine", "cold"] = "quarantine"
    """Candidates whose user or item is unknown: quarantine with a reason, or score them with a
    zero CF vector (cold start)."""
    max_mixtures: int = Field(8, ge=1)
    """vLLM: pre-merged exact mixtures kept (weights quantised to mixture_step)."""
    mixture_step: float = Field(0.1, gt=0, le=0.5)
    """vLLM: grid of the mixture weights; 1 / mixture_step must be an integer so grid points sum to 1."""
    block_rows: int = Field(1024, ge=1)
    """Rows per read block and per scorer call. A shard's rows are sorted by user and cut only
    between users, so a user's candidates always share one call (one prefix pass) whatever the
    table's order; a larger value only means fewer, larger calls."""
    read_cpus: float = Field(0.25, gt=0)
    """CPUs reserved per partition task (one per candidate file: read, split by user shard, stage);
    below one, so it still runs beside scorer actors that hold whole CPUs."""
    torch_threads: int = Field(0, ge=0)
    """Intra-op threads per scorer on CPU (0: torch's default, Ray sets it from the actor's num_cpus)."""
    pin_cores: bool = False
    """Bind each scorer actor's process to ``num_cpus_per_actor`` cores of its node that no other
    scorer actor holds (Linux; thinkrec/runtime.py ``CorePin``). Ray counts CPUs but binds none, so
    without this an actor's prompt process runs on any idle core: faster alone, but ``num_cpus`` is then
    not what it uses. For nodes given over to scoring, and for the benchmark's ``scale_2_actors``."""
    vllm_max_model_len: int | None = Field(None, ge=16)
    """vLLM: longest prompt + 1 answer token. None: the model's own maximum."""
    vllm_kv_cache_gib: float | None = Field(None, gt=0)
    """vLLM: KV cache size in GiB (CPU backend: host memory). None: vLLM's default share of memory."""
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vLLM: share of accelerator memory the engine may use (ignored when vllm_kv_cache_gib is set)."""
    vllm_max_loras: int | None = Field(None, ge=1)
    """vLLM: adapters resident in one batch. None: all adapters plus max_mixtures."""
    vllm_block_size: int | None = Field(None, ge=16, multiple_of=16)
    """vLLM: tokens per KV-cache block, the prefix cache's unit (a shared prefix is reused in whole
    blocks). None: vLLM's default (16 on GPU, 128 on CPU, where prefixes under 128 tokens never hit)."""
    vllm_enforce_eager: bool = False
    """vLLM: skip CUDA graphs / compilation (faster start, slower steady state)."""
    output: str = ""
    """Where this table's scores go: a path under the run root, or an absolute path / ``s3://`` URI.
    Empty: ``score/scores`` for the test split, else ``score/<table name>`` (the candidates URI's last
    path component without its extension), so each table keeps its own output."""
    id_space: Literal["raw", "internal"] = "raw"
    """A candidate table's ``user_id``/``item_id``: raw ids as in the logs (strings or integers, mapped
    through prepare's id maps; an id not in a map is never read as another entity's number) or the
    internal ids 1..N. The test split (no ``candidates``) always uses internal ids."""
    history: Literal["auto", "latest", "before_timestamp"] = "auto"
    """The history a candidate table's prompt shows (``data.history_len`` interactions from
    prepare/interactions): ``latest`` = the user's latest at scoring time; ``before_timestamp`` = the
    latest strictly before the row's ``timestamp`` (the table must have one); ``auto`` = before the
    timestamp when the table has a ``timestamp`` column, else the latest."""

    @model_validator(mode="after")
    def _mixture_grid(self) -> ScoreConfig:
        units = 1 / self.mixture_step
        if abs(units - round(units)) > 1e-6:
            raise ValueError(f"score.mixture_step: 1 / {self.mixture_step} is not an integer")
        return self


@dataclass(config=_STRICT)
class ExplainConfig:
    """The explain stage: generated explanations over ``generation.backend`` (hf or vllm: the rows
    need the trained adapters and their gates), with the reference decoding settings as defaults."""

    n_samples: int = Field(8, ge=0)
    """Rows to explain, chosen by ``seed`` from the test rows (those of score/scores when it is
    committed); 0: all of them."""
    max_new_tokens: int = Field(48, ge=1)
    """New tokens per explanation."""
    temperature: float = Field(0.4, ge=0)
    """Sampling temperature (0: greedy); the reference setting is 0.4."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1: off)."""
    repetition_penalty: float = Field(1.2, gt=0)
    """The reference setting is 1.2."""
    no_repeat_ngram_size: int = Field(2, ge=0)
    """No n-gram of this size twice in one explanation, the prompt not counted (hf; 0: off); the
    reference setting is 2."""
    answer_first: bool = True
    """The first token is " Yes" with probability sigmoid(Yes logit / temperature), else " No": every
    explanation states the model's answer first, drawn from the raw Yes logit where the score reads it,
    with the probability the recommendation loss trains (p_yes). The Yes logit is trained by a binary
    loss, not against the whole vocabulary, so a small model's free first token was often another word,
    and a draw between the Yes and No logits said "No" on every row (the LM term lifts the No logit far
    above the Yes logit). False: the first token is free."""
    answer_temperature: float | None = Field(None, ge=0)
    """With ``answer_first``, the stated answer's temperature (" Yes" with probability sigmoid(Yes
    logit / this)); the rationale after it is sampled at ``temperature``. None: ``temperature``. A
    rationale sampled hotter varies more, while an answer drawn cooler agrees more often with the
    score's decision (p_yes > 0.5). Greedy decoding (``temperature`` 0) answers greedily."""
    min_new_tokens: int = Field(4, ge=0)
    """No end of text before this many tokens: a bare "No" is an answer, not an explanation (label-only
    training samples end right after it)."""
    shards_per_wave: int = Field(4, ge=1)
    """Output shards generated and committed per wave: the resume granularity (a resubmitted run
    skips the shards already published)."""


@dataclass(config=_STRICT)
class EvalConfig:
    k_values: tuple[int, ...] = (1, 3, 5, 10)
    """Cut-offs of HR@k, NDCG@k and MAP@k."""
    bootstrap_resamples: int = Field(200, ge=0)
    """User-level bootstrap resamples of the headline intervals (0: point estimates only)."""
    slice_resamples: int = Field(100, ge=0)
    """Bootstrap resamples of each slice's intervals."""
    smoothing: float = Field(10.0, ge=0)
    """Pseudo-rows at the global train rate added to each item's train positive rate (item_rate)."""
    history_buckets: tuple[int, ...] = (1, 5, 10)
    """History-length slice edges: [0, 1), [1, 5), [5, 10), >= 10."""
    bertscore: bool = True
    """BERTScore F1 of explanations with all-MiniLM-L6-v2 (offline; about 1 s per 100 pairs on CPU)."""
    explanation_samples: int = Field(5, ge=0)
    """Explanations shown in the report with their metrics."""


AblationName = Literal["tallrec", "collm", "thinkrec-no-experts", "thinkrec"]


@dataclass(config=_STRICT)
class AblationConfig:
    variants: tuple[AblationName, ...] = Field(
        ("tallrec", "collm", "thinkrec-no-experts", "thinkrec"), min_length=1
    )
    """Which variants ``thinkrec ablation`` runs, in this order (see thinkrec/ablation.py)."""
    seeds: tuple[int, ...] = ()
    """Seeds to run every variant under (each the config's top-level ``seed``: the CF model's, the
    tiny base's and the adapters' initialisation, batch order, grouping). Empty: the config's ``seed``
    alone, under ``ablation/<variant>``; otherwise each seed under ``ablation/seed-<s>/<variant>``
    and the table gives each metric's mean and spread over the seeds."""


@dataclass(config=_STRICT)
class Config:
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    keywords: KeywordsConfig = dataclasses.field(default_factory=KeywordsConfig)
    cf: CFConfig = dataclasses.field(default_factory=CFConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    reason: ReasonConfig = dataclasses.field(default_factory=ReasonConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    fusion: FusionConfig = dataclasses.field(default_factory=FusionConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    explain: ExplainConfig = dataclasses.field(default_factory=ExplainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    ablation: AblationConfig = dataclasses.field(default_factory=AblationConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """Content hash of the resolved config (stable across runs and machines)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides applied and validated (``cfg.replace(**{"train.lr": 1e-3})``)."""
        return from_dict(_apply_overrides(self.to_dict(), overrides))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            lines.append(f"{loc}: unknown key")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config(**tree)
    except ValidationError as err:
        raise ConfigError(f"bad config: {_format_errors(err)}") from None
    except TypeError as err:  # a section given as a scalar
        raise ConfigError(f"bad config: {err}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "score.backend=vllm"]`` -> {"train.lr": 0.0003, "score.backend": "vllm"}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    tree: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return _absolute_paths(from_dict(_apply_overrides(tree, overrides or {})))


def _absolute_paths(cfg: Config) -> Config:
    """Relative local paths resolved against the submitting process's directory: Ray workers run in
    other directories, so a relative ``runs/demo`` would point somewhere else inside them."""
    fix: dict[str, Any] = {}
    for key, value in (("storage.output_root", cfg.storage.output_root), ("data.source", cfg.data.source)):
        if value and "://" not in value and not os.path.isabs(value):
            fix[key] = os.path.abspath(value)
    if cfg.model.base and not os.path.isabs(cfg.model.base) and os.path.exists(cfg.model.base):
        fix["model.base"] = os.path.abspath(cfg.model.base)  # a local model dir, not a hub id
    return cfg.replace(**fix) if fix else cfg
