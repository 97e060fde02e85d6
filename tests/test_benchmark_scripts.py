"""Every benchmark script runs as a script: `python benchmarks/X.py --help` prints its usage.

A script whose `if __name__ == "__main__"` line is lost imports cleanly and exits 0 without
doing anything, so a device call would come back empty; this catches that on CPU.
"""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scripts take flags; a helper module (no argparse) is imported by them, not run.
SCRIPTS = sorted(path for path in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                 if "argparse" in open(path, encoding="utf-8").read())


def test_benchmark_folder_has_scripts():
  assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_benchmark_script_prints_usage_when_run_with_help(script):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                        env=env, timeout=120, cwd=ROOT, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "usage:" in done.stdout.lower(), (done.stdout[-500:], done.stderr[-500:])


SHELL_SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")))


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=os.path.basename)
def test_benchmark_shell_script_parses(script):
  done = subprocess.run(["bash", "-n", script], capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
