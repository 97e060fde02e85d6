"""The recorded default run (benchmarks/results/default_cpu.json) still describes the code:
the default config's first logged training losses equal the recorded ones exactly."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD = os.path.join(ROOT, "benchmarks", "results", "default_cpu.json")
CHECKED_STEPS = (10, 20)  # the first two logged steps: a few seconds of training


def _train_losses(path: str) -> dict[int, float]:
  losses = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        if row["split"] == "train":
          losses[row["step"]] = row["loss"]
  return losses


def test_default_run_first_losses_equal_the_recorded_default(tmp_path):
  with open(RECORD, encoding="utf-8") as f:
    recorded = {int(k.split("_")[1]): v for k, v in json.load(f)["train_loss"].items()}
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as the README's command runs
  metrics = os.path.join(tmp_path, "metrics.jsonl")
  log = open(os.path.join(tmp_path, "stderr.txt"), "w+", encoding="utf-8")  # pylint: disable=consider-using-with
  # The full default config (its LR schedule spans all 300 steps); stopped once step 20 is in.
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.run", "--config", "experiments/configs/default.py",
       f"--config.workdir={tmp_path}", "--config.train.tensorboard=False"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
  try:
    deadline = time.monotonic() + 600
    while max(CHECKED_STEPS) not in _train_losses(metrics):
      if process.poll() is not None:
        log.seek(0)
        raise AssertionError(f"default run ended early: {log.read()[-2000:]}")
      assert time.monotonic() < deadline, "default run did not reach step 20 in 600 s"
      time.sleep(0.5)
  finally:
    process.kill()
    process.wait()
    log.close()
  losses = _train_losses(metrics)
  assert {s: losses[s] for s in CHECKED_STEPS} == {s: recorded[s] for s in CHECKED_STEPS}
