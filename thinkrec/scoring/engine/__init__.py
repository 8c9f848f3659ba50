"""The scoring engine: a batch of prompt rows in, a Yes logit per row out. ``hf.py`` and ``vllm.py``
are the two backends behind ``thinkrec.scoring.base.Scorer``; the rest are the hf backend's pieces
(prefix-shared KV cache, the packed block mask, per-row fused LoRA and projections, the answer-rows
shortcut) and ``merge.py``, the adapter merge for backends that take one adapter per request."""
