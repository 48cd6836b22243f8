#!/usr/bin/env bash
# H2 window B, session 8 (≤ 480 s, GPU1 alone). HEAD 1e3d17a's defaults (window.KV_SPLIT, TRAIN_FWD_PARTS 8) plus,
# off by default, span.KV_PREFETCH: the span dK/dV loop reads the next pair tile's key range and pair arrays
# (1) and also its q/dO rows (2) one trip ahead, so a visit no longer waits for three dependent memory round trips
# (window A: dV and dK in separate launches cost +82 ms for ~+25% MMA work, so the visit's fixed cost dominates).
# Compiled for sm_90 under Triton 3.6.0; interpreter tests + mutants.
# Phase 1 (≤ 170 s, six processes at once; correctness, compile warm-ups):
#   P1 gpu_check release bf16/fp16 grads, recompute, 40K chunks with KV_PREFETCH=1;
#   P2 the same rows, bf16 only, with KV_PREFETCH=2;  P3 release fp32 grad + chunks with KV_PREFETCH=2;
#   P4 test_triton's small-tile / dQ / chunking / residual tests on CUDA (incl. the prefetch cases);
#   P5 / P6 compile warm-ups of phase 2's bwd_tune candidates and train_variants variants (times discarded).
# Phase 2 (alone): backward alone at 128K per candidate, per-kernel profile each (bwd_tune 0, 21-26);
# Phase 3 (alone): train step vs dense: new (= HEAD defaults), prefetch, prefetch-rows, s7-defaults at 32K, 128K,
#   64K, 256K, 16K.
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head
mkdir -p $R/p1 $R/p2 $R/p3 $R/warm5 $R/warm6
P=170
( OUT=$R/p1 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 fp16 \
    --set span.KV_PREFETCH=1 > $R/p1_gpu_check_prefetch1.txt 2>&1; echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p2 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    --set span.KV_PREFETCH=2 > $R/p2_gpu_check_prefetch2.txt 2>&1; echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p3 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes fp32 \
    --set span.KV_PREFETCH=2 > $R/p3_gpu_check_prefetch2_fp32.txt 2>&1; echo "P3 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfE tests/test_triton.py \
    -k "backward_small_tiles or dq_small or training_in_chunks or residuals_freed or backward_without_residuals" \
    > $R/p4_pytest_cuda_train.txt 2>&1; echo "P4 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm5 timeout -k 2 140 python3 bench/bwd_tune.py --length 16384 --reps 1 --only 0 21 22 23 24 25 26 \
    --json warm.json > $R/p5_warm.txt 2>&1; echo "P5 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm6 timeout -k 2 140 python3 bench/train_variants.py --lengths 32768 --reps 1 --dense-max 0 \
    --variants new prefetch prefetch-rows s7-defaults --json warm.json > $R/p6_warm.txt 2>&1
  echo "P6 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
for f in p1_gpu_check_prefetch1 p2_gpu_check_prefetch2 p3_gpu_check_prefetch2_fp32; do
  grep -E "FAIL|checks passed" $R/$f.txt | tail -5; echo "$f PASS rows: $(grep -c PASS $R/$f.txt)"; done
grep -E "PASSED|FAILED|ERROR|passed|failed" $R/p4_pytest_cuda_train.txt | tail -25

left=$(( 290 - SECONDS )); [ $left -gt 110 ] && left=110
[ $left -gt 15 ] && timeout -k 2 $left python3 bench/bwd_tune.py --length 131072 --reps 3 --only 0 21 22 23 24 25 26 \
  --profile-all --json bwd_tune_B.json > $R/bwd_tune.txt 2>&1
step "bwd_tune 128K (defaults; prefetch 1/2; 32/128-pair tiles; 2 stages)" $?
grep -E "backward|_span_bwd_kv|_window_bwd_kv" $R/bwd_tune.txt | tail -30

left=$(( 472 - SECONDS ))
[ $left -gt 15 ] && timeout -k 2 $left python3 bench/train_variants.py --lengths 32768 131072 65536 262144 16384 \
  --variants new prefetch prefetch-rows s7-defaults --reps 9 --host 32768 --profile 131072 \
  --profile-variants prefetch prefetch-rows --json train_variants_B.json > $R/train_variants.txt 2>&1
step "train_variants" $?; grep -v "^  mem\|UserWarning\|_warn_once" $R/train_variants.txt | tail -40
ls -la $R
