#!/bin/bash
# Window B (session 11, #13): selection (train split, 64K, facts_select, triton) between runs/s11_cont and
# runs/s11_final by /work/coord/ship_rule_s11.md, then the held-out evaluation of the picked arm AND small on the
# same rows (facts_gpu --eval-only, torch backend, 32 seeds, 8K-64K) + held-out real documents (word).
source .dev/prelude.sh
SEL=${SEL:-75}; EV=${EV:-300}; ROWS=${ROWS:-64}
mkdir -p $OUT/sel $OUT/ev
i=0
for g in "fact_word fact_name" "fact_phrase fact_date" "fact_number fact_multi_key" "niah"; do i=$((i+1))
  ( timeout -k 3 $SEL python3 bench/facts_select.py --models runs/s11_cont runs/s11_final --lengths 65536 --rows $ROWS \
      --suites $g --device cuda --backend triton --out $OUT/sel/sel$i.json > $OUT/sel/sel$i.txt 2>&1 ) &
done
wait
PICK=$(python3 - $OUT/sel <<'PY'
import sys, glob, json, re
a = b = n = 0; d = []
for f in glob.glob(sys.argv[1] + "/sel*.txt"):
    for line in open(f):
        m = re.match(r"^(fact_\w+|niah) (\d+) (\{.*\}) (\{.*\})$", line.strip())
        if not m: continue
        models = json.loads(m.group(3)); p = json.loads(m.group(4))["runs/s11_final"]
        rows = round(list(models.values())[0]["rows"]); n += rows
        a += p["only_a_exact"]; b += p["only_b_exact"]; d.append(p["nll_diff"])
        print(m.group(1), m.group(2), models, p, file=sys.stderr)
diff = b - a
if n == 0: pick = "cont"; why = "selection produced no cell: control"
elif abs(diff) > 0.01 * n: pick = "final" if diff > 0 else "cont"; why = f"exact rows final-cont {diff:+d} of {n}"
else:
    md = sum(d) / len(d); pick = "final" if md < 0 else "cont"; why = f"exact tie ({diff:+d} of {n}); mean NLL diff final-cont {md:+.4f}"
print(pick); print("PICK", pick, why, file=sys.stderr)
PY
)
echo "== selection pick: $PICK at ${SECONDS}s"; cat $OUT/sel/*.txt | grep -E "^(fact_|niah)" | cut -c1-400
CAND=runs/s11_$PICK
ev() { # tag model "suites" "lengths"
  ( timeout -k 3 $EV python3 bench/facts_gpu.py --ckpt /tmp/none --config bench/facts_s11_cont.json --eval-only $2 \
      --eval-backend torch --seeds 32 --suites $3 --lengths $4 --out $OUT/ev/$1 > $OUT/ev/$1.txt 2>&1 ) &
}
for M in cand small; do MP=$CAND; [ $M = small ] && MP=small
  ev ${M}_64a $MP "fact_word fact_name" 65536
  ev ${M}_64b $MP "fact_phrase fact_date" 65536
  ev ${M}_64c $MP "fact_number fact_multi_key" 65536
  ev ${M}_64d $MP "fact_hop niah" 65536
  ev ${M}_32a $MP "fact_word fact_name fact_phrase fact_date" 32768
  ev ${M}_32b $MP "fact_number fact_multi_key fact_hop niah" 32768
  ev ${M}_lo_a $MP "fact_word fact_name fact_phrase fact_date" "8192 16384"
  ev ${M}_lo_b $MP "fact_number fact_multi_key fact_hop niah" "8192 16384"
  ( timeout -k 3 $EV python3 bench/facts_realdoc.py --model $MP --split eval --kinds word --tries 64 --device cuda \
      --backend torch --out $OUT/ev/realdoc_$M.json > $OUT/ev/realdoc_$M.txt 2>&1 ) &
done
wait
echo "== eval done at ${SECONDS}s (candidate $CAND)"; echo "$PICK" > $OUT/ev/pick.txt
grep -h "^cand\|^small\|bits per byte\|^new " $OUT/ev/*.txt | cut -c1-200 | head -5; tail -n 3 $OUT/ev/realdoc_*.txt
cd $OUT && tar czf sel.tgz sel && tar czf ev.tgz ev && rm -rf sel ev; ls -la
