"""``lsskd eval --checkpoint FILE``: the same metrics as training reports."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test split")
    p.add_argument("--checkpoint", required=True, help="last.pt / best.pt written by `lsskd train`")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="test set (default), or the held-out split of a run trained with data.val_fraction > 0")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: cuda when available)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="load with weights_only=False (only for checkpoints you trust)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=PATH")
    return p


def run(args) -> int:
    from ..engine.evaluation import evaluate_checkpoint

    out = evaluate_checkpoint(args.checkpoint, args.split, args.device, args.overrides,
                              weights_only=not args.unsafe_load)
    print(json.dumps(out, indent=2))
    return 0
