#!/usr/bin/env bash
# H4 window A, session 10 (<= 400 s, CORRECTNESS ONLY: runs beside #13 training on the same GPU; nothing is timed;
# <= 3 GPU processes at once).
# Goal 1: 018a989 (decode group/heads kernels share _online_step) on its own defaults (DECODE_TMA off).
# Goal 2: the group kernel with a TMA constexpr (separate TMA kernel removed; DECODE_TMA = True now by default on cc >= 9).
# Phase 1 (3 procs): P1 gpu_check --no-timing bf16/fp16 with DECODE_TMA=False; P2 the same with the new defaults
#   (TMA on); P3 pytest -m gpu test_triton_decode (incl. new TMA bit test), test_decode_fast, test_decode_graph.
# Phase 2 (3 procs): P4 GPU decode tests on a tree copy with DECODE_TMA = False (018a989's defaults);
#   P5/P6 mutants of the TMA path on tree copies (partial block read through TMA; KV head 0 read for every group):
#   test_gpu_decode_tma_bit_identical (and the oracle 'tma' case) must FAIL.
# Phase 3 (3 procs): session_decode.py at 64K with --tokens 256 (checks the replay_ms bound fix; times discarded);
#   prefill variants (all off by default): test_triton -k search on CUDA (ordered top-K), and gpu_check bf16 with
#   search.SEARCH_ORDERED, window.FWD_FOLD (scale folded into exp2), window/span.FWD_TMA (interior blocks via TMA) on.
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
mkdir -p $R/p1 $R/p2
P=170
( OUT=$R/p1 timeout -k 2 $P python3 -c "
import sys, runpy
sys.argv = ['bench/gpu_check.py', '--no-timing', '--dtypes', 'bf16', 'fp16']
from superlinear_kernels.triton import decode
decode.DECODE_TMA = False
print('DECODE_TMA', decode.DECODE_TMA, flush=True)
runpy.run_path('bench/gpu_check.py', run_name='__main__')" > $R/p1_gpu_check_tma_off.txt 2>&1
  echo "P1 (gpu_check, TMA off) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p2 timeout -k 2 $P python3 bench/gpu_check.py --no-timing --dtypes bf16 fp16 > $R/p2_gpu_check_tma_on.txt 2>&1
  echo "P2 (gpu_check, defaults = TMA on) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton_decode.py \
    tests/test_decode_fast.py tests/test_decode_graph.py > $R/p3_pytest_decode.txt 2>&1
  echo "P3 (GPU decode tests, defaults) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
for f in $R/p1_gpu_check_tma_off.txt $R/p2_gpu_check_tma_on.txt; do echo "-- $f"; grep -E "FAIL|checks passed|checks took|Error" $f | tail -6; done
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p3_pytest_decode.txt | tail -20

# Tree copies: kernels + tests (+ links to the rest); superlinear_kernels resolved from the copy.
mkcopy() { local d=$1; rm -rf $d; mkdir -p $d/pp; cp -r kernels tests pyproject.toml $d/; ln -s $PWD/superlinear_lab $d/superlinear_lab
  ln -s $PWD/bench $d/bench; ln -sfn $d/kernels $d/pp/superlinear_kernels; }
mkcopy /tmp/h4off; sed -i 's/^DECODE_TMA = True$/DECODE_TMA = False/' /tmp/h4off/kernels/triton/decode.py
mkcopy /tmp/h4m1; sed -i 's|masked_from = first + ((stop - first) // BLOCK_N) \* BLOCK_N|masked_from = first + ((stop - first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N|' /tmp/h4m1/kernels/triton/decode.py
mkcopy /tmp/h4m2; sed -i 's|kk = k_desc.load(\[b, hkv, n0, 0\])|kk = k_desc.load([b, 0, n0, 0])|' /tmp/h4m2/kernels/triton/decode.py
for d in h4off h4m1 h4m2; do echo "-- $d diff:"; diff kernels/triton/decode.py /tmp/$d/kernels/triton/decode.py; done
P=120
( cd /tmp/h4off && PYTHONPATH=/tmp/h4off/pp:/tmp/h4off:/tmp/site timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs \
    tests/test_triton_decode.py tests/test_decode_fast.py tests/test_decode_graph.py > $R/p4_pytest_tma_off.txt 2>&1
  echo "P4 (GPU decode tests, DECODE_TMA=False copy) rc=$? at ${SECONDS}s" >> $R/phase2.txt ) &
for m in 1 2; do
( cd /tmp/h4m$m && PYTHONPATH=/tmp/h4m$m/pp:/tmp/h4m$m:/tmp/site timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs \
    tests/test_triton_decode.py -k "tma" > $R/p5_mutant$m.txt 2>&1
  echo "P$((4+m)) (mutant $m, must fail) rc=$? at ${SECONDS}s" >> $R/phase2.txt ) &
done
wait
cat $R/phase2.txt; step "phase 2" 0
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p4_pytest_tma_off.txt | tail -16
for m in 1 2; do echo "-- mutant $m"; grep -hE "PASSED|FAILED|ERROR|passed|failed|AssertionError|assert " $R/p5_mutant$m.txt | head -8; done

# Phase 3 (3 procs): session_decode smoke; prefill variants on the GPU (see the header).
left=$(( 390 - SECONDS )); [ $left -gt 110 ] && left=110
if [ $left -gt 20 ]; then
( timeout -k 2 $left python3 bench/session_decode.py --attention-lengths 65536 --session-lengths 65536 \
  --reps 20 --tokens 256 --forward-tokens 16 --out $R/session_decode_smoke_A.json > $R/session_decode_smoke.txt 2>&1
  echo "P7 (session_decode smoke 64K --tokens 256; times discarded) rc=$? at ${SECONDS}s" >> $R/phase3.txt ) &
( timeout -k 2 $left python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py -k "search" \
  > $R/p8_pytest_search_cuda.txt 2>&1; echo "P8 (test_triton -k search on CUDA) rc=$? at ${SECONDS}s" >> $R/phase3.txt ) &
( mkdir -p $R/p9; OUT=$R/p9 timeout -k 2 $left python3 bench/gpu_check.py --no-timing --dtypes bf16 \
  --set search.SEARCH_ORDERED=True window.FWD_FOLD=True window.FWD_TMA=True span.FWD_TMA=True \
  > $R/p9_gpu_check_prefill_variants.txt 2>&1
  echo "P9 (gpu_check bf16, prefill variants on: SEARCH_ORDERED, FWD_FOLD, window/span FWD_TMA) rc=$? at ${SECONDS}s" >> $R/phase3.txt ) &
wait
fi
cat $R/phase3.txt; step "phase 3" 0
grep -v Warning $R/session_decode_smoke.txt | grep -oE '"(graph_replay_ms|graph_tokens_equal_forward|graph_tokens_equal_eager|generate_equals_stream|graph_logits_equal_eager|fallback)": [^,]*' | head -12
tail -2 $R/session_decode_smoke.txt | cut -c1-300
grep -hE "passed|failed|FAILED|ERROR" $R/p8_pytest_search_cuda.txt | tail -6
grep -E "FAIL|checks passed|checks took|Error|settings" $R/p9_gpu_check_prefill_variants.txt | tail -8
ls -la $R
