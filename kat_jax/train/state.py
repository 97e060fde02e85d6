"""Train state: a plain pytree of step, parameters and optimizer state, created sharded."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kat_jax.model import Decoder, ModelConfig
from kat_jax.model.mtp import boxed_mtp_init
from kat_jax.parallel.mesh import LOGICAL_RULES, logical_to_sharding
from kat_jax.parallel.sharding import strip_boxes


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: optax.OptState


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def _boxed_state_init(config: ModelConfig, optimizer: optax.GradientTransformation,
                      mtp_depth: int = 0) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState whose params and optimizer moments keep their logical-axis boxes.

  With `mtp_depth` > 0 the params also hold the MTP heads under "mtp".
  """
  def init(rng):
    if not mtp_depth:
      params = Decoder(config).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    else:
      r1, r2 = jax.random.split(rng)
      params = dict(Decoder(config).init(r1, jnp.zeros((1, 8), jnp.int32))["params"])
      params["mtp"] = boxed_mtp_init(config, mtp_depth, r2)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return init


def state_shardings(config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules=LOGICAL_RULES, *, mtp_depth: int = 0) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, matching NamedSharding tree), computed without allocating."""
  boxed = jax.eval_shape(_boxed_state_init(config, optimizer, mtp_depth), jax.random.key(0))
  abstract = strip_boxes(boxed)
  return abstract, logical_to_sharding(nn.get_partition_spec(boxed), abstract, mesh, rules)


def init_sharded_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: Mesh, rng: jax.Array, params: Any = None,
                       rules=LOGICAL_RULES, *, mtp_depth: int = 0
                       ) -> tuple[TrainState, TrainState]:
  """Creates the train state directly in its sharded layout. Returns (state, shardings).

  With `params` (e.g. loaded from a checkpoint) those are placed on the mesh and the
  optimizer state is created sharded; otherwise parameters are initialised in place by a
  jitted init whose outputs are sharded, so no device ever holds the full model.
  """
  _, shardings = state_shardings(config, optimizer, mesh, rules, mtp_depth=mtp_depth)
  if params is None:
    init = _boxed_state_init(config, optimizer, mtp_depth)
    state = jax.jit(lambda r: strip_boxes(init(r)), out_shardings=shardings)(rng)
    return state, shardings
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state), shardings
