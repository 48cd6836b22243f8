#!/bin/bash
# Session 14, device call 2 (one H200, timeout_s 600; bench/facts_s14/RULE.md): selection between runs/s14/hop and
# runs/s14/len on train-split rows, session 14's pick (with the hop gate measured on the CPU, runs/s14/hop_gate.json),
# the held-out evaluation of the pick and of small on the same rows, then the digit suites of both.
# Back in $OUT: call2.tgz.
#   run: bash bench/s14/call2.sh      (carry .dev runs/corpus runs/s14)
cd "$(dirname "$0")/../.." || exit 1
[ -f runs/s14/hop_gate.json ] || { echo "no runs/s14/hop_gate.json"; exit 1; }
RUN=s14 ARM_A=hop ARM_B=len HOP_GATE=runs/s14/hop_gate.json DIGITS=1 END=${END:-570} \
  bash bench/facts_s12/scripts/select_eval.sh
