#!/bin/bash
# Run HERE after each device call of session 12 (#13): unpacks what came back and lays out runs/$RUN for the next call.
#   bash bench/facts_s12/scripts/fetch.sh CALL FILES_AT      (CALL: train | eval | spare; FILES_AT: the run's files_at)
# Later sessions: RUN=s15 ARMS="wide same" (runs/<RUN>/, runs/<RUN>_out/, as train.sh and spare.sh take them).
# runs/$RUN travels (carry ".dev", "runs/corpus", "runs/$RUN"): <arm>/ (the arms' fp16 exports), ck_<arm>_*
# (compact checkpoints of arms short of their plan), call2/ (call 2's outputs, read by call 3). The raw returns go
# to runs/${RUN}_out/<call>/, which does not travel. Prints what the rule needs next and the size that would travel.
cd /work/main || exit 1
RUN=${RUN:-s12}; ARMS=${ARMS:-A B}
CALL=$1; F=$2; [ -d "$F" ] || { echo "usage: fetch.sh train|eval|spare FILES_AT"; exit 1; }
mkdir -p runs/$RUN runs/${RUN}_out && rm -rf runs/${RUN}_out/$CALL && mkdir -p runs/${RUN}_out/$CALL
case $CALL in
train)
  tar xzf $F/train.tgz -C runs/${RUN}_out/train || exit 1
  rm -f runs/$RUN/ck_*; cp $F/ck_* runs/$RUN/ 2>/dev/null
  for arm in $ARMS; do W=runs/${RUN}_out/train/$arm/weights
    if [ -f runs/$RUN/ck_${arm}_model.safetensors ]; then rm -rf runs/$RUN/$arm  # short: the resume call exports it
    elif [ -f $W/model.safetensors ]; then rm -rf runs/$RUN/$arm && cp -r $W runs/$RUN/$arm
    elif [ -f runs/$RUN/$arm/model.safetensors ]; then echo "arm $arm: kept from an earlier call"; continue; fi
    .venv/bin/python - $arm runs/${RUN}_out/train/$arm/facts_eval.json <<'PY'
import json, sys
arm, path = sys.argv[1:]
try:
    t = json.load(open(path))["train"]
except (OSError, KeyError, ValueError):
    print(f"arm {arm}: no training result (see {path.rsplit('/', 1)[0]}/log.txt)"); raise SystemExit
share = t["step"] / t["total_steps"]
print(f"arm {arm}: {t['step']} of {t['total_steps']} planned steps ({share:.1%}), {t['elapsed_s']} s:",
      "taken as it stands" if share >= 0.9 else "SHORT (< 90 %): the next call is train.sh again (resume)")
PY
  done
  ls runs/$RUN/ck_* 2>/dev/null ;;
eval)
  tar xzf $F/call2.tgz -C runs/${RUN}_out/eval || exit 1
  rm -rf runs/$RUN/call2 && cp -r runs/${RUN}_out/eval/call2 runs/$RUN/call2
  echo "pick: $(cat runs/$RUN/call2/pick.txt) $(cat runs/$RUN/call2/pick.json | tr -d '\n' | cut -c1-400)"
  echo "held-out cells missing: $(wc -l < runs/$RUN/call2/missing.txt)"; cat runs/$RUN/call2/verdict.txt ;;
spare)
  tar xzf $F/call3.tgz -C runs/${RUN}_out/spare || exit 1
  cat runs/${RUN}_out/spare/call3/verdict.txt ;;
*) echo "CALL: train | eval | spare"; exit 1 ;;
esac
TREE=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
OTHER=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
CARRY=$(du -cb .dev runs/corpus runs/$RUN | tail -1 | cut -f1)
TOTAL=$(( TREE + ${OTHER:-0} + CARRY ))
if [ $TOTAL -gt 67108864 ] && ls runs/$RUN/ck_*_moments.safetensors >/dev/null 2>&1; then
  echo "over 64 MiB ($TOTAL bytes): the moments files are dropped (the resume restarts AdamW's moments)"
  rm -f runs/$RUN/ck_*_moments.safetensors; CARRY=$(du -cb .dev runs/corpus runs/$RUN | tail -1 | cut -f1)
  TOTAL=$(( TREE + ${OTHER:-0} + CARRY ))
fi
echo "would travel: tree $TREE + untracked ${OTHER:-0} + carry $CARRY = $TOTAL bytes of 67108864"
[ $TOTAL -le 67108864 ] || echo "TOO LARGE: carry less (runs/$RUN holds only what the next call reads)"
