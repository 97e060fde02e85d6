"""RunCheckpointer: falling back past an unreadable step, and file-system errors named."""

import errno
import os

import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from kat_jax.checkpoint.manager import RunCheckpointer, os_error_reason
from kat_jax.errors import CheckpointError


def _state(step: int) -> dict:
  return {"w": jnp.arange(1000, dtype=jnp.float32) + step, "step": jnp.asarray(step)}


def _save_steps(directory, steps) -> None:
  checkpointer = RunCheckpointer(str(directory), save_every=1, keep=5, async_save=False)
  for step in steps:
    checkpointer.save(step, _state(step), None, {"step": step})
  checkpointer.close()


def _truncate_largest_state_file(directory, step: int) -> str:
  root = os.path.join(directory, str(step), "state")
  files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


def test_truncated_latest_step_falls_back_to_the_previous_one_and_says_so(tmp_path, monkeypatch):
  _save_steps(tmp_path, [1, 2, 3])
  _truncate_largest_state_file(tmp_path, 3)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  checkpointer = RunCheckpointer(str(tmp_path), save_every=1, keep=5, async_save=False)
  state, meta = checkpointer.restore(_state(0), None)
  assert meta == {"step": 2} and int(state["step"]) == 2
  np.testing.assert_array_equal(state["w"], _state(2)["w"])
  assert any("restored step 2 instead of step 3" in w and f"{tmp_path}/unreadable-3" in w
             for w in warnings), warnings
  # The unreadable step is out of the way: the run saves step 3 again and resumes from it.
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "unreadable-3"]
  checkpointer.save(3, _state(3), None, {"step": 3})
  state, meta = checkpointer.restore(_state(0), None)
  assert meta == {"step": 3} and int(state["step"]) == 3
  checkpointer.close()


def test_no_readable_step_is_a_checkpoint_error_naming_the_directory(tmp_path):
  _save_steps(tmp_path, [1])
  _truncate_largest_state_file(tmp_path, 1)
  checkpointer = RunCheckpointer(str(tmp_path), save_every=1, async_save=False)
  with pytest.raises(CheckpointError, match=f"no checkpoint under {tmp_path} can be read; "
                     "step 1: "):
    checkpointer.restore(_state(0), None)
  assert os.listdir(tmp_path) == ["1"]  # nothing moved when there is nothing to fall back to
  checkpointer.close()


def test_os_error_reason_reads_python_and_tensorstore_errors():
  # The TensorStore text is what a real full tmpfs gave during an Orbax save.
  tensorstore = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/c/1/state/": '
      "Failed to write 227972 bytes to file 7: No space left on device [os_error_code='28']")
  assert os_error_reason(tensorstore) == os.strerror(errno.ENOSPC)
  wrapped = RuntimeError("commit failed")
  wrapped.__cause__ = OSError(errno.EACCES, os.strerror(errno.EACCES), "/c/1/meta")
  assert os_error_reason(wrapped) == os.strerror(errno.EACCES)
  assert os_error_reason(ValueError("shape mismatch")) is None
