#!/bin/bash
# Session 12, call 3 (#13; bench/facts_s12/RULE.md): the spare. When call 2 never came back (no
# runs/$RUN/call2/pick.txt), it runs call 2 (select_eval.sh). Otherwise it re-runs, one process per cell, longest
# first, at most MAXP=12 at once, the held-out cells call 2's files lack (rule.py missing over
# runs/$RUN/call2/ev/*/facts_eval.json) for the pick (runs/$RUN/call2/pick.txt) and small, and a missing
# real-document probe; then the verdict over both calls' files. Back in $OUT: call3.tgz.
#   run: bash bench/facts_s12/scripts/spare.sh      (env END=400; timeout_s: what the session has left, <= 600)
# Later sessions: RUN=s14 (runs/<RUN>/call2, and the candidate's path from call 2's cand.txt).
RUN=${RUN:-s12}
[ -f runs/$RUN/call2/pick.txt ] || exec bash bench/facts_s12/scripts/select_eval.sh
source bench/facts_s11/scripts/prelude.sh  # -> cd /tmp/w (snapshot + runs/), $REPO = the tree
export OMP_NUM_THREADS=1
END=${END:-400}; MAXP=${MAXP:-12}
R=$OUT/call3; mkdir -p $R/ev
. bench/h200_s11/jobs.sh  # job NAME CAP COMMAND...
slot() { while [ "$(jobs -rp | wc -l)" -ge $MAXP ]; do wait -n; done; }
PICK=$(cat runs/$RUN/call2/pick.txt); CAND=runs/$RUN/$PICK; [ -f runs/$RUN/call2/cand.txt ] && CAND=$(cat runs/$RUN/call2/cand.txt)
echo "pick $PICK ($CAND)"
python3 bench/facts_s12/rule.py missing runs/$RUN/call2/ev/*/facts_eval.json --models $CAND small \
  | sort -k3,3nr > $R/missing_before.txt
echo "$(wc -l < $R/missing_before.txt) held-out cells to run"
while read model suite length; do
  slot; job ev/${model##*/}_${suite}_$length $END python3 bench/facts_gpu.py --ckpt /tmp/none \
    --config bench/facts_s12_B.json --eval-only $model --eval-backend torch --seeds 32 --suites $suite \
    --lengths $length --out $R/ev/${model##*/}_${suite}_$length
done < $R/missing_before.txt
for who in cand small; do M=$CAND; [ $who = small ] && M=small
  if [ ! -s runs/$RUN/call2/ev/realdoc_$who.json ]; then slot; job ev/realdoc_$who $END python3 bench/facts_realdoc.py \
    --model $M --split eval --kinds word --tries 64 --device cuda --backend torch --out $R/ev/realdoc_$who.json; fi
done
wait
echo "== done at ${SECONDS}s"; cat $R/jobs.txt 2>/dev/null
EV="runs/$RUN/call2/ev/*/facts_eval.json $(ls $R/ev/*/facts_eval.json 2>/dev/null)"
python3 bench/facts_s12/rule.py missing $EV --models $CAND small > $R/missing.txt
echo "missing held-out cells after call 3: $(wc -l < $R/missing.txt)"
RD=""; for who in cand small; do f=$R/ev/realdoc_$who.json; [ -s $f ] || f=runs/$RUN/call2/ev/realdoc_$who.json; RD="$RD $f"; done
python3 bench/facts_verdict.py --candidate $CAND --baseline small $EV --realdoc $RD --out $R/verdict.json \
  > $R/verdict.txt 2>&1
cat $R/verdict.txt
cd $OUT && tar czf call3.tgz call3 && rm -rf call3; ls -la $OUT
