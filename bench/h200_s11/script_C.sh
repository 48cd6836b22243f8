#!/usr/bin/env bash
# HISTORY: ran in session 13 (bench/s13/call1.sh, STOP_WITHOUT_PICK=1) with CANDS "0 40 41 42 43 44 45 46 47 48 49 18";
# the span dK/dV switches of 40-42, 45, 46, 48, 49 were removed after it (bench/bwd_tune.py), so CANDS below is what is
# left of that list (47 is now the H200's default; 50 is the window in order).
# H2 window C, written in session 11 (not run: the session's device time was spent before window C), for the next
# session (<= 245 s, ALONE on the GPU; after script_A.sh's correctness jobs): timings of the backward candidates against
# HEAD's defaults in one process, then the train step of record (32K-256K) with the fastest against the defaults,
# then 1M.
# Candidates (bench/bwd_tune.py CANDIDATES): 0 defaults; 43 span.KV_WARPS=8; 44 span.KV_TILE=32;
# 47 window.KV_ROTATE=132; 50 window.KV_ROTATE=0; 18 span.DQ_WARPS=8 (span dQ without spills, bench/bwd_spills.py).
# Phase 1 (<= 70 s): compile every candidate's kernels at 16K in 6 parallel processes (Triton's disk cache).
# Phase 2 (alone): backward alone at 128K, each candidate after its own forward, median of 3, per-kernel profile.
# Phase 3 (alone): train step 32K/64K/128K/256K, dense in the same process: defaults ("new"), the fastest candidate of
#   phase 2 ("set", train_variants --set) if it beats the defaults by >= 1%; "new" again last.
# Phase 4 (alone): the 1M train step with the faster of new / set at 128K + 256K.
cd "$(dirname "$0")/../.." || exit 1
R=${OUT:-/tmp}/h2C
mkdir -p $R/warm
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | grep -v '^??' | head -20
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
CANDS="0 43 44 47 50 18"
timeout -k 2 70 python3 bench/bwd_tune.py --length 16384 --reps 1 --only $CANDS --warm 6 --json warm.json \
  > $R/p1_warm.txt 2>&1
step "phase 1 (warm-up)" $?; grep -E "compiled|error" $R/p1_warm.txt | tail -4

left=$(( 135 - SECONDS )); [ $left -gt 65 ] && left=65
[ $left -gt 10 ] && timeout -k 2 $left python3 bench/bwd_tune.py --length 131072 --reps 3 --only $CANDS \
  --profile-all --json bwd_tune_C.json > $R/p2_bwd_tune.txt 2>&1
step "phase 2 bwd_tune 128K" $?
grep -E "backward|error|_span_bwd_kv|_window_bwd_kv|_span_bwd_dq|_window_bwd_dq|_search_bwd" $R/p2_bwd_tune.txt | tail -70

PICK=$(python3 bench/bwd_tune.py --pick "$R/bwd_tune_C.json" 2>/dev/null)  # faster than the defaults by > 1 %
echo "phase 3 candidate: ${PICK:-none (defaults only)}"
if [ -z "$PICK" ] && [ -n "$STOP_WITHOUT_PICK" ]; then  # session 13: the defaults' train step was timed in session 11
  echo "no candidate beats the defaults by > 1 %: phases 3-4 skipped"; ls -la $R; exit 0; fi
left=$(( 210 - SECONDS )); [ $left -gt 75 ] && left=75
if [ -n "$PICK" ]; then SETARG="--set $PICK"; else SETARG=""; fi
[ $left -gt 12 ] && timeout -k 2 $left python3 bench/train_variants.py --lengths 131072 262144 32768 65536 \
  --variants new --reps 5 $SETARG --json train_variants_C.json > $R/p3_train_variants.txt 2>&1
step "phase 3 train_variants new / ${PICK:-none}" $?
grep -v "^  mem\|UserWarning\|_warn_once" $R/p3_train_variants.txt | tail -14

SET1M=""
[ -n "$PICK" ] && [ "$(python3 bench/train_variants.py --faster "$R/train_variants_C.json" 2>/dev/null)" = set ] \
  && SET1M="--set $PICK"
echo "1M with: ${SET1M:-defaults}"
left=$(( 243 - SECONDS ))
[ $left -gt 14 ] && timeout -k 1 $left python3 bench/speed.py --mode train --reps 1 --lengths 1048576 --dense-max 0 \
  --json speed_train_1m_C.json $SET1M > $R/p4_speed_train_1m.txt 2>&1
step "phase 4 speed.py train 1M" $?; tail -4 $R/p4_speed_train_1m.txt
ls -la $R
