#!/usr/bin/env bash
# The RL-step benchmark in one GPU call: ours (benchmarks/rl_step.py) first, then the peer,
# TRL's GRPOTrainer (benchmarks/rl_step_trl.py), one after the other on the same GPU.
#
#   here, once:   bash benchmarks/peer_wheels.sh   (the peer's wheels; the project's own GPU
#                 wheels go into the same .whl folder)
#   device call:  carry [".whl"], timeout 600, command: bash benchmarks/run_rl_step_gpu.sh
#   the peer:     a second call, command: STAGES=peer bash benchmarks/run_rl_step_gpu.sh
#   ours, tree:   STAGES=ours_tree bash benchmarks/run_rl_step_gpu.sh
#   7B peer:      STAGES=peer7b bash benchmarks/run_rl_step_gpu.sh
#
# Variables:
#   STAGES        stages to run, in this order: ours_grpo ours_tree peer peer7b
#                 (default "ours_grpo"). One stage per 600 s call: on an H100 the engine alone
#                 compiles for ~130 s and rolls out the 1.5b draw in ~42 s
#                 (benchmarks/results/rollout_qwen2.5-1.5b_mosaic_gpu_h100.json), so ours'
#                 four timed-or-warm-up steps (k = 0 and 1) take most of a call
#   OURS_ARGS     extra flags for every run of ours (default "--kv_gib 10 --remat dots_no_batch":
#                 the 1.5b draw held at most 4.0 GB of KV (rollout_qwen2.5-1.5b_mosaic_gpu_h100
#                 .json) and the engine's schedule of the grpo draw is unchanged down to 8 GiB
#                 (8,593 decode steps; 6 GiB: 8,929, rollout.py --simulate with the pool
#                 capped), so a 10 GiB pool leaves room for the update to keep its matmul
#                 outputs instead of recomputing the forward (remat "full": 17.1 s of a 67 s
#                 step at 30 K tokens/s). Memory, estimated from train_step_h100.json (43.8
#                 GiB at 16 K tokens with dots_no_batch, AdamW state included): + 6 GiB of
#                 accumulated gradients + 10 GiB KV + 3 GiB decode weights, ~63 of the 73.6
#                 GiB that XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 gives)
#   PEER_ARGS     the 1.5B peer's flags (default: the reduced step below)
#   PEER7B_ARGS   the 7B peer's flags
#   BUDGET_S      seconds this script may take in all (default 570, inside a 600 s call)
#   PEER_RESERVE_S  seconds kept for the 1.5B peer when ours runs first (default 280)
#
# The peer's default step is reduced: TRL decodes each generate call until its longest sample,
# so its whole 64 x 8 step takes about 20 minutes (benchmarks/rl_step_trl.py's docstring and
# docs/performance.md have the estimate); here it measures 8 prompts x 8 samples, prompts
# 17-24 of the draw (53,731 generated tokens, one generate call of 64 samples, 2,835 decode
# steps: the 8 consecutive prompts with the shortest longest sample, so the call fits 600 s;
# the first 8 need 6,363 steps, at the 76-96 ms per step measured on an H100 more than a
# call), and its JSON adds a labelled projection to the whole draw.
#
# Writes under $OUT: run.log (everything printed) and one JSON per run.
set -uo pipefail
# No network there: nothing may wait on the hub. Expandable segments: fewer fragmentation OOMs.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
source benchmarks/gpu_setup.sh
gpu_begin "$0" ours_grpo || exit 1
python3 - <<'PY'
from importlib.metadata import version, PackageNotFoundError
names = ("torch", "transformers", "accelerate", "trl", "datasets", "pyarrow", "fsspec",
         "huggingface-hub", "jax")
def v(name):
  try:
    return version(name)
  except PackageNotFoundError:
    return "absent"
print("versions:", {name: v(name) for name in names})
PY

# ========================= OURS: benchmarks/rl_step.py ======================================
# Stages ours_grpo / ours_tree: one process per workload runs k = 0 then k = 1 (the XLA
# cache of gpu_setup.sh lets the second reuse the first's programs). Step 0 of each k
# compiles and is not timed; step 1 is (k = 1: its batch was sampled while update 0 ran).
for workload in grpo tree; do
  stage "ours_$workload" || continue
  limit=$(( $(left) - $(stage peer && echo "${PEER_RESERVE_S:-280}" || echo 0) ))
  if (( limit < 30 )); then echo "ours $workload: skipped, ${limit}s left"; continue; fi
  echo "=== ours: qwen2.5-1.5b, $workload, k = 0 and 1 (limit ${limit}s) ==="
  # shellcheck disable=SC2086
  timeout "$limit" python3 benchmarks/rl_step.py --preset qwen2.5-1.5b --workload "$workload" \
    --k 0 1 --warmup 1 --steps 1 --out "$out/rl_step_qwen2.5-1.5b_$workload.json" \
    ${OURS_ARGS:---kv_gib 10 --remat dots_no_batch}
  echo "ours $workload: exit $?"
done
# ========================= PEER: TRL GRPOTrainer (benchmarks/rl_step_trl.py) ================
run_peer() {  # preset, json name, flags...
  local preset=$1 name=$2 limit
  shift 2
  limit=$(left)
  if (( limit < 60 )); then echo "peer $preset: skipped, ${limit}s left"; return; fi
  echo "=== peer: TRL GRPOTrainer, $preset (limit ${limit}s) ==="
  timeout "$limit" python3 benchmarks/rl_step_trl.py --preset "$preset" "$@" --out "$out/$name"
  echo "peer $preset: exit $?"
}
if stage peer; then
  # shellcheck disable=SC2086
  run_peer qwen2.5-1.5b rl_step_trl_qwen2.5-1.5b.json \
    ${PEER_ARGS:---first_prompt 17 --step_prompts 8 --generation_batch 64 --micro_batch 2}
fi
if stage peer7b; then
  # bf16 weights + gradients + AdamW state are 57 GiB: small generate calls and micro-batches.
  # shellcheck disable=SC2086
  run_peer qwen2.5-7b rl_step_trl_qwen2.5-7b.json \
    ${PEER7B_ARGS:---first_prompt 58 --step_prompts 4 --generation_batch 32 --micro_batch 1}
fi
echo "done in $((SECONDS - start)) s"
