"""The scorer actor's prompt process: a child process that reads staged shards and builds their
prompts while the actor's model scores, up to ``AHEAD`` slices ahead.

Why a process and not a thread: the tiny models' forward is Python-heavy, and prompt building is all
Python, so a prompt thread took the GIL from the forward (7-10% of the scorer's time on a 2-core
CPU) and the shard's first slice, its read and its lookups ran in series with the scorer. The child
process holds its own tokenizer, CF users and fusion; the actor tells it the next shard as soon as
the driver does, so the next shard's read, lookups and first slice are built while the current one
is scored. It imports neither torch nor transformers (the tokenizer is ``tokenizers``' own, the gates
numpy): it starts beside the model's load on the same cores, has its set-up done 2.3 s after it
starts instead of 3.7 s (traced at 60,000 pairs on 2 cores), and holds about 90 MB before its first
shard instead of 270 MB.

Protocol (the child's stdin and stdout, nothing else): one JSON line of setup, then one JSON line per
shard (``{"shard": s}``). Frames of ``kind (1 byte) + length (8 bytes) + payload`` come back: first
``I``, the tokenizer's answer and placeholder ids (JSON), so the scorer loads no tokenizer of its
own; then for each shard, in order, ``T`` one prompt slice as an Arrow IPC stream and ``E`` the
shard's end (JSON: its staged row count); ``X`` an error (its traceback), in the set-up or a shard.
The child runs up to ``AHEAD`` slices ahead of the actor: a writer thread sends the frames while the
main thread builds the next ones, and blocks once ``AHEAD`` are waiting. With the pipe alone as the
back-pressure it ran one slice ahead, so the next shard's read and lookups overlapped only the
current shard's last slice; where they take longer (an ``s3://`` root, large shards) the scorer
waited at every shard's start. On local files they are short: at 60,000 pairs the scorer waited
0.03 s per later shard with either bound. The child exits when its stdin closes (the actor ended,
or was killed), and writes its logs to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import pyarrow as pa

from thinkrec.scoring.base import Artifacts
from thinkrec.scoring.candidates import read_staged, shard_column

IDS, SLICE, END, ERROR = b"I", b"T", b"E", b"X"
_HEADER = struct.Struct("<cQ")
AHEAD = 8  # frames built and not yet read; with 1,024-row slices, a few MB of prompts


def user_chunks(table: pa.Table, key: str, rows: int) -> Iterator[pa.Table]:
    """Slices of a table sorted by ``key`` of about ``rows`` rows, cut only where the key changes,
    so each user's candidates stay in one scorer call (one prefix pass)."""
    n = table.num_rows
    if n == 0:
        return
    k = table.column(key).to_numpy(zero_copy_only=False)
    change = np.flatnonzero(k[1:] != k[:-1]) + 1  # first row of each user but the first
    start = 0
    while start < n:
        cut = np.searchsorted(change, start + rows)
        end = int(change[cut]) if cut < len(change) else n
        end = max(end, min(n, start + 1))
        yield table.slice(start, end - start)
        start = end


def _read_exact(f: IO[bytes], n: int) -> bytes:
    buf = f.read(n)
    if buf is None or len(buf) < n:
        raise EOFError("prompt process: stream ended")
    return buf


def _read_frame(f: IO[bytes]) -> tuple[bytes, bytes]:
    kind, n = _HEADER.unpack(_read_exact(f, _HEADER.size))
    return kind, _read_exact(f, n)


def _write_frame(f: IO[bytes], kind: bytes, payload: bytes | pa.Buffer) -> None:
    f.write(_HEADER.pack(kind, len(payload)))
    f.write(payload)
    f.flush()


class _Sender:
    """Frames to the actor from a writer thread, at most ``AHEAD`` waiting: the builder blocks only
    when it is that far ahead. ``put`` raises BrokenPipeError once the actor has gone."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.q: queue.Queue[tuple[bytes, bytes | pa.Buffer] | None] = queue.Queue(AHEAD)
        self.broken = False
        self.thread = threading.Thread(target=self._run, name="prompt-frames", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            try:
                _write_frame(self.out, *item)
            except (BrokenPipeError, ValueError):  # the actor closed its end
                self.broken = True
                while self.q.get() is not None:  # unblock the builder until it stops
                    pass
                return

    def put(self, kind: bytes, payload: bytes | pa.Buffer) -> None:
        if self.broken:
            raise BrokenPipeError("prompt process: the actor closed the stream")
        self.q.put((kind, payload))

    def close(self) -> None:
        """Send what is queued, then stop."""
        self.q.put(None)
        self.thread.join()


def _ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


class PromptProcess:
    """The actor's side: starts the child, tells it shards, reads their prompt slices."""

    def __init__(self, cfg: dict[str, Any], artifacts: Artifacts, out: str, mode: str) -> None:
        self._setup = {"cfg": cfg, "artifacts": dataclasses.asdict(artifacts), "out": out, "mode": mode}
        self._proc: subprocess.Popen[bytes] | None = None
        self._sent: list[int] = []  # shards told to the child whose slices are not all read yet
        self._ids: dict[str, int] | None = None
        self.staged = 0  # the last shard's staged row count, once its slices are all read
        self.start()

    def answer_ids(self) -> tuple[int, int, int]:
        """(Yes, No, CF placeholder) token ids, from the child's tokenizer (waits for its set-up)."""
        if self._ids is None:
            assert self._proc is not None and self._proc.stdout is not None
            kind, payload = _read_frame(self._proc.stdout)
            if kind != IDS:
                raise RuntimeError(f"prompt process set-up:\n{payload.decode()}")
            self._ids = json.loads(payload)
        return self._ids["yes"], self._ids["no"], self._ids["placeholder"]

    def start(self) -> None:
        """A fresh child (its CPU mask: this process's, so a pinned actor's prompts stay on its cores)."""
        self.stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "thinkrec.scoring.prompt_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._sent = []
        self._send(self._setup)

    def stop(self) -> None:
        p, self._proc = self._proc, None
        if p is not None:
            p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()

    def _send(self, msg: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(msg) + "\n").encode())
        self._proc.stdin.flush()

    def prefetch(self, shard: int) -> None:
        """Tell the child ``shard`` now: it starts on it as soon as the shards before it are built."""
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        self._send({"shard": shard})
        self._sent.append(shard)

    def slices(self, shard: int) -> Iterator[pa.Table]:
        """``shard``'s prompt slices, in order (the child is told ``shard`` now, if it was not named
        in advance). A stream left unfinished (the consumer failed) is unusable: the next call
        starts a fresh child."""
        dead = self._proc is None or self._proc.poll() is not None
        if dead or self._sent[:1] not in ([], [shard]):  # told another shard first (a retry)
            self.start()
        if not self._sent:
            self.prefetch(shard)
        return self._read(shard)

    def _read(self, shard: int) -> Iterator[pa.Table]:
        assert self._proc is not None and self._proc.stdout is not None
        f, done = self._proc.stdout, False
        try:
            while True:
                kind, payload = _read_frame(f)
                if kind == IDS:  # a restarted child's set-up; the ids do not change
                    continue
                if kind == SLICE:
                    yield pa.ipc.open_stream(payload).read_all()
                elif kind == END:
                    self._sent.pop(0)
                    self.staged = json.loads(payload)["staged"]
                    done = True
                    return
                else:
                    raise RuntimeError(f"prompt process, shard {shard}:\n{payload.decode()}")
        finally:
            if not done:
                self.start()


def _serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """The child: setup, then each shard's prompt slices, until stdin closes."""
    from thinkrec.io.fs import Storage
    from thinkrec.scoring.candidates import out_storage
    from thinkrec.scoring.prompts import PromptStep

    setup = json.loads(inp.readline())
    art = setup["artifacts"]
    artifacts = Artifacts(**{**art, "adapter_names": tuple(art["adapter_names"])})
    try:
        step = PromptStep(setup["cfg"], artifacts=artifacts)
    except Exception:
        _write_frame(out, ERROR, traceback.format_exc().encode())
        return
    pb = step.pb
    ids = {"yes": pb.yes_id, "no": pb.no_id, "placeholder": pb.placeholder_id}
    _write_frame(out, IDS, json.dumps(ids).encode())
    ost = out_storage(Storage.from_config(step.cfg), setup["out"])
    mode, block = setup["mode"], step.cfg.score.block_rows
    send = _Sender(out)
    try:
        for line in inp:
            shard = json.loads(line)["shard"]
            try:
                table = read_staged(ost, shard, mode)
                if table.num_rows:
                    lk = step.lookups(table)
                    for chunk in user_chunks(table, shard_column(mode), block):
                        send.put(SLICE, _ipc(step(chunk, lk)))
                send.put(END, json.dumps({"staged": table.num_rows}).encode())
            except BrokenPipeError:
                return
            except Exception:
                send.put(ERROR, traceback.format_exc().encode())
    finally:
        send.close()


def main() -> None:
    # Frames go to the original stdout; anything printed (logs, warnings) goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        _serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
