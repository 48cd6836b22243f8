#!/usr/bin/env bash
# H4 window A, session 9 (<= 200 s, GPU1 alone after H2): decode breakdown at 1M/128K + the heads-kernel variant,
# and the 1M prefill per-kernel profile. Nothing here changes a default (decode.DECODE_BY_HEADS stays False).
# Phase 1 (<= 75 s, parallel; correctness + compile warm-ups, times discarded):
#   P1 pytest tests/test_triton_decode.py -m gpu (group and heads kernels vs the oracle, release layer bf16, 16K);
#   P2-P5 decode_probe sweep variants at 16K (fills Triton's cache for phase 2's sweep);
#   P6 fwd_tune at 6,784 keys (fills the cache for phase 3).
# Phase 2 (alone): decode_probe.py at 1M and 128K: graph cold/warm, per-kernel profile, byte floor (union read by a
#   sum-only kernel, contiguous, whole cache; dense SDPA), calls; then the SWEEP (group vs heads kernel settings) at 1M.
# Phase 3 (alone, time left): fwd_tune 1M: stage times of the defaults on the last 32K queries + the whole 1M prefill
#   profile (per kernel).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
mkdir -p $R/w1 $R/w2 $R/w3 $R/w4 $R/w6
P=75
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton_decode.py \
    > $R/p1_pytest_decode.txt 2>&1; echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
for i in 1 2 3 4; do
  case $i in 1) only="0 1 2";; 2) only="3 4 5";; 3) only="6 7 11";; 4) only="8 9 10 12";; esac
  ( OUT=$R/w$i timeout -k 2 $P python3 bench/decode_probe.py --lengths 16384 --sweep-lengths 16384 --reps 2 \
      --skip graph profile calls floor --only $only --json warm.json > $R/w$i/log.txt 2>&1
    echo "P$((i+1)) (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
done
( OUT=$R/w6 timeout -k 2 $P python3 bench/fwd_tune.py --lengths 6784 --reps 1 --full --pick span:1 window:1 search:0 \
    --json warm.json > $R/w6/log.txt 2>&1; echo "P6 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -hE "PASSED|FAILED|ERROR|passed|failed|skipped" $R/p1_pytest_decode.txt | tail -6

left=$(( 165 - SECONDS )); [ $left -gt 95 ] && left=95
[ $left -gt 20 ] && timeout -k 2 $left python3 bench/decode_probe.py --lengths 1048576 131072 --sweep-lengths 1048576 \
  --reps 30 --json decode_probe_A.json > $R/decode_probe.txt 2>&1
step "decode_probe 1M/128K + sweep at 1M" $?
grep -E "graph|profile|floor|sweep|error|Error" $R/decode_probe.txt | cut -c1-600 | grep -v cprofile | head -40
grep -E "L=1048576: \{" $R/decode_probe.txt | cut -c1-300

left=$(( 195 - SECONDS ))
[ $left -gt 15 ] && timeout -k 1 $left python3 bench/fwd_tune.py --lengths 1048576 --reps 2 --full 16384 32768 1048576 \
  --pick span:1 window:1 search:0 --json fwd_tune_A.json > $R/fwd_tune.txt 2>&1
step "fwd_tune 1M stages + whole prefill profiles at 16K, 32K, 1M" $?; tail -20 $R/fwd_tune.txt | cut -c1-300
ls -la $R
