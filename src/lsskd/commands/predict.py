"""``lsskd predict (--checkpoint FILE | --model EXPORTED) INPUT...``: top-k class names per file."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("predict", help="classify image files / folders with a checkpoint or an exported model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="last.pt / best.pt written by `lsskd train`")
    src.add_argument("--model", help="ONNX, ExecuTorch (.pte) or TorchScript file written by `lsskd export`, float or "
                                      "int8 (reads FILE.json, else the metadata embedded in the file)")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively); "
                                             ".npy arrays for signal models")
    p.add_argument("--topk", type=int, default=5, help="classes listed per input, most probable first (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="inputs classified per forward pass (default 64)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = library default)")
    p.add_argument("--json", metavar="PATH", help="also write the predictions as JSON ('-' = stdout only)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="load the checkpoint with weights_only=False (only for checkpoints you trust)")
    return p


def run(args) -> int:
    import sys

    import torch

    from .. import deploy
    from ..errors import CLIError, DataError
    from ..engine.checkpoint import atomic_write_json

    if args.topk < 1:
        raise CLIError(f"--topk must be >= 1, got {args.topk}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    skipped = []  # (file, reason): unreadable files do not stop the others
    try:
        runner, meta = deploy.open_model(args.checkpoint, args.model, not args.unsafe_load, args.threads)
        files = deploy.collect_files(args.inputs, meta.get("modality", "image"))
        preds = deploy.predict(runner, meta, files, args.topk, args.batch_size, skipped=skipped)
    except deploy.ExportError as e:
        raise CLIError(str(e)) from None
    if skipped and not preds and len(skipped) == 1:
        raise DataError(skipped[0][1])  # the only input: a plain one-line error
    if skipped:
        print(f"skipped {len(skipped)} of {len(files)} file(s) that could not be read:", file=sys.stderr)
        for _, why in skipped:
            print(f"  {why}", file=sys.stderr)
        if not preds:
            raise DataError(f"none of the {len(files)} input files could be read (listed above)")
    doc = {"model": args.model or args.checkpoint, "backend": runner.kind, "topk": args.topk,
           "predictions": preds, "skipped": [{"file": f, "error": why} for f, why in skipped]}
    if args.json == "-":
        print(json.dumps(doc, indent=2))
    else:
        for p in preds:
            print(f"{p['file']}: " + ", ".join(
                f"{t['class']}{' (' + t['description'] + ')' if 'description' in t else ''} {t['prob']:.3f}"
                for t in p["topk"]))
        if args.json:
            atomic_write_json(args.json, doc)
    return 1 if skipped else 0
