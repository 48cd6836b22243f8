#!/bin/bash
# Session 13, device call 1 (one H200, timeout_s 600): #16's backward-switch timings first, with the GPU to
# themselves (bench/h200_s11/script_C.sh, <= 255 s; it stops after phase 2 when no candidate beats the defaults),
# then #13's arms A and B (bench/facts_s12/scripts/train.sh) with the seconds that are left: TL = 505 - elapsed,
# at most 400, PLAN = TL - 30 (bench/facts_s12/RULE.md, amendment of session 13).
# Back in $OUT: h2C.tgz (script_C's log and JSON) and train.sh's train.tgz / ck_<arm>_* files.
#   run: bash bench/s13/call1.sh      (carry .dev runs/corpus runs/s12)
cd "$(dirname "$0")/../.." || exit 1
FINAL=$OUT
mkdir -p /tmp/c16
OUT=/tmp/c16 STOP_WITHOUT_PICK=1 timeout -k 5 255 bash bench/h200_s11/script_C.sh > /tmp/c16/script_C.log 2>&1
echo "== script_C rc=$? at ${SECONDS}s"; grep -v "UserWarning\|_warn_once" /tmp/c16/script_C.log | tail -60
(cd /tmp/c16 && tar czf "$FINAL/h2C.tgz" --exclude='*/warm/*cache*' .)
TL=$(( 505 - SECONDS )); [ $TL -gt 400 ] && TL=400
PLAN=$(( TL - 30 ))
echo "== #13 train.sh TL=$TL PLAN=$PLAN at ${SECONDS}s"
OUT=$FINAL TL=$TL PLAN=$PLAN bash bench/facts_s12/scripts/train.sh
