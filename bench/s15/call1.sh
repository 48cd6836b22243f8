#!/bin/bash
# #13, the width arm's device call 1 (one H200, timeout_s 600; bench/facts_s15/RULE.md): arms wide and same side by
# side from small (wide = small widened to d_model 224 / d_ff 640 by TrainConfig.widen_init).
#   run: bash bench/s15/call1.sh      (carry .dev runs/corpus; .dev from bench/facts_s12/scripts/snap.sh HEAD)
cd "$(dirname "$0")/../.." || exit 1
RUN=s15 ARMS="wide same" TL=${TL:-420} PLAN=${PLAN:-390} bash bench/facts_s12/scripts/train.sh
