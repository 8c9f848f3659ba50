"""Ray start-up and progress, shared by every job."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

log = logging.getLogger("thinkrec")


def start_local_ray(
    num_cpus: int | None, *, object_store_mb: int | None = None, log_to_driver: bool = False
) -> None:
    """A new local Ray (the demo's, the tests' session, the benchmarks'), without its dashboard and
    with ``LOCAL_RUNTIME_ENV``'s worker setup. address="local" always starts a new Ray: without it
    ray.init joins whatever cluster a `ray start` on this machine left in /tmp/ray, which then
    rejects num_cpus."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        configure_logging=False,
        runtime_env=LOCAL_RUNTIME_ENV,
    )


def init_ray(cfg: Any) -> None:
    """Join the configured cluster, or start a local Ray sized by ``ray.num_cpus``."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address
    if address in (None, "", "local"):
        # A local Ray for the demo and tests. Ray Data's own progress bars show stage progress.
        start_local_ray(cfg.ray.num_cpus, object_store_mb=cfg.ray.object_store_mb, log_to_driver=True)
    else:
        ray.init(address=address)
    ctx = ray.data.DataContext.get_current()
    if address in (None, "", "local"):
        size_local_shuffles(cfg.ray.num_cpus)
    ctx.enable_progress_bars = os.environ.get("THINKREC_PROGRESS", "1") != "0"


def size_local_shuffles(num_cpus: int | None) -> None:
    """Hash shuffles sized for a local Ray of ``num_cpus``; a cluster keeps Ray's default.

    Ray Data hash-partitions a group-by into 200 parts by default, sized for clusters: on a few
    local CPUs each part is a task whose start-up dwarfs its rows (a 3,000-row group-by took 5 s
    with 200 parts, 0.5 s with 4)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.default_hash_shuffle_parallelism = max(2, 2 * int(num_cpus or os.cpu_count() or 1))


def fit(trainer: Any) -> Any:
    """``trainer.fit()`` for Ray Train v2 trainers, releasing the run's controller actor afterwards.

    fit() installs a SIGINT handler whose closure holds the ``TrainController`` actor handle, so
    the controller (~400 MB) stays alive after fit() returns, until the driver exits or the next
    fit() replaces the handler. Restoring the previous handler drops the last reference, and Ray's
    reference counting ends the actor now."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        # ValueError: not the main thread, where fit() installed no handler either.
        if previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, previous)


# Ray Train's placement-group cleaner asks the State API (served by the dashboard) once a second
# whether the training controller is alive; without the dashboard every ask fails and logs a warning,
# hundreds per training run. It can do nothing without that API, so its warnings are noise here.
NO_DASHBOARD_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def setup_local_worker() -> None:
    """Ray worker setup hook for the local Ray, which runs without its dashboard.

    ``RAY_ADDRESS`` names this cluster: the State API resolves no address by reading
    /tmp/ray/ray_current_cluster, which a ``ray start`` on this machine leaves behind (stale once that
    cluster stops). Ray Train's cleaner then waited on a dead GCS, and the controller waits for the
    cleaner to stop at the end of every run: each training phase ended about 13 s late (the final
    report to ``fit()``'s return: 14.7 s before, 1-2 s after)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    for name in NO_DASHBOARD_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


LOCAL_RUNTIME_ENV = {"worker_process_setup_hook": "thinkrec.runtime.setup_local_worker"}
"""The runtime environment of every local Ray this project starts (demo, tests, benchmarks)."""


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


class CorePin:
    """Binds this process, all its threads, to ``n`` cores of the node that no other ``CorePin``
    holds. Ray counts an actor's CPUs but binds none, so an actor given one CPU still runs its second
    thread on any idle core. The claim is an exclusive ``flock`` per core under the node's temp
    directory, released by the kernel when the process ends, so a restarted actor claims again.
    Linux only; elsewhere, or when fewer than ``n`` cores are free, nothing is pinned (``cores`` is
    empty)."""

    def __init__(self, n: int) -> None:
        import fcntl
        import tempfile

        self.cores: list[int] = []
        self._fds: list[int] = []
        if n <= 0 or not hasattr(os, "sched_setaffinity"):
            return
        lock_dir = os.path.join(tempfile.gettempdir(), "thinkrec-cores")
        os.makedirs(lock_dir, exist_ok=True)
        for core in sorted(os.sched_getaffinity(0)):
            fd = os.open(os.path.join(lock_dir, f"{core}.lock"), os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._fds.append(fd)
            self.cores.append(core)
            if len(self.cores) == n:
                break
        if len(self.cores) < n:
            log.warning("core pinning: only %d of %d cores free, not pinned", len(self.cores), n)
            self.release()
            return
        # Every thread already running (Ray's, torch's); threads started later inherit the mask.
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), self.cores)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds, self.cores = [], []
