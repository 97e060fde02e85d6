"""An importable copy of `kat_jax` at a git revision, renamed, for in-process A/Bs.

  python benchmarks/baseline_package.py HEAD~1            # writes ./kat_jax_base/
  python benchmarks/sampler.py --batch_sizes 1 --compare_variants ab.json
  # ab.json: {"this": {"kernels": "fused"},
  #           "base": {"kernels": "fused", "package": "kat_jax_base"}}

A change to the code of the decode step (not just its tiles) can only be timed against the
code before it in one process (docs/sampling.md says why separate processes do not settle a
few percent). This copies `kat_jax/` as it was at REV into `<out>/kat_jax_base/` and rewrites
its imports, so both versions load side by side. The copy is untracked: a device run carries it
with the working tree; delete it afterwards.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import tarfile

_IMPORT = re.compile(r"\bkat_jax(?=[.\s]|$)")


def write_baseline(revision: str, out_dir: str, name: str = "kat_jax_base") -> str:
  """Extracts kat_jax/ at `revision` as `<out_dir>/<name>/` with its imports renamed.

  Returns the package directory. Raises ValueError for an unknown revision.
  """
  archive = subprocess.run(["git", "archive", "--format=tar", revision, "kat_jax"],
                           capture_output=True, check=False)
  if archive.returncode:
    raise ValueError(f"git archive {revision} failed: {archive.stderr.decode().strip()}")
  commit = subprocess.run(["git", "rev-parse", revision], capture_output=True, check=True,
                          text=True).stdout.strip()
  target = os.path.join(out_dir, name)
  shutil.rmtree(target, ignore_errors=True)
  with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
    for member in tar.getmembers():
      if not member.isfile():
        continue
      path = os.path.join(target, os.path.relpath(member.name, "kat_jax"))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      data = tar.extractfile(member).read()
      if member.name.endswith(".py"):
        data = _IMPORT.sub(name, data.decode()).encode()
      if member.name == "kat_jax/__init__.py":  # benchmark reports record where it came from
        data += f"\n__revision__ = {commit!r}\n".encode()
      with open(path, "wb") as f:
        f.write(data)
  return target


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("revision")
  parser.add_argument("--out_dir", default=".")
  parser.add_argument("--name", default="kat_jax_base")
  args = parser.parse_args()
  print(write_baseline(args.revision, args.out_dir, args.name))


if __name__ == "__main__":
  main()
