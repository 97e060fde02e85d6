"""Multi-process start-up: `jax.distributed.initialize` from the run config or environment.

Must run before anything touches a JAX device. Sources, in order:
- `config.distributed.coordinator_address` / `num_processes` / `process_id` when set;
- the environment variables `KAT_COORDINATOR_ADDRESS`, `KAT_NUM_PROCESSES`,
  `KAT_PROCESS_ID` (what `launch/local.py` and `launch/slurm.py` export);
- `config.distributed.auto=True`: no arguments, so JAX detects the cluster itself (Cloud TPU
  pods, SLURM, Open MPI).
Nothing set: a single-process run, no initialisation.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax
from absl import logging

ENV_PREFIX = "KAT_"


def distributed_settings(distributed: Any | None) -> dict[str, Any] | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a 1-process run."""
  cfg = dict(distributed or {})
  address = cfg.get("coordinator_address") or os.environ.get(f"{ENV_PREFIX}COORDINATOR_ADDRESS")
  if address:
    num = cfg.get("num_processes") or os.environ.get(f"{ENV_PREFIX}NUM_PROCESSES")
    pid = cfg.get("process_id")
    if pid is None or pid < 0:
      pid = os.environ.get(f"{ENV_PREFIX}PROCESS_ID")
    if num is None or pid is None:
      raise ValueError("config.distributed: a coordinator_address needs num_processes and "
                       f"process_id (or {ENV_PREFIX}NUM_PROCESSES / {ENV_PREFIX}PROCESS_ID)")
    settings = {"coordinator_address": address, "num_processes": int(num),
                "process_id": int(pid)}
    local = cfg.get("local_device_ids") or os.environ.get(f"{ENV_PREFIX}LOCAL_DEVICE_IDS")
    if local:
      settings["local_device_ids"] = [int(i) for i in str(local).split(",")]
    return settings
  if cfg.get("auto"):
    return {}
  return None


def initialize_distributed(distributed: Any | None = None) -> bool:
  """Initialises multi-process JAX if configured; returns whether it did."""
  settings = distributed_settings(distributed)
  if settings is None:
    return False
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU processes need a collectives implementation to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings)
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


_BARRIER_COUNT = itertools.count()


def wait_for_all_processes(name: str, timeout_s: float = 900.0) -> None:
  """Blocks until every process reaches this call (no-op in a 1-process run).

  Call it before the first cross-process collective after uneven work (data preparation,
  compilation): CPU (Gloo) collectives give up after 30 s waiting for a slow peer, while this
  coordination-service barrier waits `timeout_s`.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    return
  # Barrier ids must be unique per use; every process makes the same calls in order.
  client.wait_at_barrier(f"kat_jax/{name}/{next(_BARRIER_COUNT)}", int(timeout_s * 1000))
