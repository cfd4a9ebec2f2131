#!/usr/bin/env bash
# Produce results/deploy/ for one checkpoint: exports with parity, int8, eval, profile.
#   scripts/deploy_evidence.sh NAME CHECKPOINT [extra profile args...]
set -euo pipefail
export OMP_NUM_THREADS=1
name=$1; ck=$2; shift 2
OUT=results/deploy
mkdir -p $OUT
lsskd export --checkpoint $ck --format torchscript --out $OUT/$name.ts --parity-images 1000 > $OUT/${name}_export_ts.json
lsskd export --checkpoint $ck --format onnx --out $OUT/$name.onnx --parity-images 1000 \
    --int8 --calib-images 512 > $OUT/${name}_export_onnx.json
lsskd profile --checkpoint $ck --exported $OUT/$name.ts --exported $OUT/$name.onnx \
    --exported $OUT/$name.int8.onnx --threads 1 --repeats 200 "$@" \
    --json $OUT/${name}_profile.json > $OUT/${name}_profile.txt
