"""Full prompts under ``torch.compile`` take SDPA's causal kernel, not a materialised mask (torch and
transformers only, so the GPU benchmark script uses the scorer's own code).

Full prompts run without an attention mask (hf.py): rows are right-padded and attention is causal,
so a plain causal mask is all they need, and Hugging Face then calls SDPA with ``is_causal=True``
(the flash kernel on a GPU). Under ``torch.compile`` (torch < 2.14) transformers cannot prove that
the position ids are one unpacked sequence per row, so it builds a (B, 1, T, T) causal mask in every
forward and SDPA runs a masked kernel: on an H100 the mask building and the masked kernel cost about
5% of a Llama-3-8B-shaped forward. The scorer never packs sequences, so this attention
implementation ("sdpa" under another name) returns no mask exactly when the mask would be the plain
causal one: no padding mask given, no cache (query and key lengths equal, no offset). Every other
call (the prefix-shared candidate pass with its padding mask and cache) gets transformers' own SDPA
mask.

The same implementation serves packed scoring (packed.py): a FlexAttention ``BlockMask`` passed as the
attention mask goes to transformers' FlexAttention forward, which skips the masked-out blocks, and
everything else to SDPA.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_causal_skip"


def _mask(
    *, q_length: int, kv_length: int, q_offset: Any = 0, attention_mask: Any = None, **kwargs: Any
) -> Any:
    if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0:
        return None  # SDPA's is_causal=True: the same causal mask, never materialised
    return sdpa_mask(
        q_length=q_length, kv_length=kv_length, q_offset=q_offset, attention_mask=attention_mask, **kwargs
    )


def _attention(
    module: nn.Module, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> Any:
    if isinstance(attention_mask, BlockMask):  # packed candidates: only the blocks the mask keeps
        kwargs.pop("is_causal", None)
        # Contiguous copies: with fused projections (fused_proj.py) q, k and v are strided views of
        # one matmul's output, and compiled FlexAttention on CPU (torch 2.13) then read them wrongly
        # (logits off by up to 2 on the tiny model; eager and unfused were exact).
        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
        return flex_attention_forward(module, q, k, v, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _mask)


def install(model: nn.Module) -> bool:
    """Switch a model on SDPA attention to this implementation; any other attention is left as is."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
