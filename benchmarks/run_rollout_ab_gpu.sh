#!/usr/bin/env bash
# The rollout engine's two speed options, A/B on one GPU in one call (docs/sampling.md, "Tail
# compaction and command buffers"): benchmarks/rollout.py --ab runs the qwen2.5-1.5b draw four
# times in one process (the programs a run shares with an earlier one compile once): neither
# option, tail compaction only, command buffers only, both. Each run reports tokens/s, its
# step times by busy slots (the tail: 1-32 busy) and whether its tokens and log-probs equal
# the first run's; the JSON is rewritten after every run, so a run cut off by the time limit
# keeps the ones before it.
#
#   device call:  carry [".whl"], timeout 600, command: bash benchmarks/run_rollout_ab_gpu.sh
#   RL step with the options (a later call):  STAGES=rl_grpo bash benchmarks/run_rollout_ab_gpu.sh
#
# Stages (STAGES, default "ab"; they run in this order):
#   ab        rollout.py --ab: ~130 s of compiles for the first run (H100), then per run ~40 s
#             of rollout plus its new programs (compaction: 2 decode shapes, width 32 at
#             table widths 512 and 1,024 pages, from `rollout.py --simulate --attention
#             mosaic_gpu --compact_widths 32`; command buffers: every decode shape again)
#   rl_grpo   rl_step.py, the grpo workload at k = 0, with ENGINE_ARGS (run_rl_step_gpu.sh's
#             settings otherwise)
#   precompile  rollout.py with neither option and --precompile 16: its programs compiled
#             side by side first (engine.precompile: wall_s against ab's base compile_s; run
#             it in a call of its own, on a fresh compilation cache)
# Variables:
#   STAGES, BUDGET_S (default 570: seconds for the whole script)
#   AB_ARGS      rollout.py's extra flags (default "--compact_widths 32 --kv_gib 10": decode
#                calls with <= 32 of the 128 slots busy run 32 rows, 4,209 of the draw's 8,593
#                steps; a 10 GiB pool holds the draw's at most 4.0 GB of KV, so one run's pool
#                is never beside the previous one's)
#   ENGINE_ARGS  rl_step.py's engine options (default "--compact_widths 32 --command_buffers")
# Writes under $OUT: run.log and the stages' JSON files.
set -uo pipefail
source benchmarks/gpu_setup.sh
gpu_begin "$0" ab || exit 1

# shellcheck disable=SC2086
run_stage ab python3 benchmarks/rollout.py --preset qwen2.5-1.5b --skip_static --ab \
  ${AB_ARGS:---compact_widths 32 --kv_gib 10} --out "$out/rollout_ab_qwen2.5-1.5b.json"
# shellcheck disable=SC2086
run_stage rl_grpo python3 benchmarks/rl_step.py --preset qwen2.5-1.5b --workload grpo --k 0 \
  --warmup 1 --steps 1 --kv_gib 10 --remat dots_no_batch \
  ${ENGINE_ARGS:---compact_widths 32 --command_buffers} \
  --out "$out/rl_step_qwen2.5-1.5b_grpo_options.json"
run_stage precompile python3 benchmarks/rollout.py --preset qwen2.5-1.5b --skip_static \
  --kv_gib 10 --precompile 16 --out "$out/rollout_precompile_qwen2.5-1.5b.json"
echo "done in $((SECONDS - start)) s"
