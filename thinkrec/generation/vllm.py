"""The ``vllm`` generation backend: vLLM's offline engine inside the actor.

- All prompts of a batch go to one ``LLM.generate`` call (vLLM batches and schedules them itself):
  text prompts as text, encoded prompts as token ids, or as ``prompt_embeds`` when they have CF slots.
- Per-row adapters: vLLM applies one LoRA per request. A row whose gate is one-hot on adapter k gets
  that adapter's ``LoRARequest``. A row whose gate mixes adapters gets the exact fused adapter of that
  gate: the weighted sum of LoRA deltas sum_k w_k s_k B_k A_k is one LoRA of rank sum(r_k) (the A's
  stacked, the B's scaled by w_k s_k and concatenated; ``scoring/engine/merge.py``), so it computes the same
  mixture as the hf backend's fused gates, unquantised. Each distinct gate is merged once, saved under
  a local temporary directory and kept by a hash of its weights, with its own ``LoRARequest``.
- CF tokens: the token embeddings with the projected CF embeddings in the CF slots are computed on the
  CPU (``input_embeddings``, from the base model's input-embedding matrix only: the same function the
  hf backend and the trainer use) and sent as ``prompt_embeds`` (the engine then runs with
  ``enable_prompt_embeds``; vLLM takes prompt embeddings and LoRA together).
- Not served: ``fusion.mode=linear`` (peft's inexact linear merge; use ``hf``) and beam search
  (``num_beams`` is ignored: vLLM decodes greedily or samples). ``no_repeat_ngram_size`` has no vLLM
  equivalent and is ignored; both stay in the decoding hash.

vLLM starts worker processes: a script that builds this generator must do so under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import tempfile
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from thinkrec.generation.base import Decoding, GenRequest, GenResult
from thinkrec.model.prompt import Encoded
from thinkrec.model.thinkrec import CFProjector, CFTable, collate, input_embeddings, p_yes_of
from thinkrec.scoring.base import Artifacts
from thinkrec.scoring.engine.merge import LoraAdapter, load_adapter, merge_exact, save_adapter
from thinkrec.scoring.engine.vllm import load_input_embeddings, lora_rank_bound

_ONE_HOT_TOL = 1e-9


def gate_hash(gate: np.ndarray) -> str:
    """Key of a merged mixture: its weights to 1e-9 (a merge is exact for the weights it was made of)."""
    return hashlib.sha256(np.round(np.asarray(gate, np.float64), 9).tobytes()).hexdigest()[:16]


class VLLMGenerator:
    """``Generator`` on vLLM's offline engine. ``engine_kwargs`` are passed to ``vllm.LLM`` last."""

    name = "vllm"

    def __init__(
        self, cfg: Any, artifacts: Artifacts | None = None, engine_kwargs: dict | None = None
    ) -> None:
        from vllm import LLM

        self.model = artifacts.base_model if artifacts else (cfg.generation.model or cfg.model.base)
        self.names: list[str] = []
        self.paths: dict[str, str] = {}
        self.adapters: dict[str, LoraAdapter] = {}
        self.lora_ids: dict[str, int] = {}
        self.mixtures: dict[str, str] = {}  # gate hash -> merged adapter name
        self.cf: CFTable | None = None
        self.projector: CFProjector | None = None
        self.embedder: Any = None
        kw: dict[str, Any] = dict(
            model=self.model,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.seed,
            enforce_eager=cfg.score.vllm_enforce_eager,
            gpu_memory_utilization=cfg.score.vllm_gpu_memory_utilization,
        )
        if cfg.score.vllm_max_model_len:
            kw["max_model_len"] = cfg.score.vllm_max_model_len
        if cfg.score.vllm_kv_cache_gib:
            kw["kv_cache_memory_bytes"] = int(cfg.score.vllm_kv_cache_gib * 2**30)
        if artifacts is not None:
            if cfg.fusion.mode == "linear":
                raise ValueError(
                    "fusion.mode=linear (peft's inexact linear merge) is not served by "
                    "generation.backend=vllm, which serves exact mixtures only; use generation.backend=hf"
                )
            self.names = list(artifacts.adapter_names)
            self.paths = {n: os.path.join(artifacts.adapters_dir, n) for n in self.names}
            self.adapters = {n: load_adapter(p) for n, p in self.paths.items()}
            self.lora_ids = {n: i + 1 for i, n in enumerate(self.names)}
            self.mix_dir = tempfile.mkdtemp(prefix="thinkrec-gen-mixtures-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.mix_dir, True)
            # Every distinct mixture of a batch may be in flight at once, beside the plain adapters.
            slots = len(self.names) + int(cfg.generation.batch_size)
            kw.update(
                enable_lora=True,
                max_lora_rank=lora_rank_bound(sum(int(a.config["r"]) for a in self.adapters.values())),
                max_loras=slots,
                max_cpu_loras=slots,
            )
            if artifacts.projector and artifacts.cf_embeddings:
                self.cf = CFTable.load(artifacts.cf_embeddings)
                self.projector = CFProjector.load(artifacts.projector).eval()
                self.embedder = load_input_embeddings(
                    artifacts.base_model, getattr(torch, cfg.model.dtype), cfg.model.trust_remote_code
                )
                kw["enable_prompt_embeds"] = True
        # Logprobs requested by id come back as raw logits: answer-first explanations draw the answer
        # from the raw Yes logit, as the score reads it (Decoding.first_token_binary).
        kw["logprobs_mode"] = "raw_logits"
        kw.update(engine_kwargs or {})
        self.llm = LLM(**kw)

    def _params(self, d: Decoding, **overrides: Any) -> Any:
        from vllm import SamplingParams

        kw = dict(
            max_tokens=d.max_new_tokens,
            min_tokens=d.min_new_tokens,
            temperature=d.temperature,
            top_p=d.top_p if d.temperature > 0 else 1.0,
            repetition_penalty=d.repetition_penalty,
            seed=d.seed,
        )
        kw |= overrides
        kw["min_tokens"] = min(kw["min_tokens"], kw["max_tokens"])  # vLLM rejects more
        return SamplingParams(**kw)

    # -- adapters --------------------------------------------------------------------------------
    def _lora(self, r: GenRequest) -> Any:
        """The row's LoRARequest (None: the base model); ValueError for a gate of the wrong width."""
        if r.gate is None or not self.names:
            return None
        g = np.asarray(r.gate, dtype=np.float64)
        if g.shape != (len(self.names),):
            raise ValueError(f"gate over {g.shape[0] if g.ndim else 0} adapters; the model has {self.names}")
        nz = np.flatnonzero(np.abs(g) > _ONE_HOT_TOL)
        if len(nz) == 1 and abs(float(g[nz[0]]) - 1.0) < 1e-6:
            name = self.names[int(nz[0])]
        else:
            name = self._mixture(g)
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, self.lora_ids[name], self.paths[name])

    def _mixture(self, g: np.ndarray) -> str:
        """The fused adapter of this gate, merged and saved on first use."""
        h = gate_hash(g)
        if h not in self.mixtures:
            name = f"mix-{h}"
            path = os.path.join(self.mix_dir, name)
            save_adapter(path, merge_exact([self.adapters[n] for n in self.names], g.tolist()))
            self.paths[name] = path
            self.lora_ids[name] = len(self.lora_ids) + 1
            self.mixtures[h] = name
        return self.mixtures[h]

    # -- prompts ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _prompt(self, r: GenRequest) -> Any:
        if r.encoded is None:
            return r.prompt
        if not r.encoded.cf_pos:
            return {"prompt_token_ids": list(r.encoded.ids)}
        if self.embedder is None:
            raise ValueError("the prompt has CF slots but the generator has no projector and CF table")
        batch = collate([r.encoded], pad_id=0)
        return {"prompt_embeds": input_embeddings(self.embedder, batch, self.cf, self.projector)[0]}  # (T, H)

    def generate(self, requests: list[GenRequest], decoding: Decoding) -> list[GenResult]:
        d = decoding
        if not d.first_token_ids:
            return self._generate(requests, self._params(d))
        # vLLM's allowed_token_ids hold for every step: the first token is drawn among them in a
        # one-token pass, then the text goes on after it (and after_first_ids) in a second pass.
        if d.first_token_binary:
            # The first token from the first id's raw logit alone (Decoding.first_token_binary); vLLM
            # cannot read the other id's logit as 0, so the draw is made here.
            params = self._params(d, max_tokens=1, min_tokens=0, temperature=0.0, repetition_penalty=1.0,
                                  logprob_token_ids=[d.first_token_ids[0]])  # fmt: skip
            out = self._generate(requests, params, answer=functools.partial(_binary_answer, d))
        else:
            out = self._generate(requests, self._params(d, max_tokens=1, min_tokens=0,
                                                        allowed_token_ids=list(d.first_token_ids)))  # fmt: skip
        tok = self.llm.get_tokenizer()
        n_lead = 1 + min(len(d.after_first_ids), d.max_new_tokens - 1)
        rows, leads, cont = [], [], []
        for n, (q, r) in enumerate(zip(requests, out, strict=True)):
            if r.error is not None or not r.token_ids:
                continue  # quarantined in the first pass: kept as it is
            lead = r.token_ids + list(d.after_first_ids)[: n_lead - 1]
            # A text prompt as the ids vLLM made of it in the first pass (its special tokens too).
            prompt = q.encoded or Encoded(tok(q.prompt).input_ids)
            rows.append(n)
            leads.append(lead)
            cont.append(dataclasses.replace(q, prompt="", encoded=prompt + Encoded(lead)))
        rest: list[GenResult | None] = [None] * len(cont)
        if cont and d.max_new_tokens > n_lead:
            params = self._params(
                d, max_tokens=d.max_new_tokens - n_lead, min_tokens=max(0, d.min_new_tokens - n_lead)
            )
            rest = list(self._generate(cont, params))
        for n, lead, r in zip(rows, leads, rest, strict=True):
            if r is not None and r.error is not None:
                out[n] = r
                continue
            ids = lead + ((r.token_ids or []) if r is not None else [])
            text = tok.decode(ids, skip_special_tokens=True)
            out[n] = GenResult(requests[n].key, text, None, 1, len(ids), token_ids=ids)
        return out

    def _generate(
        self, requests: list[GenRequest], params: Any, answer: Callable[[str, Any], int] | None = None
    ) -> list[GenResult]:
        """One result per request, in order (a bad request's is its quarantine reason). ``answer``:
        the one new token is ``answer(key, the first position's logprobs by token id)``, not vLLM's."""
        out: list[GenResult | None] = [None] * len(requests)
        prompts, loras, idx = [], [], []
        for n, r in enumerate(requests):
            try:
                lora, prompt = self._lora(r), self._prompt(r)
            except ValueError as e:  # this row is quarantined with the reason; the batch goes on
                out[n] = GenResult(r.key, None, f"bad_request: row {r.key}: {e}")
                continue
            prompts.append(prompt)
            loras.append(lora)
            idx.append(n)
        if prompts:
            lora_arg = loras if any(x is not None for x in loras) else None
            res = self.llm.generate(prompts, params, lora_request=lora_arg, use_tqdm=False)
            for n, o in zip(idx, res, strict=True):
                c = o.outputs[0]
                ids = list(c.token_ids)
                if answer is not None:
                    ids = [answer(requests[n].key, c.logprobs[0])]
                out[n] = GenResult(requests[n].key, c.text, None, 1, len(ids), token_ids=ids)
        return [o for o in out if o is not None]

    def close(self) -> None:
        """Stop the engine and remove the merged mixtures."""
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.llm = None
        if hasattr(self, "_finalizer"):
            self._finalizer()


def _binary_answer(d: Decoding, key: str, values: Any) -> int:
    """Decoding.first_token_binary's draw: the first id with probability sigmoid(logit / T) of its raw
    logit, T = ``Decoding.answer_draw_temperature()``, else the second (T = 0: the first iff logit > 0),
    seeded by the decoding seed and the row's key. ``values``: token id -> Logprob, raw logits in this
    engine's mode; vLLM adds the token it sampled itself, so the first id is looked up."""
    first, second = d.first_token_ids
    logit = float(values[first].logprob)
    t = d.answer_draw_temperature()
    if t <= 0:
        return first if logit > 0 else second
    u = np.random.default_rng([d.seed, zlib.crc32(key.encode())]).random()
    return first if u < p_yes_of(logit / t) else second
