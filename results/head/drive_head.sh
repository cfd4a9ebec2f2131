#!/usr/bin/env bash
# Issue 27 held-out runs: two lanes, each seed-major (so pairs complete first), one thread per run.
# Lane 1: sensor set s2, then image cell A; lane 2: sensor set s3, then image cell B.
set -u
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src
lane() {
  local hapt=$1 img=$2
  lsskd sweep --plan configs/sweeps/$hapt.yaml --only 'ce/*' 'sad_ce_gated/*' 'deepest/*' 'deepest_store/*'
  for s in 0 1 2; do
    lsskd sweep --plan configs/sweeps/$img.yaml --only "sad_ce_gated/seed$s" "deepest/seed$s" "deepest_store/seed$s"
  done
  lsskd sweep --plan configs/sweeps/$hapt.yaml --only 'ensemble/*'
  for s in 0 1 2; do
    lsskd sweep --plan configs/sweeps/$img.yaml --only "ensemble/seed$s" "v4_deepest/seed$s"
  done
}
lane head_heldout_hapt_s2 head_heldout_a > logs/lane1.log 2>&1 &
lane head_heldout_hapt_s3 head_heldout_b > logs/lane2.log 2>&1 &
wait
