#!/usr/bin/env bash
# Coordinator for H4, window D (session 10): the final forward/decode defaults (2d4d0bc: SEARCH_ORDERED, FWD_FOLD,
# FWD_TMA, 3-stage span, DECODE_TMA) through gpu_check --no-timing in bf16 AND fp16 (window B/C ran them in bf16 only).
cd "$(dirname "$0")/../.." || exit 1
export OUT=$R
git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | grep -v '^??' | head
timeout -k 2 98 python3 bench/gpu_check.py --no-timing --dtypes bf16 fp16 > $R/gpu_check_final.txt 2>&1
echo "gpu_check --no-timing bf16 fp16 rc=$? at ${SECONDS}s"
grep -E "FAIL|checks passed|checks took|Error" $R/gpu_check_final.txt | tail -12
