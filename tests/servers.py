"""Helpers for tests that start real servers on 127.0.0.1 (S3 servers, Ray clusters, vLLM)."""

from __future__ import annotations

import socket
import subprocess
import time

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 that this process has not handed out before: the kernel may give two
    calls the same ephemeral port once the first is closed, and a Ray node whose components got one
    port twice refuses to start (seen: client server and metrics export on one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Until something accepts connections on 127.0.0.1:port; fails early if ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no server on 127.0.0.1:{port} after {timeout}s")


def aws_env(endpoint: str, key: str, secret: str) -> dict[str, str]:
    """The AWS chain's environment for an S3-compatible server: credentials only ever travel here."""
    return {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        # s3rver does not understand the flexible-checksum trailers newer SDKs send by default.
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }
