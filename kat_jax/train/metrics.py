"""Run metrics at the edge: JSONL file, TensorBoard events and a one-line progress report."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax

from kat_jax.progress import format_duration, status


def keep_rows_up_to(path: str, step: int) -> int:
  """Rewrites the JSONL file `path` keeping rows with "step" <= `step`; returns rows dropped.

  For a resumed run: rows a killed run logged after its last checkpoint are logged again by
  the resumed run, so they go. A row cut short by the kill (not valid JSON) goes too. The file
  is replaced whole (written aside, then renamed).
  """
  if not os.path.exists(path):
    return 0
  kept, dropped, unterminated = [], 0, False
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row_step = json.loads(line)["step"]
      except (ValueError, KeyError, TypeError):
        row_step = None
      if isinstance(row_step, int) and row_step <= step:
        unterminated = not line.endswith("\n")
        kept.append(line if not unterminated else line + "\n")
      elif line.strip():
        dropped += 1
  if dropped or unterminated:
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(partial, path)
  return dropped


class MetricsLogger:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard; prints a progress line.

  Only process 0 writes (multi-host runs log once). `resume_step` is the step the run starts
  from (0 for a fresh run, the restored checkpoint's step when resuming): rows and TensorBoard
  events already logged past it are dropped, so every step appears once however often the run
  was interrupted. None appends to whatever is there.
  """

  def __init__(self, workdir: str, total_steps: int, *, tensorboard: bool = True,
               stream=None, resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self._jsonl = None
    self._tb = None
    self._last_time = time.perf_counter()
    self._last_step: int | None = None
    self._tokens_since = 0.0
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      keep_rows_up_to(path, resume_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      purge = None if resume_step is None else resume_step + 1  # drops events at steps >= it
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

  def count_tokens(self, tokens: float) -> None:
    """Adds tokens processed since the last report (for tokens/s)."""
    self._tokens_since += tokens

  def write(self, step: int, scalars: dict[str, Any], *, prefix: str = "train",
            progress: bool = True) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in scalars.items()}
    now = time.perf_counter()
    if progress and self._last_step is not None and step > self._last_step:
      elapsed = now - self._last_time
      values["tokens_per_sec"] = self._tokens_since / max(elapsed, 1e-9)
      values["sec_per_step"] = elapsed / (step - self._last_step)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(f"{prefix}/{key}", value, step)
    if progress:
      self._print_progress(step, values)
      self._last_time, self._last_step, self._tokens_since = now, step, 0.0

  def _print_progress(self, step: int, values: dict[str, float]) -> None:
    parts = [f"step {step}/{self.total_steps}"]
    parts += [f"{k} {values[k]:.4f}" for k in ("loss", "accuracy") if k in values]
    if "tokens_per_sec" in values:
      parts.append(f"{values['tokens_per_sec']:,.0f} tok/s")
      eta = values["sec_per_step"] * (self.total_steps - step)
      parts.append(f"ETA {format_duration(eta)}")
    print(" | ".join(parts), file=self.stream, flush=True)

  def status(self, text: str) -> None:
    """A status line on process 0 only."""
    status(text, self.stream)

  def write_eval(self, step: int, scalars: dict[str, Any]) -> None:
    self.write(step, scalars, prefix="eval", progress=False)
    if self.active:
      text = " ".join(f"{k} {float(v):.4f}" for k, v in scalars.items())
      print(f"eval @ step {step}: {text}", file=self.stream, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
