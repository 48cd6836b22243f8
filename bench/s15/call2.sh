#!/bin/bash
# #13, the width arm's device call 2 (one H200, timeout_s 600; bench/facts_s15/RULE.md): selection between
# runs/s15/wide and runs/s15/same on train-split rows (session 12's pick; same is the control), the held-out
# evaluation of the pick and of small on the same rows, then the digit suites of both. Back in $OUT: call2.tgz.
#   run: bash bench/s15/call2.sh      (carry .dev runs/corpus runs/s15)
cd "$(dirname "$0")/../.." || exit 1
RUN=s15 ARM_A=wide ARM_B=same DIGITS=1 END=${END:-570} bash bench/facts_s12/scripts/select_eval.sh
