#!/usr/bin/env bash
# H2 window B, session 10 (<= 150 s; GPU shared with #13 evaluation): CORRECTNESS ONLY, <= 2 processes, nothing timed.
# Tree defaults now: span dK/dV lean visits in 64-key 4-warp programs (span.KV_LEAN=True, KV_BLOCK_N=64, KV_WARPS=4;
# window A: gpu_check grads 47/47 with these settings, incl. the release fp32 row).
#   P1 test_triton on CUDA on these defaults: test_gpu_matches_oracle bf16/fp16 (both presets; D 64 and 128, batch 2
#      with left padding, a decode row) + the small-tile dK/dV tests; then (time left) model_grad_check, shipped
#      weights: Triton bf16 and oracle bf16 against the fp32 oracle and each other, with routing differences per layer;
#   P2 test_gpu_matches_oracle release fp32 on these defaults.
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git status --short 2>/dev/null | grep -v '^??' | head -20
grep -nE "^KV_(LEAN|BLOCK_N|WARPS|NEXT|INTERIOR) =" kernels/triton/span.py
mkdir -p $R/p1b
( timeout -k 2 100 python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py \
    -k "backward_small_tiles or (gpu_matches_oracle and (bf16 or fp16))" > $R/p1_pytest_cuda.txt 2>&1
  echo "P1 pytest rc=$? at ${SECONDS}s" >> $R/phase.txt
  left=$(( 140 - SECONDS ))
  if [ $left -gt 25 ]; then
    timeout -k 2 $left python3 bench/model_grad_check.py --weights shipped --lengths 1024 4096 --batch-steps 0 1 2 \
      --runs triton-bf16 oracle-bf16 --out $R/p1b/model_grad_check_B.json > $R/p1b_model_grad_check.txt 2>&1
    echo "P1b model_grad_check rc=$? at ${SECONDS}s" >> $R/phase.txt
  fi ) &
( timeout -k 2 140 python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py \
    -k "gpu_matches_oracle and release and fp32" > $R/p2_pytest_fp32.txt 2>&1; echo "P2 rc=$? at ${SECONDS}s" >> $R/phase.txt ) &
wait
cat $R/phase.txt
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p1_pytest_cuda.txt | tail -14
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p2_pytest_fp32.txt | tail -3
grep -v "Warning\|warn" $R/p1b_model_grad_check.txt 2>/dev/null | tail -20
ls -la $R
