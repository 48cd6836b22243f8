#!/usr/bin/env bash
# H2 window C, session 10 (<= 220 s, alone on the GPU): correctness of what is timed first, then the timings of record.
# Tree defaults (since window A): span dK/dV lean visits in 64-key 4-warp programs (span.KV_LEAN=True, KV_BLOCK_N=64,
# KV_WARPS=4; NEXT and INTERIOR on); window A: gpu_check grads 47/47 with them (both presets bf16/fp16, fp32, recompute,
# chunks). Against: session 9's shipped span dK/dV (plain visits, 128 keys x 8 warps) = variant `s9-shipped` /
# bwd_tune candidate 36. Kept as the default only if faster here.
# Phase 1 (<= 75 s, four processes): P1 gpu_check release bf16 grad + recompute + 40K chunks on the defaults;
#   P2 the same with s9-shipped; P3 compile warm-up (bwd_tune 16K: 0 36 37 38); P4 test_gpu_matches_oracle release-fp16
#   on the defaults (window B's process ran out of time on it).
# Phase 2 (alone): backward alone at 128K: defaults / s9-shipped / every lean visit masked / without KV_NEXT
#   (0 36 37 38), profiled.
# Phase 3 (alone): train step 32K/64K/128K/256K: new (defaults) vs s9-shipped (dense in the same process; new again).
# Phase 4 (alone): the 1M train step with whichever of the two had the smaller 128K + 256K step time (dense at 1M from
#   the L^2 fit of phase 3's 64K-256K dense rows, in BENCHMARKS).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
step() { echo "== $1 rc=$2 at ${SECONDS}s"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | grep -v '^??' | head -20
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
OLD="span.KV_LEAN=False span.KV_BLOCK_N=None span.KV_WARPS=None"
mkdir -p $R/p1 $R/p2 $R/warm
P=75
( OUT=$R/p1 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    > $R/p1_gpu_check_defaults.txt 2>&1; echo "P1 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/p2 timeout -k 2 $P python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 --set $OLD \
    > $R/p2_gpu_check_s9_shipped.txt 2>&1; echo "P2 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( timeout -k 2 $P python3 -m pytest -o addopts="" -p no:cacheprovider -v -rfEs tests/test_triton.py \
    -k "gpu_matches_oracle and release and fp16" > $R/p4_pytest_cuda.txt 2>&1; echo "P4 rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
( OUT=$R/warm timeout -k 2 $P python3 bench/bwd_tune.py --length 16384 --reps 1 --only 0 36 37 38 --json warm.json \
    > $R/p3_warm.txt 2>&1; echo "P3 (warm-up) rc=$? at ${SECONDS}s" >> $R/phase1.txt ) &
wait
cat $R/phase1.txt; step "phase 1" 0
grep -E "FAIL|checks passed" $R/p1_gpu_check_defaults.txt | tail -6; echo "P1 PASS rows: $(grep -c PASS $R/p1_gpu_check_defaults.txt)"
grep -E "FAIL|checks passed" $R/p2_gpu_check_s9_shipped.txt | tail -6; echo "P2 PASS rows: $(grep -c PASS $R/p2_gpu_check_s9_shipped.txt)"
grep -hE "PASSED|FAILED|ERROR|passed|failed" $R/p4_pytest_cuda.txt | tail -3
grep -E "backward|error" $R/p3_warm.txt | tail -4

left=$(( 105 - SECONDS )); [ $left -gt 30 ] && left=30
[ $left -gt 10 ] && timeout -k 2 $left python3 bench/bwd_tune.py --length 131072 --reps 3 --only 0 36 37 38 \
  --profile-all --json bwd_tune_C.json > $R/bwd_tune.txt 2>&1
step "bwd_tune 128K (defaults; s9-shipped; every lean visit masked; no KV_NEXT)" $?
grep -E "backward|error|_span_bwd_kv|_window_bwd_kv|_span_bwd_dq|_window_bwd_dq|_search_bwd" $R/bwd_tune.txt | tail -18

left=$(( 170 - SECONDS )); [ $left -gt 60 ] && left=60
[ $left -gt 12 ] && timeout -k 2 $left python3 bench/train_variants.py --lengths 32768 131072 65536 262144 \
  --variants new s9-shipped --reps 5 --json train_variants_C.json > $R/train_variants.txt 2>&1
step "train_variants new / s9-shipped" $?; grep -v "^  mem\|UserWarning\|_warn_once" $R/train_variants.txt | tail -14

SET=$(python3 - "$R/train_variants_C.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception:
    rows = []
t = {}
for r in rows:
    if r.get("length") in (131072, 262144) and "ours_s" in r and "again" not in r["variant"]:
        t.setdefault(r["variant"], []).append(r["ours_s"])
full = {v: sum(x) for v, x in t.items() if len(x) == 2}
print("--set span.KV_LEAN=False span.KV_BLOCK_N=None span.KV_WARPS=None"
      if "s9-shipped" in full and "new" in full and full["s9-shipped"] < full["new"] else "")
EOF
)
echo "1M with: ${SET:-defaults}"
left=$(( 214 - SECONDS ))
[ $left -gt 14 ] && timeout -k 1 $left python3 bench/speed.py --mode train --reps 1 --lengths 1048576 --dense-max 0 \
  --json speed_train_1m_C.json $SET > $R/speed_train_1m.txt 2>&1
step "speed.py train 1M" $?; tail -4 $R/speed_train_1m.txt
ls -la $R
