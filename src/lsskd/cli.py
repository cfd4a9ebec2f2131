"""``lsskd`` command line. Each sub-command lives in ``lsskd/commands/<name>.py``
and exposes ``add_parser(subparsers)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order `lsskd --help` lists them.
COMMANDS = ["train", "eval", "export", "predict", "profile", "sweep", "report", "bench"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="lsskd", description="Layered Self-Supervised Knowledge Distillation")
    p.add_argument("--version", action="version", version=f"lsskd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"lsskd.commands.{name}")
        sp = mod.add_parser(sub)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv=None) -> int:
    from .config import ConfigError
    from .data.base import DataError
    from .engine.checkpoint import CheckpointError
    from .engine.trainer import NonFiniteError, RunDirError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CLIError, ConfigError, DataError, CheckpointError, RunDirError, NonFiniteError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"lsskd {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except torch_oom() as e:  # pragma: no cover - needs a real OOM
        print(f"lsskd {args.command}: error: out of memory ({e}). Lower train.batch_size, "
              "or choose a smaller soft-target store (method.store=...)", file=sys.stderr)
        return 3


def torch_oom():
    import torch

    return (torch.OutOfMemoryError, MemoryError) if hasattr(torch, "OutOfMemoryError") else (MemoryError,)


if __name__ == "__main__":
    sys.exit(main())
