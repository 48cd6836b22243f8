#!/usr/bin/env bash
# H2 window A, session 10 (<= 400 s; GPU shared with #13 training): CORRECTNESS ONLY, nothing timed.
# At most 3 GPU processes of mine at once (a queue: the next job starts when one ends), each under its own timeout.
#   J1 gpu_check --grads-only --presets release --dtypes fp32 on the shipped defaults (the release fp32 grad row,
#      H_Q 8, that timed out in session 9's window C; then the 40K chunked == one-shot rows);
#   J2 test_triton on CUDA: test_gpu_matches_oracle fp32 (default + release) on the shipped defaults;
#   J3 gpu_check --grads-only (both presets bf16/fp16, release fp32, recompute, 40K chunks) with the candidate
#      span dK/dV: lean visits in 64-key 4-warp programs (span.KV_LEAN=True KV_BLOCK_N=64 KV_WARPS=4; KV_NEXT and
#      KV_INTERIOR as shipped: on);
#   J4 (when a slot frees) model_grad_check: bf16 gradient decomposition vs the fp32 oracle (both weights, L 1024 and
#      4096, batches 0 1 2; runs: triton fp32/bf16, oracle bf16, routing forced, fp32 with bf16 weights +- forced);
#   J5 (when a slot frees) model_grad_check loss curves: 150 steps, L 1024 x 16, same init/batches:
#      oracle fp32 (no autocast, no TF32), Triton bf16, oracle bf16, Triton fp32.
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
END=385   # every job ends by then (budget 400)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | grep -v '^??' | head -20
mkdir -p $R/j1 $R/j3 $R/j4 $R/j5
job() { # name cap command... : run in the background under min(cap, END - now) seconds
  local name=$1 cap=$2; shift 2
  local left=$(( END - SECONDS )); [ $left -gt $cap ] && left=$cap
  if [ $left -lt 25 ]; then echo "$name not started (${left}s left) at ${SECONDS}s" >> $R/jobs.txt; return; fi
  echo "$name start at ${SECONDS}s, limit ${left}s" >> $R/jobs.txt
  ( timeout -k 3 $left "$@" > $R/$name.txt 2>&1; echo "$name rc=$? at ${SECONDS}s" >> $R/jobs.txt ) &
}
job j1_gpu_check_fp32 380 env OUT=$R/j1 python3 bench/gpu_check.py --grads-only --presets release --dtypes fp32
job j2_pytest_fp32 380 python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py \
    -k "gpu_matches_oracle and fp32"
job j3_gpu_check_lean64x4 380 env OUT=$R/j3 python3 bench/gpu_check.py --grads-only \
    --set span.KV_LEAN=True span.KV_BLOCK_N=64 span.KV_WARPS=4
wait -n
job j4_model_grad_check 240 python3 bench/model_grad_check.py --lengths 1024 4096 --batch-steps 0 1 2 \
    --runs triton-fp32 triton-bf16 oracle-bf16 oracle-bf16-forced-routing oracle-fp32-bf16-weights \
    oracle-fp32-bf16-weights-forced-routing --out $R/j4/model_grad_check_A.json
wait -n
job j5_loss_curves 240 python3 bench/model_grad_check.py --lengths --train-steps 150 --train-length 1024 \
    --train-batch 16 --train-runs oracle-fp32 triton oracle triton-fp32 --out $R/j5/loss_curves_A.json
wait
echo "== all jobs done at ${SECONDS}s"; cat $R/jobs.txt
for f in j1_gpu_check_fp32 j3_gpu_check_lean64x4; do
  echo "-- $f: PASS rows $(grep -c PASS $R/$f.txt), FAIL rows $(grep -c FAIL $R/$f.txt)"
  grep -E "FAIL|checks passed|fp32" $R/$f.txt | tail -14
done
echo "-- j2"; grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/j2_pytest_fp32.txt | tail -6
echo "-- j4"; grep -v "Warning\|warn" $R/j4_model_grad_check.txt | tail -40
echo "-- j5"; grep -v "Warning\|warn" $R/j5_loss_curves.txt | tail -14
ls -la $R
