#!/usr/bin/env bash
# H4 window B, session 10 (<= 150 s, CORRECTNESS ONLY beside #13's evaluation; <= 2 GPU processes; nothing timed).
# P1: gpu_check --no-timing bf16/fp16 on the current defaults (decode TMA on; the pair sort's key from one Triton
#     kernel, int32 keys where they fit; H2's backward defaults).
# P2: then pytest on CUDA for the new prefill variants (test_triton: ordered search, pair sort, fold, TMA forward),
#     then gpu_check bf16 with every prefill variant on (search.SEARCH_ORDERED, window.FWD_FOLD, window/span.FWD_TMA,
#     window.FWD_I32).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | grep -v "^??" | head -20
mkdir -p $R/p1 $R/p3
( OUT=$R/p1 timeout -k 2 140 python3 bench/gpu_check.py --no-timing --dtypes bf16 fp16 > $R/p1_gpu_check_defaults.txt 2>&1
  echo "P1 (gpu_check bf16/fp16, defaults) rc=$? at ${SECONDS}s" >> $R/phases.txt ) &
( timeout -k 2 70 python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py \
    -k "tma or fold or pair_sort or ordered or forward_small_tiles or search_routing or tie_rule" > $R/p2_pytest_prefill.txt 2>&1
  echo "P2 (test_triton prefill variants on CUDA) rc=$? at ${SECONDS}s" >> $R/phases.txt
  left=$(( 142 - SECONDS ))
  [ $left -gt 20 ] && OUT=$R/p3 timeout -k 2 $left python3 bench/gpu_check.py --no-timing --dtypes bf16 \
    --set search.SEARCH_ORDERED=True window.FWD_FOLD=True window.FWD_TMA=True span.FWD_TMA=True window.FWD_I32=True \
    > $R/p3_gpu_check_variants.txt 2>&1
  echo "P3 (gpu_check bf16, every prefill variant on) rc=$? at ${SECONDS}s" >> $R/phases.txt ) &
wait
cat $R/phases.txt; step "all" 0
for f in $R/p1_gpu_check_defaults.txt $R/p3_gpu_check_variants.txt; do echo "-- $f"; grep -E "FAIL|checks passed|checks took|Error|settings" $f | tail -8; done
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p2_pytest_prefill.txt | tail -40
ls -la $R
