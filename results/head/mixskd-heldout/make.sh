#!/usr/bin/env bash
# How results/head/mixskd-heldout was made (2026-12-08). The runs: the `git worktree` /work/exp-cmp at
# 975e43f (the code of every run in results/compare; the two plans copied into it, config files, no
# code), two runs at a time, one thread each, through a queue of one-run commands, from 00:04 UTC:
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/mixskd_heldout_a.yaml --only 'lsskd_selfsup/seed0'
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/mixskd_heldout_a.yaml --only 'mixskd/seed0'
#   ... the same for _b, then seeds 1 and 2.
# Then, from the main checkout (PYTHONPATH=src), this script collects the runs' small files and
# writes the tables: bash results/head/mixskd-heldout/make.sh
set -euo pipefail
WT=${WT:-/work/exp-cmp}
for c in a b; do
  scripts/collect_runs.sh "$WT/results/head/mixskd-heldout-$c" "results/head/mixskd-heldout-$c"
  python -m lsskd report "results/head/mixskd-heldout-$c" --out "results/head/mixskd-heldout-$c" \
      --compare-to lsskd_selfsup
done
python -m lsskd report --cells A=results/head/mixskd-heldout-a B=results/head/mixskd-heldout-b \
    --compare-to lsskd_selfsup --out results/head/mixskd-heldout
