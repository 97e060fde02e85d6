# Sourced by the GPU-call scripts (run_*_gpu.sh), which start with
#   set -uo pipefail; source benchmarks/gpu_setup.sh; gpu_begin "$0" DEFAULT_STAGES || exit 1

# gpu_begin CALLER DEFAULT_STAGES: sets `out` ($OUT, else /tmp/<caller's name>), copies
# everything printed from here on to $out/run.log, starts the budget clock (gpu_budget) and
# installs the wheels (gpu_setup). Returns non-zero where gpu_setup does.
gpu_begin() {
  out=${OUT:-/tmp/$(basename "$1" .sh)}
  mkdir -p "$out"
  exec > >(tee "$out/run.log") 2>&1
  gpu_budget "$2"
  gpu_setup "$1"
}

# gpu_budget DEFAULT_STAGES: starts the script's clock (BUDGET_S seconds in all, default 570,
# inside a 600 s call) and its stage list (STAGES, default DEFAULT_STAGES). Then `left`
# prints the seconds left and `stage NAME` says whether NAME is to run.
gpu_budget() {
  start=$SECONDS
  budget=${BUDGET_S:-570}
  stages=" ${STAGES:-$1} "
}
stage() { [[ "$stages" == *" $1 "* ]]; }
left() { echo $((budget - (SECONDS - start))); }

# run_stage NAME COMMAND...: runs COMMAND if stage NAME is to run and 30 s or more are left,
# under `timeout` for the seconds left, and prints its exit status.
run_stage() {
  local name=$1 limit
  shift
  stage "$name" || return 0
  limit=$(left)
  if (( limit < 30 )); then echo "$name: skipped, ${limit}s left"; return 0; fi
  echo "=== $name (limit ${limit}s): $* ==="
  timeout "$limit" "$@"
  echo "$name: exit $?"
}

# gpu_setup CALLER: installs the carried wheels (.whl, see the device notes in
# docs/performance.md) into /tmp/site, puts them and the checkout on PYTHONPATH, and prints
# the GPU. CALLER: the calling script's name, for error lines. Returns non-zero (the caller
# exits) when there are no wheels or they do not install.
gpu_setup() {
  local caller=$1
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: $caller: no wheels in .whl (run benchmarks/peer_wheels.sh and carry .whl)"
    return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: $caller: wheel install failed"; return 1; }
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}
