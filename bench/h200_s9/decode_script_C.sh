# AS RUN in window C this is the version before 01:48: one pytest process (test_triton_decode, test_decode_fast,
# test_decode_graph), session_decode with --tokens 256 (crashed in replay_ms: too few spare cache slots), the
# tree's DECODE_TMA was False. Below: the 01:48 edit (TMA default, tokens fix), which did not run.
#!/usr/bin/env bash
# H4 window C, session 9 (<= 180 s, GPU1 alone): final checks of the decode defaults shipped (decode.DECODE_PDL = True,
# DECODE_TMA = True (B: 0.1240 -> 0.1183 ms, bit-identical), DECODE_BY_HEADS off; search merge and decode merge with one memory round trip less) + timings of record.
# Phase 1 (<= 95 s, parallel): P1 gpu_check --no-timing --dtypes bf16 fp16 (every preset: grads, prefill rows,
#   chunked, decode vs oracle / prefill row, CUDA-graph decode); P2 pytest -m gpu test_triton_decode, test_decode_fast,
#   test_decode_graph; P3 warm-ups (speed.py decode/prefill at 16K, decode_probe sweep B rows 0, 1, 13-16 at 16K).
# Phase 2 (alone): speed.py --mode decode 128K, 1M (graph replay, L2 flushed, dense in the same run).
# Phase 3 (alone): session_decode.py at 1M (public call / entry / graph, tiny Session tok/s).
# Phase 4 (alone): speed.py --mode prefill 16K..1M (dense in the same run; exponent 128K->1M).
# Phase 5 (time left): decode_probe sweep B rows 0, 1, 13-16 at 1M (PDL off/on, TMA) — not a default.
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
mkdir -p $R/p1 $R/w1 $R/w2
P=95
( OUT=$R/p1 timeout -k 2 $P python3 bench/gpu_check.py --no-timing --dtypes bf16 fp16 > $R/p1_gpu_check.txt 2>&1
  echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_triton_decode.py \
    tests/test_decode_fast.py > $R/p2_pytest_decode.txt 2>&1
  echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rfEs tests/test_decode_graph.py \
    > $R/p2b_pytest_graph.txt 2>&1; echo "P2b rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/w1 timeout -k 2 60 python3 bench/speed.py --mode both --lengths 16384 --reps 1 --json warm.json > $R/w1/log.txt 2>&1
  echo "P3 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/w2 timeout -k 2 60 python3 bench/decode_probe.py --lengths 16384 --sweep-lengths 16384 --reps 2 \
    --skip graph profile calls floor --sweep-list B --only 0 1 13 14 15 16 --json warm.json > $R/w2/log.txt 2>&1
  echo "P4 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -E "FAIL|checks passed|checks took" $R/p1_gpu_check.txt | tail -8; echo "P1 PASS rows: $(grep -c PASS $R/p1_gpu_check.txt)"
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p2_pytest_decode.txt $R/p2b_pytest_graph.txt | tail -24

timeout -k 2 25 python3 bench/speed.py --mode decode --lengths 131072 1048576 --json speed_decode_C.json \
  > $R/speed_decode.txt 2>&1
step "speed.py decode" $?; tail -5 $R/speed_decode.txt | cut -c1-300

left=$(( 145 - SECONDS )); [ $left -gt 45 ] && left=45
[ $left -gt 15 ] && timeout -k 1 $left python3 bench/session_decode.py --attention-lengths 1048576 \
  --session-lengths 1048576 --reps 100 --out $R/session_decode_C.json > $R/session_decode.txt 2>&1
step "session_decode 1M" $?; grep -v Warning $R/session_decode.txt | cut -c1-700 | tail -3

left=$(( 172 - SECONDS ))
[ $left -gt 20 ] && timeout -k 1 $left python3 bench/speed.py --mode prefill --reps 2 \
  --lengths 16384 32768 65536 131072 262144 524288 1048576 --json speed_prefill_C.json > $R/speed_prefill.txt 2>&1
step "speed.py prefill" $?; tail -12 $R/speed_prefill.txt | cut -c1-200

left=$(( 178 - SECONDS ))
[ $left -gt 10 ] && timeout -k 1 $left python3 bench/decode_probe.py --lengths 1048576 --sweep-lengths 1048576 \
  --skip graph profile calls floor --sweep-list B --only 0 1 13 14 15 16 --reps 30 --json decode_probe_C.json \
  > $R/decode_probe.txt 2>&1
step "decode_probe sweep B (PDL, TMA) at 1M" $?; grep -E "L=1048576: \{" $R/decode_probe.txt | cut -c1-300
ls -la $R
