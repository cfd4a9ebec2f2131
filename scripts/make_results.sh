#!/usr/bin/env bash
# Rebuild the tables and plots under results/ from the run directories of the
# experiments (the training commands are in each results/*/README.md).
# Copies config/metrics/summary of every finished run, then runs `lsskd report`.
#   scripts/make_results.sh
set -euo pipefail
collect() { if [ -d "$1" ]; then scripts/collect_runs.sh "$1" "$2"; fi; }
collect runs/t3 results/cpu-scale/table3
lsskd report results/cpu-scale/table3 --out results/cpu-scale/table3
# Fig. 5: the 25%/50% runs plus the seed-0 100% runs of the table above
collect runs/fig5 results/cpu-scale/fig5
if [ -d results/cpu-scale/fig5 ]; then
  lsskd report results/cpu-scale/fig5 results/cpu-scale/table3/c100_resnet8_ce/seed0 \
      results/cpu-scale/table3/c100_resnet8_lsskd/seed0 --out results/cpu-scale/fig5
fi
# budget cell (issue 9): 25% of the subset, 60 epochs
collect runs/budget results/cpu-scale/budget
if [ -d results/cpu-scale/budget ]; then
  lsskd report results/cpu-scale/budget --out results/cpu-scale/budget
fi
lsskd report results/cpu-scale/val --out results/cpu-scale/val
collect runs/store results/store
if [ -d results/store ]; then
  lsskd report results/store results/cpu-scale/table3/c100_resnet8_pskd --out results/store
fi
collect runs/digits results/digits
if [ -d results/digits ]; then
  lsskd report results/digits results/store/digits_lsskd_dense --out results/digits
fi
collect runs/hapt results/hapt
lsskd report results/hapt --out results/hapt/report
# gap gate (issue 9): CE and lsskd_robust with a 10% held-out split, beside the runs without one
for d in digits hapt; do
  collect runs/gap/$d results/gap/$d
  if [ -d results/gap/$d ]; then
    lsskd report results/gap/$d results/$d/ce results/$d/lsskd_robust --out results/gap/$d
  fi
done
# the same on HAPT with whole subjects held out (data.val_split=group)
collect runs/gapsubj/hapt results/gap/hapt-subject
if [ -d results/gap/hapt-subject ]; then lsskd report results/gap/hapt-subject --out results/gap/hapt-subject; fi
# an over-fitting cell (issue 9): 10 CIFAR-100 classes (1,000 training images), 60 and 120 epochs
collect runs/explore/c10 results/overfit/c10-e60
collect runs/explore/c10e120 results/overfit/c10-e120
for d in c10-e60 c10-e120; do
  if [ -d results/overfit/$d ]; then lsskd report results/overfit/$d --out results/overfit/$d; fi
done
# both budgets in one report: accuracy_vs_epochs.png
if [ -d results/overfit/c10-e60 ] && [ -d results/overfit/c10-e120 ]; then
  lsskd report results/overfit/c10-e60 results/overfit/c10-e120 --out results/overfit/budget
fi
# the same cell with a quarter of its training data (250 images), 120 epochs; with the
# full-data runs: accuracy_vs_fraction.png
collect runs/explore/c10e120f25 results/overfit/c10-e120-f25
if [ -d results/overfit/c10-e120-f25 ]; then
  lsskd report results/overfit/c10-e120-f25 --out results/overfit/c10-e120-f25
  lsskd report results/overfit/c10-e120-f25 results/overfit/c10-e120/ce results/overfit/c10-e120/lsskd_robust \
      --out results/overfit/fraction
fi
# held-out choice of alpha_T and kl_weight in that cell (lsskd tune, 20% held out; val top-1 only)
collect runs/tune-overfit results/tune-overfit
for f in tune.json chosen.yaml; do
  if [ -f runs/tune-overfit/$f ]; then cp runs/tune-overfit/$f results/tune-overfit/; fi
done
if [ -d results/tune-overfit ]; then lsskd report results/tune-overfit --out results/tune-overfit; fi
# issue 18: the over-fitting suite (plans write straight into results/overfit-suite/<tree>;
# checkpoints and TensorBoard events stay out of git via .gitignore), and the recommended
# profile's checks where the model fits and generalises
# (the delta columns are against CE where a folder has it)
for d in heldout-a heldout-hapt heldout-hapt-s2 heldout-hapt-s3 hapt test-a test-b test-c heldout-b; do
  if [ -d results/overfit-suite/$d ]; then
    lsskd report results/overfit-suite/$d --out results/overfit-suite/$d
  fi
done
# the walks hold their own baselines, named by group label: walk-hapt's plain SAD-CE (its
# none/, equal to heldout-hapt/sad_ce run by run) and walk-remove-hapt's plain paper profile
if [ -d results/overfit-suite/walk-hapt ]; then
  lsskd report results/overfit-suite/walk-hapt --out results/overfit-suite/walk-hapt --compare-to sad_ce
fi
if [ -d results/overfit-suite/walk-remove-hapt ]; then
  lsskd report results/overfit-suite/walk-remove-hapt --out results/overfit-suite/walk-remove-hapt --compare-to lsskd
fi
# the walk from the chosen profile on two held-out image cells, against CE and against the
# profile itself (its group label: the settings that differ from sad_ce's defaults)
for d in walk-profile-a walk-profile-b; do
  if [ -d results/overfit-suite/$d ]; then
    lsskd report results/overfit-suite/$d --out results/overfit-suite/$d
    lsskd report results/overfit-suite/$d --out results/overfit-suite/$d/vs-profile --no-plots \
        --compare-to 'sad_ce (bn_views=split, gate=fit, views_per_step=2)'
  fi
done
# the paper profile minus one ingredient at two views per step, cell A held out; CE and the
# chosen profile from walk-profile-a (same split, same seeds) beside it
if [ -d results/overfit-suite/walk-remove-a ]; then
  lsskd report results/overfit-suite/walk-remove-a results/overfit-suite/walk-profile-a/ce \
      results/overfit-suite/walk-profile-a/none --out results/overfit-suite/walk-remove-a
  lsskd report results/overfit-suite/walk-remove-a --out results/overfit-suite/walk-remove-a/vs-paper-v2 \
      --no-plots --compare-to 'lsskd (views_per_step=2)'
fi
# branches_when_shut=skip on three held-out sensor subject sets (CE, the profile, skip)
for d in skip-hapt skip-hapt-s2 skip-hapt-s3; do
  if [ -d results/overfit-suite/$d ]; then
    lsskd report results/overfit-suite/$d --out results/overfit-suite/$d
  fi
done
# all image cells on test images, one group per method and cell (data.classes), against CE
# and against SAD-CE in the same cell
if [ -d results/overfit-suite/test-a ]; then
  cells="results/overfit/c10-e120/ce results/overfit/c10-e120/sad_ce
         results/overfit-suite/test-a results/overfit-suite/test-b results/overfit-suite/test-c"
  lsskd report $cells --group-by method,data.classes --out results/overfit-suite/test --compare-to ce
  lsskd report $cells --group-by method,data.classes --out results/overfit-suite/test/vs-sad-ce --compare-to sad_ce \
      --no-plots
fi
if [ -d results/selfsup-checks ]; then lsskd report results/selfsup-checks --out results/selfsup-checks; fi
for d in selfsup-checks-heldout selfsup-checks-underfit digits-overfit/heldout digits-overfit/test; do
  if [ -d results/$d ]; then lsskd report results/$d --out results/$d; fi
done
