"""Launchers: dry runs print the exact commands; the local launcher really runs 2 processes."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_ARGS = ["--config", "experiments/configs/default.py", "--config.train.steps=5"]


def _launch(module, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_tpu_pod_dry_run_prints_every_gcloud_command():
  out = _launch("launch.tpu_pod", "--name=kat", "--zone=us-east5-a", "--project=p",
                "--accelerator_type=v5p-64", "--queued", "--spot", "--dry_run", "--",
                *RUN_ARGS, "--config.workdir=gs://b/run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == ("gcloud compute tpus queued-resources create kat-qr --node-id=kat "
                      "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot "
                      "--zone=us-east5-a --project=p")
  assert lines[1].startswith("gcloud compute tpus queued-resources describe kat-qr")
  assert any(l.startswith("gcloud compute tpus tpu-vm scp /tmp/kat_jax_checkout.tgz kat:/tmp/ "
                          "--worker=all") for l in lines)
  ssh = [l for l in lines if " tpu-vm ssh kat --worker=all " in l]
  assert len(ssh) == 2 and "pip install -q -e ." in ssh[0]
  assert ("python3 -m experiments.run --config experiments/configs/default.py "
          "--config.train.steps=5 --config.workdir=gs://b/run --config.distributed.auto=True"
          in ssh[1])
  assert "warning" not in out.stderr


def test_tpu_pod_direct_create_and_workdir_warning():
  out = _launch("launch.tpu_pod", "--name=kat", "--zone=z", "--project=p", "--dry_run", "--",
                *RUN_ARGS)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[0] == ("gcloud compute tpus tpu-vm create kat "
                                        "--accelerator-type=v5p-8 --version=v2-alpha-tpuv5 "
                                        "--zone=z --project=p")
  assert "workdir is not on gs://" in out.stderr


def test_slurm_dry_run_script_per_gpu():
  out = _launch("launch.slurm", "--nodes=2", "--gpus_per_node=4", "--per=gpu",
                "--partition=h100", "--dry_run", "--", *RUN_ARGS)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
               "#SBATCH --partition=h100", 'export KAT_NUM_PROCESSES="$SLURM_NTASKS"',
               'export KAT_COORDINATOR_ADDRESS="$head_node:12355"'):
    assert line in text.splitlines(), line
  srun = next(l for l in text.splitlines() if l.startswith("srun "))
  assert 'KAT_PROCESS_ID="$SLURM_PROCID"' in srun and "KAT_LOCAL_DEVICE_IDS" in srun
  assert "python3 -m experiments.run --config experiments/configs/default.py" in srun
  assert text.splitlines()[-1].startswith("sbatch ")


def test_slurm_per_node_has_one_task_per_node():
  out = _launch("launch.slurm", "--nodes=3", "--per=node", "--dry_run", "--", *RUN_ARGS)
  assert "#SBATCH --ntasks-per-node=1" in out.stdout.splitlines()
  assert "KAT_LOCAL_DEVICE_IDS" not in out.stdout


def test_local_dry_run_lists_each_process():
  out = _launch("launch.local", "--num_processes=3", "--port=1234", "--dry_run", "--",
                *RUN_ARGS)
  lines = out.stdout.splitlines()
  assert len(lines) == 3
  for pid, line in enumerate(lines):
    assert line.startswith(f"KAT_COORDINATOR_ADDRESS=localhost:1234 KAT_NUM_PROCESSES=3 "
                           f"KAT_PROCESS_ID={pid} JAX_PLATFORMS=cpu")
    assert line.endswith("-m experiments.run --config experiments/configs/default.py "
                         "--config.train.steps=5")


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(l)["loss"] for l in f if json.loads(l)["split"] == "train"]


def test_two_processes_match_one_process(tmp_path):
  """A real 2-process jax.distributed run (CPU collectives) gives the 1-process losses."""
  args = ["--config", "experiments/configs/default.py", "--config.model.num_layers=2",
          "--config.data.synthetic_docs=300", "--config.data.seq_len=64",
          "--config.data.batch_size=4", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.steps=5",
          "--config.train.checkpoint_every=5", "--config.train.tensorboard=False",
          "--config.data.host_sharding=rows"]
  two = _launch("launch.local", "--num_processes=2", "--devices_per_process=1", "--",
                *args, f"--config.workdir={tmp_path / 'two'}")
  assert two.returncode == 0, two.stdout[-3000:]
  env = {k: v for k, v in os.environ.items()}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  one = subprocess.run([sys.executable, "-m", "experiments.run", *args,
                        f"--config.workdir={tmp_path / 'one'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert len(got) == len(expected) == 5
  for a, b in zip(got, expected):
    assert abs(a - b) <= 1e-5 * abs(b), (got, expected)
  # both processes wrote their data-iterator state into the shared checkpoint
  data_dir = tmp_path / "two" / "checkpoints" / "5" / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
