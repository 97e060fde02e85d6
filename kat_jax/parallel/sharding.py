"""Sharded train-state creation and placement: parameters never exist whole on one device."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from kat_jax.model import Decoder, ModelConfig
from kat_jax.parallel.mesh import LOGICAL_RULES, batch_sharding, logical_to_sharding
from kat_jax.train.state import TrainState


def _boxed_state_init(config: ModelConfig, optimizer: optax.GradientTransformation
                      ) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState whose params and optimizer moments keep their logical-axis boxes."""
  def init(rng):
    params = Decoder(config).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return init


def strip_boxes(tree: Any) -> Any:
  """Removes logical-axis boxes without adding sharding constraints (safe on abstract values)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def state_shardings(config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules=LOGICAL_RULES) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, matching NamedSharding tree), computed without allocating."""
  boxed = jax.eval_shape(_boxed_state_init(config, optimizer), jax.random.key(0))
  abstract = strip_boxes(boxed)
  return abstract, logical_to_sharding(nn.get_partition_spec(boxed), abstract, mesh, rules)


def init_sharded_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: Mesh, rng: jax.Array, params: Any = None,
                       rules=LOGICAL_RULES) -> tuple[TrainState, TrainState]:
  """Creates the train state directly in its sharded layout. Returns (state, shardings).

  With `params` (e.g. loaded from a checkpoint) those are placed on the mesh and the
  optimizer state is created sharded; otherwise parameters are initialised in place by a
  jitted init whose outputs are sharded, so no device ever holds the full model.
  """
  _, shardings = state_shardings(config, optimizer, mesh, rules)
  if params is None:
    init = _boxed_state_init(config, optimizer)
    state = jax.jit(lambda r: strip_boxes(init(r)), out_shardings=shardings)(rng)
    return state, shardings
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state), shardings


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global [B, T] arrays split over the mesh's batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
