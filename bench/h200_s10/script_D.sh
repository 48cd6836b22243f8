#!/usr/bin/env bash
# H2 window D (extra, session 10; HARD 100 s, alone on the GPU). Window C: backward alone at 128K with every lean span
# visit masked (span.KV_INTERIOR=False) 172.7 ms vs 177.4 (defaults: lean 64x4, unmasked interior visits) and 179.4
# (session 9's shipped span dK/dV); its train step was not timed. This run:
# Phase 1 (<= 42 s, two processes): P1 gpu_check release bf16 grad + recompute + 40K chunks with KV_INTERIOR=False
#   (both presets bf16/fp16 ran 41/41 in session 9's window C with the same kernel code);
#   P2 compile warm-up (bwd_tune 16K, candidates 37 36).
# Phase 2 (alone, to 94 s): train step 128K, 256K, then 32K, 64K: lean-64x4-masked vs s9-shipped (dense in the same
#   process; --reps 9: 128K 4 reps, 256K 1; first variant again).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
grep -nE "^KV_(LEAN|BLOCK_N|WARPS|NEXT|INTERIOR) =" kernels/triton/span.py
mkdir -p $R/p1 $R/warm
( OUT=$R/p1 timeout -k 1 40 python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    --set span.KV_INTERIOR=False > $R/p1_gpu_check_lean_masked.txt 2>&1; echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm timeout -k 1 40 python3 bench/bwd_tune.py --length 16384 --reps 1 --only 37 36 --json warm.json \
    > $R/p2_warm.txt 2>&1; echo "P2 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -E "FAIL|checks passed" $R/p1_gpu_check_lean_masked.txt | tail -4; echo "P1 PASS rows: $(grep -c PASS $R/p1_gpu_check_lean_masked.txt)"
left=$(( 94 - SECONDS ))
[ $left -gt 12 ] && timeout -k 1 $left python3 bench/train_variants.py --lengths 131072 262144 32768 65536 \
  --variants lean-64x4-masked s9-shipped --reps 9 --json train_variants_D.json > $R/train_variants.txt 2>&1
step "train_variants lean-64x4-masked / s9-shipped" $?; grep -v "^  mem\|UserWarning\|_warn_once" $R/train_variants.txt | tail -12
