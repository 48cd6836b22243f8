#!/bin/bash
# Window A (session 11): #13 two training arms from small, side by side (Triton, bf16 autocast), + gpu_check
# --no-timing (all presets, bf16/fp16/fp32 gradients, decode, graph) on the snapshot's kernels (GPU shared: correctness only).
source .dev/prelude.sh
TL=${TL:-440}; PLAN=${PLAN:-400}
for arm in cont final; do
  mkdir -p $OUT/$arm
  ( timeout -k 5 $((TL+90)) python3 bench/facts_gpu.py --ckpt /tmp/ck_$arm --config bench/facts_s11_$arm.json \
      --backend triton --plan-seconds $PLAN --plan-shares 0.5 0.5 --time-limit $TL --save-seconds 120 --workers 6 \
      --out $OUT/$arm --skip-eval --export-anyway --export-dir $OUT/$arm/weights --export-dtype float32 \
      > $OUT/$arm/log.txt 2>&1; echo "$arm rc=$? at ${SECONDS}s"; cp /tmp/ck_$arm/*.jsonl $OUT/$arm/ 2>/dev/null ) &
done
if [ -n "${GC:-}" ]; then mkdir -p $OUT/gc
( timeout -k 5 $((TL+60)) env OUT=$OUT/gc python3 bench/gpu_check.py --no-timing > $OUT/gc/gpu_check.txt 2>&1
  echo "gpu_check rc=$? at ${SECONDS}s" ) & fi
wait
for arm in cont final; do echo "== $arm"; grep -v Warn $OUT/$arm/log.txt | tail -4; done
echo "== gpu_check"; grep -E "FAIL|checks passed|checks took|Error" $OUT/gc/gpu_check.txt | tail -15
cd $OUT && for d in cont final gc; do [ -d $d ] && tar czf $d.tgz $d && rm -rf $d; done; ls -la $OUT
