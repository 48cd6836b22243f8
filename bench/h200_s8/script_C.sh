#!/usr/bin/env bash
# H2 window C, session 8 (≤ 420 s, GPU1 alone): final checks and timings of record of HEAD's defaults.
# HEAD = b5bb5b7 (window.KV_SPLIT = True, TRAIN_FWD_PARTS = 8; span dK/dV = c2264e8's) + gpu_check's --dtypes in
# full mode (so the slow fp32 grad row runs in its own process).
# Phase 1 (≤ 220 s, seven processes at once; correctness of the final defaults):
#   P1 gpu_check.py --no-timing --dtypes bf16 fp16: every check but the fp32 grad row (grads both presets bf16/fp16,
#      grad-recompute, 40K chunks, prefill rows, decode, chunked prefill, CUDA graph);
#   P1b gpu_check.py --grads-only --presets release --dtypes fp32: the fp32 grad row (+ 40K chunks again);
#   P2 / P3 / P4 test_triton's test_gpu_matches_oracle: default-fp32 | release-fp32 | the four bf16/fp16 cases;
#   P5 / P6 compile warm-ups of phases 2 and 4 (times discarded).
# Phase 2 (alone): train step vs dense, peak memory, bwd/fwd: new (= HEAD defaults) and s7-defaults (session 7's
#   settings, for the change) at 32K, 128K, 64K, 256K, 16K, median of 9 (fewer from 128K); profile at 128K.
# Phase 3 (alone): the 1M train step (speed.py train; dense at 1M extrapolated from the L^2 fit).
# Phase 4 (alone, time left): backward alone at 128K: defaults, both dK/dV kernels at 16 warps, 32-pair span tiles,
#   64-key dK/dV programs.
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head
mkdir -p $R/p1 $R/p1b $R/warm $R/warm6
P=220
( OUT=$R/p1 timeout -k 2 $P python3 bench/gpu_check.py --no-timing --dtypes bf16 fp16 > $R/p1_gpu_check.txt 2>&1
  echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p1b timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes fp32 \
    > $R/p1b_gpu_check_fp32.txt 2>&1; echo "P1b rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton.py \
    -k "default and fp32" > $R/p2_pytest_gpu.txt 2>&1; echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton.py \
    -k "release and fp32" > $R/p3_pytest_gpu.txt 2>&1; echo "P3 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton.py \
    -k "bf16 or fp16" > $R/p4_pytest_gpu.txt 2>&1; echo "P4 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm timeout -k 2 150 python3 bench/train_variants.py --lengths 32768 --reps 1 --dense-max 0 \
    --variants new s7-defaults --json warm.json > $R/p5_warm.txt 2>&1; echo "P5 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm6 timeout -k 2 150 python3 bench/bwd_tune.py --length 16384 --reps 1 --only 21 22 23 --json warm.json \
    > $R/p6_warm.txt 2>&1; echo "P6 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -E "FAIL|checks passed|checks took" $R/p1_gpu_check.txt | tail -8; echo "P1 PASS rows: $(grep -c PASS $R/p1_gpu_check.txt)"
grep -E "FAIL|checks passed" $R/p1b_gpu_check_fp32.txt | tail -4; echo "P1b PASS rows: $(grep -c PASS $R/p1b_gpu_check_fp32.txt)"
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p2_pytest_gpu.txt $R/p3_pytest_gpu.txt $R/p4_pytest_gpu.txt | tail -12

left=$(( 335 - SECONDS )); [ $left -gt 130 ] && left=130
[ $left -gt 20 ] && timeout -k 2 $left python3 bench/train_variants.py --lengths 32768 131072 65536 262144 16384 \
  --variants new s7-defaults --reps 9 --host 32768 16384 --profile 131072 --json train_variants_C.json \
  > $R/train_variants.txt 2>&1
step "train_variants" $?; grep -v "^  mem\|UserWarning\|_warn_once" $R/train_variants.txt | tail -30

left=$(( 388 - SECONDS ))
[ $left -gt 25 ] && timeout -k 2 $left python3 bench/speed.py --mode train --reps 1 --lengths 1048576 --dense-max 0 \
  --json speed_train_1m_C.json > $R/speed_train_1m.txt 2>&1
step "speed.py train 1M" $?; tail -6 $R/speed_train_1m.txt

left=$(( 414 - SECONDS ))
[ $left -gt 12 ] && timeout -k 1 $left python3 bench/bwd_tune.py --length 131072 --reps 3 --only 0 21 22 23 --profile-all \
  --json bwd_tune_C.json > $R/bwd_tune.txt 2>&1
step "bwd_tune 128K (defaults; 16 warps; 32-pair tiles; 64-key programs)" $?; grep -E "backward|error|_span_bwd_kv|_window_bwd_kv" $R/bwd_tune.txt | tail -12
ls -la $R
