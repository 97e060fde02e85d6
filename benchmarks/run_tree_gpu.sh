#!/usr/bin/env bash
# Issue 25's GPU measurements of the Mosaic GPU tree kernel (docs/tree_attention.md, "How to
# measure"), in order, as far as one call's budget goes; each stage saves its JSON (and the
# Python scripts save after every section), so a stage cut off keeps what it measured.
#
#   device call:  carry [".whl"], timeout 600, command: bash benchmarks/run_tree_gpu.sh
#   later calls:  STAGES="unrolled compiled" bash benchmarks/run_tree_gpu.sh   (and so on)
#
# Stages (STAGES, default "anchor"; they run in this order):
#   anchor     benchmarks/tree_attention.py: correctness, the anchor workload's fwd and
#              fwd+bwd for tree_mgpu, the Triton kernel, cuDNN, FlexAttention, the stock
#              attention_mgpu, and plain causal rows (targets: fwd <= 1.8 ms, fwd+bwd <= 6.0 ms,
#              >= 1.3x / 1.45x flex, causal fwd >= 0.9x cuDNN)
#   unrolled   benchmarks/tree_vs_unrolled.py --high-sharing at qwen2.5-1.5b with tree_mgpu
#              (target: update speed-up >= 0.85x the token ratio; `tree` is the same kernel
#              on Hopper now that `auto` picks it); each layout's rows in the micro-batches
#              that fit the GPU by the compiled step's memory analysis (`note:` lines)
#   compiled   the kernel's compiled pytest cases (KAT_TEST_GPU=1 ... -k compiled)
#   sweep      tiles of tree_mgpu, one compilation each, each checked against the default's
#              outputs: dq/dkdv pairs (fwd+bwd ms, bwd ms), then forward tiles (fwd ms); one
#              call on its own (STAGES=sweep)
# Variables: STAGES, BUDGET_S (default 570: seconds for the whole script).
# Writes under $OUT: run.log and the stages' JSON files.
set -uo pipefail
source benchmarks/gpu_setup.sh
gpu_begin "$0" anchor || exit 1

run_stage anchor python3 benchmarks/tree_attention.py --out "$out" --check-heads 2 \
  --backends mgpu,gpu --name tree_attention_mgpu.json
run_stage unrolled python3 benchmarks/tree_vs_unrolled.py --high-sharing --preset qwen2.5-1.5b \
  --dtype bfloat16 --remat full --attention tree_mgpu --repeats 3 \
  --out "$out/tree_vs_unrolled_high_sharing.json"
run_stage compiled env KAT_TEST_GPU=1 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_tree_attention_mgpu.py tests/kernels/test_tree_attention.py -k compiled
# Each list's first entry is the default (dQ 128x128, dK/dV 128 key rows over 64-query tiles;
# forward 128x128 without ping-pong), the yardstick of the others' timing and outputs
# (`vs_first_config`). Backward: a 3-stage ring in dK/dV alone, then in dQ over 64-key tiles
# alone (both together ran 8.00 ms against the default's 7.26 in the first sweep), and dQ
# over 64-key tiles with 2 stages; forward: with ping-pong.
# Earlier sweeps: benchmarks/results/tree_attention_mgpu_sweep*_h100.json.
run_stage sweep python3 benchmarks/tree_attention.py --out "$out" --skip-checks --skip-peers \
  --causal-lengths "" --backends mgpu --name tree_attention_mgpu_sweep.json --sweep-bwd \
  128,128,0,2/64,128,0,2 128,128,0,2/64,128,0,3 128,64,0,3/64,128,0,2 \
  128,64,0,2/64,128,0,2 --sweep-fwd 128,128,0,2 128,128,0,2,1
echo "done in $((SECONDS - start)) s"
