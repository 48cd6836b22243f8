#!/bin/bash
# Session 15, device call 4 (timeout_s <= 500): for information only. The rule took wide as it stood at 2,132 of its
# 2,354 planned steps (90.6 %, cosine not finished) and picked same; this call finishes wide's plan from its call-1
# checkpoint (runs/s15w/ck_wide_*) and runs its held-out cells beside small's call-2 cells (runs/s15winfo/call2,
# cand.txt = runs/s15w/wide), so the width result is not confounded by an unfinished schedule. Nothing here ships.
#   run: bash bench/s15/call4.sh      (carry .dev runs/corpus runs/s15w runs/s15winfo)
cd "$(dirname "$0")/../.." || exit 1
RUN=s15w ARMS=wide TL=${TL:-150} bash bench/facts_s12/scripts/train.sh || exit 1
mkdir -p /tmp/s15w_x && tar xzf $OUT/train.tgz -C /tmp/s15w_x && rm -rf runs/s15w/wide \
  && cp -r /tmp/s15w_x/wide/weights runs/s15w/wide && rm -f runs/s15w/ck_* || { echo "no export"; exit 1; }
RUN=s15winfo END=${END:-300} bash bench/facts_s12/scripts/spare.sh
