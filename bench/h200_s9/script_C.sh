#!/usr/bin/env bash
# H2 window C, session 9 (<= 200 s, GPU1 alone). Window B did not run, so C both checks and times the candidates.
# Defaults in this tree: span dK/dV plain visits with exp2 (span.KV_LEAN = False after window A), window dK/dV exp2 +
# int32 indices (window.KV_EXP2, KV_I32), relaxed gradient atomics (common.GRAD_ATOMIC_SEM; span dQ adds, search dK).
# Phase 1 (<= 95 s, five processes at once; correctness):
#   P1  gpu_check --grads-only (both presets, bf16/fp16 grads, grad-recompute, 40K chunks) on the defaults;
#   P1c the same with span.KV_NEXT=True (the next tile's key range read one trip ahead);
#   P1b gpu_check --grads-only --presets release --dtypes fp32 (fp32 grad row, H_Q 8, then 40K chunks);
#   P2  test_triton on CUDA: small-tile dK/dV tests + test_gpu_matches_oracle bf16/fp16;
#   P4  compile warm-up of the bwd_tune candidates (16K, times discarded).
# Phase 2 (alone): backward alone at 128K: defaults / s8 kernels / next / acq_rel atomics / lean (0 24 31 33 28).
# Phase 3 (alone): train step new vs s8-kernels vs next, 32K/128K/64K/256K (timings of record, dense same run).
# Phase 4 (alone): the 1M train step (dense extrapolated from phase 3's L^2 fit in BENCHMARKS).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
mkdir -p $R/p1 $R/p1b $R/p1c $R/warm
P=95
( OUT=$R/p1 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release default --dtypes bf16 fp16 \
    > $R/p1_gpu_check.txt 2>&1; echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p1c timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release default --dtypes bf16 fp16 \
    --set span.KV_NEXT=True > $R/p1c_gpu_check_next.txt 2>&1; echo "P1c rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p1b timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes fp32 \
    > $R/p1b_gpu_check_fp32.txt 2>&1; echo "P1b rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py \
    -k "backward_small_tiles or (gpu_matches_oracle and (bf16 or fp16))" > $R/p2_pytest_cuda.txt 2>&1
  echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm timeout -k 2 $P python3 bench/bwd_tune.py --length 16384 --reps 1 --only 0 24 31 33 28 \
    --json warm.json > $R/p4_warm.txt 2>&1; echo "P4 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -E "FAIL|checks passed" $R/p1_gpu_check.txt | tail -6; echo "P1 PASS rows: $(grep -c PASS $R/p1_gpu_check.txt)"
grep -E "FAIL|checks passed" $R/p1c_gpu_check_next.txt | tail -6; echo "P1c PASS rows: $(grep -c PASS $R/p1c_gpu_check_next.txt)"
grep -E "FAIL|checks passed|fp32" $R/p1b_gpu_check_fp32.txt | tail -8; echo "P1b PASS rows: $(grep -c PASS $R/p1b_gpu_check_fp32.txt)"
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p2_pytest_cuda.txt | tail -14

left=$(( 125 - SECONDS )); [ $left -gt 30 ] && left=30
[ $left -gt 10 ] && timeout -k 2 $left python3 bench/bwd_tune.py --length 131072 --reps 3 --only 0 24 31 33 28 \
  --profile-all --json bwd_tune_C.json > $R/bwd_tune.txt 2>&1
step "bwd_tune 128K (defaults; s8; next; acq_rel; lean)" $?
grep -E "backward|error|_span_bwd_kv|_window_bwd_kv|_span_bwd_dq|_search_bwd" $R/bwd_tune.txt | tail -26

left=$(( 176 - SECONDS )); [ $left -gt 52 ] && left=52
[ $left -gt 12 ] && timeout -k 2 $left python3 bench/train_variants.py --lengths 32768 131072 65536 262144 \
  --variants new s8-kernels next --reps 5 --json train_variants_C.json > $R/train_variants.txt 2>&1
step "train_variants new / s8-kernels / next" $?; grep -v "^  mem\|UserWarning\|_warn_once" $R/train_variants.txt | tail -16

left=$(( 198 - SECONDS ))
[ $left -gt 14 ] && timeout -k 1 $left python3 bench/speed.py --mode train --reps 1 --lengths 1048576 --dense-max 0 \
  --json speed_train_1m_C.json > $R/speed_train_1m.txt 2>&1
step "speed.py train 1M" $?; tail -4 $R/speed_train_1m.txt
ls -la $R
