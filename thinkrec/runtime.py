"""Ray start-up and progress, shared by every job."""

from __future__ import annotations

import logging
import os
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
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=store * 2**20 if store else None,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    else:
        ray.init(address=address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("THINKREC_PROGRESS", "1") != "0"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
