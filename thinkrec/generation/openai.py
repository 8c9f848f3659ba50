"""The ``openai`` generation backend: any OpenAI-compatible HTTP server (vLLM, TGI, SGLang, a vendor).

- Text prompts go to ``POST {base_url}/completions`` (the prompts are already rendered by the one
  prompt builder, chat template included, so the completions API keeps train/serve prompts equal).
- The API key is read from the environment variable ``generation.api_key_env`` names, once, in the
  actor; it is only ever placed in the Authorization header (never logged, never in a repr).
- At most ``generation.concurrency`` requests are in flight per actor (an asyncio semaphore over one
  pooled httpx client); each has ``generation.timeout_s``.
- Retries (tenacity): 429, 5xx, timeouts and connection errors (refused, reset, closed mid-response)
  are retried with exponential backoff and random jitter, up to ``generation.max_tries`` tries.
  Other 4xx and malformed bodies are not retried: they will not get better.
- A row that still fails comes back as ``GenResult(error=...)`` with the reason; the caller quarantines
  it. One row's failure never fails the batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from thinkrec.generation.base import Decoding, GenRequest, GenResult

log = logging.getLogger(__name__)


class MalformedResponse(ValueError):
    """A 2xx answer without the expected ``choices[0].text`` (a string)."""


class RetryableStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"http_{status}: {body[:200]}")
        self.status = status


class FatalStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"http_{status}: {body[:200]}")
        self.status = status


def _retryable(exc: BaseException) -> bool:
    # httpx.TransportError covers connect/read/write timeouts, refused and reset connections and a
    # server that closes the socket mid-response (RemoteProtocolError).
    return isinstance(exc, RetryableStatus | httpx.TransportError)


def reason(exc: BaseException) -> str:
    """A short quarantine reason: the error kind first (``http_500``, ``timeout``, ``connection``...)."""
    if isinstance(exc, RetryableStatus | FatalStatus):
        return str(exc)
    if isinstance(exc, MalformedResponse):
        return f"malformed_response: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout: {type(exc).__name__}"
    if isinstance(exc, httpx.TransportError):
        return f"connection: {type(exc).__name__}: {exc}"[:300]
    return f"error: {type(exc).__name__}: {exc}"[:300]


def parse_completion(body: Any) -> tuple[str, int]:
    """(text, completion tokens) from a completions response body; MalformedResponse otherwise."""
    if not isinstance(body, dict):
        raise MalformedResponse(f"body is {type(body).__name__}, not an object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("no choices[0]")
    text = choices[0].get("text")
    if not isinstance(text, str):
        raise MalformedResponse("choices[0].text is not a string")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    n = usage.get("completion_tokens", 0)
    return text, int(n) if isinstance(n, int) else 0


class OpenAIGenerator:
    """``Generator`` over an OpenAI-compatible completions endpoint."""

    name = "openai"

    def __init__(self, cfg: Any) -> None:
        g = cfg.generation
        self.model = g.model or cfg.model.base
        self.url = g.base_url.rstrip("/") + "/completions"
        self.concurrency = int(g.concurrency)
        self.timeout = float(g.timeout_s)
        self.max_tries = int(g.max_tries)
        self.backoff = (float(g.backoff_initial_s), float(g.backoff_max_s))
        key = os.environ.get(g.api_key_env, "")
        if not key:
            log.info("generation: %s is not set; requests carry no Authorization header", g.api_key_env)
        # Kept out of attributes a repr or a pickle would show: only the headers dict holds it.
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.stats = {"requests": 0, "retries": 0, "failed_rows": 0}

    def __repr__(self) -> str:
        return f"OpenAIGenerator(url={self.url!r}, model={self.model!r})"

    def body(self, prompt: str, d: Decoding) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": d.max_new_tokens,
            "temperature": d.temperature,
            "top_p": d.top_p,
            "seed": d.seed,
        }
        # Not in the OpenAI API; vLLM and most servers accept it. Sent only when it changes anything.
        if d.repetition_penalty != 1.0:
            out["repetition_penalty"] = d.repetition_penalty
        return out

    def generate(self, requests: list[GenRequest], decoding: Decoding) -> list[GenResult]:
        for r in requests:
            if r.encoded is not None or (r.gate is not None and r.adapter not in ("base", "global")):
                raise ValueError(
                    f"row {r.key}: the openai backend takes text prompts for the served model only "
                    "(CF tokens and per-row experts need generation.backend=hf or vllm)"
                )
        return asyncio.run(self._run(requests, decoding))

    async def _run(self, requests: list[GenRequest], decoding: Decoding) -> list[GenResult]:
        sem = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout), limits=limits, headers=self._headers
        ) as client:
            return list(await asyncio.gather(*(self._one(client, sem, r, decoding) for r in requests)))

    async def _one(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, req: GenRequest, d: Decoding
    ) -> GenResult:
        tries = 0

        async def attempt() -> tuple[str, int]:
            nonlocal tries
            tries += 1
            self.stats["requests"] += 1
            if tries > 1:
                self.stats["retries"] += 1
            async with sem:
                resp = await client.post(self.url, json=self.body(req.prompt, d))
            if resp.status_code == 429 or resp.status_code >= 500:
                raise RetryableStatus(resp.status_code, resp.text)
            if resp.status_code >= 400:
                raise FatalStatus(resp.status_code, resp.text)
            try:
                body = resp.json()
            except ValueError as e:
                raise MalformedResponse(f"not JSON: {resp.text[:100]!r}") from e
            return parse_completion(body)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_tries),
            # initial * 2^(try - 1) plus up to ``initial`` of random jitter, capped at the max.
            wait=wait_exponential_jitter(
                initial=self.backoff[0], max=self.backoff[1], jitter=self.backoff[0]
            ),
            retry=retry_if_exception(_retryable),
            reraise=False,
        )
        try:
            text, n = await retrying(attempt)
        except RetryError as e:
            exc = e.last_attempt.exception()
            self.stats["failed_rows"] += 1
            assert exc is not None
            return GenResult(req.key, None, f"{reason(exc)} (after {tries} tries)", tries)
        except Exception as e:  # malformed bodies, other 4xx, bad URLs: not retried
            self.stats["failed_rows"] += 1
            return GenResult(req.key, None, reason(e), tries)
        return GenResult(req.key, text, None, tries, n)
