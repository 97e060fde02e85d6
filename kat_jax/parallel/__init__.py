"""Device mesh, logical-axis rules, sharded state and multi-process start-up."""

from kat_jax.parallel.distributed import initialize_distributed, wait_for_all_processes
from kat_jax.parallel.mesh import (BATCH_AXES, LOGICAL_RULES, MESH_AXES, batch_sharding,
                                   sharding_context,
                                   logical_to_sharding, make_mesh, replicated)
from kat_jax.parallel.sharding import global_batch, init_sharded_state, state_shardings

__all__ = ["BATCH_AXES", "LOGICAL_RULES", "MESH_AXES", "batch_sharding", "global_batch",
           "init_sharded_state", "initialize_distributed", "logical_to_sharding", "make_mesh",
           "replicated", "sharding_context", "state_shardings", "wait_for_all_processes"]
