"""kat_jax.progress: the progress line's fields, throttling, final line and process-0 rule."""

import io
import re

from kat_jax.progress import Progress, format_duration


def test_format_duration_minutes_and_hours():
  assert format_duration(0) == "00:00"
  assert format_duration(75.9) == "01:15"
  assert format_duration(3 * 3600 + 61) == "3:01:01"


def test_progress_line_names_phase_done_total_rate_and_eta():
  stream = io.StringIO()
  progress = Progress("tagging", 1000, unit="answers", stream=stream, every_s=0.0, active=True)
  progress.update(250)
  start, line = stream.getvalue().splitlines()
  assert start == "tagging: 0/1,000 answers"
  assert re.fullmatch(r"tagging: 250/1,000 answers \| [\d,.]+ answers/s \| ETA \d\d:\d\d", line)


def test_progress_prints_nothing_between_start_and_every_s():
  stream = io.StringIO()
  progress = Progress("gen", 10, stream=stream, every_s=3600.0, active=True)
  for _ in range(10):
    progress.update()
  assert stream.getvalue().splitlines() == ["gen: 0/10 items"]


def test_progress_final_line_counts_everything_done():
  stream = io.StringIO()
  with Progress("eval", 7, unit="responses", stream=stream, active=True) as progress:
    progress.update(3)
    progress.update(4)
  assert re.match(r"eval: 7/7 responses in \d\d:\d\d \([\d,.]+ responses/s\)",
                  stream.getvalue().splitlines()[-1])


def test_progress_on_a_process_other_than_0_prints_nothing():
  stream = io.StringIO()
  with Progress("eval", 5, stream=stream, active=False) as progress:
    progress.update(5)
  assert stream.getvalue() == ""
