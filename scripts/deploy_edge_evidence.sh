#!/usr/bin/env bash
# Produce results/deploy-edge/ for one checkpoint: every deployment format (float and int8)
# with parity, test top-1 through its own runtime, file size and batch-1 latency on this CPU.
#   scripts/deploy_edge_evidence.sh NAME CHECKPOINT [data overrides...]
# Needs lsskd[export,edge]. Model files go to runs/deploy-edge/files/ (not committed);
# their sizes and sha256 are in the JSON written to results/deploy-edge/.
set -euo pipefail
export OMP_NUM_THREADS=1
name=$1; ck=$2; shift 2
OUT=results/deploy-edge
F=runs/deploy-edge/files
mkdir -p $OUT $F
lsskd export --checkpoint $ck --format executorch --out $F/$name.pte --parity-images 1000 \
    --int8 --calib-images 256 "$@" > $OUT/${name}_export_pte.json
lsskd export --checkpoint $ck --format onnx --out $F/$name.onnx --parity-images 1000 \
    --int8 --calib-images 256 "$@" > $OUT/${name}_export_onnx.json 2> $OUT/${name}_export_onnx.stderr
lsskd export --checkpoint $ck --format torchscript --out $F/$name.ts --parity-images 1000 "$@" \
    > $OUT/${name}_export_ts.json
for f in $name.pte $name.int8.pte $name.onnx $name.int8.onnx; do
  lsskd eval --model $F/$f "$@" > $OUT/${name}_eval_${f#$name.}.json
done
lsskd profile --checkpoint $ck --exported $F/$name.pte --exported $F/$name.int8.pte \
    --exported $F/$name.onnx --exported $F/$name.int8.onnx --exported $F/$name.ts \
    --accuracy --threads 1 --repeats 200 --no-training-params "$@" \
    --json $OUT/${name}_profile.json > $OUT/${name}_profile.txt
python scripts/deploy_edge_table.py $OUT/${name}_profile.json $OUT/${name}_export_*.json > $OUT/${name}_table.md
