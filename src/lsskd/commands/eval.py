"""``lsskd eval (--checkpoint FILE | --model EXPORTED)``: the same metrics as training reports,
or an exported file's accuracy through its own runtime."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("eval", help="evaluate a checkpoint, or an exported file (.onnx, .pte, .ts; float or "
                                    "int8) through its runtime, on its dataset's test split")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="last.pt / best.pt written by `lsskd train`")
    src.add_argument("--model", help="a file written by `lsskd export` (reads FILE.json for the run's data)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="test set (default), or the held-out split of a run trained with data.val_fraction > 0")
    p.add_argument("--device", default="auto", help="--checkpoint: auto | cpu | cuda | cuda:N "
                                                    "(default auto: cuda when available); --model runs on the CPU")
    p.add_argument("--threads", type=int, default=0, help="--model: runtime CPU threads (0 = library default)")
    p.add_argument("--max-inputs", type=int, default=0,
                   help="--model: score this many evenly spaced inputs of the split (0 = all)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="load with weights_only=False (only for checkpoints you trust)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=PATH")
    return p


def run(args) -> int:
    if args.model:
        from .. import deploy
        from ..errors import CLIError

        try:
            out = deploy.evaluate_exported(args.model, args.split, args.overrides, args.threads, args.max_inputs)
        except deploy.ExportError as e:
            raise CLIError(str(e)) from None
    else:
        from ..engine.evaluation import evaluate_checkpoint

        out = evaluate_checkpoint(args.checkpoint, args.split, args.device, args.overrides,
                                  weights_only=not args.unsafe_load)
    print(json.dumps(out, indent=2))
    return 0
