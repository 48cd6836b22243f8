#!/usr/bin/env bash
# H2 window A, session 8 (≤ 480 s, GPU1 alone). HEAD's kernels = session 7's final defaults (by-heads training
# forward + c2264e8's backward) after 23eadd0's ops.py refactor: never run as one combination on a GPU.
# Phase 1 (≤ 230 s, nine processes at once so their Triton compiles overlap; correctness only, defaults):
#   P1 gpu_check release fp32 grad (H_Q 8) + 40K chunked == one shot;
#   P2 gpu_check bf16/fp16 grads, both presets, + release grad-recompute + 40K chunks;
#   P3 / P4 / P5 test_triton's test_gpu_matches_oracle: default-fp32 | release-fp32 | the four bf16/fp16 cases;
#   P6 gpu_check release bf16/fp16 grads, grad-recompute, 40K chunks with the candidates common.TRAIN_FWD_PARTS=8
#      (4 heads per chunk at 40K) and window.KV_SPLIT=True (window dK/dV trips inside every window without masks);
#   P8 gpu_check release fp32 grad + 40K chunks with window.KV_SPLIT=True;
#   P9 gpu_check release bf16 grads + 40K chunks with dV and dK in separate launches (span/window.KV_SEPARATE=True)
#      and window.KV_SPLIT=True;
#   P7 compile warm-up of phase 2's variants at 32K (times discarded).
# Phase 2 (alone on the GPU): train step vs dense per variant (new = defaults, fwd-parts-8, fwd-parts-4,
#   window-split, parts8-split, separate = dV and dK in separate launches, split-separate) at 32K, 128K, 64K, 256K,
#   16K; forward host time at 32K/16K; per-kernel profile of the 128K step (defaults, window-split, split-separate).
# Phase 3 (time left): test_triton's small-tile / dQ / residual / chunking tests on CUDA.
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head
mkdir -p $R/p1 $R/p2 $R/p6 $R/p8 $R/p9 $R/warm
P=230
( OUT=$R/p1 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes fp32 \
    > $R/p1_gpu_check_fp32.txt 2>&1; echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p2 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets default release --dtypes bf16 fp16 \
    > $R/p2_gpu_check_16.txt 2>&1; echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton.py \
    -k "default and fp32" > $R/p3_pytest_gpu.txt 2>&1; echo "P3 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton.py \
    -k "release and fp32" > $R/p4_pytest_gpu.txt 2>&1; echo "P4 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton.py \
    -k "bf16 or fp16" > $R/p5_pytest_gpu.txt 2>&1; echo "P5 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p6 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 fp16 \
    --set common.TRAIN_FWD_PARTS=8 window.KV_SPLIT=True > $R/p6_gpu_check_parts8_split.txt 2>&1
  echo "P6 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p8 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes fp32 \
    --set window.KV_SPLIT=True > $R/p8_gpu_check_split_fp32.txt 2>&1; echo "P8 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p9 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    --set span.KV_SEPARATE=True window.KV_SEPARATE=True window.KV_SPLIT=True > $R/p9_gpu_check_separate.txt 2>&1
  echo "P9 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm timeout -k 2 150 python3 bench/train_variants.py --lengths 32768 --reps 1 --dense-max 0 \
    --variants new fwd-parts-8 window-split split-separate --json warm.json > $R/p7_warm.txt 2>&1
  echo "P7 (compile warm-up, times not used) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
for f in p1_gpu_check_fp32 p2_gpu_check_16 p6_gpu_check_parts8_split p8_gpu_check_split_fp32 p9_gpu_check_separate; do
  grep -E "FAIL|checks passed" $R/$f.txt | tail -5; echo "$f PASS rows: $(grep -c PASS $R/$f.txt)"; done
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p3_pytest_gpu.txt $R/p4_pytest_gpu.txt $R/p5_pytest_gpu.txt | tail -12

left=$(( 430 - SECONDS )); [ $left -gt 170 ] && left=170
[ $left -gt 20 ] && timeout -k 2 $left python3 bench/train_variants.py --lengths 32768 131072 65536 262144 16384 \
  --variants new fwd-parts-8 window-split parts8-split separate split-separate fwd-parts-4 --reps 9 \
  --host 32768 16384 --profile 131072 --profile-variants window-split split-separate --json train_variants_A.json > $R/train_variants.txt 2>&1
step "train_variants" $?; grep -v "^  mem\|UserWarning\|_warn_once" $R/train_variants.txt | tail -40

left=$(( 472 - SECONDS ))
[ $left -gt 10 ] && timeout -k 1 $left python3 -m pytest -o addopts="" -p no:cacheprovider -q -rfE tests/test_triton.py \
  -k "backward_small_tiles or dq_small or residuals_freed or training_in_chunks or backward_without_residuals" \
  > $R/pytest_cuda_train.txt 2>&1
step "pytest test_triton training tests on CUDA" $?; grep -E "passed|failed|FAILED|ERROR" $R/pytest_cuda_train.txt | tail -6
ls -la $R
