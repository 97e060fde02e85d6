"""Device mesh with axes (data, fsdp, tensor) and the one logical-axis → mesh-axis table.

Parameters and activations are annotated with logical names (kat_jax/model); this module
is the only place that says how those names land on devices.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# logical name -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters: FSDP shards the embed dimension; tensor parallelism splits heads/mlp/vocab
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, ...]:
  """Mesh sizes with at most one -1 ('the rest of the devices') filled in."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} "
                     f"tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor} does not fit "
                     f"{num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh data×fsdp×tensor = {math.prod(sizes)} but there are "
                     f"{num_devices} devices; use -1 for one axis to take the rest")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  if devices == list(jax.devices()):
    try:  # topology-aware order where JAX knows the interconnect
      return Mesh(jax.experimental.mesh_utils.create_device_mesh(shape, devices), MESH_AXES)
    except Exception:  # pylint: disable=broad-except
      pass
  return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def _fits(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Drops the sharding of any dimension the mesh does not divide (it stays replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[n] for n in names)
    out.append(axes if names and dim % size == 0 else None)
  return PartitionSpec(*out)


def logical_to_sharding(logical_specs: Any, abstract: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """Tree of logical PartitionSpecs + matching abstract arrays -> tree of NamedShardings.

  A dimension that the mesh axes do not divide (e.g. 2 KV heads over 4 tensor shards) is
  replicated rather than failing; every other dimension follows the rules.
  """
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)

  def to_sharding(spec, leaf):
    spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    return NamedSharding(mesh, _fits(spec, tuple(leaf.shape), mesh))

  return jax.tree.map(to_sharding, mesh_specs, abstract,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T] batches: rows split over data×fsdp, tokens whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
  """Within it, traced `nn.with_logical_constraint`s bind to `mesh` through `rules`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
