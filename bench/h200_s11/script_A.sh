#!/usr/bin/env bash
# H2 window A, session 11 (<= 200 s; GPU shared with #13 training): CORRECTNESS ONLY, nothing timed.
# At most 3 GPU processes at once (the next job starts when one ends), each under its own timeout; every job ends by
# END seconds. Outputs under $OUT/h2A/.
#   j1 gpu_check --grads-only on HEAD's defaults: both presets bf16/fp16, release fp32, recompute, 40K chunks (the
#      fp16 / default-preset / fp32 grad rows were never run on session 10's final combination);
#   j2 gpu_check --grads-only release bf16 (+ recompute, chunks) with the new dK/dV switches together:
#      span.KV_L2_PREFETCH=True span.KV_ROTATE=264 window.KV_ROTATE=132;
#   j3 pytest on CUDA: the small-tile dK/dV tests (incl. the rotate cases) and test_gpu_backward_l2_prefetch_bit_identical;
#   j4 (when a slot frees) gpu_check --grads-only release bf16 with span.KV_WARPS=8 (64-key programs of 8 warps);
#   j5 (when a slot frees) the same with span.KV_TILE=32.
cd "$(dirname "$0")/../.." || exit 1
R=${OUT:-/tmp}/h2A
END=${END:-195}
mkdir -p $R/j1 $R/j2 $R/j4 $R/j5
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | grep -v '^??' | head -20
job() { # name cap command... : run in the background under min(cap, END - now) seconds
  local name=$1 cap=$2; shift 2
  local left=$(( END - SECONDS )); [ $left -gt $cap ] && left=$cap
  if [ $left -lt 25 ]; then echo "$name not started (${left}s left) at ${SECONDS}s" >> $R/jobs.txt; return; fi
  echo "$name start at ${SECONDS}s, limit ${left}s" >> $R/jobs.txt
  ( timeout -k 3 $left "$@" > $R/$name.txt 2>&1; echo "$name rc=$? at ${SECONDS}s" >> $R/jobs.txt ) &
}
job j1_gpu_check_defaults 190 env OUT=$R/j1 python3 bench/gpu_check.py --grads-only
job j2_gpu_check_prefetch_rotate 150 env OUT=$R/j2 python3 bench/gpu_check.py --grads-only --presets release \
    --dtypes bf16 --set span.KV_L2_PREFETCH=True span.KV_ROTATE=264 window.KV_ROTATE=132
job j3_pytest 150 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rfEs tests/test_triton.py \
    -k "backward_small_tiles or l2_prefetch_bit_identical"  # 16 tests
wait -n
job j4_gpu_check_64x8 120 env OUT=$R/j4 python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    --set span.KV_WARPS=8
wait -n
job j5_gpu_check_tile32 120 env OUT=$R/j5 python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    --set span.KV_TILE=32
wait
echo "== all jobs done at ${SECONDS}s"; cat $R/jobs.txt
for f in $R/j*.txt; do echo "== $f"; grep -E "checks passed|passed|failed|FAIL|Error" $f | tail -6; done
