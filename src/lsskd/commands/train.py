"""``lsskd train --config FILE [key=value ...]`` and ``lsskd train --resume RUN_DIR``."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import build_config, parse_override, run_config
from ..errors import ConfigError

# Without --config, a run starts only when one of these names the data (20.1).
DATA_KEYS = ("data.root", "data.name")

NO_CONFIG = ("no --config given. Pass a config file, e.g. `lsskd train --config configs/quickstart.yaml` "
             "(example configs are in configs/: quickstart.yaml, quickstart_cifar.yaml, cpu/, paper/), "
             "or name your data explicitly to train with the built-in defaults, e.g. "
             "`lsskd train data.root=PATH/TO/CLASS/FOLDERS train.epochs=30` (the defaults train "
             "resnet20 with cross-entropy for 240 epochs); every key: docs/config.md")


def add_parser(sub):
    p = sub.add_parser(
        "train", help="train a model (one run directory per run)",
        description="Train one run into out_dir: a YAML config, then dotted key=value overrides. "
                    "Without --config the data must be named (data.root=PATH or data.name=NAME).",
        epilog="Every config key, with its type, default, allowed values and meaning: docs/config.md "
               "(example configs: configs/quickstart.yaml, configs/README.md).")
    p.add_argument("--config", help="YAML config (examples in configs/, e.g. configs/quickstart.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--unsafe-load", action="store_true",
                   help="with --resume: load the checkpoint with weights_only=False (trusted files only)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 data.root=PATH seed=1")
    return p


def run(args) -> int:
    from ..engine.trainer import Trainer

    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; do not pass --config")
        run_dir = Path(args.resume)
        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file():
            raise ConfigError(f"cannot resume: {cfg_file} not found")
        cfg = run_config(run_dir)
        if args.overrides:
            raise ConfigError("overrides are not accepted with --resume (the run's config is fixed)")
        trainer = Trainer(cfg, resume=True, unsafe_load=args.unsafe_load)
    else:
        if not args.config and not names_data(args.overrides):
            raise ConfigError(NO_CONFIG)
        cfg = build_config(args.config, args.overrides)
        trainer = Trainer(cfg)
    summary = trainer.fit()
    if trainer.dist.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def names_data(overrides) -> bool:
    """True when the overrides name the data (``data.root=...`` or ``data.name=...``)."""
    return any(".".join(parse_override(o)[0]) in DATA_KEYS for o in overrides)
