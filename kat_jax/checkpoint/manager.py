"""Orbax checkpointing of the whole training run: train state, data iterator, run config.

One `CheckpointManager` directory per run (`<workdir>/checkpoints/<step>/`) with three
items: `state` (params + optimizer, saved asynchronously, restored onto the target
shardings), `data` (the Grain iterator position, so a resumed run sees exactly the batches
it would have seen) and `meta` (the JSON config the run started with). Orbax writes each
step to a temporary directory and renames it when complete, so a run killed mid-save
resumes from the last complete step.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from kat_jax.parallel.distributed import wait_for_all_processes


class RunCheckpointer:
  """Saves and restores (state, data iterator, meta) under `directory`."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    # Orbax's first directory sync is a collective; line the processes up before it.
    wait_for_all_processes("checkpoint_manager")
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None,
           meta: dict[str, Any], *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores `step` (default: latest) into `abstract_state`'s shapes/shardings.

    The data iterator is restored in place. Returns (state, meta).
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint to restore under {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
