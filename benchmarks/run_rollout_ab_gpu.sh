#!/usr/bin/env bash
# The rollout engine's options, A/B on one GPU in one call (docs/sampling.md, "Tail compaction
# (on by default), precompilation (options)"): benchmarks/rollout.py --ab runs the qwen2.5-1.5b
# draw several times in one process (programs a run shares with an earlier one compile once).
# Each run reports tokens/s, its step times by busy slots and how many samples' tokens and
# log-probs equal the first run's; the JSON is rewritten after every run, so a run cut off by
# the time limit keeps the ones before it. Measured (H100, benchmarks/results/rollout_ab_
# qwen2.5-1.5b_h100.json): base 12,946 tokens/s, compaction to 32 rows 14,342 (now the
# engine's default).
#
#   device call:  carry [".whl"], timeout 600, command: bash benchmarks/run_rollout_ab_gpu.sh
#   precompilation (a later call):  STAGES=precompile bash benchmarks/run_rollout_ab_gpu.sh
#
# Stages (STAGES, default "ab"; they run in this order):
#   ab        rollout.py --ab: the engine with tail compaction off (base), then on (compact,
#             the default); measured: base ~210 s of compiles then ~37 s of rollout, compact
#             ~75 s then ~34 s
#   precompile  rollout.py with the default engine and --precompile 16: its programs compiled
#             side by side first (engine.precompile: wall_s against ab's compile_s; run it in
#             a call of its own, on a fresh compilation cache)
# Variables:
#   STAGES, BUDGET_S (default 570: seconds for the whole script)
#   AB_ARGS      rollout.py's extra flags (default "--ab_runs base compact --kv_gib 10"; a
#                10 GiB pool holds the draw's at most 4.0 GB of KV, so one run's pool is never
#                beside the previous one's)
# Writes under $OUT: run.log and the stages' JSON files.
set -uo pipefail
source benchmarks/gpu_setup.sh
gpu_begin "$0" ab || exit 1

# shellcheck disable=SC2086
run_stage ab python3 benchmarks/rollout.py --preset qwen2.5-1.5b --skip_static --ab \
  ${AB_ARGS:---ab_runs base compact --kv_gib 10} --out "$out/rollout_ab_qwen2.5-1.5b.json"
run_stage precompile python3 benchmarks/rollout.py --preset qwen2.5-1.5b --skip_static \
  --kv_gib 10 --precompile 16 --out "$out/rollout_precompile_qwen2.5-1.5b.json"
echo "done in $((SECONDS - start)) s"
