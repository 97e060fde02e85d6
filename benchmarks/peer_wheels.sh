#!/usr/bin/env bash
# Downloads into ./.whl the wheels that benchmarks/rl_step_trl.py (TRL's GRPOTrainer, the
# RL-step peer) needs on the GPU machine, whose image lacks them: CPython 3.12, x86-64,
# no registry reachable there.
#
#   bash benchmarks/peer_wheels.sh          # from the repository root, where pip works
#
# The image already has torch, transformers (5.17), accelerate (1.15), huggingface-hub,
# tokenizers, numpy, pandas, pyarrow, fsspec, xxhash, psutil, jinja2, pyyaml, tqdm, filelock,
# packaging. Of the closure of trl's and datasets' requirements it lacks trl, datasets,
# dill and multiprocess (multiprocess needs dill); those are pinned below to the versions the
# script was developed against. datasets 5.2 asks for pyarrow >= 24 and fsspec <= 2026.9.0:
# the run script prints the image's versions of both before the peer runs.
# The wheels are fetched without their dependencies (the list is the closure) and installed
# there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# (benchmarks/run_rl_step_gpu.sh does that). Together about 1.8 MB.
set -euo pipefail
peer=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${peer[@]}" "$@"
ls -la .whl
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
