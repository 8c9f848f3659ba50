"""GPU scoring benchmark for a Llama-3-8B-shaped model with random bf16 weights (torch + transformers only).

    python bench/gpu_scoring.py            # on a CUDA machine (H100/H200): prints JSON
    python bench/gpu_scoring.py --tiny     # CPU smoke test with a tiny model (what CI runs)
    python bench/gpu_scoring.py --only packed   # the packed variants and prefix sharing alone

Measures, in one run:
- three bf16 GEMM ceilings: ``matmul_tflops`` (8192^3, best single call, a burst at the boost clock),
  ``matmul_tflops_sustained`` (the same GEMM 200 times back to back; each of the two measured before
  and after the full-prompt variants, the higher kept), and ``matmul_tflops_model_shapes`` (the
  model's own fused projection GEMMs of all layers back to back at the full-prompt batch's token
  count); every fraction below is reported at each of them;
- ``full_prompt``: pairs/s scoring 256-token prompts at batch 64 and 128, the better kept (one forward,
  ``use_cache=False``, last position projected onto two vocabulary rows only), and that rate as a
  fraction of the FLOP floor (2 * params * tokens + causal attention FLOPs per pair) at each measured
  GEMM rate. Target >= 0.85 at the sustained rate, the one a GEMM holds for as long as a forward runs
  (a card at its power cap cannot hold the single-call boost rate through a 0.36 s forward).
  ``variants`` measures, at that batch size: no attention mask (the HF scorer's full-prompt call),
  ``torch.compile`` (``--no-compile`` skips it), and the scorer's fused q/k/v and gate/up projections
  (thinkrec/scoring/engine/fused_proj.py), eager and compiled; then, compiled, the last layer's MLP at the
  answer position only (thinkrec/scoring/engine/answer_rows.py; it skips ``flops_skipped_share`` of the FLOPs
  the floor counts), and that with the scorer's attention setup (thinkrec/scoring/engine/causal_attn.py:
  SDPA's causal kernel under compile, no materialised mask); ``best`` is the fastest;
- ``prefix_shared``: pairs/s when each user's 200-token prefix runs once (4 users' prefixes in one
  batch) and its key/value cache serves that user's 100 candidates of 56 tokens each, over the same
  pairs as full 256-token prompts (both as the scorer runs them: fused projections, the
  answer-rows-only last layer, the causal-kernel attention setup). Target >= 3.5;
- ``prefix_packed``: the same users and candidates packed (thinkrec/scoring/engine/packed.py, the HF
  scorer's ``score.prefix_mode="packed"``): each user's prefix once, then its 100 candidates in one
  sequence with a block attention mask (each candidate sees the prefix and itself, positions restart
  at the prefix's end), three ways: an explicit boolean SDPA mask (eager), and FlexAttention's block
  mask (the scorer's ``score.packed_attention=flex``), eager and with the decoder compiled. Its own
  FLOP floor counts the prefix once per user plus each candidate's own tokens (projections at 2 FLOPs
  per parameter per token; attention the prefix's causal square plus each candidate's keys over the
  prefix and itself), at the sustained GEMM rate of this run: ``fraction_of_floor`` of the fastest
  variant, target >= 0.85. The dense masked kernel also computes the masked-out
  candidate-to-candidate scores, which the floor does not count; the block mask skips the key blocks
  they fill (``block_mask_sparsity``);
- ``breakdown``: one call of the best full-prompt variant under ``torch.profiler``, its device time
  split into GEMM, attention and other kernels (norms, rotary embedding, SiLU-gating, residual adds,
  copies), the GEMMs' own rate inside the forward, and the ten longest kernels by name (so a kernel
  the name patterns put in the wrong class shows). ``fraction_of_floor_if_only_gemms`` is the
  fraction of the floor the forward would reach if everything but its GEMMs took no time.

Needs the repository root on PYTHONPATH (or thinkrec installed): the fused projections, the
answer-rows-only last layer, the attention setup and the prefix-shared key/value cache are the HF
scorer's own (thinkrec/scoring/engine/fused_proj.py, answer_rows.py, causal_attn.py, kv_cache.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import time

import torch
from model_shapes import LLAMA3_8B, TINY  # bench/ is the script's directory

# The scorer's own pieces (torch + transformers only); the repository root must be on PYTHONPATH.
from thinkrec.scoring.engine import answer_rows, causal_attn
from thinkrec.scoring.engine.fused_proj import fuse as fuse_projections
from thinkrec.scoring.engine.kv_cache import prefix_cache
from thinkrec.scoring.engine.packed import layout as pack_layout


def llama8b_config(tiny: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**(TINY if tiny else LLAMA3_8B))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, iters: int) -> float:
    """Best seconds per call over ``iters`` calls after one warm-up."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_tflops(device: str, dtype: torch.dtype, n: int, iters: int, reps: int = 1) -> float:
    """bf16 (n x n) @ (n x n) rate: the best of ``iters`` timings of ``reps`` GEMMs back to back."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def gemms() -> None:
        for _ in range(reps):
            torch.matmul(a, b, out=c)

    return 2 * n**3 * reps / timed(gemms, device, iters) / 1e12


# Kernel classes by name: attention first (cutlass memory-efficient attention kernels are "fmha_cutlass...").
# CUDA kernels: flash_fwd / fmha / cudnn sdpa; GEMMs: cuBLAS (gemm, nvjet, xmma), cutlass, Inductor's
# Triton matmul templates (triton_tem_fused_mm...). CPU (the --tiny smoke test): aten ops only, so the
# C++ kernels Inductor generates there are not counted; on CUDA every kernel is.
KERNEL_CLASSES = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|_mm_|_mm$|^aten::(mm|addmm|bmm)$", re.I)),
)


def kernel_breakdown(fn, device: str, gemm_flops: float) -> dict[str, object]:
    """One call of ``fn`` under torch.profiler: device time by kernel class, and the GEMMs' rate given
    the ``gemm_flops`` that call does in its GEMMs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync(device)
    ms: collections.Counter[str] = collections.Counter()
    by_name: collections.Counter[str] = collections.Counter()
    for e in prof.key_averages():
        if cuda and e.device_type != DeviceType.CUDA:
            continue  # host-side ops; their kernels are counted as CUDA events
        if not cuda and not e.key.startswith("aten::"):
            continue
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
        cls = next((c for c, pattern in KERNEL_CLASSES if pattern.search(e.key)), "other")
        ms[cls] += t
        by_name[e.key] += t
    total = sum(ms.values())
    if not total:
        raise RuntimeError(f"the profile holds no {'CUDA kernel' if cuda else 'aten op'} times")
    return {
        "ms": {c: ms[c] for c in ("gemm", "attention", "other")},
        "share": {c: ms[c] / total for c in ("gemm", "attention", "other")},
        "gemm_tflops_in_forward": gemm_flops / (ms["gemm"] / 1e3) / 1e12 if ms["gemm"] else None,
        "top_kernels_ms": [[name[:120], t] for name, t in by_name.most_common(10)],
    }


def model_gemm_tflops(body: torch.nn.Module, m: int, device: str, dtype: torch.dtype, iters: int) -> float:
    """Rate of every 2-D weight's GEMM in ``body``'s layers, run in order on an (m, in) input."""
    weights = [p.detach() for n, p in body.layers.named_parameters() if p.dim() == 2 and "lora" not in n]
    widest = max(w.shape[1] for w in weights)
    x = torch.randn(m, widest, device=device, dtype=dtype)
    outs = {w.shape[0]: torch.empty(m, w.shape[0], device=device, dtype=dtype) for w in weights}

    def gemms() -> None:
        for w in weights:
            torch.matmul(x[:, : w.shape[1]], w.T, out=outs[w.shape[0]])

    return 2 * m * sum(w.numel() for w in weights) / timed(gemms, device, iters) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile'd full-prompt measurement"
    )
    ap.add_argument(
        "--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune-no-cudagraphs"
    )
    ap.add_argument(
        "--only",
        choices=["all", "packed"],
        default="all",
        help="packed: the GEMM ceilings, prefix sharing and the packed variants only (no full-prompt"
        " variants, no profile), with the scorer's setup (fused projections, answer rows, causal kernel)",
    )
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    tiny = args.tiny or not torch.cuda.is_available()
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    iters = args.iters or (2 if tiny else 5)
    # Full prompts are timed at each batch size and the best kept. The prefix-shared path runs the
    # prefixes of ``users`` users in one batch, then their candidates in chunks of ``chunk`` rows, each
    # row attending to its own user's cached prefix (as the HF scorer batches groups).
    batches, prompt_len, prefix_len, cand_len, per_user, users, chunk = (
        ((4, 8), 32, 24, 8, 10, 2, 8) if tiny else ((64, 128), 256, 200, 56, 100, 4, 200)
    )

    torch.manual_seed(0)
    config = llama8b_config(tiny)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    body, head = model.model, model.get_output_embeddings()
    w_yn = head.weight[[1, 2]]  # (2, H): the two answer-token rows stand in for Yes / No
    n_params = sum(p.numel() for n, p in body.named_parameters() if "embed_tokens" not in n) + w_yn.numel()
    L, H = config.num_hidden_layers, config.hidden_size

    # The GEMM ceiling two ways, each measured before and after the full-prompt variants and the
    # higher kept (so a card that warms up cannot flatter the fractions): ``peak`` is one 8192^3 GEMM,
    # ``sustained`` the same GEMM 200 times back to back, about as long as one full-prompt batch runs.
    # A clock that boosts for a 1.5 ms GEMM may not hold for a 400 ms forward under the power cap.
    gemm_n, reps = (256, 4) if tiny else (8192, 200)
    peak_runs = [matmul_tflops(device, dtype, gemm_n, iters)]
    sustained_runs = [matmul_tflops(device, dtype, gemm_n, iters, reps=reps)]

    rows = None  # the answer-rows-only last layer, once installed (answer_rows.AnswerRows)

    def only_at(b: int, at: int):
        """The last layer's MLP at position ``at`` of each of ``b`` rows only, once installed."""
        if rows is None:
            return contextlib.nullcontext()
        return rows.at(torch.full((b,), at, dtype=torch.long, device=device))

    def full_at(b: int, net, masked: bool = True, answer_only: bool = False):
        ids = torch.randint(3, config.vocab_size, (b, prompt_len), device=device)
        # The HF scorer passes no mask for full prompts (right padding is invisible under causal
        # attention), which lets SDPA use its causal flash kernel; ``masked`` is HF's usual call.
        mask = torch.ones_like(ids) if masked else None

        def full() -> torch.Tensor:
            with (
                torch.inference_mode(),
                only_at(b, prompt_len - 1) if answer_only else contextlib.nullcontext(),
            ):
                h = net(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, -1]
                return h @ w_yn.T  # (B, 2)

        return full

    if args.only == "packed":
        batches = batches[:1]  # full prompts only as the speedups' baseline, at one batch size
    rate_at = {b: b / timed(full_at(b, body), device, iters) for b in batches}
    batch = max(rate_at, key=rate_at.get)
    full_rate = rate_at[batch]
    # FLOPs per pair: 2 per parameter per token, plus causal attention (QK^T and AV: 2 * T^2 * H per layer).
    flops_pair = 2 * n_params * prompt_len + 2 * L * prompt_len**2 * H

    calls = {}  # variant name -> its timed call, for the profile of the best one

    def variant(name: str, net, masked: bool, answer_only: bool = False) -> dict[str, object]:
        fn = calls[name] = full_at(batch, net, masked, answer_only)
        t = time.perf_counter()
        fn()  # compiles, for a compiled net
        sync(device)
        first_s = time.perf_counter() - t
        rate = batch / timed(fn, device, iters)
        return {"variant": name, "pairs_per_s": rate, "first_call_s": first_s}

    # Inductor fuses the norms, rotary embedding and SiLU-gating that eager mode runs as separate
    # memory-bound kernels; only the best batch size is compiled (one shape, one compilation).
    compile_ = lambda net: torch.compile(net, dynamic=False, mode=args.compile_mode)  # noqa: E731
    variants = [variant("eager, no mask", body, masked=False)]
    if not args.no_compile and args.only == "all":
        variants.append(variant(f"compiled ({args.compile_mode})", compile_(body), masked=True))
    # The HF scorer's layout: q/k/v and gate/up as one matmul each (thinkrec.scoring.engine.fused_proj),
    # fused in place, so every later measurement (prefix sharing too) runs the fused model.
    fused_groups = fuse_projections(model)
    torch._dynamo.reset()
    variants.append(variant("eager, fused projections, no mask", body, masked=False))
    if not args.no_compile and args.only == "all":
        variants.append(
            variant(f"compiled ({args.compile_mode}), fused projections, no mask", compile_(body), False)
        )
    # The scorer's answer-rows-only last layer, on top of the fused projections (compiled only: eager
    # is slower anyway). It runs fewer FLOPs than the floor counts: the share it skips is reported.
    rows = answer_rows.install(body)
    last_mlp = sum(p.numel() for p in body.layers[-1].mlp.parameters())
    skipped = 2 * last_mlp * (prompt_len - 1) / flops_pair
    if not args.no_compile and args.only == "all":
        torch._dynamo.reset()
        name = f"compiled ({args.compile_mode}), fused projections, answer rows only, no mask"
        variants.append({**variant(name, compile_(body), False, True), "flops_skipped_share": skipped})
        # The scorer's attention setup: under compile, transformers would build a causal mask in every
        # forward; causal_attn lets SDPA take its causal (flash) kernel instead.
        causal_attn.install(model)
        torch._dynamo.reset()
        name = f"compiled ({args.compile_mode}), fused projections, answer rows only, causal kernel, no mask"
        variants.append({**variant(name, compile_(body), False, True), "flops_skipped_share": skipped})
    best = max(variants, key=lambda v: v["pairs_per_s"])
    # The projections' FLOPs in one call of the best variant: every 2-D weight of the layers at every
    # token, less the last layer's MLP at all but the answer position where the variant skips it.
    gemm_flops = 2 * batch * prompt_len * sum(p.numel() for p in body.layers.parameters() if p.dim() == 2)
    gemm_flops -= batch * flops_pair * best.get("flops_skipped_share", 0)
    breakdown: dict[str, object] = {"variant": best["variant"]}
    try:
        if args.only == "all":
            breakdown.update(kernel_breakdown(calls[best["variant"]], device, gemm_flops))
    except Exception as e:  # the profile is an aid: its failure must not cost the run's measurements
        breakdown["error"] = repr(e)
    peak_runs.append(matmul_tflops(device, dtype, gemm_n, iters))
    sustained_runs.append(matmul_tflops(device, dtype, gemm_n, iters, reps=reps))
    ceiling, sustained = max(peak_runs), max(sustained_runs)
    floor_rate = ceiling * 1e12 / flops_pair
    # The model's own projections (fused q/k/v, o, fused gate/up, down of every layer) as bare GEMMs
    # back to back at the full-prompt batch's M: the matmul rate this model's shapes can reach, so
    # the gap to the peak splits into GEMM shape/clock effects and everything else in the forward.
    shape_rate = model_gemm_tflops(body, batch * prompt_len, device, dtype, iters)
    if breakdown.get("gemm_tflops_in_forward"):  # the best variant's pairs/s, had its GEMMs been all it ran
        only_gemms_rate = batch / (breakdown["ms"]["gemm"] / 1e3)
        breakdown["fraction_of_floor_if_only_gemms"] = only_gemms_rate / floor_rate
    for v in variants:
        tflops = v["pairs_per_s"] * flops_pair / 1e12
        v["fraction_of_floor"] = tflops / ceiling
        v["fraction_of_sustained_floor"] = tflops / sustained
        v["fraction_of_model_gemm_floor"] = tflops / shape_rate

    prefixes = torch.randint(3, config.vocab_size, (users, prefix_len), device=device)
    cands = torch.randint(3, config.vocab_size, (users * per_user, cand_len), device=device)
    owner = torch.arange(users, device=device).repeat_interleave(per_user)  # (users * per_user,)
    full_rows = torch.cat([prefixes[owner], cands], dim=1)  # (users * per_user, prefix + cand)

    def shared() -> torch.Tensor:
        with torch.inference_mode():
            with only_at(users, 0):  # only the prefixes' keys/values are read
                cache = body(input_ids=prefixes, use_cache=True).past_key_values
            kv = [(layer.keys, layer.values) for layer in cache.layers]  # each (users, kvh, P, d)
            out = []
            for s in range(0, len(cands), chunk):
                c, who = cands[s : s + chunk], owner[s : s + chunk]
                n = c.shape[0]
                past = prefix_cache(kv, who.tolist(), cand_len)  # the HF scorer's cache
                pos = torch.arange(prefix_len, prefix_len + cand_len, device=device)[None].expand(n, -1)
                m = torch.ones(n, prefix_len + cand_len, dtype=torch.long, device=device)
                with only_at(n, cand_len - 1):
                    h = body(
                        input_ids=c, attention_mask=m, position_ids=pos, past_key_values=past, use_cache=True
                    )
                out.append(h.last_hidden_state[:, -1] @ w_yn.T)
            return torch.cat(out)

    def full_prompts() -> torch.Tensor:
        with torch.inference_mode():
            out = []
            for s in range(0, len(full_rows), batch):
                x = full_rows[s : s + batch]
                with only_at(len(x), x.shape[1] - 1):
                    h = body(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
                out.append(h.last_hidden_state[:, -1] @ w_yn.T)
            return torch.cat(out)

    # Packed: one row per user, its prefix then all its candidates (the scorer's packed layout). The
    # scorer's attention implementation sends a FlexAttention block mask to FlexAttention.
    causal_attn.install(model)
    lay = pack_layout([prefix_len] * users, [[cand_len] * per_user] * users)
    packed_ids = torch.cat([prefixes, cands.view(users, per_user * cand_len)], dim=1)  # (users, T)
    packed_mask = lay.mask().to(device)  # (users, 1, T, T) bool
    packed_pos, packed_answer = lay.positions.to(device), lay.answer.to(device)  # (users, T), (users, n)

    def packed_with(net, mask):
        def packed() -> torch.Tensor:
            with torch.inference_mode(), rows.at(packed_answer) if rows else contextlib.nullcontext():
                h = net(
                    input_ids=packed_ids, attention_mask=mask, position_ids=packed_pos, use_cache=False
                ).last_hidden_state  # (users, T, H)
                h = h[torch.arange(users, device=device)[:, None], packed_answer]  # (users, n, H)
                return (h @ w_yn.T).reshape(-1, 2)

        return packed

    packed = packed_with(body, packed_mask)

    # The shared and packed paths must score what full prompts score (up to bf16 rounding on a GPU).
    a, b, c = shared().float(), full_prompts().float(), packed().float()
    max_diff = (a - b).abs().max().item()
    packed_diff = (c - b).abs().max().item()
    s_shared = timed(shared, device, iters)
    s_full = timed(full_prompts, device, iters)
    s_packed = timed(packed, device, iters)
    pairs = users * per_user
    # The same packs with FlexAttention's block mask (the scorer's score.packed_attention=flex, its
    # default on CUDA): masked-out key blocks are skipped. Eager, then the whole decoder compiled.
    block_mask = lay.block_mask(device)
    packed_variants = [
        {"variant": "dense SDPA mask, eager", "seconds": s_packed, "max_abs_logit_diff_vs_full": packed_diff}
    ]
    flex_nets = [("flex block mask, eager", body)]
    if not args.no_compile:
        torch._dynamo.reset()
        flex_nets.append((f"flex block mask, compiled ({args.compile_mode})", compile_(body)))
    for name, net in flex_nets:
        fn = packed_with(net, block_mask)
        t = time.perf_counter()
        diff = (fn().float() - b).abs().max().item()  # compiles, for a compiled net
        sync(device)
        first_s = time.perf_counter() - t
        packed_variants.append(
            {
                "variant": name,
                "seconds": timed(fn, device, iters),
                "first_call_s": first_s,
                "max_abs_logit_diff_vs_full": diff,
            }
        )
    sustained_runs.append(matmul_tflops(device, dtype, gemm_n, iters, reps=reps))
    sustained = max(sustained_runs)
    cand_attn = 4 * H * cand_len * prefix_len + 2 * H * cand_len**2  # QK^T + AV over prefix + itself
    packed_flops = users * (
        2 * n_params * (prefix_len + per_user * cand_len) + L * (2 * H * prefix_len**2 + per_user * cand_attn)
    )
    packed_floor_s = packed_flops / (sustained * 1e12)
    for v in packed_variants:
        v["pairs_per_s"] = pairs / v["seconds"]
        v["fraction_of_floor"] = packed_floor_s / v["seconds"]
    packed_best = min(packed_variants, key=lambda v: v["seconds"])
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (tiny smoke test)",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "model": {"layers": L, "hidden": H, "params_non_embedding": n_params, "tiny": tiny},
        "matmul_tflops": ceiling,
        "matmul_tflops_runs": peak_runs,
        "matmul_tflops_sustained": sustained,
        "matmul_tflops_sustained_runs": sustained_runs,
        "matmul_tflops_model_shapes": shape_rate,
        "fused_projection_groups": fused_groups,
        "full_prompt": {
            "batch": batch,
            "tokens": prompt_len,
            "pairs_per_s_by_batch": {str(b): r for b, r in rate_at.items()},
            "pairs_per_s": full_rate,
            "floor_pairs_per_s": floor_rate,
            "fraction_of_floor": full_rate / floor_rate,
            "variants": variants,
            "best": best,
            "breakdown": breakdown,
            "target": ">= 0.85 of the FLOP floor at the sustained GEMM rate (best:"
            " fraction_of_sustained_floor; fraction_of_floor is at the single-call boost peak)",
        },
        "prefix_shared": {
            "prefix_tokens": prefix_len,
            "candidate_tokens": cand_len,
            "candidates_per_user": per_user,
            "users": users,
            "candidate_chunk": chunk,
            "pairs_per_s": pairs / s_shared,
            "full_prompt_pairs_per_s": pairs / s_full,
            "speedup": s_full / s_shared,
            "max_abs_logit_diff_vs_full": max_diff,
            "target": ">= 3.5",
        },
        "prefix_packed": {
            "candidates_per_user": per_user,
            "users": users,
            "sequence_tokens": int(packed_ids.shape[1]),
            "block_mask_sparsity": float(block_mask.sparsity()),
            "variants": packed_variants,
            "best": packed_best["variant"],
            "pairs_per_s": packed_best["pairs_per_s"],
            "floor_pairs_per_s": pairs / packed_floor_s,
            "fraction_of_floor": packed_best["fraction_of_floor"],
            "speedup_over_full": s_full / packed_best["seconds"],
            "speedup_over_prefix_shared": s_shared / packed_best["seconds"],
            "max_abs_logit_diff_vs_full": max(v["max_abs_logit_diff_vs_full"] for v in packed_variants),
            "target": ">= 0.85 of its own FLOP floor at the sustained GEMM rate (best variant)",
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
