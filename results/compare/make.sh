#!/usr/bin/env bash
# How results/compare was made (2026-12-07). The runs: a `git worktree` at 975e43f, two runs at a
# time (one thread each) through a queue of `lsskd sweep --only ...` commands:
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/cutmix_test_a.yaml --only '*/seed0'   # seeds 0, 1
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/cutmix_test_a.yaml --only 'ce/seed2' 'ce_cutmix/seed2'
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/cutmix_test_a.yaml \
#       --only 'lsskd_selfsup/seed2' 'lsskd_selfsup_cutmix/seed2' method.eval_aggregate=last
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_test_hapt.yaml --only '*/seed0'  # 1, 2
# and on 2026-12-07 from 12:15 UTC, same worktree and commit (ce_2x.yaml and its line in the plan
# copied into it; a config file, no code):
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_test_hapt.yaml --only 'ce_2x/seed0'  # 1, 2
# (the profile+CutMix runs of seeds 0 and 1 also with method.eval_aggregate=last: an execution
# key, the ceiling at the last epoch only; the worktree's plans wrote into results/head/cutmix-test-a
# and results/baselines/test-hapt, today's plans say results/compare/test-a and test-hapt.)
# and for cells B and C (2026-12-07 from 12:05 UTC, same worktree and commit, the same queue of
# one-run commands, two at a time; the profile's runs with the ceiling at the last epoch only):
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/cutmix_test_b.yaml --only 'ce/seed0'  # ce_cutmix, 0-2
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/cutmix_test_b.yaml --only 'lsskd_selfsup/seed0' \
#       method.eval_aggregate=last                                  # seeds 0-2; the same for cell C
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/cutmix_test_a.yaml --only 'lsskd_selfsup_cutmix/seed2' \
#       method.eval_aggregate=last
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_test_a.yaml --only 'ddgsd/seed0'  # as far as it got
# and on 2026-12-07 from 15:11 UTC, same worktree and commit (this session's plans and configs
# copied into it: config files, no code; results/compare/test-hapt there is a link to
# results/baselines/test-hapt so that the students' teacher paths resolve):
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/cutmix_test_b.yaml \
#       --only 'lsskd_selfsup_cutmix/seed0' method.eval_aggregate=last      # seeds 0-2; the same for cell C
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_teachers_hapt.yaml --only 'hsakd_teacher_resnet1d/seed0'
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_teachers_hapt.yaml --only 'kd_teacher_resnet1d/seed0'
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_test_a.yaml --only 'ce_mixup/seed0'  # zipf_ls; 0-2
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_students_hapt.yaml --only 'hsakd/seed0'  # kd; 0-2,
#       each after its teacher's summary.json existed
#   (the queue was stopped there; DLB on A and the B/C plans did not start)
# and on 2026-12-07 from 18:09 UTC, same worktree and commit (this session's costly-method plans
# copied into it with out_root results/head/cutmix-test-{a,b,c}):
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_test_a.yaml --only 'dlb/seed0'      # 0-2
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_test_b.yaml --only 'ce_mixup/seed0' # 0-2; then
#       zipf_ls, dlb, ddgsd; the same for baselines_test_c.yaml
# and on 2026-12-07 from 21:03 UTC, same worktree and commit (the costly plans with out_root
# results/head/cutmix-test-{a,b,c}; SLA's seeds 0 and 1 on A resumed from the epoch the previous
# session's queue stopped at, which `lsskd sweep` does exactly):
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_costly_test_a.yaml --only 'sla/seed0'     # 0-2
#   OMP_NUM_THREADS=1 lsskd sweep --plan configs/sweeps/baselines_costly_test_a.yaml --only 'mixskd/seed0'  # 0-2; then
#       mixskd on baselines_costly_test_b.yaml and _c.yaml, seeds 0-2
# Then, from the project root:
set -euo pipefail
wt=${1:-/work/exp-cmp}
scripts/collect_runs.sh "$wt/results/head/cutmix-test-a" results/compare/test-a
scripts/collect_runs.sh "$wt/results/baselines/test-hapt" results/compare/test-hapt
scripts/collect_runs.sh "$wt/results/head/cutmix-test-b" results/compare/test-b
scripts/collect_runs.sh "$wt/results/head/cutmix-test-c" results/compare/test-c
python -m lsskd report results/compare/test-a --out results/compare/test-a
python -m lsskd report results/compare/test-hapt --out results/compare/test-hapt
python -m lsskd report results/compare/test-b --out results/compare/test-b
python -m lsskd report results/compare/test-c --out results/compare/test-c
python -m lsskd report --cells A=results/compare/test-a B=results/compare/test-b C=results/compare/test-c sensor=results/compare/test-hapt --out results/compare
python -m lsskd report --cells A=results/compare/test-a B=results/compare/test-b C=results/compare/test-c --compare-to ce_cutmix --out results/compare/vs-ce-cutmix
python -m lsskd report --cells A=results/compare/test-a B=results/compare/test-b C=results/compare/test-c sensor=results/compare/test-hapt --compare-to lsskd_selfsup \
    --out results/compare/vs-profile
python -m lsskd report --cells sensor=results/compare/test-hapt --compare-to ce_2x --out results/compare/vs-ce-2x
python scripts/splice_table.py results/compare/cells.md results/compare/README.md
