"""``lsskd bench``: per-step time, peak memory and FLOPs of ce / pskd / sad_ce / lsskd.

    lsskd bench --model resnet8 --batch-size 64 --steps 10 --out results/bench/resnet8_b64.json
    lsskd bench --methods lsskd lsskd:views_per_step=2 lsskd:store=topk --data-root ../shared/data/cifar100
"""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("bench", help="time and memory of a training step per method, FLOPs ratios, store sizes")
    p.add_argument("--model", default="resnet8", help="registered model name (default resnet8)")
    p.add_argument("--batch-size", type=int, default=64, help="images per training step (default 64)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="method names, optionally with options: lsskd:views_per_step=2,store=topk "
                        "(default: ce pskd sad_ce lsskd)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision (default off)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--num-classes", type=int, default=100, help="synthetic data: classes")
    p.add_argument("--image-size", type=int, default=32, help="synthetic data: square image side")
    p.add_argument("--data-root", default="", help="real class-folder data (train/<class>/*.png) instead of synthetic")
    p.add_argument("--store-topk", type=int, default=10, help="k of the top-k row in the store table")
    p.add_argument("--no-isolate", action="store_true",
                   help="run all methods in this process (faster start; CPU memory numbers less clean)")
    p.add_argument("--out", help="write the JSON report here")
    return p


def run(args) -> int:
    import torch

    from ..bench import DEFAULT_METHODS, format_table, run_bench
    from ..errors import CLIError

    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise CLIError("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device} but CUDA is not available")
    data, mean, std, desc = None, None, None, "synthetic uint8"
    num_classes, shape = args.num_classes, (3, args.image_size, args.image_size)
    if args.data_root:
        import copy

        from ..config import DEFAULTS
        from ..data import build_data

        cfg = copy.deepcopy(DEFAULTS["data"])
        cfg["root"] = args.data_root
        cfg["per_class"] = 0
        bundle = build_data(cfg)
        data, mean, std = (bundle.train.x, bundle.train.y), bundle.mean, bundle.std
        num_classes, shape = len(bundle.classes), tuple(bundle.input_shape)
        desc = f"real: {args.data_root}"
    report = run_bench(args.model, args.batch_size, args.methods or DEFAULT_METHODS, args.steps, args.warmup,
                       device, args.amp, num_classes, shape, data, mean, std, args.store_topk, desc,
                       isolate=not args.no_isolate)
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
