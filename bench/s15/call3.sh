#!/bin/bash
# Session 15, device call 3 (timeout_s 600): for information only (bench/facts_s15/RULE.md picked same, the control,
# which did not ship; nothing else may ship this session): the held-out cells of the wide arm, beside small's cells
# from call 2 (same corpus, rows and snapshot), through spare.sh: runs/s15info/call2 holds small's call-2 files and
# cand.txt = runs/s15/wide, so spare.sh runs exactly wide's cells and its real documents, then the verdict.
#   run: bash bench/s15/call3.sh      (carry .dev runs/corpus runs/s15 runs/s15info)
cd "$(dirname "$0")/../.." || exit 1
RUN=s15info END=${END:-420} bash bench/facts_s12/scripts/spare.sh
