#!/usr/bin/env bash
# H4 window B, session 9 (<= 200 s, GPU1 alone after H2): decode with the new defaults (decode.DECODE_PDL = True, the
# search merge reading B(t)/Fw(t) before its merge, the decode merge reading the accumulators with m/l) and a sweep of
# larger key blocks / warps / search runs (A: a sum-only read of the union runs took 91.6 us with 128-key blocks and
# 8 warps vs 117.9 us with the group kernel's 32-key blocks and 4 warps).
# Phase 1 (<= 80 s, parallel; correctness of the new defaults + compile warm-ups, times discarded):
#   P1 pytest -m gpu: test_triton_decode (both kernels vs oracle; PDL graph == no PDL, bit for bit),
#      test_decode_fast, test_decode_graph (entry/graph/Session == public call / eager / forward);
#   P2 pytest -m gpu test_triton.py test_gpu_matches_oracle (all six: decode rows included);
#   P3-P6 decode_probe --sweep-list B warm-ups at 16K.
# Phase 2 (alone): decode_probe 1M + 128K (graph, profile, floor with B's reads, calls) and sweep list B at 1M.
# Phase 3 (alone): session_decode.py at 1M: public call / entry / graph and the tiny Session's tok/s (graph path).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
mkdir -p $R/w1 $R/w2 $R/w3 $R/w4
P=80
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton_decode.py \
    tests/test_decode_fast.py tests/test_decode_graph.py > $R/p1_pytest_decode.txt 2>&1
  echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton.py \
    -k "gpu_matches_oracle" > $R/p2_pytest_triton.txt 2>&1; echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
for i in 1 2 3 4; do
  case $i in 1) only="0 1 2 3 4";; 2) only="5 6 7 8";; 3) only="9 10 11 12";; 4) only="13 14 15 16";; esac
  ( OUT=$R/w$i timeout -k 2 $P python3 bench/decode_probe.py --lengths 16384 --sweep-lengths 16384 --reps 2 \
      --skip graph profile calls floor --sweep-list B --only $only --json warm.json > $R/w$i/log.txt 2>&1
    echo "P$((i+2)) (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
done
wait
cat $R/phase1.txt; step "phase 1" 0
grep -hE "PASSED|FAILED|ERROR|passed|failed|skipped" $R/p1_pytest_decode.txt $R/p2_pytest_triton.txt | tail -30

left=$(( 160 - SECONDS )); [ $left -gt 85 ] && left=85
[ $left -gt 20 ] && timeout -k 2 $left python3 bench/decode_probe.py --lengths 1048576 131072 --sweep-lengths 1048576 \
  --sweep-list B --reps 30 --json decode_probe_B.json > $R/decode_probe.txt 2>&1
step "decode_probe 1M/128K + sweep list B at 1M" $?
grep -E "graph|profile|floor|error|Error" $R/decode_probe.txt | cut -c1-330 | grep -v cprofile | head -40
grep -E "L=1048576: \{" $R/decode_probe.txt | cut -c1-420

left=$(( 196 - SECONDS ))
[ $left -gt 15 ] && timeout -k 1 $left python3 bench/session_decode.py --attention-lengths 1048576 \
  --session-lengths 1048576 --tokens 256 --reps 100 --out $R/session_decode_B.json > $R/session_decode.txt 2>&1
step "session_decode 1M" $?; grep -v Warning $R/session_decode.txt | cut -c1-900 | tail -4
ls -la $R
