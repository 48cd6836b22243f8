#!/usr/bin/env bash
# H4 window C, session 10 (<= 200 s, ALONE on the GPU): timings of record for decode (DECODE_TMA now on by default),
# the tiny Session at 1M, and prefill (stage sweep of this session's variants, then the whole prefill 16K..1M with the
# fastest settings that match the defaults' outputs; dense in the same run).
# Phase 1 (<= 62 s, parallel): P1 pytest -m gpu test_triton_decode + test_decode_graph (correctness of the decode
#   timed here); warm-ups (times discarded): speed.py 16K both modes then the fwd_tune candidates at 6,784 keys (8
#   processes), decode_probe rows 1/17 at 16K, session_decode 16K.
# Phase 2: speed.py --mode decode 128K, 1M (graph replay, L2 flushed; dense SDPA in the same run).
# Phase 3: decode_probe sweep B rows 1 (defaults: PDL + TMA) and 17 (TMA off = session 9) at 1M, per-kernel us.
# Phase 4: session_decode.py at 1M (public call / entry / caller's graph; tiny Session tok/s, default 512 tokens).
# Phase 5: fwd_tune at 1M (last 32K queries): span/window/search candidates, then one whole 1M prefill profiled.
# Phase 6: speed.py --mode prefill 16K..1M with fwd_tune's fastest settings (--set; {} = the defaults).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | grep -v "^??" | head -20
mkdir -p $R/w1 $R/w2 $R/w3 $R/wt
PICKS="span:1 span:10 span:12 span:14 span:15 span:16 window:1 window:7 window:9 window:10 search:0 search:7 search:8"
( timeout -k 2 55 python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton_decode.py \
    tests/test_decode_graph.py -k "not heads" > $R/p1_pytest_decode.txt 2>&1
  echo "P1 (GPU decode tests) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/w1 timeout -k 2 30 python3 bench/speed.py --mode both --lengths 16384 --reps 1 --json warm.json > $R/w1/log.txt 2>&1
  echo "W1 rc=$? at ${SECONDS}s" >> $R/phase1.txt
  # then the fwd_tune candidates (the default kernels are in Triton's cache by now)
  i=0; for p in $PICKS; do i=$((i+1)); echo "$i ${p%%:*} $p"; done | \
  xargs -P 8 -L 1 bash -c 'mkdir -p $0/wt/$1; OUT=$0/wt/$1 timeout -k 2 30 python3 bench/fwd_tune.py --lengths 6784 --reps 1 \
    --full --stages $2 --pick $3 --json warm.json > $0/wt/$1/log.txt 2>&1' $R
  echo "WT (fwd_tune warm-ups) done at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/w2 timeout -k 2 50 python3 bench/decode_probe.py --lengths 16384 --sweep-lengths 16384 --reps 2 \
    --skip graph profile calls floor --sweep-list B --only 1 17 --json warm.json > $R/w2/log.txt 2>&1
  echo "W2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 50 python3 bench/session_decode.py --attention-lengths 16384 --session-lengths 16384 --reps 5 \
    --tokens 64 --forward-tokens 8 --out $R/w3/warm.json > $R/w3/log.txt 2>&1
  echo "W3 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p1_pytest_decode.txt | tail -14
grep -h "error" $R/wt/*/log.txt | head -5

timeout -k 2 20 python3 bench/speed.py --mode decode --lengths 131072 1048576 --json speed_decode_C.json \
  > $R/speed_decode.txt 2>&1
step "speed.py decode (defaults: PDL + TMA)" $?; tail -4 $R/speed_decode.txt | cut -c1-200

timeout -k 2 20 python3 bench/decode_probe.py --lengths 1048576 --sweep-lengths 1048576 --reps 30 \
  --skip graph profile calls floor --sweep-list B --only 1 17 --json decode_probe_C.json > $R/decode_probe.txt 2>&1
step "decode_probe rows 1 (TMA) / 17 (no TMA) at 1M" $?; grep -E "L=1048576: \{" $R/decode_probe.txt | cut -c1-420

timeout -k 2 45 python3 bench/session_decode.py --attention-lengths 1048576 --session-lengths 1048576 --reps 100 \
  --out $R/session_decode_C.json > $R/session_decode.txt 2>&1
step "session_decode 1M" $?; grep -v Warning $R/session_decode.txt | cut -c1-900 | tail -3

timeout -k 2 40 python3 bench/fwd_tune.py --lengths 1048576 --reps 3 --stages span window search --pick $PICKS \
  --full 16384 1048576 --budget 28 --json fwd_tune_C.json > $R/fwd_tune.txt 2>&1
step "fwd_tune 1M stage sweep + profile" $?; grep -vE "Warning|warn" $R/fwd_tune.txt | cut -c1-260 | tail -20

SET=$(python3 -c "
import json, sys
try:
    best = json.load(open('$R/fwd_tune_C.json')).get('best', {})
except Exception:
    best = {}
print(' '.join(f'{k}={v!r}' for k, v in best.items()))")
echo "prefill settings: [${SET}]"
left=$(( 196 - SECONDS ))
[ $left -gt 15 ] && timeout -k 1 $left python3 bench/speed.py --mode prefill --reps 2 \
  --lengths 16384 32768 65536 131072 262144 524288 1048576 --json speed_prefill_C.json ${SET:+--set $SET} \
  > $R/speed_prefill.txt 2>&1
step "speed.py prefill (fastest settings)" $?; tail -12 $R/speed_prefill.txt | cut -c1-200
ls -la $R
