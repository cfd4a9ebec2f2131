"""Sweeps: many runs (configs x grid x seeds), resumable and skippable; the library
behind ``lsskd sweep`` and ``lsskd tune`` (the commands themselves are thin, in
``lsskd/commands/``).

Each run goes to ``<out_root>/<config-stem>[-<grid tag>]/seed<k>``. A run whose
directory holds ``summary.json`` is finished and skipped; one with ``last.pt`` but
no ``summary.json`` was interrupted and is resumed from its checkpoint; one with
neither is trained from scratch. Runs execute one after another in this process
(the same code path as ``lsskd train``), or as ``--jobs N`` parallel
``python -m lsskd train`` subprocesses. A failing run is reported and the sweep
goes on; the exit status is 1 when any run failed. Each run is trained under its
directory's lock (:mod:`lsskd.engine.runlock`): a run another live process holds is
left to it ("running elsewhere"), so the same sweep started on several GPUs or machines
that share the results folder splits the runs between them.

Plan file (``--plan FILE``, all keys optional except ``configs``)::

    configs: [configs/cpu/c100_resnet8_ce.yaml, configs/cpu/c100_resnet8_lsskd.yaml]
    seeds: [0, 1, 2]
    overrides: [train.epochs=15]        # or a mapping {train.epochs: 15}
    grid: {data.train_fraction: [0.25, 0.5, 0.75]}
    out_root: results/table3_cpu
    only: ["*lsskd*"]

Command-line values replace the plan's ``configs``/``seeds``/``out_root``/``only``;
command-line overrides and ``--grid`` entries are added to the plan's.

The package: :mod:`.planning` (plan files, grid, run list, skip/resume/train decisions)
and :mod:`.execution` (in-process runs, the subprocess pool, the results table).
"""
from .execution import (claim, data_key, execute, format_table, run_in_process, run_sweep,
                        torch_globals_restored, train_command)
from .planning import (PLAN_KEYS, RESERVED, RunResult, RunSpec, check_seeds, config_drift, expand, grid_points,
                       load_plan, plan_actions, resolve_config)

__all__ = ["PLAN_KEYS", "RESERVED", "RunResult", "RunSpec", "check_seeds", "claim", "config_drift", "data_key", "execute",
           "expand", "format_table", "grid_points", "load_plan", "plan_actions", "resolve_config", "run_in_process",
           "run_sweep", "torch_globals_restored", "train_command"]
