#!/bin/bash
# Session 13, device call 3 (timeout_s <= 560): two jobs that share the GPU, neither timed.
# HISTORY (session 13): ran once as the third device call; its --set span.KV_ROTATE=264 names a switch removed since (d3d9ed8), so it no longer runs as written.
#  * #13 arm H (bench/facts_s13_H.json, a probe for the hop diagnosis of session 12, not a ship candidate this
#    session): the shipped pick A's weights (runs/s12/A) trained on A's mix with fact_hop_wide 5 % (from multi_key,
#    fact_list, fact_needle) and TrainConfig.route_in_order on the chain tasks, TL s (default 320, PLAN TL-30),
#    Triton backend, exported in fp16 -> $OUT/trainH.tgz;
#  * #16 correctness of the backward switches that won call 1's timings (span.KV_ROTATE=264 window.KV_ROTATE=132):
#    gpu_check --grads-only on every preset and dtype with them set, and the rotate/small-tile pytest cases
#    -> $OUT/check16.tgz.
#   run: bash bench/s13/call3.sh      (carry .dev runs/corpus runs/s12)
source bench/facts_s11/scripts/prelude.sh  # -> cd /tmp/w (snapshot + runs/), $REPO = the tree
TL=${TL:-320}; PLAN=$(( TL - 30 ))
cp "$REPO/bench/facts_s13_H.json" bench/ || exit 1
mkdir -p $OUT/H /tmp/c16
( cd "$REPO" && OUT=/tmp/c16 timeout -k 5 300 python3 bench/gpu_check.py --grads-only \
    --set span.KV_ROTATE=264 window.KV_ROTATE=132 > /tmp/c16/gpu_check_rotate.txt 2>&1
  echo "gpu_check rc=$? at ${SECONDS}s" >> /tmp/c16/gpu_check_rotate.txt
  timeout -k 5 200 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rfEs tests/test_triton.py \
    -k "backward_small_tiles or rotate or l2_prefetch_bit_identical" > /tmp/c16/pytest_rotate.txt 2>&1
  echo "pytest rc=$? at ${SECONDS}s" >> /tmp/c16/pytest_rotate.txt ) &
timeout -k 5 $((TL+150)) python3 bench/facts_gpu.py --ckpt /tmp/s13ck/H --config bench/facts_s13_H.json \
  --plan-seconds $PLAN --plan-shares 0.5 0.5 --backend triton --time-limit $TL --save-seconds 60 --workers 8 \
  --out $OUT/H --skip-eval --export-anyway --export-dir $OUT/H/weights --export-dtype float16 > $OUT/H/log.txt 2>&1
echo "H rc=$? at ${SECONDS}s"; cp /tmp/s13ck/H/log.jsonl $OUT/H/ 2>/dev/null; grep -v Warn $OUT/H/log.txt | tail -4
wait
tail -3 /tmp/c16/gpu_check_rotate.txt; grep -E "checks passed|FAIL" /tmp/c16/gpu_check_rotate.txt | tail -3
tail -3 /tmp/c16/pytest_rotate.txt
cd $OUT && tar czf trainH.tgz H && rm -rf H && (cd /tmp/c16 && tar czf $OUT/check16.tgz *.txt) ; ls -la $OUT
