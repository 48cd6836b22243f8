#!/bin/bash
# Session 13, device call 2 (timeout_s 600): RULE.md's calls 2 and 3 in one command, to save a machine start:
# arm B (87.6 % of its plan after call 1) resumes to the end of its plan (bench/facts_s12/scripts/train.sh; arm A,
# 99.8 %, was taken as it stands: its export travels in runs/s12/A), its export is laid out in runs/s12/B as
# fetch.sh does here, then bench/facts_s12/scripts/select_eval.sh with END = 585 s - elapsed.
# Back in $OUT: train.tgz (B's resumed slice) and call2.tgz.
#   run: bash bench/s13/call2.sh      (carry .dev runs/corpus runs/s12)
cd "$(dirname "$0")/../.." || exit 1
FINAL=$OUT
OUT=$FINAL bash bench/facts_s12/scripts/train.sh
rm -rf /tmp/t2 && mkdir -p /tmp/t2 && tar xzf "$FINAL/train.tgz" -C /tmp/t2 || exit 1
for arm in A B; do W=/tmp/t2/$arm/weights
  [ -f $W/model.safetensors ] && rm -rf runs/s12/$arm && cp -r $W runs/s12/$arm && rm -f runs/s12/ck_${arm}_*
done
ls -la runs/s12 runs/s12/A runs/s12/B
[ -f runs/s12/A/model.safetensors ] && [ -f runs/s12/B/model.safetensors ] || echo "an arm has no export"
END=$(( 585 - SECONDS )); echo "== select_eval END=$END at ${SECONDS}s"
OUT=$FINAL END=$END bash bench/facts_s12/scripts/select_eval.sh
