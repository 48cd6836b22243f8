#!/bin/bash
# Session 12, call 1 (#13; bench/facts_s12/RULE.md): arms A and B side by side on one H200 (Triton backend, bf16
# autocast, 6 batch workers each), each under TL seconds of training after its plan (PLAN s, shares 0.5 / 0.5).
# Resumable: an arm continues from /tmp/s12ck/<arm> (a warm machine: the call came within 30 s of the last) or from
# runs/s12/ck_<arm>_model.safetensors (+ _moments, carried back from a cut call; bench/facts_s12/ckpt.py), else
# starts from its config's init_from with a fresh plan; an arm whose export runs/s12/<arm> came with no checkpoint
# (done in an earlier call) is skipped. Checkpoints every 60 s.
# Back in $OUT: train.tgz (per arm log.txt, log.jsonl, planned config.json, facts_eval.json, the fp16 export in
# weights/) and, for an arm short of its planned steps, ck_<arm>_model.safetensors + ck_<arm>_moments.safetensors.
#   run: bash bench/facts_s12/scripts/train.sh      (env TL=400 PLAN=370 by default; timeout_s 600)
# Later sessions: RUN=s14 ARMS="hop len" -> configs bench/facts_<RUN>_<arm>.json, runs/<RUN>/, /tmp/<RUN>ck/;
# SHARES_<arm>="1.0" for a config with one stage (default "0.5 0.5").
source bench/facts_s11/scripts/prelude.sh  # -> cd /tmp/w (snapshot + runs/), $REPO = the tree
TL=${TL:-400}; PLAN=${PLAN:-370}; RUN=${RUN:-s12}; ARMS=${ARMS:-A B}
mkdir -p bench/facts_s11 && cp -r "$REPO/bench/facts_s11/s11_final_fp16" bench/facts_s11/ || exit 1
echo "4c60165bc14d28335cd03a612cd986eba2d37658af03a03a3e0a4bb413674884  bench/facts_s11/s11_final_fp16/model.safetensors" \
  | sha256sum -c || exit 1
[ -f runs/corpus/manifest.json ] || { echo "no runs/corpus: carry it"; exit 1; }
for arm in $ARMS; do
  CK=/tmp/${RUN}ck/$arm
  if [ -f runs/$RUN/$arm/model.safetensors ] && [ ! -f runs/$RUN/ck_${arm}_model.safetensors ]; then
    echo "$arm: trained in an earlier call (runs/$RUN/$arm): skipped"; continue; fi
  mkdir -p $OUT/$arm
  if [ -f $CK/state.json ]; then echo "$arm: warm checkpoint"
  elif [ -f runs/$RUN/ck_${arm}_model.safetensors ]; then python3 bench/facts_s12/ckpt.py unpack runs/$RUN/ck_$arm $CK
  fi
  if [ -f $CK/state.json ]; then
    python3 bench/facts_s12/ckpt.py config $CK $CK/train_config.json >/dev/null && cp $CK/train_config.json $OUT/$arm/config.json
    ARGS="--config $CK/train_config.json"
  else
    SH=SHARES_$arm; ARGS="--config bench/facts_${RUN}_$arm.json --plan-seconds $PLAN --plan-shares ${!SH:-0.5 0.5}"
  fi
  echo "$arm: $ARGS"
  ( timeout -k 5 $((TL+150)) python3 bench/facts_gpu.py --ckpt $CK $ARGS --backend triton --time-limit $TL \
      --save-seconds 60 --workers 6 --out $OUT/$arm --skip-eval --export-anyway --export-dir $OUT/$arm/weights \
      --export-dtype float16 > $OUT/$arm/log.txt 2>&1
    echo "$arm rc=$? at ${SECONDS}s"; cp $CK/log.jsonl $OUT/$arm/ 2>/dev/null ) &
done
wait
for arm in $ARMS; do
  CK=/tmp/${RUN}ck/$arm; [ -d $OUT/$arm ] || continue; echo "== $arm"; grep -v Warn $OUT/$arm/log.txt | tail -3
  LEFT=$(python3 -c "import json,sys; s=json.load(open('$CK/state.json')); t=sum(x[1] for x in s['config']['stages'])
print(s['step'], t, 'done' if s['step'] >= t else 'short')" 2>/dev/null); echo "$arm steps: ${LEFT:-no checkpoint}"
  case "$LEFT" in *short) python3 bench/facts_s12/ckpt.py pack $CK $OUT/ck_$arm ;; esac
done
cd $OUT && tar czf train.tgz $(ls -d $ARMS 2>/dev/null) && rm -rf $ARMS; ls -la $OUT
