"""End-to-end tests of `python -m experiments.run`: config errors, and exact resumption after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "--config", "experiments/configs/default.py",
    "--config.model.num_layers=2", "--config.data.synthetic_docs=300",
    "--config.data.synthetic_eval_docs=20", "--config.data.seq_len=64",
    "--config.data.batch_size=4", "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.tensorboard=False",
]


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # one CPU device, like a user's run
  return env


def _run(args, **kwargs):
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600, **kwargs)


def _losses(workdir) -> dict[int, float]:
  """Training loss per step, asserting that metrics.jsonl holds each step once."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      if not line.endswith("\n"):  # a row still being written when read
        continue
      row = json.loads(line)
      if row["split"] == "train":
        assert row["step"] not in losses, f"step {row['step']} logged twice"
        losses[row["step"]] = row["loss"]
  return losses


@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=3"], 'unknown config field in the command line: \'stepz\' Did you mean "steps"'),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.model.dtype=float64"], "config.model: dtype 'float64' not in"),
    (["--config.stage=nope"], "config.stage 'nope' not in"),
    (["--config.data.source=jsonl", "--config.data.paths=/no/such.jsonl"],
     "config.data: file not found: /no/such.jsonl"),
    (["--config.data.tokenizer=qwen2.5"], "vocab_size 512 is smaller than"),
    (["--config.data.tokenizer=foo"], "config.data.tokenizer must be one of ['qwen2.5', 'bytes']"),
    (["--config.train.grad_accum=3"], "config.data.batch_size 4 must be divisible by "
     "config.train.grad_accum 3"),
    (["--config.model.hidden_size=100"], "config.model: head_dim 25 must be even"),
])
def test_config_mistakes_give_one_line_errors(tmp_path, args, message):
  result = _run(SMALL + [f"--config.workdir={tmp_path}"] + args)
  assert result.returncode == 2, result.stderr
  error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr
  assert "Traceback" not in result.stderr


def test_missing_config_file_is_named(tmp_path):
  result = _run(["--config", "experiments/configs/missing.py"])
  assert result.returncode == 2
  assert "experiments/configs/missing.py" in result.stderr and "Traceback" not in result.stderr


def test_sigkill_then_restart_resumes_with_identical_losses_and_each_step_logged_once(
    tmp_path):
  steps = ["--config.train.steps=16", "--config.train.checkpoint_every=4"]
  reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
  reference = _run(SMALL + steps + [f"--config.workdir={reference_dir}"])
  assert reference.returncode == 0, reference.stderr
  expected = _losses(reference_dir)
  assert sorted(expected) == list(range(1, 17))

  # Start the same run and SIGKILL it once it has logged step 10 (a checkpoint exists at 8).
  proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *SMALL, *steps,
                           f"--config.workdir={killed_dir}"], cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = killed_dir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and max(_losses(killed_dir) or [0]) >= 10:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_losses(killed_dir))
  assert 10 <= killed_at < 16

  resumed = _run(SMALL + steps + [f"--config.workdir={killed_dir}"])
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step" in resumed.stdout
  resumed_from = int(resumed.stdout.split("resumed from step ")[1].split()[0])
  assert resumed_from % 4 == 0 and 4 <= resumed_from <= killed_at
  got = _losses(killed_dir)
  assert sorted(got) == list(range(1, 17))
  for step in range(1, 17):
    assert got[step] == expected[step], (step, got[step], expected[step])
