"""Rollouts ahead of the trainer: bounded staleness, weight pushes and partial rollouts.

An RL run alternates two jobs: produce batch b (sample, score, pack) and train on it. With
`max_staleness` k = 0 they alternate on one thread (the synchronous loop: batch b is sampled
with the weights after b updates). With k >= 1 a rollout thread produces batches b = s, s+1, ...
in order while the trainer trains, so rollout and update overlap (SeamlessFlow, arXiv
2508.11553, decouples them the same way):

  * batch b starts once weights of version >= b - k have been pushed, so no token of a batch
    is more than k versions older than the trainer that consumes it;
  * after every trainer step the new weights are pushed (`RolloutWeights.push`: placed on the
    rollout devices in the decode layout) and every attached sampler swaps them in at its next
    decode call. A request in flight at that moment continues under the new weights (a partial
    rollout); each token records the version it was sampled with and its log-prob, and the
    update corrects for the gap with the truncated importance weight of `rl.objectives`.

Rollout and training may share devices or use disjoint ones (`split_devices`: the first
`train` devices train, the next `rollout` devices generate, tensor-parallel).

Resuming: a batch is checkpointed as trained or not at all. The producer's own state (e.g. the
prompt pool) is saved as it was right after the last trained batch was produced; batches that
were produced or in flight ahead of the trainer are dropped at a kill and produced again on
resume from the restored weights (their prompts come out the same, their tokens are new).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from kat_jax.errors import ConfigError
from kat_jax.parallel import make_mesh, sharding_context
from kat_jax.sampling import prepare_params
from kat_jax.train.trainer import mesh_from


class AcceptsWeights(Protocol):
  def set_params(self, params: Any, version: int) -> Any:
    ...


def split_devices(rollout: int, train: int, devices: Sequence[Any] | None = None, *,
                  fields: str = "config.rl") -> tuple[list[Any], list[Any]]:
  """(train devices, rollout devices): disjoint slices of `devices` (default all), training
  first. rollout = 0 means both use every device (train must then be 0 too). `fields`: the
  config section errors name."""
  devices = list(jax.devices() if devices is None else devices)
  if rollout < 0 or train < 0:
    raise ConfigError(f"{fields}.rollout_devices / train_devices must be >= 0, got "
                      f"{rollout} / {train}")
  if rollout == 0:
    if train:
      raise ConfigError(f"{fields}.train_devices needs {fields}.rollout_devices > 0 (0 = "
                        "rollout and training share every device)")
    return devices, devices
  train = train or len(devices) - rollout
  if train < 1 or rollout + train > len(devices):
    raise ConfigError(f"{fields}.rollout_devices={rollout} + train_devices={train} do not "
                      f"fit the {len(devices)} devices")
  return devices[:train], devices[train:train + rollout]


def rollout_meshes(config: Any, rollout_devices: int, train_devices: int, rollout_tensor: int,
                   *, fields: str = "config.rl") -> tuple[Any, Any]:
  """(train mesh by `config.mesh` over the train devices, rollout mesh (data=-1,
  tensor=rollout_tensor) over the rollout devices); one mesh twice when they share."""
  train, rollout = split_devices(rollout_devices, train_devices, fields=fields)
  train_mesh = mesh_from(config, train)
  if rollout is train:
    return train_mesh, train_mesh
  try:
    return train_mesh, make_mesh(-1, 1, rollout_tensor, rollout)
  except ValueError as e:
    raise ConfigError(f"{fields}.rollout_tensor: {e}") from e


class RolloutWeights:
  """The rollout side's copy of the policy: (decode params, version), pushed by the trainer.

  prepare(params) -> decode params placed where the rollouts run; it must return arrays that
  do not alias `params` (the trainer donates them to its next step).
  """

  def __init__(self, prepare: Callable[[Any], Any]):
    self.prepare = prepare
    self._cond = threading.Condition()
    self._current: tuple[Any, int] | None = None
    self._samplers: list[AcceptsWeights] = []
    self.push_seconds = 0.0  # of the last push

  def attach(self, sampler: AcceptsWeights) -> None:
    """A sampler that gets every later push (and the current weights now)."""
    with self._cond:
      self._samplers.append(sampler)
      if self._current is not None:
        sampler.set_params(*self._current)

  def detach(self, sampler: AcceptsWeights) -> None:
    """Stops pushing to `sampler` (e.g. an engine whose rollout ended); no-op if absent."""
    with self._cond:
      self._samplers = [s for s in self._samplers if s is not sampler]

  def push(self, params: Any, version: int) -> None:
    start = time.perf_counter()
    dparams = self.prepare(params)
    jax.block_until_ready(dparams)
    with self._cond:
      if self._current is not None and version < self._current[1]:
        raise ValueError(f"weights pushed out of order: version {version} after "
                         f"{self._current[1]}")
      self._current = (dparams, version)
      for sampler in self._samplers:
        sampler.set_params(dparams, version)
      self._cond.notify_all()
    self.push_seconds = time.perf_counter() - start

  def current(self) -> tuple[Any, int]:
    with self._cond:
      if self._current is None:
        raise RuntimeError("no weights pushed yet")
      return self._current

  def wait_for(self, version: int, stop: threading.Event) -> bool:
    """Blocks until weights of at least `version` are pushed (True) or `stop` is set."""
    with self._cond:
      while not stop.is_set():
        if self._current is not None and self._current[1] >= version:
          return True
        self._cond.wait(timeout=0.1)
    return False


def decode_weights_fn(model_config: Any, train_mesh: Any, rollout_mesh: Any, *,
                      own_copy: bool) -> Callable[[Any], Any]:
  """params (placed on `train_mesh`) -> decode params on `rollout_mesh`, for `RolloutWeights`.

  On other devices the weights are moved first (a replicated copy there, then the decode
  layout, tensor-parallel by the rollout mesh). On the same devices `own_copy` also copies
  the arrays that `prepare_params` would share with the training state (embedding, head,
  norm), which a rollout running beside the next update must not see donated.
  """
  same = set(train_mesh.devices.flat) == set(rollout_mesh.devices.flat)

  def prepare(params):
    if not same:
      params = jax.device_put(params, NamedSharding(rollout_mesh, PartitionSpec()))
    with sharding_context(rollout_mesh):  # the trainer's thread is inside its own mesh's
      dparams = prepare_params(params, model_config, rollout_mesh)
    if same and own_copy:
      embed = jnp.copy(dparams.embed)
      head = embed if dparams.head is dparams.embed else jnp.copy(dparams.head)
      dparams = dparams.replace(embed=embed, head=head, final_norm=jnp.copy(dparams.final_norm))
    return dparams

  return prepare


@dataclasses.dataclass
class Produced:
  """One produced batch: whatever the producer returns, with its index and timing."""
  index: int
  value: Any
  seconds: float


class RolloutPipeline:
  """Produces batches for the trainer, up to `max_staleness` versions ahead of it.

  produce(index, weights) -> value runs the batch's rollouts with `weights` (it reads
  `weights.current()` for its starting weights; attached samplers get later pushes). With
  k = 0 it runs on the trainer's thread inside `take`; with k >= 1 on a rollout thread.
  """

  def __init__(self, produce: Callable[[int, RolloutWeights], Any], weights: RolloutWeights, *,
               max_staleness: int, end: int | None = None, mesh: Any = None,
               timeout_s: float = float("inf")):
    """end: the number of batches of the run (k >= 1 produces none past it); mesh: the
    rollout mesh, made the context and default device of every `produce` call."""
    if max_staleness < 0:
      raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    self.produce, self.weights, self.k = produce, weights, max_staleness
    self.timeout_s, self.end, self.mesh = timeout_s, end, mesh
    self._results: dict[int, Produced] = {}
    self._cond = threading.Condition()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self.started_at: int | None = None

  def start(self, params: Any, step: int) -> None:
    """From the run's first (or resumed) step on: for k >= 1 pushes its weights and starts
    producing batches `step`, `step + 1`, ...; for k = 0 each `take` pushes its own."""
    self.started_at = step
    if self.k:
      self.weights.push(params, step)
      self._thread = threading.Thread(target=self._loop, args=(step,), daemon=True,
                                      name="rollouts")
      self._thread.start()

  def _loop(self, index: int) -> None:
    try:
      while not self._stop.is_set() and (self.end is None or index < self.end):
        if not self.weights.wait_for(index - self.k, self._stop):
          return
        start = time.perf_counter()
        value = self._produce(index)
        with self._cond:
          self._results[index] = Produced(index, value, time.perf_counter() - start)
          self._cond.notify_all()
        index += 1
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by take)
      with self._cond:
        self._error = e
        self._cond.notify_all()

  def _produce(self, index: int) -> Any:
    if self.mesh is None:
      return self.produce(index, self.weights)
    # Everything of a rollout (keys, the engine's page pool) on the rollout devices: nothing
    # of it may run on the trainer's devices beside an update (on XLA:CPU a small op there,
    # e.g. a key's fold_in on the default device, stalled the update's all-reduce until XLA
    # aborted the process, about 1 run in 3).
    with sharding_context(self.mesh), jax.default_device(self.mesh.devices.flat[0]):
      return self.produce(index, self.weights)

  def take(self, step: int, params: Any) -> tuple[Produced, float]:
    """Batch `step` and the seconds the trainer waited for it; `params` are the trainer's
    current weights (k = 0 samples with them; k >= 1 has them already). The first take
    starts the pipeline at `step` (the run's first or resumed step)."""
    if self.started_at is None:
      self.start(params, step)
    start = time.perf_counter()
    if not self.k:
      self.weights.push(params, step)
      value = self._produce(step)
      seconds = time.perf_counter() - start
      return Produced(step, value, seconds), seconds
    deadline = time.monotonic() + self.timeout_s
    with self._cond:
      while step not in self._results:
        if self._error is not None:
          raise self._error
        if time.monotonic() > deadline:
          raise TimeoutError(f"no rollout batch {step} within {self.timeout_s}s")
        self._cond.wait(timeout=0.1)
      produced = self._results.pop(step)
    return produced, time.perf_counter() - start

  def trained(self, params: Any, step: int) -> float:
    """After the trainer's step `step` (1-based count of trained batches): for k >= 1 push
    its weights as version `step` (k = 0: the next `take` pushes them). -> the seconds the
    push took (0 for k = 0)."""
    if not self.k:
      return 0.0
    self.weights.push(params, step)
    return self.weights.push_seconds

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)
