"""What every Pallas Mosaic GPU kernel here needs: the backend's module (imported only when a
kernel is built: it needs jaxlib's Mosaic GPU support then) and its CPU interpreter."""

from __future__ import annotations

import functools
from typing import Any

import jax


def plgpu() -> Any:
  """jax.experimental.pallas.mosaic_gpu."""
  from jax.experimental.pallas import mosaic_gpu  # pylint: disable=g-import-not-at-top
  return mosaic_gpu


def is_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x): the kernels here
  are written for its wgmma and TMA, so newer GPUs (Blackwell's tcgen05) do not run them."""
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def has_interpreter() -> bool:
  """Whether this jax has Mosaic GPU's CPU interpreter (a private module in jax 0.10)."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


@functools.cache
def interpret_params() -> Any:
  """Mosaic GPU's CPU interpreter settings (the `interpret=` of `plgpu().kernel`)."""
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  return params.InterpretGPUParams()
