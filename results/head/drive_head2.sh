#!/usr/bin/env bash
# Issue 27 held-out runs, second order (07:40): on the sensor sets the step-teacher candidate
# ('deepest') is behind the profile on both sets, so by the plan's rule it cannot be chosen;
# image runs of the profile and 'deepest_store' come first (seed-major), the rest after.
set -u
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src
lane() {
  local img=$1
  for s in 0 1 2; do
    lsskd sweep --plan configs/sweeps/$img.yaml --only "sad_ce_gated/seed$s" "deepest_store/seed$s"
  done
  for s in 0 1 2; do
    lsskd sweep --plan configs/sweeps/$img.yaml --only "deepest/seed$s"
  done
}
lane head_heldout_a > logs/lane1b.log 2>&1 &
lane head_heldout_b > logs/lane2b.log 2>&1 &
wait
