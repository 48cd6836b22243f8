#!/bin/bash
# Session 14, device call 1 (one H200, timeout_s 600; bench/facts_s14/RULE.md): arms hop and len side by side.
#   run: bash bench/s14/call1.sh      (carry .dev runs/corpus)
cd "$(dirname "$0")/../.." || exit 1
RUN=s14 ARMS="hop len" SHARES_len="1.0" TL=${TL:-420} PLAN=${PLAN:-390} bash bench/facts_s12/scripts/train.sh
