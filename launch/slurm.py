"""Launch an experiment on a Slurm GPU cluster: writes an sbatch script and submits it.

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --per=gpu --partition=a100 --dry_run -- \
      --config experiments/configs/pretrain.py --config.workdir=/shared/runs/x

`--per=node` starts one process per node that drives all its GPUs; `--per=gpu` starts one
process per GPU (each sees one local device). The coordinator is the job's first node;
kat_jax/parallel/distributed.py reads the KAT_* variables that the script exports.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags

from launch.common import Shell, run_command

_NODES = flags.DEFINE_integer("nodes", 1, "Nodes to allocate.")
_GPUS = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node.")
_PER = flags.DEFINE_enum("per", "node", ["node", "gpu"], "One process per node or per GPU.")
_PARTITION = flags.DEFINE_string("partition", "", "Slurm partition.")
_ACCOUNT = flags.DEFINE_string("account", "", "Slurm account.")
_TIME = flags.DEFINE_string("time", "24:00:00", "Time limit.")
_JOB_NAME = flags.DEFINE_string("job_name", "kat_jax", "Job name.")
_PORT = flags.DEFINE_integer("port", 12355, "Coordinator port on the first node.")
_SETUP = flags.DEFINE_string("setup", "", "Shell lines run before the job (e.g. module load).")
_SCRIPT = flags.DEFINE_string("script", "", "Where to write the sbatch script (default: "
                              "runs/slurm/<job_name>.sbatch).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the script and the sbatch command only.")


def sbatch_script(run_args: list[str], *, nodes: int, gpus_per_node: int, per: str,
                  partition: str = "", account: str = "", time_limit: str = "24:00:00",
                  job_name: str = "kat_jax", port: int = 12355, setup: str = "",
                  repo_dir: str = ".") -> str:
  """The full sbatch script text."""
  tasks_per_node = gpus_per_node if per == "gpu" else 1
  header = [
      "#!/bin/bash",
      f"#SBATCH --job-name={job_name}",
      f"#SBATCH --nodes={nodes}",
      f"#SBATCH --ntasks-per-node={tasks_per_node}",
      f"#SBATCH --gpus-per-node={gpus_per_node}",
      f"#SBATCH --time={time_limit}",
      "#SBATCH --output=%x-%j.out",
  ]
  header += [f"#SBATCH --partition={partition}"] if partition else []
  header += [f"#SBATCH --account={account}"] if account else []
  local_ids = 'export KAT_LOCAL_DEVICE_IDS="$SLURM_LOCALID"; ' if per == "gpu" else ""
  body = [
      "set -euo pipefail",
      *([setup] if setup else []),
      f"cd {shlex.quote(repo_dir)}",
      'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
      f'export KAT_COORDINATOR_ADDRESS="$head_node:{port}"',
      'export KAT_NUM_PROCESSES="$SLURM_NTASKS"',
      "srun --kill-on-bad-exit=1 bash -c " + shlex.quote(
          f'export KAT_PROCESS_ID="$SLURM_PROCID"; {local_ids}exec {run_command(run_args)}'),
  ]
  return "\n".join(header + [""] + body) + "\n"


def main(argv):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = sbatch_script(argv[1:], nodes=_NODES.value, gpus_per_node=_GPUS.value,
                         per=_PER.value, partition=_PARTITION.value, account=_ACCOUNT.value,
                         time_limit=_TIME.value, job_name=_JOB_NAME.value, port=_PORT.value,
                         setup=_SETUP.value, repo_dir=repo)
  path = _SCRIPT.value or os.path.join(repo, "runs", "slurm", f"{_JOB_NAME.value}.sbatch")
  shell = Shell(_DRY_RUN.value)
  if _DRY_RUN.value:
    print(f"# {path}\n{script}", end="")
  else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(script)
  shell.run(["sbatch", path])
  sys.exit(0)


if __name__ == "__main__":
  app.run(main)
