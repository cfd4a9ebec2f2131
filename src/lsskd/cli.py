"""``lsskd`` command line. Each sub-command lives in ``lsskd/commands/<name>.py``
and exposes ``add_parser(subparsers)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order `lsskd --help` lists them.
COMMANDS = ["train", "eval", "tune", "export", "predict", "profile", "sweep", "report", "bench"]


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    p = argparse.ArgumentParser(prog="lsskd", description="Layered Self-Supervised Knowledge Distillation")
    p.add_argument("--version", action="version", version=f"lsskd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"lsskd.commands.{name}")
        sp = mod.add_parser(sub)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv=None) -> int:
    from .errors import USER_ERRORS, ResourceError, StorageError, oom_errors

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (*USER_ERRORS, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        # One line, so scripts and logs get the whole message (YAML errors span several).
        msg = "; ".join(ln.strip() for ln in str(msg).splitlines() if ln.strip())
        print(f"lsskd {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except StorageError as e:  # out of disk space: a resource, like memory
        print(f"lsskd {args.command}: error: {e}", file=sys.stderr)
        return 3
    except oom_errors() as e:  # the trainer's ResourceError (a MemoryError) or a raw OOM
        if isinstance(e, ResourceError):
            print(f"lsskd {args.command}: error: {e}", file=sys.stderr)
        else:
            print(f"lsskd {args.command}: error: out of memory ({e}). Lower train.batch_size, "
                  "or set method.store_dtype=float16 (half-size soft-target store)", file=sys.stderr)
        return 3
    except BrokenPipeError:
        # The reader went away (`lsskd sweep --dry-run | head`): stop quietly, as shell
        # tools do, and keep Python's exit-time flush from raising again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
