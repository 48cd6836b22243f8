#!/bin/bash
# Session 12, call 2 (#13; bench/facts_s12/RULE.md): selection between runs/s12/A and runs/s12/B (fp16 exports of
# call 1) on train-split rows, the pick by bench/facts_s12/rule.py, and the held-out evaluation of the pick and of
# small on the same rows. At most MAXP=12 processes at once, each OMP_NUM_THREADS=1, every one ended by END seconds:
#   1. selection: bench/facts_select.py, one suite per process (7), 65,536 tokens, ROWS=64 train-split rows, Triton
#      backend, --rival-pull; fact_name also at 8,192 (first: the rival-pull cell of the rule); each under SEL s;
#      beside it small's two 64K evaluation processes (they need no pick; the rest waits, so that the selection
#      shares the GPU with 8 processes, not 11);
#   2. the pick (rule.py pick) once every selection process has ended;
#   3. as slots free, longest first: the pick's 64K cells (4 processes), both models' 32K (2 + 2) and 8K/16K cells
#      (2 + 2), the real documents of both (facts_realdoc.py, word, 64 tries).
# Cells END cuts are listed in missing.txt (call 3 runs them). Back in $OUT: call2.tgz (sel/, ev/, pick.json,
# pick.txt, verdict.txt, missing.txt, jobs.txt).
#   run: bash bench/facts_s12/scripts/select_eval.sh      (env END=560 SEL=240 ROWS=64; timeout_s 600)
# Later sessions: RUN=s14 ARM_A=hop ARM_B=len (runs/<RUN>/<arm>; B is the control), HOP_GATE=<rule.py hop-gate JSON>
# (session 14's pick), DIGITS=1 (also multi_key and multi_hop for both models at the four lengths, after the rest).
source bench/facts_s11/scripts/prelude.sh  # -> cd /tmp/w (snapshot + runs/), $REPO = the tree
export OMP_NUM_THREADS=1
END=${END:-560}; SEL=${SEL:-240}; ROWS=${ROWS:-64}; MAXP=${MAXP:-12}
RUN=${RUN:-s12}; ARM_A=${ARM_A:-A}; ARM_B=${ARM_B:-B}; PA=runs/$RUN/$ARM_A; PB=runs/$RUN/$ARM_B
GATE=""; [ -n "$HOP_GATE" ] && GATE="--hop-gate $HOP_GATE"
R=$OUT/call2; mkdir -p $R/sel $R/ev
. bench/h200_s11/jobs.sh  # job NAME CAP COMMAND...: output in $R/NAME.txt, start / exit lines in $R/jobs.txt
slot() { while [ "$(jobs -rp | wc -l)" -ge $MAXP ]; do wait -n; done; }
ev() { # tag model "suites" "lengths"
  slot; job ev/$1 $EVCAP python3 bench/facts_gpu.py --ckpt /tmp/none --config bench/facts_s12_B.json --eval-only $2 \
    --eval-backend torch --seeds 32 --suites $3 --lengths $4 --out $R/ev/$1
}
realdoc() { slot; job ev/realdoc_$1 $EVCAP python3 bench/facts_realdoc.py --model $2 --split eval --kinds word --tries 64 \
    --device cuda --backend torch --out $R/ev/realdoc_$1.json; }
SELPIDS=""
if [ -f $PA/model.safetensors ] && [ -f $PB/model.safetensors ]; then
  for s in fact_name fact_word fact_phrase fact_date fact_number fact_multi_key niah; do
    L=65536; [ $s = fact_name ] && L="8192 65536"
    slot; job sel/$s $SEL python3 bench/facts_select.py --models $PB $PA --lengths $L --rows $ROWS \
      --suites $s --device cuda --backend triton --rival-pull --out $R/sel/$s.json
    SELPIDS="$SELPIDS $!"
  done
fi
EVCAP=$END
ev small_64a small "fact_word fact_name fact_phrase fact_date" 65536
ev small_64b small "fact_number fact_multi_key fact_hop niah" 65536
[ -n "$SELPIDS" ] && wait $SELPIDS
if [ -z "$SELPIDS" ]; then  # one arm has no export: the other is the candidate (RULE.md)
  PICK=$( [ -f $PA/model.safetensors ] && echo A || echo B )
  echo "{\"pick\": \"$PICK\", \"why\": \"only arm $PICK has an export: no selection\"}" > $R/pick.json; echo $PICK
else
  PICK=$(python3 bench/facts_s12/rule.py pick $R/sel/*.json --a $PA --b $PB $GATE --out $R/pick.json)
fi
CAND=$PA; [ "$PICK" = B ] && CAND=$PB
echo "$PICK" > $R/pick.txt; echo "$CAND" > $R/cand.txt
echo "== pick $PICK at ${SECONDS}s: $(cat $R/pick.json | tr -d '\n' | cut -c1-600)"
ev cand_64a $CAND "fact_word fact_name" 65536
ev cand_64b $CAND "fact_phrase fact_date" 65536
ev cand_64c $CAND "fact_number fact_multi_key" 65536
ev cand_64d $CAND "fact_hop niah" 65536
for M in cand small; do MP=$CAND; [ $M = small ] && MP=small
  ev ${M}_32a $MP "fact_word fact_name fact_phrase fact_date" 32768
  ev ${M}_32b $MP "fact_number fact_multi_key fact_hop niah" 32768
done
for M in cand small; do MP=$CAND; [ $M = small ] && MP=small
  ev ${M}_lo_a $MP "fact_word fact_name fact_phrase fact_date" "8192 16384"
  ev ${M}_lo_b $MP "fact_number fact_multi_key fact_hop niah" "8192 16384"
done
realdoc cand $CAND
realdoc small small
if [ -n "$DIGITS" ]; then for M in cand small; do MP=$CAND; [ $M = small ] && MP=small
  ev ${M}_dig_lo $MP "multi_key multi_hop" "8192 16384"; ev ${M}_dig_32 $MP "multi_key multi_hop" 32768
  ev ${M}_dig_64 $MP "multi_key multi_hop" 65536
done; fi
wait
echo "== done at ${SECONDS}s"; cat $R/jobs.txt
python3 bench/facts_s12/rule.py missing $R/ev/*/facts_eval.json --models $CAND small > $R/missing.txt
echo "missing held-out cells: $(wc -l < $R/missing.txt)"; ls $R/ev/realdoc_*.json
python3 bench/facts_verdict.py --candidate $CAND --baseline small $R/ev/*/facts_eval.json \
  --realdoc $R/ev/realdoc_cand.json $R/ev/realdoc_small.json --out $R/verdict.json > $R/verdict.txt 2>&1
cat $R/verdict.txt
cd $OUT && tar czf call2.tgz call2 && rm -rf call2; ls -la $OUT
