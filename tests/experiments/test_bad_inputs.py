"""Bad input to `experiments.run` ends in one `error:` line naming the path, line or field.

Each case runs the runner in-process through `experiments.run.run(config)` (the function
`main` calls after flag parsing), except the config-file case, which is about flag parsing and
runs the command. Each asserts a non-zero exit status, exactly one `error:` line on stderr with
the named path/line/field, and no traceback (other stderr lines may only be log lines).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from experiments import run as runner
from experiments.configs.default import get_config
from kat_jax.checkpoint import config_to_hf
from kat_jax.model import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(workdir, **data):
  config = get_config()
  config.workdir = str(workdir)
  config.model.num_layers = 1
  config.data.seq_len = 32
  config.data.batch_size = 8  # the tests see 8 CPU devices (conftest)
  config.data.synthetic_docs = 40
  config.data.synthetic_eval_docs = 4
  config.train.steps = 1
  config.train.eval_every = 0
  config.train.tensorboard = False
  for key, value in data.items():
    config.data[key] = value
  return config


def _one_error_line(stderr: str, *fragments: str) -> str:
  lines = stderr.splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1, stderr
  assert all(fragment in errors[0] for fragment in fragments), (fragments, errors[0])
  assert not any(line.startswith(("Traceback", "  File ", "    ")) for line in lines), stderr
  return errors[0]


def _run(config, capfd) -> tuple[int, str]:
  status = runner.run(config)
  return status, capfd.readouterr().err


def _jsonl(tmp_path, name: str, content: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


def test_directory_as_config_file(tmp_path):
  result = subprocess.run([sys.executable, "-m", "experiments.run", "--config", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  _one_error_line(result.stderr, f"config file {tmp_path}: Is a directory")


def test_binary_data_file(tmp_path, capfd):
  path = _jsonl(tmp_path, "data.jsonl", b'{"text": "fine"}\n\x00\x01\x02\xff binary\n')
  status, err = _run(_config(tmp_path / "run", source="jsonl", paths=path), capfd)
  assert status == 1, err
  _one_error_line(err, f"{path} line 2", "binary data")


def test_non_utf8_data_file(tmp_path, capfd):
  path = _jsonl(tmp_path, "latin1.jsonl", '{"text": "café"}\n'.encode("latin-1"))
  status, err = _run(_config(tmp_path / "run", source="jsonl", paths=path), capfd)
  assert status == 1, err
  _one_error_line(err, f"{path} line 1", "not UTF-8", "0xe9", "column 14")


def test_empty_data_file(tmp_path, capfd):
  path = _jsonl(tmp_path, "empty.jsonl", b"\n\n")
  status, err = _run(_config(tmp_path / "run", source="jsonl", paths=path), capfd)
  assert status == 1, err
  _one_error_line(err, path, "no records")


def test_malformed_jsonl_row(tmp_path, capfd):
  path = _jsonl(tmp_path, "rows.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": 3}\n')
  status, err = _run(_config(tmp_path / "run", source="jsonl", paths=path), capfd)
  assert status == 1, err
  _one_error_line(err, f"{path} line 3", "field 'text'", "must be a string")


def test_regular_file_as_workdir(tmp_path, capfd):
  workdir = tmp_path / "taken"
  workdir.write_text("not a directory")
  status, err = _run(_config(workdir), capfd)
  assert status == 2, err
  _one_error_line(err, f"config.workdir {workdir}", "not a directory")


def test_unreadable_workdir(tmp_path, capfd, monkeypatch):
  # Tests run as root, whom chmod 000 does not stop, so os.access is made to answer for the
  # directory what it answers a non-root user for a chmod-000 directory.
  workdir = tmp_path / "locked"
  workdir.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
      False if os.path.abspath(path) == str(workdir) else real_access(path, mode, **kw)))
  status, err = _run(_config(workdir), capfd)
  assert status == 2, err
  _one_error_line(err, f"config.workdir {workdir}", "not readable and writable")


_DISK_FULL_RUN = """
import errno, os, sys
import orbax.checkpoint as ocp
from absl import app
from experiments.run import main, parse_flags

async def disk_full(self, item, directory):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

ocp.JsonCheckpointHandler._save_fn = disk_full
app.run(main, argv=["experiments.run", *sys.argv[1:]], flags_parser=parse_flags)
"""


def test_full_disk_while_checkpointing(tmp_path):
  # Simulated: Orbax's JSON item writer (the run's `meta` item) fails as a full disk does,
  # while the state write is still in flight. A real full tmpfs, where TensorStore reports
  # os_error_code 28, gives the same line (tests/checkpoint/test_manager.py has that form).
  # A subprocess, so that what Orbax's writer threads print at interpreter exit is seen too.
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device
  result = subprocess.run(
      [sys.executable, "-c", _DISK_FULL_RUN, "--config", "experiments/configs/default.py",
       "--config.model.num_layers=1", "--config.data.synthetic_docs=40",
       "--config.data.synthetic_eval_docs=4", "--config.data.seq_len=32",
       "--config.data.batch_size=2", "--config.train.steps=1", "--config.train.eval_every=0",
       "--config.train.tensorboard=False", f"--config.workdir={workdir}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr
  _one_error_line(result.stderr, "could not write checkpoint step 1", f"{workdir}/checkpoints",
                  "No space left on device")
  others = [l for l in result.stderr.splitlines() if not l.startswith("error:")]
  assert all(re.match(r"[IWEF]\d{4} ", line) for line in others), result.stderr  # log lines


def test_directory_without_config_json_as_init_from(tmp_path, capfd):
  weights = tmp_path / "weights"
  weights.mkdir()
  config = _config(tmp_path / "run")
  config.model.init_from = str(weights)
  status, err = _run(config, capfd)
  assert status != 0, err  # 1 from the HF loader, 2 where a model-source check sees it first
  _one_error_line(err, str(weights), "config.json")


def test_hf_directory_with_a_missing_shard(tmp_path, capfd):
  # A sharded HF directory (config.json, index, shards) whose second shard is gone; the
  # loader checks the index against the files before reading any tensor.
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  model = get_preset("tiny", num_layers=1)
  (hf_dir / "config.json").write_text(json.dumps(config_to_hf(model)))
  shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
  weight_map = {"model.embed_tokens.weight": shards[0], "model.norm.weight": shards[1]}
  (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, hf_dir / shards[0])
  config = _config(tmp_path / "run")
  config.model.init_from = str(hf_dir)
  status, err = _run(config, capfd)
  assert status != 0, err  # 1 from the HF loader, 2 where a model-source check wraps it
  _one_error_line(err, shards[1], f"missing from {hf_dir}")


def test_reward_sandbox_that_cannot_run_ends_in_one_error_line(tmp_path, capfd, monkeypatch):
  # A stage whose code rewards hit a broken sandbox: the runner prints the sandbox's reason on
  # one line and exits 1 instead of training on all-zero rewards.
  from kat_jax.errors import RewardInfrastructureError  # pylint: disable=g-import-not-at-top

  def broken_stage(config):
    raise RewardInfrastructureError("code-reward sandbox failed its start-up self-check: "
                                    "a correct program scored 'error' under /venv/bin/python")

  monkeypatch.setattr(runner, "run_stage", broken_stage)
  status, err = _run(_config(tmp_path / "run"), capfd)
  assert status == 1, err
  _one_error_line(err, "sandbox failed its start-up self-check", "/venv/bin/python")
