#!/usr/bin/env bash
# Copy the small, reviewable files of finished runs (config, metrics, summary) into
# results/, leaving checkpoints and TensorBoard events behind.
#   scripts/collect_runs.sh SRC_ROOT DEST_ROOT
set -euo pipefail
src=$1; dest=$2
find "$src" -name summary.json | while read -r s; do
  run=$(dirname "$s"); rel=${run#"$src"/}
  mkdir -p "$dest/$rel"
  cp "$run/config.yaml" "$run/metrics.jsonl" "$run/summary.json" "$dest/$rel/"
done
