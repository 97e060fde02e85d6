"""Run one experiment as N local processes (multi-host simulation on one machine).

  python -m launch.local --num_processes=2 --devices_per_process=1 -- \
      --config experiments/configs/default.py --config.train.steps=20

Every process runs `python -m experiments.run <args>` with the coordinator environment
that kat_jax/parallel/distributed.py reads; output lines are prefixed with `[pN]`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading

import portpicker
from absl import app, flags

_NUM = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "CPU devices per process.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0 = pick a free one).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands and exit.")
_PLATFORM = flags.DEFINE_string("platform", "cpu", "JAX_PLATFORMS for the processes.")


def process_commands(run_args: list[str], num_processes: int, devices_per_process: int,
                     port: int, platform: str = "cpu") -> list[tuple[dict[str, str], list[str]]]:
  """(extra environment, argv) of every process."""
  commands = []
  for pid in range(num_processes):
    env = {"KAT_COORDINATOR_ADDRESS": f"localhost:{port}",
           "KAT_NUM_PROCESSES": str(num_processes), "KAT_PROCESS_ID": str(pid),
           "JAX_PLATFORMS": platform}
    if platform == "cpu":
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    commands.append((env, [sys.executable, "-m", "experiments.run", *run_args]))
  return commands


def format_command(env: dict[str, str], argv: list[str]) -> str:
  return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(a) for a in argv])


def _stream(prefix: str, pipe) -> None:
  for line in iter(pipe.readline, ""):
    sys.stdout.write(f"{prefix} {line}")
    sys.stdout.flush()


def launch(run_args: list[str], num_processes: int, devices_per_process: int, port: int = 0,
           platform: str = "cpu", dry_run: bool = False) -> int:
  """Starts the processes, streams their output, returns the first non-zero exit code (or 0)."""
  port = port or portpicker.pick_unused_port()
  commands = process_commands(run_args, num_processes, devices_per_process, port, platform)
  if dry_run:
    for env, argv in commands:
      print(format_command(env, argv))
    return 0
  procs, threads = [], []
  for pid, (env, argv) in enumerate(commands):
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    thread = threading.Thread(target=_stream, args=(f"[p{pid}]", proc.stdout), daemon=True)
    thread.start()
    procs.append(proc)
    threads.append(thread)
  codes = [proc.wait() for proc in procs]
  for thread in threads:
    thread.join()
  return next((c for c in codes if c), 0)


def main(argv):
  sys.exit(launch(argv[1:], _NUM.value, _DEVICES.value, _PORT.value, _PLATFORM.value,
                  _DRY_RUN.value))


if __name__ == "__main__":
  app.run(main)
