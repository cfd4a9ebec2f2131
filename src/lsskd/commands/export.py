"""``lsskd export --checkpoint FILE --format torchscript|onnx|executorch``: ship the bare backbone."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("export", help="export the deployed backbone to ONNX, ExecuTorch or TorchScript "
                                      "(+ metadata JSON)")
    p.add_argument("--checkpoint", required=True, help="last.pt / best.pt written by `lsskd train`")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx", "executorch"],
                   help="file format to write (executorch: a .pte for the ExecuTorch runtime, XNNPACK-lowered, "
                        "needs lsskd[edge]; torchscript is legacy)")
    p.add_argument("--head", choices=["deployed", "aggregated"], default="deployed",
                   help="'deployed' (default): the backbone and its final classifier, the branches dropped; "
                        "'aggregated': the deepest branch averaged over all M views instead (M backbone "
                        "passes per input, for the branch's accuracy; `lsskd profile` shows both)")
    p.add_argument("--out", help="output file (default: next to the checkpoint, .ts / .onnx / .pte); "
                                 "metadata goes to OUT.json")
    p.add_argument("--onnx-exporter", choices=["auto", "dynamo", "torchscript"], default=None,
                   help="ONNX only: 'auto' (default): the torch.export-based exporter, falling back to the "
                        "TorchScript-based one (reason on stderr); 'dynamo' or 'torchscript' to force one")
    p.add_argument("--parity-images", type=int, default=64,
                   help="test inputs used to check the exported file against PyTorch (0 = skip)")
    p.add_argument("--parity-inputs", default="test", choices=["test", "random"],
                   help="'test': the run's real test split (needs its data); 'random': N(0,1) inputs")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |diff| of logits (fp32)")
    p.add_argument("--int8", action="store_true",
                   help="ONNX / ExecuTorch: also write OUT with .int8.onnx (onnxruntime static QDQ) or .int8.pte "
                        "(PT2E static, XNNPACK), and report test top-1 through the runtime before/after")
    p.add_argument("--calib-images", type=int, default=256, help="training images for int8 calibration")
    p.add_argument("--eval-images", type=int, default=0, help="test images for the int8 accuracy check (0 = all)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="load with weights_only=False (only for checkpoints you trust)")
    p.add_argument("overrides", nargs="*", help="data overrides for the parity/int8 inputs, e.g. data.root=PATH")
    return p


def run(args) -> int:
    import sys

    import torch

    from .. import deploy
    from ..errors import CLIError

    # One read of the checkpoint (verified once); the run's data is built at most once,
    # for the parity inputs and the int8 calibration together.
    run = deploy.read_run(args.checkpoint, args.overrides, weights_only=not args.unsafe_load)
    dep = deploy.load_aggregated(run) if args.head == "aggregated" else deploy.load_deployed(run)
    out = Path(args.out) if args.out else deploy.default_export_path(args.checkpoint, args.format)
    if args.int8 and args.format not in ("onnx", "executorch"):
        raise CLIError("--int8 needs --format onnx or --format executorch")
    if args.calib_images < 1 or args.eval_images < 0:
        raise CLIError(f"--calib-images must be >= 1 and --eval-images >= 0, got {args.calib_images} "
                       f"and {args.eval_images}")
    parity_x, source = None, ""
    if args.parity_images > 0:
        if args.parity_inputs == "test":
            parity_x = deploy.parity_inputs(run, dep, args.parity_images)
            source = f"{len(parity_x)} evenly spaced test inputs of {dep.config['data']['name']}"
        else:
            parity_x = torch.randn(args.parity_images, *dep.input_shape, generator=torch.Generator().manual_seed(0))
            source = f"{args.parity_images} N(0,1) inputs (seed 0)"
    try:
        meta = deploy.export(dep, args.format, out, parity_x, source, args.tolerance, args.onnx_exporter)
    except deploy.ExportError as e:
        raise CLIError(str(e)) from None
    if meta.get("onnx_fallback_reason"):
        print(f"onnx: the torch.export-based exporter was not used ({meta['onnx_fallback_reason']}); "
              "wrote the file with the TorchScript-based exporter", file=sys.stderr)
    report = {"file": str(out), "metadata": str(deploy.metadata_path(out)), "format": args.format,
              "exporter": meta["exporter"], "bytes": meta["bytes"], "sha256": meta["sha256"],
              "params": meta["params"], "parity": meta.get("parity")}
    if "head" in meta:
        report.update(head=meta["head"], passes=meta["passes"])
    if args.int8:
        report["int8"] = _int8(args, run, dep, out)
    print(json.dumps(report, indent=2))
    return 0


def _int8(args, run, dep, out: Path) -> dict:
    import torch

    from .. import deploy
    from ..errors import CLIError
    from ..engine.checkpoint import atomic_write_json

    bundle = run.bundle()
    g = torch.Generator().manual_seed(0)
    # A random subset: the training set is stored class by class.
    pick = torch.randperm(len(bundle.train), generator=g)[: args.calib_images]
    calib = dep.normalize(bundle.train.x[pick])
    n = min(args.eval_images or len(bundle.test), len(bundle.test))
    # Evenly spaced: the test split is stored class by class.
    rows = torch.linspace(0, len(bundle.test) - 1, n).round().long()
    xt, yt = dep.normalize(bundle.test.x[rows]), bundle.test.y[rows]
    suffix = ".int8.pte" if args.format == "executorch" else ".int8.onnx"
    qout = out.with_name((out.name[: -len(out.suffix)] if out.suffix else out.name) + suffix)
    try:
        if args.format == "executorch":
            deploy.quantize_executorch(dep, qout, calib, out)
        else:
            deploy.quantize_onnx(out, qout, calib)
        fp32 = deploy.accuracy(deploy.load_runner(out), xt, yt)
        int8 = deploy.accuracy(deploy.load_runner(qout), xt, yt)
    except deploy.ExportError as e:
        raise CLIError(str(e)) from None
    eager = deploy.accuracy(deploy.TorchRunner(dep.model, "eager"), xt, yt)
    res = {"file": str(qout), "bytes": qout.stat().st_size, "calibration_images": int(len(calib)),
           "test_images": int(n), "top1_eager": eager, "top1_fp32": fp32, "top1_int8": int8,
           "top1_drop": fp32 - int8}
    meta = deploy.read_metadata(qout)
    meta["quantization"].update({k: res[k] for k in ("test_images", "top1_eager", "top1_fp32", "top1_int8",
                                                     "top1_drop")})
    atomic_write_json(deploy.metadata_path(qout), meta)
    return res
