# Sourced by the GPU-call scripts (run_*_gpu.sh): installs the carried wheels (.whl, see the
# device notes in docs/performance.md) into /tmp/site, puts them and the checkout on
# PYTHONPATH, and prints the GPU. $1: the calling script's name, for error lines.
# Returns non-zero (the caller exits) when there are no wheels or they do not install.
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
