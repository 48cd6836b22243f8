#!/bin/bash
# Session 14, device call 3 (timeout_s 600): for information only (bench/facts_s14/RULE.md picked hop, which did not
# ship; nothing else may ship this session): the held-out cells of the len arm, beside small's cells from call 2
# (same corpus, rows and snapshot), through spare.sh: runs/s14info/call2 holds small's call-2 files and
# cand.txt = runs/s14/len, so spare.sh runs exactly len's 32 cells and its real documents, then the verdict.
#   run: bash bench/s14/call3.sh      (carry .dev runs/corpus runs/s14 runs/s14info)
cd "$(dirname "$0")/../.." || exit 1
RUN=s14info END=${END:-420} bash bench/facts_s12/scripts/spare.sh
