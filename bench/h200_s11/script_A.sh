#!/usr/bin/env bash
# HISTORY: not run as a whole (session 11 ran j2/j3; session 13's bench/s13/call3.sh checked the rotations the same
# way). The span dK/dV switches j2 and j3 tried were removed after session 13's timings (bench/bwd_tune.py, candidates
# 40-49): j2 and j3 below now check only window.KV_ROTATE=132 (the H200's default since) and the remaining cases.
# H2 window A, session 11 (<= 200 s; GPU may be shared): CORRECTNESS ONLY, nothing timed. In session 11 only j2 and
# j3 ran (the coordinator's windows C/D, on the switches' first forms); the whole script is the next session's request.
# At most 3 GPU processes at once (the next job starts when one ends), each under its own timeout; every job ends by
# END seconds. Outputs under $OUT/h2A/.
#   j1 gpu_check --grads-only on HEAD's defaults: both presets bf16/fp16, release fp32, recompute, 40K chunks (the
#      coordinator's A0 of session 11 ran these rows on session 10's final kernels, 91/91; the defaults' PTX is
#      unchanged since, so j1 is the first to cut when time is short);
#   j2 gpu_check --grads-only release bf16 (+ recompute, chunks) with the new dK/dV switches together (in session 11
#      the span's L2 prefetch and rotation too, since removed): window.KV_ROTATE=132;
#   j3 pytest on CUDA: the small-tile dK/dV tests (incl. the window rotate cases);
#   j4 (when a slot frees) gpu_check --grads-only release bf16 with span.KV_WARPS=8 (64-key programs of 8 warps);
#   j5 (when a slot frees) the same with span.KV_TILE=32.
cd "$(dirname "$0")/../.." || exit 1
R=${OUT:-/tmp}/h2A
END=${END:-195}
mkdir -p $R/j1 $R/j2 $R/j4 $R/j5
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | grep -v '^??' | head -20
. "$(dirname "$0")/jobs.sh"  # job NAME CAP COMMAND...
job j1_gpu_check_defaults 190 env OUT=$R/j1 python3 bench/gpu_check.py --grads-only
job j2_gpu_check_rotate 150 env OUT=$R/j2 python3 bench/gpu_check.py --grads-only --presets release \
    --dtypes bf16 --set window.KV_ROTATE=132
job j3_pytest 150 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rfEs tests/test_triton.py \
    -k "backward_small_tiles or kv_rotate"  # 12 tests
wait -n
job j4_gpu_check_64x8 120 env OUT=$R/j4 python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    --set span.KV_WARPS=8
wait -n
job j5_gpu_check_tile32 120 env OUT=$R/j5 python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    --set span.KV_TILE=32
wait
echo "== all jobs done at ${SECONDS}s"; cat $R/jobs.txt
for f in $R/j*.txt; do echo "== $f"; grep -E "checks passed|passed|failed|FAIL|Error" $f | tail -6; done
