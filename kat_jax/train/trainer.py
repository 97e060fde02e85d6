"""One training run, written once: every stage is a state initialiser, a step and a batch source.

`Trainer` owns what each stage used to rebuild: the workdir, the device mesh, the sharded
state (initialised, or restored from the newest complete checkpoint together with the batch
source's position), the step jitted with the state's shardings and the state donated,
checkpoints (`RunCheckpointer`), metrics (`MetricsLogger`: JSONL, TensorBoard, progress line)
and the eval cadence. A stage supplies

  * `init_state() -> (state, shardings)`: the train state created directly sharded;
  * `step(state, batch, *extra) -> (state, metrics)`: pure; jitted here (or, for an update
    that runs its own jitted pieces, called as is with `jit_step=False`);
  * a batch source (`BatchSource`): `next(state, step) -> Work`. A data pipeline
    (`DataBatches`) ignores the state; a rollout producer (Step-SRPO, agentic RL) samples
    with the current parameters, scores and packs.

A run's step number is the number of batches taken, saved in each checkpoint's meta as
"step" (RL stages may take several optimizer updates, or none, per step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from ml_collections import ConfigDict

from kat_jax.checkpoint.manager import RunCheckpointer
from kat_jax.errors import ConfigError
from kat_jax.parallel import batch_sharding, global_batch, make_mesh, replicated, sharding_context
from kat_jax.progress import status
from kat_jax.train.metrics import MetricsLogger

Batch = dict[str, Any]
StepFn = Callable[..., tuple[Any, dict[str, Any]]]


@dataclasses.dataclass
class Work:
  """What a batch source hands the trainer for one step.

  batch: global arrays (`global_batch`), or None when this step takes no update;
  tokens: trained tokens of the step, over all processes (for tokens/s);
  stats: extra scalars logged with the step's metrics (e.g. rollout rewards).
  """
  batch: Batch | None
  tokens: float = 0.0
  stats: dict[str, float] = dataclasses.field(default_factory=dict)


class BatchSource(Protocol):
  """`next(state, step) -> Work`; `checkpoint`: saved and restored with the state (a Grain
  iterator, or an object with `get_state() -> bytes`, `set_state(bytes)`, `start_prefetch()`),
  or None. Optional: `after_step(step, state, metrics)` (curves, weight publishing) and
  `close()`."""

  checkpoint: Any

  def next(self, state: Any, step: int) -> Work:
    ...


class DataBatches:
  """A batch source over a (checkpointable) iterator of this process's rows [rows, T]."""

  def __init__(self, iterator, mesh):
    self.checkpoint, self._mesh = iterator, mesh

  def next(self, state: Any, step: int) -> Work:
    del state, step
    local = next(self.checkpoint)
    return Work(global_batch(local, self._mesh),
                tokens=float(np.sum(local["weights"] > 0)) * jax.process_count())


def mesh_from(config: ConfigDict, devices=None):
  """The device mesh of `config.mesh` over `devices` (default all; ConfigError naming the
  field on a bad shape)."""
  try:
    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e


@dataclasses.dataclass
class RunResult:
  state: Any
  metrics: dict[str, float]  # the last step's metrics (plus the source's stats)
  steps: int
  seconds: float
  eval: dict[str, float] | None = None


def _floats(tree: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


class Trainer:
  """One run under `workdir`: checkpoints in `<workdir>/checkpoints`, metrics in
  `<workdir>/metrics.jsonl` (+ `tensorboard/`). `config.train` gives the cadences."""

  def __init__(self, config: ConfigDict, *, name: str, workdir: str, steps: int,
               mesh=None, meta: dict[str, Any] | None = None):
    train = config.train
    self.name, self.steps = name, steps
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.mesh = mesh if mesh is not None else mesh_from(config)
    self.log_every, self.eval_every = train.log_every, train.eval_every
    self.meta = {"config": config.to_dict(), **(meta or {})}
    self.checkpointer = RunCheckpointer(os.path.join(self.workdir, "checkpoints"),
                                        save_every=train.checkpoint_every,
                                        keep=train.keep_checkpoints,
                                        async_save=train.async_checkpoint)
    self.tensorboard = train.tensorboard
    self.logger: MetricsLogger | None = None  # made once the resume step is known
    if jax.process_index() == 0:  # what the run was started with, next to its outputs
      with open(os.path.join(self.workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(self.meta, f, indent=2, default=str)

  def fit(self, init_state: Callable[[], tuple[Any, Any]], step: StepFn, source: BatchSource,
          *, extra: tuple[tuple[Any, Any], ...] = (), jit_step: bool = True,
          evaluate: Callable[[Any], dict[str, float]] | None = None) -> RunResult:
    """Runs (or resumes) the run to `steps`.

    Args:
      init_state: () -> (state, shardings), called under the mesh's sharding context.
      step: (state, batch, *extra values) -> (state, metrics).
      source: the batch source.
      extra: (value, sharding) pairs passed to every step after the batch (e.g. a frozen
        teacher's parameters); not donated.
      jit_step: False for a step that jits its own parts (it is then called as is).
      evaluate: state -> held-out scalars, every `train.eval_every` steps and at the end.
    """
    start = time.perf_counter()
    try:
      with sharding_context(self.mesh):
        state, metrics, done, evals = self._run(init_state, step, source, extra, jit_step,
                                                evaluate)
    finally:  # also on an exception: finish the pending checkpoint, flush the logs
      self.close()
      if hasattr(source, "close"):
        source.close()
    return RunResult(state, metrics, done, time.perf_counter() - start, evals)

  def _run(self, init_state, step, source, extra, jit_step, evaluate):
    state, shardings = init_state()
    done, resumed = 0, self.checkpointer.latest_step() is not None
    if resumed:
      state, meta = self.checkpointer.restore(state, source.checkpoint)
      done = int(meta.get("step", jax.device_get(state.step)))
    # Rows a killed run logged after its checkpoint are dropped: the resumed run logs them.
    self.logger = MetricsLogger(self.workdir, self.steps, tensorboard=self.tensorboard,
                                resume_step=done if resumed else None)
    if resumed:
      status(f"{self.name}: resumed from step {done} ({self.checkpointer.directory})")
    if jit_step:
      step = jax.jit(step, in_shardings=(shardings, batch_sharding(self.mesh),
                                         *(sh for _, sh in extra)),
                     out_shardings=(shardings, replicated(self.mesh)), donate_argnums=(0,))
    extra_values = tuple(v for v, _ in extra)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    status(f"{self.name}: {n_params:,} params, {self.steps} steps, mesh "
           f"{dict(self.mesh.shape)}, workdir {self.workdir}")
    metrics: dict[str, float] = {}
    evals = None
    while done < self.steps:
      work = self._take(source, state, done)
      raw: dict[str, Any] = {}
      if work.batch is not None:
        state, raw = step(state, work.batch, *extra_values)
        self.logger.count_tokens(work.tokens)
      done += 1
      last = done == self.steps
      logged = done % self.log_every == 0 or last
      if logged or hasattr(source, "after_step"):
        metrics = {**_floats(raw), **work.stats}
        if hasattr(source, "after_step"):
          metrics.update(source.after_step(done, state, metrics) or {})
        if logged:
          self.logger.write(done, metrics)
      if evaluate is not None and ((self.eval_every and done % self.eval_every == 0) or last):
        evals = evaluate(state)
        self.logger.write_eval(done, evals)
      self.checkpointer.save(done, state, source.checkpoint, {**self.meta, "step": done},
                             force=last)
    return state, metrics, done, evals

  @staticmethod
  def _take(source: BatchSource, state: Any, step: int) -> Work:
    """The source's work for `step` (one place, so a test can stop a run here)."""
    return source.next(state, step)

  def close(self) -> None:
    try:
      self.checkpointer.close()
    finally:
      if self.logger is not None:
        self.logger.close()
