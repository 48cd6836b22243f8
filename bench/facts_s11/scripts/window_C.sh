#!/bin/bash
# Window C (session 11, the last): #13 eval cells window B's time limit cut (candidate runs/s11_final and small, same
# rows, one process per cell), and, sharing the GPU (correctness only): H1's GPU decode/forward TMA tests, H2's
# span dK/dV variants (gpu_check grads release bf16 with KV_L2_PREFETCH+KV_ROTATE; CUDA small-tile + prefetch tests).
source .dev/prelude.sh
EV=${EV:-250}
mkdir -p $OUT/ev $OUT/gpu
ev() { ( timeout -k 3 $EV python3 bench/facts_gpu.py --ckpt /tmp/none --config bench/facts_s11_cont.json --eval-only $2 \
      --eval-backend torch --seeds 32 --suites $3 --lengths $4 --out $OUT/ev/$1 > $OUT/ev/$1.txt 2>&1 ) & }
ev cand_name64 runs/s11_final fact_name 65536
ev cand_date64 runs/s11_final fact_date 65536
ev cand_niah64 runs/s11_final niah 65536
ev cand_date32 runs/s11_final fact_date 32768
ev cand_niah32 runs/s11_final niah 32768
ev cand_date16 runs/s11_final fact_date 16384
ev cand_niah16 runs/s11_final niah 16384
ev small_date32 small fact_date 32768
ev small_niah32 small niah 32768
ev small_date16 small fact_date 16384
ev small_niah16 small niah 16384
( timeout -k 3 150 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rfEs -m gpu tests/test_triton_decode.py \
    tests/test_triton.py -k "switch_bit_identical or release_bf16 or gpu_forward_tma" > $OUT/gpu/h1_pytest.txt 2>&1 ) &
( timeout -k 3 150 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rfEs tests/test_triton.py \
    -k "backward_small_tiles or l2_prefetch_bit_identical" > $OUT/gpu/h2_j3_pytest.txt 2>&1 ) &
( timeout -k 3 200 env OUT=$OUT/gpu/j2 python3 bench/gpu_check.py --grads-only --presets release --dtypes bf16 \
    --set span.KV_L2_PREFETCH=True span.KV_ROTATE=264 > $OUT/gpu/h2_j2_gpu_check.txt 2>&1 ) &
wait
echo "== done at ${SECONDS}s"
for f in $OUT/ev/*.txt; do echo "$(basename $f): $(grep -c "'accuracy'" $f) cells"; done
for f in $OUT/gpu/*.txt; do echo "== $f"; grep -E "checks passed|passed|failed|FAIL|Error" $f | tail -6; done
cd $OUT && tar czf ev.tgz ev && tar czf gpu.tgz gpu && rm -rf ev gpu; ls -la
