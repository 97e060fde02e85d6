"""Orbax checkpointing of the whole training run: train state, data iterator, run config.

One `CheckpointManager` directory per run (`<workdir>/checkpoints/<step>/`) with three
items: `state` (params + optimizer, saved asynchronously, restored onto the target
shardings), `data` (the Grain iterator position, so a resumed run sees exactly the batches
it would have seen) and `meta` (the JSON config the run started with). Orbax writes each
step to a temporary directory and renames it when complete, so a run killed mid-save
resumes from the last complete step.

A step that was completed but cannot be read back (a truncated or damaged file) is moved
aside to `<directory>/unreadable-<step>` and the previous readable step is restored instead,
with a warning naming both. A write that fails for a file-system reason (no space left,
permissions) raises `CheckpointError` naming the step, directory and reason.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import threading
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from kat_jax.errors import CheckpointError
from kat_jax.parallel.distributed import wait_for_all_processes

UNREADABLE_PREFIX = "unreadable-"
# TensorStore reports a failed file operation as ValueError("...: <reason> [os_error_code='28']").
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='?(\d+)'?\]")


def os_error_reason(error: BaseException) -> str | None:
  """The file-system reason behind `error` (e.g. 'No space left on device'), or None.

  Looks through the exception chain for an OSError, and into TensorStore's error text.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    match = _TENSORSTORE_OS_ERROR.search(str(error))
    if match:
      return os.strerror(int(match.group(1)))
    error = error.__cause__ or error.__context__
  return None


class _DropOrbaxTracebacks(std_logging.Filter):
  """Keeps Orbax's one-line error logs but drops their tracebacks (shown at --verbosity=1).

  A failed background write is logged with a traceback by several Orbax threads; the caller
  gets it once as a CheckpointError, so the tracebacks only bury that line.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname
        and logging.get_verbosity() < logging.DEBUG):
      record.exc_info, record.exc_text = None, None
    return True


_ORBAX_FILTER = _DropOrbaxTracebacks()


class RunCheckpointer:
  """Saves and restores (state, data iterator, meta) under `directory`."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    logging.get_absl_logger().addFilter(_ORBAX_FILTER)  # idempotent
    # Orbax's first directory sync is a collective; line the processes up before it.
    wait_for_all_processes("checkpoint_manager")
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "data": grain.checkpoint.CheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise CheckpointError(f"checkpoint directory {self.directory}: {e.strerror}") from e
    self._writing: int | None = None  # the step whose asynchronous write may still fail

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _write_failed(self, step: int | None, error: Exception) -> Exception:
    """CheckpointError for a file-system failure of a write; else `error` itself.

    The failed step is the previous asynchronous write when it never completed (Orbax
    reports it at the next save or wait), else `step`.
    """
    reason = os_error_reason(error)
    if reason is None:
      return error
    if self._writing is not None and self._writing not in self._manager.all_steps():
      step = self._writing
    _join_orbax_threads()  # its other writers finish now, not in errors at interpreter exit
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-exception-caught; the first failure is reported
      pass
    what = "checkpoint" if step is None else f"checkpoint step {step}"
    return CheckpointError(f"could not write {what} to {self.directory}: {reason}")

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None,
           meta: dict[str, Any], *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved.

    Raises CheckpointError when this or the previous (asynchronous) write hit a file-system
    error such as a full disk.
    """
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-exception-caught; re-raised below
      raise self._write_failed(step, e) from e
    if saved:
      self._writing = step
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def _restore_step(self, step: int, abstract: Any,
                    data_iterator: grain.DatasetIterator | None) -> tuple[Any, dict[str, Any]]:
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores `step` (default: the latest readable) into `abstract_state`'s shapes/shardings.

    The data iterator is restored in place. Returns (state, meta). Without `step`, a latest
    step that cannot be read is moved aside (`unreadable-<step>`) and the one before it is
    tried, with a warning; CheckpointError if no step can be read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    if step is not None:
      restored = self._restore_step(step, abstract, data_iterator)
      logging.info("checkpoint: restored step %d from %s", step, self.directory)
      return restored
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint to restore under {self.directory}")
    failures: list[tuple[int, str]] = []
    for candidate in steps:
      try:
        restored, error = self._restore_step(candidate, abstract, data_iterator), None
      except Exception as e:  # pylint: disable=broad-exception-caught; any unreadable file
        restored, error = None, e
      if not _all_processes_agree(error is None):
        reason = _one_line(error) if error else "unreadable on another process"
        _quiet_abandoned_reads()
        failures.append((candidate, reason))
        logging.warning("checkpoint: step %d in %s cannot be read (%s)", candidate,
                        self.directory, reason)
        continue
      if failures:
        moved = self._set_aside([s for s, _ in failures])
        logging.warning("checkpoint: restored step %d instead of step %d, which cannot be read "
                        "(moved to %s)", candidate, failures[0][0], ", ".join(moved))
      logging.info("checkpoint: restored step %d from %s", candidate, self.directory)
      return restored
    raise CheckpointError(f"no checkpoint under {self.directory} can be read; step "
                          f"{failures[0][0]}: {failures[0][1]}")

  def _set_aside(self, steps: list[int]) -> list[str]:
    """Renames unreadable step directories so saves and later resumes skip them; new paths."""
    self._manager.wait_until_finished()
    moved = []
    for step in steps:
      target = os.path.join(self.directory, f"{UNREADABLE_PREFIX}{step}")
      copies = 0
      while os.path.lexists(target if not copies else f"{target}.{copies}"):
        copies += 1
      moved.append(target if not copies else f"{target}.{copies}")
    if jax.process_index() == 0:
      for step, target in zip(steps, moved):
        os.replace(os.path.join(self.directory, str(step)), target)
    wait_for_all_processes("checkpoint_set_aside")
    self._manager.reload()
    return moved

  def wait(self) -> None:
    """Blocks until the last save is on disk; CheckpointError if it failed (e.g. disk full)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught; re-raised below
      raise self._write_failed(None, e) from e
    self._writing = None

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _join_orbax_threads(timeout_s: float = 60.0) -> None:
  """Waits (bounded) for Orbax's background writer threads, e.g. after one of them failed."""
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith(
        "orbax."):
      thread.join(max(deadline - time.monotonic(), 0.0))


def _quiet_abandoned_reads() -> None:
  """From now on, Orbax read coroutines that a failed restore abandoned end silently.

  When one array of a step cannot be read, Orbax stops waiting for the others; they fail
  too, later, and Python would print each as "Exception ignored in <coroutine ...>" with a
  traceback when it frees them (possibly at exit). The step's failure is already reported;
  these go to the debug log. Other unraisable exceptions reach the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "kat_jax_quiet_orbax", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      logging.debug("checkpoint: abandoned read: %s", unraisable.exc_value)
    else:
      previous(unraisable)

  hook.kat_jax_quiet_orbax = True
  sys.unraisablehook = hook


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (a restore is used only if all could read it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))
