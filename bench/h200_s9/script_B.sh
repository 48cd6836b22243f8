#!/usr/bin/env bash
# H2 window B, session 9 (<= 220 s, GPU1 alone). Defaults in this tree: span dK/dV plain visits with exp2
# (span.KV_LEAN = False after window A), window dK/dV exp2 + int32 indices (window.KV_EXP2, KV_I32), and the
# backward's gradient atomics (span dQ adds, search dK scatter) relaxed instead of acq_rel (common.GRAD_ATOMIC_SEM).
# Phase 1 (<= 100 s, five processes at once):
#   P1  gpu_check --grads-only (both presets, bf16/fp16 grads, grad-recompute, 40K chunks) on these defaults;
#   P1b the same with span.KV_LEAN=True (the lean visits, now with the gate folded into lse and delta);
#   P1c the same with span.KV_NEXT=True (the next tile's key range read one trip ahead);
#   P2  test_triton on CUDA: the small-tile dK/dV tests (incl. sorted-lean, span blocks of 32);
#   P4  compile warm-up of the bwd_tune candidates (16K, times discarded).
# Phase 2 (alone): backward alone at 128K: defaults / s8 kernels / span 64-key 4-warp / lean / lean all-masked /
#   lean 64-key 4-warp / next tile's key range read ahead / that + lean / acq_rel atomics (candidates 0 24 27-33).
# Phase 3 (alone, time left): train step: new vs s8-kernels vs lean vs next at 32K, 128K, 64K.
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
mkdir -p $R/p1 $R/p1b $R/p1c $R/warm
P=100
( OUT=$R/p1 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release default --dtypes bf16 fp16 \
    > $R/p1_gpu_check.txt 2>&1; echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p1b timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release default --dtypes bf16 fp16 \
    --set span.KV_LEAN=True > $R/p1b_gpu_check_lean.txt 2>&1; echo "P1b rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p1c timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release default --dtypes bf16 fp16 \
    --set span.KV_NEXT=True > $R/p1c_gpu_check_next.txt 2>&1; echo "P1c rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py \
    -k "backward_small_tiles" > $R/p2_pytest_cuda.txt 2>&1; echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm timeout -k 2 $P python3 bench/bwd_tune.py --length 16384 --reps 1 --only 0 24 27 28 29 30 31 32 33 \
    --json warm.json > $R/p4_warm.txt 2>&1; echo "P4 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -E "FAIL|checks passed" $R/p1_gpu_check.txt | tail -6; echo "P1 PASS rows: $(grep -c PASS $R/p1_gpu_check.txt)"
grep -E "FAIL|checks passed" $R/p1b_gpu_check_lean.txt | tail -6; echo "P1b PASS rows: $(grep -c PASS $R/p1b_gpu_check_lean.txt)"
grep -E "FAIL|checks passed" $R/p1c_gpu_check_next.txt | tail -6; echo "P1c PASS rows: $(grep -c PASS $R/p1c_gpu_check_next.txt)"
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p2_pytest_cuda.txt | tail -10
grep -E "backward|error" $R/p4_warm.txt | tail -8

left=$(( 150 - SECONDS )); [ $left -gt 50 ] && left=50
[ $left -gt 10 ] && timeout -k 2 $left python3 bench/bwd_tune.py --length 131072 --reps 3 --only 0 24 27 28 29 30 31 32 33 \
  --profile-all --json bwd_tune_B.json > $R/bwd_tune.txt 2>&1
step "bwd_tune 128K" $?
grep -E "backward|error|_span_bwd_kv|_window_bwd_kv|_span_bwd_dq|_search_bwd|fastest" $R/bwd_tune.txt | tail -46

left=$(( 214 - SECONDS ))
[ $left -gt 12 ] && timeout -k 1 $left python3 bench/train_variants.py --lengths 32768 131072 65536 \
  --variants new s8-kernels lean next --reps 5 --json train_variants_B.json > $R/train_variants.txt 2>&1
step "train_variants new / s8-kernels / lean / next" $?; grep -v "^  mem\|UserWarning\|_warn_once" $R/train_variants.txt | tail -14
ls -la $R
