"""``lsskd profile --checkpoint FILE``: size and CPU latency of the deployed model."""
from __future__ import annotations



def add_parser(sub):
    p = sub.add_parser("profile", help="parameters, MACs, file sizes and batch-1 CPU latency of the "
                                       "deployed model vs the same architecture built plainly")
    p.add_argument("--checkpoint", required=True, help="last.pt / best.pt written by `lsskd train`")
    p.add_argument("--compare-model", action="append", default=[], metavar="NAME",
                   help="also time a plainly built model of this name (repeatable)")
    p.add_argument("--exported", action="append", default=[], metavar="FILE",
                   help="also time an exported ONNX / ExecuTorch (.pte) / TorchScript file, float or int8, "
                        "through its runtime (repeatable)")
    p.add_argument("--accuracy", action="store_true",
                   help="also score the deployed model and each --exported file on the run's test split "
                        "(top-1 through the file's runtime, and its difference to eager PyTorch)")
    p.add_argument("--eval-images", type=int, default=0,
                   help="with --accuracy: this many evenly spaced test inputs (0 = the whole split)")
    p.add_argument("--threads", type=int, default=1, help="torch/onnxruntime CPU threads (0 = default)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per model before timing (default 10)")
    p.add_argument("--repeats", type=int, default=100, help="timed calls per model (median reported)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the calls are split into")
    p.add_argument("--no-training-params", action="store_true",
                   help="skip rebuilding the training-time method (needs the run's data) for its size")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--unsafe-load", action="store_true",
                   help="load with weights_only=False (only for checkpoints you trust)")
    p.add_argument("overrides", nargs="*", help="data overrides for rebuilding the method, e.g. data.root=PATH")
    return p


def run(args) -> int:
    from .. import deploy
    from ..errors import CLIError
    from ..engine.checkpoint import atomic_write_json

    if args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        raise CLIError("--repeats and --rounds must be >= 1 and --warmup >= 0")
    try:
        rep = deploy.profile(args.checkpoint, args.compare_model, args.exported, args.threads, args.warmup,
                             args.repeats, args.rounds, args.overrides, not args.no_training_params,
                             not args.unsafe_load, args.eval_images if args.accuracy else None)
    except deploy.ExportError as e:
        raise CLIError(str(e)) from None
    width = max([24] + [len(k) + 2 for k in rep["rows"]])
    print(f"{'':{width}s}{'params':>12s}{'MACs':>14s}{'file bytes':>12s}{'latency ms':>12s}"
          f"{'top-1':>9s}{'vs eager':>10s}")
    for key, r in rep["rows"].items():
        params = f"{r['params']:,}" if "params" in r else "-"
        macs = f"{r['macs']:,}" if "macs" in r else "-"
        size = f"{r['bytes']:,}" if "bytes" in r else "-"
        top1 = f"{r['top1']:.2f}" if "top1" in r else "-"
        diff = f"{r['top1_diff_vs_eager']:+.2f}" if "top1_diff_vs_eager" in r else "-"
        print(f"{key:{width}s}{params:>12s}{macs:>14s}{size:>12s}{r['latency_ms']:>12.3f}{top1:>9s}{diff:>10s}")
    ratio = rep["latency_ratio_deployed_over_plain"]
    d = rep["rows"]["deployed"]
    t = rep["training_model"]
    print(f"latency ratio deployed/plain: {ratio:.3f} (batch 1, {rep['threads']} thread(s), "
          f"median of {rep['repeats']})")
    print(f"files: torchscript {d['torchscript_bytes']:,} B, onnx {d['onnx_bytes'] or 0:,} B, "
          f"checkpoint {t['checkpoint_bytes']:,} B")
    if t["params"] is not None:
        print(f"training-time model (with auxiliary parts): {t['params']:,} params "
              f"vs deployed {d['params']:,} ({t['source']})")
    else:
        print(f"training-time model size: {t['source']}")
    if args.json:
        atomic_write_json(args.json, rep)
    return 0
