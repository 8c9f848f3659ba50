"""LoRA training throughput and MFU for a Llama-3-8B-shaped model (random weights), torch + transformers
+ peft only (no Ray): the single-GPU number behind the train stage's GPU configs.

    python bench/gpu_training.py                  # H100/H200: bf16, LoRA r=8 on q/v, 8 x 512 tokens
    python bench/gpu_training.py --tiny           # CPU smoke run of the same code path (seconds)

FLOPs are counted as 4 N per token, N = the base model's parameters that do matmuls (every weight
but the input embedding lookup): forward (2N) plus the activation gradients (2N) that backward must
compute to reach the LoRA weights; the frozen base gets no weight gradients, the LoRA's own FLOPs are
negligible (<0.1%) and attention's T^2 term is not counted. MFU = achieved FLOP/s over a dense bf16
matmul ceiling measured in the same process on the same device (not the datasheet peak).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from model_shapes import LLAMA3_8B, TINY  # bench/ is the script's directory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model on CPU in fp32 (smoke test)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; tiny 32)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (memory)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--matmul", type=int, default=None, help="ceiling matmul size (default 8192; tiny 256)")
    args = p.parse_args(argv)
    tiny = args.tiny
    for name, full, small in (
        ("batch", 8, 2),
        ("seq", 512, 32),
        ("steps", 20, 3),
        ("warmup", 3, 1),
        ("matmul", 8192, 256),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, iters: int = 10) -> float:
    """Dense matmul FLOP/s for (n, n) @ (n, n) in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, int]:
    """(peft model, N counted for FLOPs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # random weights, built directly on the device
    finally:
        torch.set_default_dtype(prev)
    n_matmul = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        ),
    )
    return model, n_matmul


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ceiling = matmul_ceiling(device, dtype, args.matmul)
    model, n = build(args, device, dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-3)
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)

    def step() -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = 0.0
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    tokens = args.batch * args.seq * args.steps
    tok_s = tokens / elapsed
    achieved = 4 * n * tok_s
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "model": "tiny-llama" if args.tiny else "llama-3-8b-shape",
        "layers": model.config.num_hidden_layers,
        "params_matmul": n,
        "lora_params": sum(p.numel() for p in trainable),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "tokens_per_s": tok_s,
        "step_s": elapsed / args.steps,
        "flops_per_token": 4 * n,
        "flops_rule": "4N per token: forward 2N + activation gradients 2N (frozen base, LoRA weights only)",
        "achieved_tflops": achieved / 1e12,
        "matmul_ceiling_tflops": ceiling / 1e12,
        "mfu_vs_measured_ceiling": achieved / ceiling,
        "final_loss": loss,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(parse_args(argv))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
