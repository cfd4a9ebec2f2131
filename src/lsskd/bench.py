"""Training-cost benchmark: per-step time, peak memory and FLOPs of each method.

For one model and batch size, every method runs ``warmup`` + ``steps`` training
steps (augmentation, forward, backward, SGD step, store update) on synthetic
uint8 images or on real data, and reports:

* ``step_ms``: median wall time of a whole step (augmentation included; the extra rows a
  method loads through ``sample_extra`` are augmented and trained on too);
  ``aug_ms`` / ``aug_fraction``: the augmentation's share of it;
* ``peak_mem_mb``: CUDA ``max_memory_allocated`` during the steps, or on CPU
  the growth of the peak resident set size (Linux VmHWM, reset through
  ``/proc/self/clear_refs``) from just before the method is built. With
  ``isolate`` (the default) each method runs in a fresh process, so memory the
  allocator kept from an earlier method cannot hide a later one's;
* ``flops_ratio`` = training MACs per sample / deployed MACs per sample
  (forward pass; ``Method.training_macs``, CE's is the backbone), and
  ``time_ratio`` = step time / CE's step time, and their quotient.

Also the soft-target store's bytes per training sample for each layout
(:func:`store_table`).
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from .config import DEFAULTS
from .errors import ConfigError
from .data import BatchAugment
from .engine.profile import count_macs, count_params
from .engine.trainer import build_optimizer
from .methods.store import store_options
from .models import build_model
from .registry import METHODS

DEFAULT_METHODS = ("ce", "pskd", "sad_ce", "lsskd")

# (classes, branches, views) of the store for the settings the paper trains.
STORE_SETTINGS = {
    "cifar100_resnet": (100, 3, 4),  # 3 branches x 4 views x 400 joint labels + 100
    "imagenet1k_resnet": (1000, 4, 4),  # 4 branches x 4 views x 4000 joint labels + 1000
}


def store_table(k: int = 10, num_samples: Optional[Dict[str, int]] = None) -> Dict[str, Dict]:
    """Bytes per sample (and GiB for the full training set) of each store layout."""
    sizes = num_samples or {"cifar100_resnet": 50000, "imagenet1k_resnet": 1281167}
    out = {}
    for name, (c, s, m) in STORE_SETTINGS.items():
        opts = store_options(c, s, m, k)
        n = sizes[name]
        out[name] = {"num_classes": c, "branches": s, "views": m, "values_per_sample": c + s * m * m * c,
                     "train_samples": n, "bytes_per_sample": opts,
                     "gib_total": {key: round(v * n / 1024 ** 3, 3) for key, v in opts.items()}}
    return out


def parse_method_spec(spec: str):
    """``name`` or ``name:key=value,key=value`` (method config overrides)."""
    name, _, rest = spec.partition(":")
    cfg = {"name": name}
    if name not in METHODS:
        raise ConfigError(f"bench: unknown method {name!r}; registered: {', '.join(METHODS.names())}")
    import yaml

    for item in filter(None, rest.split(",")):
        if "=" not in item:
            raise ConfigError(f"bench: method option {item!r} in {spec!r} is not key=value")
        k, v = item.split("=", 1)
        cfg[k] = yaml.safe_load(v)
    return cfg


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if platform.system() == "Darwin" else 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_method(method_cfg: Dict, model: str, batch_size: int, steps: int = 10, warmup: int = 3,
                 device: str = "cpu", amp: str = "off", num_classes: int = 100,
                 input_shape: Sequence[int] = (3, 32, 32), data=None, mean=None, std=None,
                 seed: int = 0) -> Dict:
    """Time ``steps`` training steps (after ``warmup``) of one method; see module docstring."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n = batch_size * (steps + warmup)
    if data is None:
        x_all = torch.randint(0, 256, (n, *input_shape), dtype=torch.uint8, generator=g)
        y_all = torch.randint(0, num_classes, (n,), generator=g)
        mean, std = [0.5] * input_shape[0], [0.25] * input_shape[0]
    else:
        x_all, y_all = data
        reps = -(-n // len(y_all))
        x_all, y_all = x_all.repeat(reps, *[1] * (x_all.dim() - 1))[:n], y_all.repeat(reps)[:n]
        input_shape = tuple(x_all.shape[1:])
    # Memory baseline before the method exists, so its parameters and store count.
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_mem = torch.cuda.memory_allocated(dev)
    else:
        reset = _reset_peak_rss()
        base_mem = _peak_rss_mb()
    backbone = build_model(model, num_classes)
    # has_val: a held-out split costs one evaluation per epoch and nothing per step, so
    # methods that need one (gate=gap) are timed as if the run had it
    method = METHODS.get(method_cfg["name"])(backbone, method_cfg, num_train=n,
                                               modality="image", input_shape=tuple(input_shape),
                                               train_labels=y_all, has_val=True).to(dev)
    method.train()
    method.on_epoch_start(2, 2)  # a late epoch: softening (store reads) active
    opt = build_optimizer(method.parameters(), DEFAULTS["optim"])
    a = DEFAULTS["data"]["augment"]
    aug = BatchAugment(mean, std, "image", a["crop_padding"], a["flip"], a["cutout"], 0.0, 1.0, 0.0, 0.0)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")

    step_t: List[float] = []
    aug_t: List[float] = []
    for s in range(warmup + steps):
        idx = torch.arange(s * batch_size, (s + 1) * batch_size)
        # Extra rows the method loads with the batch (CS-KD's pairs, DLB's previous batch,
        # DDGSD's second view), as the trainer does; they are part of the step's cost.
        extra = method.sample_extra(idx, y_all, aug_gen)
        if extra is not None:
            idx = torch.cat([idx, extra])
        xb, yb = x_all[idx], y_all[idx]
        _sync(dev)
        t0 = time.perf_counter()
        x, mix = aug(xb.to(dev), aug_gen, train=True)
        _sync(dev)
        t1 = time.perf_counter()
        with (torch.autocast(dev.type, dtype=dtype) if dtype else torch.autocast(dev.type, enabled=False)):
            _, losses = method(x, yb.to(dev), idx.to(dev), mix)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        method.after_step()
        _sync(dev)
        t2 = time.perf_counter()
        if s >= warmup:
            step_t.append(t2 - t0)
            aug_t.append(t1 - t0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"bench: non-finite loss for {method_cfg}")
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base_mem) / 2 ** 20
        mem_kind = "cuda_max_allocated_minus_start"
    else:
        peak = _peak_rss_mb() - base_mem
        mem_kind = "cpu_peak_rss_growth" + ("" if reset else "_no_reset")
    deployed = method.deploy()
    macs_dep = count_macs(deployed, input_shape)
    macs_train = method.training_macs(input_shape)
    step_ms = 1000 * statistics.median(step_t)
    aug_ms = 1000 * statistics.median(aug_t)
    store = getattr(method, "store", None)
    return {
        "method": method_cfg["name"],
        "options": {k: v for k, v in method_cfg.items() if k != "name"},
        "step_ms": round(step_ms, 3),
        "step_ms_min": round(1000 * min(step_t), 3),
        "step_ms_max": round(1000 * max(step_t), 3),
        "aug_ms": round(aug_ms, 3),
        "aug_fraction": round(aug_ms / step_ms, 4),
        "img_per_s": round(batch_size / (step_ms / 1000), 1),
        "peak_mem_mb": round(peak, 1),
        "mem_kind": mem_kind,
        "store_bytes": int(store.nbytes) if store is not None else 0,
        "params_train": count_params(method),
        "params_deployed": count_params(deployed),
        "macs_deployed": macs_dep,
        "macs_train": macs_train,
        "flops_ratio": round(macs_train / macs_dep, 4),
    }


def _isolated(threads: int, *args):
    if threads > 0:
        torch.set_num_threads(threads)
    return bench_method(*args)


def run_bench(model: str = "resnet8", batch_size: int = 64, methods: Sequence[str] = DEFAULT_METHODS,
              steps: int = 10, warmup: int = 3, device: str = "cpu", amp: str = "off",
              num_classes: int = 100, input_shape: Sequence[int] = (3, 32, 32), data=None,
              mean=None, std=None, store_topk: int = 10, data_desc: str = "synthetic",
              isolate: bool = True) -> Dict:
    specs = [parse_method_spec(m) for m in methods]
    rows = []
    for spec in specs:
        args = (spec, model, batch_size, steps, warmup, device, amp, num_classes, input_shape, data, mean, std)
        if isolate:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
                rows.append(ex.submit(_isolated, torch.get_num_threads(), *args).result())
        else:
            rows.append(bench_method(*args))
    ce = next((r for r in rows if r["method"] == "ce" and not r["options"]), None)
    for r in rows:
        if ce is not None:
            r["time_ratio"] = round(r["step_ms"] / ce["step_ms"], 4)
            r["time_over_flops_ratio"] = round(r["time_ratio"] / r["flops_ratio"], 4)
    return {
        "model": model, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "device": device, "amp": amp, "data": data_desc, "input_shape": list(input_shape),
        "num_classes": num_classes, "threads": torch.get_num_threads(), "isolated": isolate,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "results": rows,
        "store_bytes_per_sample": store_table(store_topk),
    }


def format_table(report: Dict) -> str:
    head = (f"{'method':<28}{'step ms':>9}{'img/s':>8}{'aug %':>7}{'peak MB':>9}"
            f"{'FLOPs x':>9}{'time x':>8}{'t/F':>7}")
    lines = [f"{report['model']}, batch {report['batch_size']}, {report['device']}, amp={report['amp']}, "
             f"{report['data']}, median of {report['steps']} steps", head]
    for r in report["results"]:
        name = r["method"] + ("" if not r["options"] else ":" + ",".join(f"{k}={v}" for k, v in r["options"].items()))
        lines.append(f"{name:<28}{r['step_ms']:>9.1f}{r['img_per_s']:>8.0f}{100 * r['aug_fraction']:>7.1f}"
                     f"{r['peak_mem_mb']:>9.1f}{r['flops_ratio']:>9.2f}{r.get('time_ratio', float('nan')):>8.2f}"
                     f"{r.get('time_over_flops_ratio', float('nan')):>7.2f}")
    lines.append("")
    lines.append("soft-target store, bytes per training sample (GiB for the whole training set):")
    for name, t in report["store_bytes_per_sample"].items():
        opts = ", ".join(f"{k} {v} B ({t['gib_total'][k]} GiB)" for k, v in t["bytes_per_sample"].items())
        lines.append(f"  {name} ({t['values_per_sample']} values, {t['train_samples']} samples): {opts}")
    return "\n".join(lines)
