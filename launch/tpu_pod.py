"""Launch an experiment on a Cloud TPU VM slice: create, install, run on all workers, restart.

  python -m launch.tpu_pod --name=kat-v5p --zone=us-east5-a --project=my-proj \
      --accelerator_type=v5p-64 --queued --spot --dry_run -- \
      --config experiments/configs/pretrain.py --config.workdir=gs://bucket/runs/x

Steps (each a `gcloud compute tpus ...` command; `--dry_run` prints them all):
1. create the slice (directly, or through a queued resource that waits for capacity);
2. copy this checkout to every worker and `pip install -e .` plus `jax[tpu]` there;
3. run `python -m experiments.run <args> --config.distributed.auto=True` on all workers at
   once (`--worker=all`), streaming their logs;
4. if the run fails and the slice was preempted, recreate it and run again (up to
   `--max_restarts`); the run resumes from its last checkpoint, so the workdir must be
   shared storage (gs://...).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from launch.common import Shell, run_command

_NAME = flags.DEFINE_string("name", None, "TPU VM (node) name.")
_ZONE = flags.DEFINE_string("zone", None, "GCP zone, e.g. us-east5-a.")
_PROJECT = flags.DEFINE_string("project", None, "GCP project.")
_TYPE = flags.DEFINE_string("accelerator_type", "v5p-8", "TPU type, e.g. v5p-64, v6e-256.")
_VERSION = flags.DEFINE_string("runtime_version", "v2-alpha-tpuv5", "TPU VM software version.")
_QUEUED = flags.DEFINE_bool("queued", False, "Create through a queued resource.")
_SPOT = flags.DEFINE_bool("spot", False, "Spot (preemptible) capacity.")
_REUSE = flags.DEFINE_bool("reuse", False, "Use an existing slice: skip creation.")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 3, "Recreate-and-rerun after preemption.")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "~/kat_jax", "Checkout location on workers.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")
_POLL_SECONDS = flags.DEFINE_integer("poll_seconds", 30, "Queued-resource polling interval.")


class TpuPod:
  """The gcloud commands of one slice."""

  def __init__(self, shell: Shell, name: str, zone: str, project: str, accelerator_type: str,
               runtime_version: str, queued: bool, spot: bool, remote_dir: str):
    self.shell, self.name, self.zone, self.project = shell, name, zone, project
    self.accelerator_type, self.runtime_version = accelerator_type, runtime_version
    self.queued, self.spot, self.remote_dir = queued, spot, remote_dir

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]

  def create(self) -> None:
    capacity = ["--spot"] if self.spot else []
    if self.queued:
      self.shell.run(["gcloud", "compute", "tpus", "queued-resources", "create",
                      f"{self.name}-qr", f"--node-id={self.name}",
                      f"--accelerator-type={self.accelerator_type}",
                      f"--runtime-version={self.runtime_version}", *capacity, *self._where()])
      self.wait_until_active()
    else:
      self.shell.run(["gcloud", "compute", "tpus", "tpu-vm", "create", self.name,
                      f"--accelerator-type={self.accelerator_type}",
                      f"--version={self.runtime_version}", *capacity, *self._where()])

  def wait_until_active(self) -> None:
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{self.name}-qr",
                "--format=value(state.state)", *self._where()]
    while True:
      state = self.shell.run(describe, capture=True).strip()
      if self.shell.dry_run or state == "ACTIVE":
        return
      if state in ("FAILED", "SUSPENDED"):
        raise RuntimeError(f"queued resource {self.name}-qr is {state}")
      print(f"queued resource {self.name}-qr: {state or 'unknown'}; waiting", flush=True)
      time.sleep(_POLL_SECONDS.value)

  def delete(self) -> None:
    if self.queued:
      self.shell.run(["gcloud", "compute", "tpus", "queued-resources", "delete",
                      f"{self.name}-qr", "--force", "--quiet", *self._where()], check=False)
    else:
      self.shell.run(["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, "--quiet",
                      *self._where()], check=False)

  def preempted(self) -> bool:
    state = self.shell.run(["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name,
                            "--format=value(state)", *self._where()], capture=True, check=False)
    return state.strip() in ("PREEMPTED", "TERMINATED", "")

  def ssh_all(self, command: str) -> int:
    return self.shell.status(["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name,
                              "--worker=all", f"--command={command}", *self._where()])

  def install(self, local_dir: str) -> None:
    archive = "/tmp/kat_jax_checkout.tgz"
    self.shell.run(["tar", "czf", archive, "--exclude=.git", "--exclude=runs", "-C", local_dir,
                    "."])
    self.shell.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                    f"{self.name}:/tmp/", "--worker=all", *self._where()])
    code = self.ssh_all(f"mkdir -p {self.remote_dir} && tar xzf {archive} -C {self.remote_dir}"
                        f" && cd {self.remote_dir} && pip install -q -e . 'jax[tpu]'")
    if code:
      raise RuntimeError(f"installing on {self.name} failed with exit code {code}")

  def run(self, run_args: list[str]) -> int:
    command = run_command([*run_args, "--config.distributed.auto=True"])
    return self.ssh_all(f"cd {self.remote_dir} && {command}")


def launch(pod: TpuPod, run_args: list[str], *, reuse: bool, max_restarts: int,
           local_dir: str) -> int:
  if not any(a.startswith("--config.workdir=gs://") for a in run_args):
    print("warning: --config.workdir is not on gs://; a restarted slice cannot resume",
          file=sys.stderr)
  if not reuse:
    pod.create()
  pod.install(local_dir)
  for attempt in range(max_restarts + 1):
    code = pod.run(run_args)
    if code == 0 or not pod.preempted() or attempt == max_restarts:
      return code
    print(f"slice {pod.name} was preempted; recreating (restart {attempt + 1} of "
          f"{max_restarts})", flush=True)
    pod.delete()
    pod.create()
    pod.install(local_dir)
  return code


def main(argv):
  for flag in (_NAME, _ZONE, _PROJECT):
    if not flag.value:
      raise app.UsageError(f"--{flag.name} is required")
  pod = TpuPod(Shell(_DRY_RUN.value), _NAME.value, _ZONE.value, _PROJECT.value, _TYPE.value,
               _VERSION.value, _QUEUED.value, _SPOT.value, _REMOTE_DIR.value)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.exit(launch(pod, argv[1:], reuse=_REUSE.value, max_restarts=_MAX_RESTARTS.value,
                  local_dir=repo))


if __name__ == "__main__":
  app.run(main)
