"""Multi-host start-up and the few host-level agreements the training loop needs.

`initialize` calls `jax.distributed.initialize` when asked to by the config
(`--config.distributed.initialize=true`, optionally with `coordinator`, `num_processes`,
`process_id`; unset fields are auto-detected by JAX on TPU pods, SLURM, Open MPI and from the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables) or when
JAX_COORDINATOR_ADDRESS is set. On CPU, collectives between processes use gloo.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(cfg) -> None:
    """Joins the multi-process job described by `cfg` (config.distributed), once per process."""
    wanted = cfg.initialize or cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not wanted or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    num_processes = cfg.num_processes if cfg.num_processes > 0 else _env_int("JAX_NUM_PROCESSES")
    process_id = cfg.process_id if cfg.process_id >= 0 else _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=cfg.coordinator or None, num_processes=num_processes,
                               process_id=process_id)


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (a stop request seen by one host stops all)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def max_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))
