#!/usr/bin/env bash
# H2 window A, session 9 (<= 220 s, GPU1 alone). Working tree: span dK/dV lean visits (span.KV_LEAN), exp2 in both
# dK/dV kernels (window.KV_EXP2), window dK/dV int32 indices (window.KV_I32) -- all three on by default here.
# Phase 1 (<= 95 s, four processes at once):
#   P1 gpu_check --grads-only (both presets, bf16/fp16 grads, grad-recompute, 40K chunks) on the new defaults;
#   P2 test_triton on CUDA: small-tile dK/dV tests (incl. sorted-lean) + test_gpu_matches_oracle bf16/fp16;
#   P3 model_grad_check (bf16-autocast whole-model gradient gap vs the fp32 oracle; current kernels);
#   P4 compile warm-up of the bwd_tune candidates (16K, times discarded).
# Phase 2 (alone): backward alone at 128K: new defaults / session 8's dK/dV kernels / no lean span / span dK/dV in
#   64-key programs of 4 warps (span.KV_BLOCK_N = 64, KV_WARPS = 4).
# Phase 3 (alone): the 1M train step (speed.py train; dense extrapolated later from the L^2 fit) -- new defaults if
#   P1 passed, else session 8's kernels.
# Phase 4 (alone, time left): train step new vs s8-kernels at 32K and 128K (bwd/fwd, ratio vs dense).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
mkdir -p $R/p1 $R/p3 $R/warm
P=95
( OUT=$R/p1 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release default --dtypes bf16 fp16 \
    > $R/p1_gpu_check.txt 2>&1; echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py \
    -k "backward_small_tiles or (gpu_matches_oracle and (bf16 or fp16))" > $R/p2_pytest_cuda.txt 2>&1
  echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 bench/model_grad_check.py --lengths 1024 4096 --batch-steps 0 1 \
    --runs triton-fp32 triton-bf16 oracle-bf16 oracle-bf16-forced-routing --out $R/p3/model_grad_check_A.json \
    > $R/p3_model_grad_check.txt 2>&1; echo "P3 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm timeout -k 2 $P python3 bench/bwd_tune.py --length 16384 --reps 1 --only 0 24 25 27 --json warm.json \
    > $R/p4_warm.txt 2>&1; echo "P4 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -E "FAIL|checks passed" $R/p1_gpu_check.txt | tail -6; echo "P1 PASS rows: $(grep -c PASS $R/p1_gpu_check.txt)"
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p2_pytest_cuda.txt | tail -14
grep -v "Warning\|warn" $R/p3_model_grad_check.txt | tail -45
grep -E "backward|error" $R/p4_warm.txt | tail -5

left=$(( 140 - SECONDS )); [ $left -gt 45 ] && left=45
[ $left -gt 10 ] && timeout -k 2 $left python3 bench/bwd_tune.py --length 131072 --reps 3 --only 0 24 25 27 --profile-all \
  --json bwd_tune_A.json > $R/bwd_tune.txt 2>&1
step "bwd_tune 128K (new; s8 kernels; no lean span; span 64-key 4-warp programs)" $?
grep -E "backward|error|_span_bwd_kv|_window_bwd_kv|_span_bwd_dq|_window_bwd_dq" $R/bwd_tune.txt | tail -24

SET=""
if ! grep -q "checks passed" $R/p1_gpu_check.txt || grep -q "FAIL" $R/p1_gpu_check.txt; then
  SET="--set span.KV_LEAN=False window.KV_EXP2=False window.KV_I32=False"; echo "1M with session 8's kernels (P1 not clean)"
fi
left=$(( 188 - SECONDS )); [ $left -gt 52 ] && left=52
[ $left -gt 20 ] && timeout -k 2 $left python3 bench/speed.py --mode train --reps 1 --lengths 1048576 --dense-max 0 \
  --json speed_train_1m_A.json $SET > $R/speed_train_1m.txt 2>&1
step "speed.py train 1M" $?; tail -4 $R/speed_train_1m.txt

left=$(( 214 - SECONDS ))
[ $left -gt 12 ] && timeout -k 1 $left python3 bench/train_variants.py --lengths 32768 131072 --variants new s8-kernels \
  --reps 5 --json train_variants_A.json > $R/train_variants.txt 2>&1
step "train_variants 32K/128K new vs s8-kernels" $?; grep -v "^  mem\|UserWarning\|_warn_once" $R/train_variants.txt | tail -10
ls -la $R
