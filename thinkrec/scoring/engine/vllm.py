"""The vLLM scoring backend: vLLM's offline engine with multi-LoRA, CF tokens as prompt embeddings.

One request per row, ``max_tokens=1``, and only the Yes and No tokens' values requested
(``logprob_token_ids``); no decoding beyond the one answer position.

What ``score`` means here: the engine runs with ``logprobs_mode="raw_logits"``, so the values vLLM
returns for the requested tokens are the raw answer-position logits (before any softmax, temperature or
processor), the same quantity the HF backend returns: score = the raw "Yes" logit, p_yes =
sigmoid(logit_Yes), the probability the recommendation loss trains (BCE-with-logits on the Yes logit).
The No logit is requested too, for the checks that compare it with the HF backend's.

Adapters (DESIGN.md, scoring rule 4): vLLM applies one LoRA per request, so
- rows whose gate is one adapter (global, or a single expert) are sent with that adapter;
- rows whose gate mixes adapters are sent with a pre-merged exact mixture (``scoring/engine/merge.py``):
  the weights are quantised to ``score.mixture_step`` and at most ``score.max_mixtures`` mixtures are
  merged (the most frequent over the CF table's users, computed when the scorer starts, then the most
  frequent in each batch while room is left); other rows use the nearest kept mixture.
  ``mixture_report`` holds the resulting weight error.
Rows are sent ordered by (adapter, user) so that vLLM's automatic prefix cache reuses each user's
prefix across that user's candidates; results come back in the caller's order.

CF tokens: token embeddings with CF slots overwritten by the projected CF embeddings are computed on
the CPU (``input_embeddings``, with only the base model's input-embedding matrix loaded) and sent as
``prompt_embeds``. Rows without CF slots (``model.cf_tokens=false``, TALLRec-style) are sent as token
ids, and the engine is then started without prompt-embedding support.

vLLM starts worker processes: a script that builds this scorer must do so under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import typing
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from thinkrec.model.base import load_tokenizer
from thinkrec.model.fusion import gate as fusion_gate
from thinkrec.model.fusion import load_fusion
from thinkrec.model.prompt import PromptBuilder
from thinkrec.model.thinkrec import (
    Batch,
    CFProjector,
    CFTable,
    collate,
    input_embeddings,
    p_yes_of,
    prefix_summary,
)
from thinkrec.scoring.base import Artifacts, ScoreRow
from thinkrec.scoring.engine.merge import (
    LoraAdapter,
    MixtureReport,
    load_adapter,
    merge_exact,
    plan_mixtures,
    quantise,
    save_adapter,
)

log = logging.getLogger(__name__)

_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
_ONE_HOT_TOL = 1e-9


def lora_rank_bound(rank: int) -> int:
    """The smallest ``max_lora_rank`` this vLLM accepts that holds ``rank``."""
    try:
        from vllm.config.lora import MaxLoRARanks

        allowed = sorted(int(r) for r in typing.get_args(MaxLoRARanks))
    except ImportError:  # older layouts: any rank
        return rank
    for r in allowed:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {allowed[-1]}")


class _Embedder(nn.Module):
    """Just the input-embedding matrix, shaped like a model for ``input_embeddings``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(weight, freeze=True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed


def load_input_embeddings(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> _Embedder:
    """The base model's input-embedding matrix read from its safetensors (one tensor, not the whole
    model, which matters for 8B bases); falls back to loading the model when the name is unusual."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files: dict[str, str] = {}
    if os.path.exists(index):
        with open(index) as f:
            files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            files = {k: os.path.join(path, "model.safetensors") for k in f.keys()}  # noqa: SIM118
    names = sorted((k for k in files if k.endswith(_EMBED_SUFFIXES)), key=len)
    if names:
        with safe_open(files[names[0]], "pt") as f:
            return _Embedder(f.get_tensor(names[0]).to(dtype))
    from thinkrec.model.base import load_model

    model = load_model(path, dtype=str(dtype).removeprefix("torch."), trust_remote_code=trust_remote_code)
    return _Embedder(model.get_input_embeddings().weight.detach().clone())


class VLLMScorer:
    """``Scorer`` on vLLM's offline engine. ``engine_kwargs`` are passed to ``vllm.LLM`` last (for
    settings the config does not name)."""

    def __init__(self, cfg: Any, artifacts: Artifacts, engine_kwargs: dict[str, Any] | None = None) -> None:
        if cfg.fusion.mode == "linear":
            raise ValueError(
                "fusion.mode=linear (peft's inexact linear merge) is not served by score.backend=vllm, "
                "which serves exact mixtures only; use score.backend=hf for the paper-compatible mode"
            )
        self.cfg = cfg
        self.artifacts = artifacts
        self.step = float(cfg.score.mixture_step)
        self.max_mixtures = int(cfg.score.max_mixtures)
        self.dtype = getattr(torch, cfg.model.dtype)
        tok = load_tokenizer(artifacts.base_model, cfg.model.trust_remote_code)
        builder = PromptBuilder(
            tok,
            cf_tokens=cfg.model.cf_tokens,
            use_chat_template=cfg.model.use_chat_template,
            max_title_chars=cfg.model.max_title_chars,
        )
        self.yes_id, self.no_id = builder.yes_id, builder.no_id

        # Adapters in gate order; their contents are kept for merging mixtures.
        self.names = list(artifacts.adapter_names)
        self.paths = {n: os.path.join(artifacts.adapters_dir, n) for n in self.names}
        self.adapters: dict[str, LoraAdapter] = {n: load_adapter(p) for n, p in self.paths.items()}
        self.lora_ids = {n: i + 1 for i, n in enumerate(self.names)}

        # CF tokens: the projector, the CF table and the embedding matrix (CPU).
        self.use_embeds = bool(cfg.model.cf_tokens and artifacts.projector and artifacts.cf_embeddings)
        self.cf: CFTable | None = None
        self.projector: CFProjector | None = None
        self.embedder: _Embedder | None = None
        if self.use_embeds:
            for name, a in self.adapters.items():
                targets = set(a.config.get("target_modules") or [])
                if targets & {"embed_tokens", "wte", "word_embeddings", "lm_head"}:
                    raise ValueError(
                        f"adapter {name} trains {sorted(targets)}: prompt embeddings bypass an adapted "
                        "embedding layer, so CF-token models need adapters on attention/MLP layers only"
                    )
            assert artifacts.projector and artifacts.cf_embeddings
            self.cf = CFTable.load(artifacts.cf_embeddings)
            self.projector = CFProjector.load(artifacts.projector).eval()
            self.embedder = load_input_embeddings(
                artifacts.base_model, self.dtype, cfg.model.trust_remote_code
            )

        # Pre-merged mixtures: key (grid units over [global, expert-0, ...]) -> adapter name.
        self.mix_dir = tempfile.mkdtemp(prefix="thinkrec-mixtures-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.mix_dir, True)
        self.mixtures: dict[tuple[int, ...], str] = {}
        self.mixture_report = MixtureReport()
        self.fusion = load_fusion(artifacts.fusion, cfg.fusion) if artifacts.fusion else None
        if (
            self.fusion
            and self.cf is None
            and artifacts.cf_embeddings
            and os.path.exists(artifacts.cf_embeddings)
        ):
            self.cf = CFTable.load(artifacts.cf_embeddings)
        self._seed_mixtures()

        max_rank = sum(int(a.config["r"]) for a in self.adapters.values())  # the widest mixture
        kw: dict[str, Any] = dict(
            model=artifacts.base_model,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.seed,
            enable_lora=True,
            max_lora_rank=lora_rank_bound(max_rank),
            max_loras=cfg.score.vllm_max_loras or len(self.names) + self.max_mixtures,
            max_cpu_loras=len(self.names) + self.max_mixtures,
            enable_prompt_embeds=self.use_embeds,
            enable_prefix_caching=True,
            logprobs_mode="raw_logits",  # the returned values are the raw logits (see module doc)
            enforce_eager=cfg.score.vllm_enforce_eager,
            gpu_memory_utilization=cfg.score.vllm_gpu_memory_utilization,
        )
        if cfg.score.vllm_max_model_len:
            kw["max_model_len"] = cfg.score.vllm_max_model_len
        if cfg.score.vllm_block_size:
            kw["block_size"] = cfg.score.vllm_block_size
        if cfg.score.vllm_kv_cache_gib:
            kw["kv_cache_memory_bytes"] = int(cfg.score.vllm_kv_cache_gib * 2**30)
        kw.update(engine_kwargs or {})
        from vllm import LLM, SamplingParams

        self.llm = LLM(**kw)
        self.params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=[self.yes_id, self.no_id], detokenize=False
        )
        # Prompt tokens vLLM reports as served from its prefix cache in the last call (num_cached_tokens).
        self.last_cached_tokens = 0
        # The No logits of the last call (p_yes reads the Yes logit alone; the checks compare these).
        self.last_no_logits = np.zeros(0, np.float32)

    # -- adapters --------------------------------------------------------------------------------
    def _seed_mixtures(self) -> None:
        """Merge the most frequent mixtures over all users of the CF table up front, so that a
        streamed candidate table does not let its first batches decide which mixtures exist."""
        if not self.fusion or self.cf is None or self.cfg.fusion.mode != "thinkrec":
            return
        if len(self.fusion.get("experts", [])) != len(self.names) - 1:
            raise ValueError(
                f"fusion.json names experts {self.fusion.get('experts')} but the adapters are {self.names}"
            )
        g, _ = fusion_gate(self.cf.user[1:], self.fusion, self.cfg.fusion.mode)  # (U, 1+N)
        W = [w for w in g if self._single(w) is None]
        if W:
            report = self._assign(np.stack(W))[1]
            log.info("vllm scorer: %d mixtures merged from %d mixture users", len(self.mixtures), report.rows)

    def _single(self, w: np.ndarray) -> str | None:
        """The adapter a gate selects alone, or None for a mixture."""
        nz = np.flatnonzero(w > _ONE_HOT_TOL)
        if len(nz) == 1 and abs(float(w[nz[0]]) - 1) < 1e-6:
            return self.names[int(nz[0])]
        return None

    def _assign(self, W: np.ndarray) -> tuple[list[str], MixtureReport]:
        """Mixture weights (R, 1+N) -> an adapter name per row, merging newly kept mixtures."""
        singles: dict[int, str] = {}
        rest: list[int] = []
        for i, w in enumerate(W):
            units = quantise(w, self.step)
            if sum(1 for u in units if u) == 1:  # the grid point is a single adapter: no merge
                singles[i] = self.names[int(np.argmax(units))]
            else:
                rest.append(i)
        report = MixtureReport()
        for i in singles:  # still report their weight error
            served = (np.arange(W.shape[1]) == self.names.index(singles[i])).astype(np.float64)
            err = float(np.abs(W[i] - served).max())
            report.rows += 1
            report.max_abs_err = max(report.max_abs_err, err)
            report.sum_abs_err += err
        names = [singles.get(i, "") for i in range(len(W))]
        if rest:
            plan = plan_mixtures(W[rest], self.step, self.max_mixtures, kept=list(self.mixtures))
            for key in plan.kept:
                if key not in self.mixtures:
                    self._merge(key)
            for i, key in zip(rest, plan.assigned, strict=True):
                names[i] = self.mixtures[key]
            report.add(plan.report)
        report.mixtures = len(self.mixtures)
        return names, report

    def _merge(self, key: tuple[int, ...]) -> None:
        name = "mix-" + "-".join(str(u) for u in key)
        w = [u * self.step for u in key]
        merged = merge_exact([self.adapters[n] for n in self.names], w)
        path = os.path.join(self.mix_dir, name)
        save_adapter(path, merged)
        self.paths[name] = path
        self.lora_ids[name] = len(self.lora_ids) + 1
        self.mixtures[key] = name

    def _lora(self, name: str) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, self.lora_ids[name], self.paths[name])

    # -- prompts ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _embeds(self, batch: Batch, summary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(T, H) input embeddings of a one-prompt batch with the CF slots filled (``summary``: the
        prefix's history summary, for a candidate embedded apart from it)."""
        assert self.embedder is not None
        return input_embeddings(self.embedder, batch, self.cf, self.projector, summary)[0]

    def _prompts(self, rows: Sequence[ScoreRow]) -> list[dict[str, Any]]:
        prefixes: dict[tuple[int, tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, Any]] = {}
        out: list[dict[str, Any]] = []
        for r in rows:
            full = r.prefix + r.candidate
            if not (self.use_embeds and full.cf_pos):
                out.append({"prompt_token_ids": list(full.ids)})
                continue
            # The prefix's embeddings are computed once per user: slot overwrites are position-wise,
            # so embed(prefix + candidate) == cat(embed(prefix), embed(candidate)).
            # The candidate's item slot may carry the prefix's history summary (CFProjector).
            parts: list[torch.Tensor] = []
            summary = None
            if r.prefix.ids:
                pk = (r.user_id, tuple(r.prefix.ids), tuple(r.prefix.cf_id))
                if pk not in prefixes:
                    pb = collate([r.prefix], pad_id=0)
                    prefixes[pk] = (self._embeds(pb), prefix_summary(pb, self.cf, self.projector))
                emb, summary = prefixes[pk]  # (T_prefix, H)
                parts.append(emb)
            if r.candidate.ids:
                parts.append(self._embeds(collate([r.candidate], pad_id=0), summary))  # (T_candidate, H)
            out.append({"prompt_embeds": torch.cat(parts, 0)})  # (T, H)
        return out

    # -- scoring ---------------------------------------------------------------------------------
    def adapters_for(self, rows: Sequence[ScoreRow]) -> list[str]:
        """The adapter each row is served with (merging any newly kept mixture)."""
        names: list[str] = [""] * len(rows)
        mix_rows: list[int] = []
        for i, r in enumerate(rows):
            g = np.asarray(r.gate, dtype=np.float64)
            if g.shape != (len(self.names),):
                raise ValueError(
                    f"row (user {r.user_id}, item {r.item_id}): gate has shape {g.shape}, expected "
                    f"({len(self.names)},) over {self.names}"
                )
            single = self._single(g)
            if single is None:
                mix_rows.append(i)
            else:
                names[i] = single
        if mix_rows:
            mixed, report = self._assign(np.stack([np.asarray(rows[i].gate, np.float64) for i in mix_rows]))
            for i, n in zip(mix_rows, mixed, strict=True):
                names[i] = n
            self.mixture_report.add(report)
        return names

    def score(self, rows: list[ScoreRow]) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        names = self.adapters_for(rows)
        order = sorted(range(len(rows)), key=lambda i: (names[i], rows[i].user_id, i))
        ordered = [rows[i] for i in order]
        prompts = self._prompts(ordered)
        loras = [self._lora(names[i]) for i in order]
        outs = self.llm.generate(prompts, self.params, lora_request=loras, use_tqdm=False)
        yes = np.empty(len(rows), np.float64)
        no = np.empty(len(rows), np.float64)
        cached = 0
        for i, out in zip(order, outs, strict=True):
            values = out.outputs[0].logprobs[0]  # token id -> Logprob; raw logits in this mode
            yes[i] = values[self.yes_id].logprob
            no[i] = values[self.no_id].logprob
            cached += int(out.num_cached_tokens or 0)
        self.last_cached_tokens = cached
        self.last_no_logits = no.astype(np.float32)
        return yes.astype(np.float32), p_yes_of(yes).astype(np.float32)

    def close(self) -> None:
        """Stop the engine and remove the merged mixtures."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
        self._finalizer()
