"""``thinkrec bench generation``: generated tokens/s of the tiny model, side by side in one run, for
the ``hf`` backend, vLLM's offline engine and ``openai`` against a ``vllm serve`` on 127.0.0.1, at
batch 1 (rows one after another; for openai one request in flight) and batch 32.

Greedy decoding, 32 new tokens at most (a random model may stop early at EOS: the rate counts the
tokens each backend really generated). Each backend's best of ``repeats`` rounds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from thinkrec import config as C
from thinkrec.generation.base import Decoding, GenRequest

DEC = Decoding(max_new_tokens=32)


def _prompts(n: int) -> list[GenRequest]:
    return [
        GenRequest(str(i), f"User {i} liked films number {i % 5} and {i % 7}. They would next watch")
        for i in range(n)
    ]


def _rate(gen: Any, batch: int, n_rows: int, repeats: int) -> float:
    """Best tokens/s over ``repeats`` rounds of ``n_rows`` rows in calls of ``batch`` rows."""
    reqs = _prompts(n_rows)
    best = 0.0
    for _ in range(repeats):
        t0, toks = time.perf_counter(), 0
        for s in range(0, n_rows, batch):
            toks += sum(r.new_tokens for r in gen.generate(reqs[s : s + batch], DEC))
        best = max(best, toks / (time.perf_counter() - t0))
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: str, port: int, log: Any) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
         "--port", str(port), "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512",
         "--enforce-eager", "--max-num-seqs", "32"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("vllm serve not ready after 900 s")


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from thinkrec.generation.hf import HFGenerator
    from thinkrec.generation.openai import OpenAIGenerator
    from thinkrec.model.base import build_tiny_model

    torch.set_num_threads(1)
    repeats = 1 if quick else 2
    n1 = 4 if quick else 8  # rows at batch 1
    n32 = 32
    out: dict[str, Any] = {"hardware": "2-core x86_64 CPU, no GPU", "max_new_tokens": DEC.max_new_tokens}
    with tempfile.TemporaryDirectory(prefix="thinkrec-genbench-") as tmp:
        base = build_tiny_model(os.path.join(tmp, "base"), C.Config().model.tiny)
        rates: dict[str, dict[str, float]] = {}
        cfg = C.load(None, {"model.base": base, "generation.batch_size": 32, "generation.torch_threads": 1})
        hf = HFGenerator(cfg)
        rates["hf"] = {"1": _rate(hf, 1, n1, repeats), "32": _rate(hf, 32, n32, repeats)}
        del hf

        # vLLM offline in this process (no engine subprocess), freed before the server starts.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from thinkrec.generation.vllm import VLLMGenerator

        vcfg = cfg.replace(**{"score.vllm_max_model_len": 512, "score.vllm_enforce_eager": True})
        vg = VLLMGenerator(vcfg)
        rates["vllm"] = {"1": _rate(vg, 1, n1, repeats), "32": _rate(vg, 32, n32, repeats)}
        del vg
        import gc

        gc.collect()

        port = _free_port()
        with open(os.path.join(tmp, "serve.log"), "ab") as log:
            proc = _serve(base, port, log)
            try:
                ocfg = cfg.replace(
                    **{"generation.backend": "openai", "generation.base_url": f"http://127.0.0.1:{port}/v1",
                       "generation.model": "tiny", "generation.concurrency": 32}
                )  # fmt: skip
                og = OpenAIGenerator(ocfg)
                rates["openai"] = {"1": _rate(og, 1, n1, repeats), "32": _rate(og, 32, n32, repeats)}
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
    out["tokens_per_s"] = rates
    out["vs_hf"] = {b: {k: v / rates["hf"][k] for k, v in r.items()} for b, r in rates.items()}
    print("generated tokens/s (tiny model, 2-core CPU):")
    print(f"{'backend':<8} {'batch 1':>10} {'batch 32':>10} {'x hf @1':>8} {'x hf @32':>9}")
    for b, r in rates.items():
        print(
            f"{b:<8} {r['1']:>10.1f} {r['32']:>10.1f} {out['vs_hf'][b]['1']:>8.2f} {out['vs_hf'][b]['32']:>9.2f}"
        )
    return out
