#!/usr/bin/env bash
# The paged decode attention's two Mosaic GPU schedules, "grid" (`mosaic_gpu`, what `auto`
# picks) and "worklist" (`mosaic_gpu_worklist`), A/B in one GPU call:
#   1. the kernel alone (benchmarks/paged_attention.py) at qwen2.5-1.5b and -7b heads, 128
#      rows, page size 16: ragged lengths 256..8192, then a batch's tail (--tail 1: one busy
#      row at 8192, the others idle); seconds;
#   2. the engine on the rollout workload at qwen2.5-1.5b (benchmarks/rollout.py) with
#      "worklist" (one table width: one compiled decode program), profiled;
#   3. the same with "grid", the baseline on the same machine, if the budget allows (its
#      earlier number: 41.8 s, benchmarks/results/rollout_qwen2.5-1.5b_mosaic_gpu_h100.json).
#
#   device call:  carry [".whl"], timeout 600, command: bash benchmarks/run_paged_ab_gpu.sh
#
# Variables: BUDGET_S (default 570): seconds for the whole script.
# Writes under $OUT: run.log and one JSON per run.
set -uo pipefail
out=${OUT:-/tmp/paged_ab_gpu}
mkdir -p "$out"
exec > >(tee "$out/run.log") 2>&1
start=$SECONDS
budget=${BUDGET_S:-570}
left() { echo $((budget - (SECONDS - start))); }
source benchmarks/gpu_setup.sh
gpu_setup benchmarks/run_paged_ab_gpu.sh || exit 1

for tail in 0 1; do
  echo "=== kernel alone, --tail $tail (limit $(left)s) ==="
  timeout "$(left)" python3 benchmarks/paged_attention.py --batches 128 --page_sizes 16 \
    --tail "$tail" --out "$out/paged_attention_tail$tail.json"
done
for attention in mosaic_gpu_worklist mosaic_gpu; do
  limit=$(left)
  if (( limit < 200 )); then echo "engine $attention: skipped, ${limit}s left"; continue; fi
  echo "=== engine, qwen2.5-1.5b, $attention (limit ${limit}s) ==="
  timeout "$limit" python3 benchmarks/rollout.py --preset qwen2.5-1.5b --skip_static \
    --attention "$attention" --profile 3 --out "$out/rollout_qwen2.5-1.5b_$attention.json"
  echo "engine $attention: exit $?"
done
echo "done in $((SECONDS - start)) s"
