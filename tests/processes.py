"""The processes a run started, found by a marker in their environment: Ray's raylet passes its
driver's environment down to every worker it starts, and subprocesses inherit it. Never a global scan
of Ray processes, which on a shared machine would see other users' clusters."""

from __future__ import annotations

import os
import time

import psutil


def marked(var: str, mark: str) -> list[psutil.Process]:
    """Live processes other than this one whose environment has ``var=mark`` (only this user's are
    readable)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(var) == mark and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def describe(procs: list[psutil.Process]) -> str:
    rows = []
    for p in procs:
        try:
            rss = p.memory_info().rss >> 20
            rows.append(f"pid {p.pid} ppid {p.ppid()} {rss} MB {' '.join(p.cmdline())[:100]} (cwd {p.cwd()})")
        except psutil.Error:
            continue
    return "\n".join(rows)


def survivors(var: str, mark: str, timeout: float = 30.0) -> list[psutil.Process]:
    """The marked processes still alive after ``timeout`` s (Ray's workers exit a moment after it)."""
    deadline = time.monotonic() + timeout
    while (procs := marked(var, mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return procs
