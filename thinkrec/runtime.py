"""Ray start-up and progress, shared by every job."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

log = logging.getLogger("thinkrec")


def init_ray(cfg: Any) -> None:
    """Join the configured cluster, or start a local Ray sized by ``ray.num_cpus``."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address
    if address in (None, "", "local"):
        # A local Ray for the demo and tests. Ray Data's own progress bars show stage progress.
        store = cfg.ray.object_store_mb
        # address="local" always starts a new Ray: without it ray.init joins whatever cluster a
        # `ray start` on this machine left in /tmp/ray, which then rejects num_cpus.
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=store * 2**20 if store else None,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={"worker_process_setup_hook": "thinkrec.runtime.quiet_worker_logs"},
        )
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


def quiet_worker_logs() -> None:
    """Ray worker setup hook for the local Ray, which runs without its dashboard."""
    for name in NO_DASHBOARD_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
