"""The ``vllm`` generation backend: vLLM's offline engine inside the actor.

- Text prompts go to ``LLM.generate`` in one call per batch (vLLM batches and schedules them itself).
- Per-row adapters: a row whose gate is one-hot on adapter k gets ``LoRARequest(name_k, k + 1,
  dir_k)``; vLLM serves several LoRAs in one batch. Mixed gates (a soft mixture of experts) are not
  served by this backend yet: such a row comes back with an error (quarantined), use ``hf``.
- Not yet: encoded prompts with CF embeddings (``enable_prompt_embeds``); such rows are refused
  the same way.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from thinkrec.generation.base import Decoding, GenRequest, GenResult
from thinkrec.scoring.base import Artifacts


class VLLMGenerator:
    name = "vllm"

    def __init__(
        self, cfg: Any, artifacts: Artifacts | None = None, engine_kwargs: dict | None = None
    ) -> None:
        from vllm import LLM

        self.model = artifacts.base_model if artifacts else (cfg.generation.model or cfg.model.base)
        self.adapters: list[tuple[str, str]] = []
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
            self.adapters = [(n, os.path.join(artifacts.adapters_dir, n)) for n in artifacts.adapter_names]
            kw.update(enable_lora=True, max_loras=len(self.adapters), max_lora_rank=64)
        kw.update(engine_kwargs or {})
        self.llm = LLM(**kw)

    def _params(self, d: Decoding) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=d.max_new_tokens,
            temperature=d.temperature,
            top_p=d.top_p if d.temperature > 0 else 1.0,
            repetition_penalty=d.repetition_penalty,
            seed=d.seed,
        )

    def _lora(self, r: GenRequest) -> tuple[Any, str | None]:
        if r.gate is None or not self.adapters:
            return None, None
        g = np.asarray(r.gate, dtype=np.float64)
        k = int(np.argmax(g))
        if len(g) != len(self.adapters) or not np.isclose(g[k], 1.0):
            return None, "vllm_mixture_unsupported: gate is not one-hot on an adapter"
        from vllm.lora.request import LoRARequest

        name, path = self.adapters[k]
        return LoRARequest(name, k + 1, path), None

    def generate(self, requests: list[GenRequest], decoding: Decoding) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(requests)
        prompts, loras, idx = [], [], []
        for n, r in enumerate(requests):
            lora, err = self._lora(r)
            if r.encoded is not None:
                err = "vllm_prompt_embeds_unsupported: encoded prompts need generation.backend=hf"
            if err:
                out[n] = GenResult(r.key, None, err)
                continue
            prompts.append(r.prompt)
            loras.append(lora)
            idx.append(n)
        if prompts:
            lora_arg = loras if any(x is not None for x in loras) else None
            res = self.llm.generate(prompts, self._params(decoding), lora_request=lora_arg, use_tqdm=False)
            for n, o in zip(idx, res, strict=True):
                c = o.outputs[0]
                out[n] = GenResult(requests[n].key, c.text, None, 1, len(c.token_ids))
        return [o for o in out if o is not None]
