"""Size and batch-1 CPU latency of the deployed model next to the same architecture
built plainly (and other models or exported files)."""
from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError
from ..version import __version__
from .export import onnx_bytes, torchscript_bytes
from .load import TrainedRun, load_deployed, load_training_method, read_run
from .runners import TorchRunner, load_runner, read_metadata


def measure_latency(fns: Dict[str, Callable], x, warmup: int = 10, repeats: int = 50,
                    rounds: int = 5) -> Dict[str, Dict[str, float]]:
    """Per-call wall time of each callable on ``x`` (ms). Calls are interleaved in
    ``rounds`` so slow drifts of a shared machine hit all of them alike; the median
    of all ``rounds * repeats`` calls is the headline number."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        per_round = max(1, repeats // max(1, rounds))
        for _ in range(max(1, rounds)):
            for name, fn in fns.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn(x)
                    times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = {"median_ms": statistics.median(ts), "p10_ms": ts[int(0.1 * (len(ts) - 1))],
                     "p90_ms": ts[int(0.9 * (len(ts) - 1))], "calls": len(ts)}
    return out


def _score(run, dep, rows: Dict, runners: Dict[str, Callable], n: int) -> None:
    """Test top-1 (%) of the deployed model and of each exported runner, in place."""
    from .runners import TorchRunner, accuracy

    test = run.bundle("scoring the exported files reads the run's test data: override data.root=PATH").test
    idx = torch.arange(len(test)) if n <= 0 or n >= len(test) else \
        torch.linspace(0, len(test) - 1, n).round().long()
    x, y = dep.normalize(test.x[idx]), test.y[idx]
    eager = accuracy(TorchRunner(dep.model, "eager"), x, y)
    rows["deployed"].update(top1=eager, test_inputs=int(len(idx)))
    for key, runner in runners.items():
        top1 = accuracy(runner, x, y)
        rows[key].update(top1=top1, top1_diff_vs_eager=top1 - eager, test_inputs=int(len(idx)))


def _add_aggregated_branch(run, shape, rows: Dict, fns: Dict) -> None:
    """A row for the deepest branch aggregated over all views (M passes), for methods that
    have one: the accuracy/cost trade-off of serving the branch instead of the head."""
    from ..engine.profile import count_macs, count_params

    try:
        method, _, _ = load_training_method(run)
    except (DataError, ConfigError, CheckpointError, KeyError, OSError):
        return
    if not hasattr(method, "aggregated_branch") or not len(getattr(method, "aux", [])):
        return
    agg = method.aggregated_branch().eval()
    key = f"aggregated:deepest branch x{method.num_views} views"
    rows[key] = {"model": "deepest branch, view-aggregated", "params": count_params(agg),
                 "macs": count_macs(agg, shape), "passes": method.num_views}
    fns[key] = TorchRunner(agg, "eager, view-aggregated")


def _nbytes_state(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def profile(checkpoint: str | Path | TrainedRun, compare_models: Sequence[str] = (),
            exported: Sequence[str | Path] = (), threads: int = 1, warmup: int = 10, repeats: int = 50,
            rounds: int = 5, overrides: List[str] | None = None, training_params: bool = True,
            weights_only: bool = True, accuracy_inputs: int | None = None) -> Dict:
    """Size and batch-1 CPU latency of the deployed model vs the same architecture
    built plainly (their ratio is 1 by construction: same graph, same weights' shapes).

    Each ``exported`` file gets a row through its own runtime (file size, latency). With
    ``accuracy_inputs`` (0 = the whole test split, N = N evenly spaced test inputs) the
    deployed model and every exported file are also scored on the run's test split
    (``top1``; exported rows also ``top1_diff_vs_eager``), which needs the run's data."""
    from ..engine.profile import count_macs, count_params
    from ..models import build_model

    if threads > 0:
        torch.set_num_threads(threads)
    run = read_run(checkpoint, overrides, weights_only)
    dep = load_deployed(run)
    cfg = dep.config
    name, kwargs = cfg["model"]["name"], cfg["model"].get("kwargs", {})
    shape = dep.input_shape
    plain = build_model(name, len(dep.classes), **kwargs).eval()
    example = torch.zeros(2, *shape)
    ts_size = len(torchscript_bytes(dep.model, example))
    try:
        onnx_size = len(onnx_bytes(dep.model, example))
    except Exception:  # noqa: BLE001 - profiling should not fail on a missing exporter
        onnx_size = None
    rows = {
        "deployed": {"model": name, "params": count_params(dep.model), "macs": count_macs(dep.model, shape),
                     "state_dict_bytes": _nbytes_state(dep.model), "torchscript_bytes": ts_size,
                     "onnx_bytes": onnx_size},
        "plain": {"model": name, "params": count_params(plain), "macs": count_macs(plain, shape)},
    }
    fns: Dict[str, Callable] = {"deployed": dep.model, "plain": plain}
    for cm in compare_models:
        m = build_model(cm, len(dep.classes)).eval()
        key = f"compare:{cm}"
        rows[key] = {"model": cm, "params": count_params(m), "macs": count_macs(m, shape)}
        fns[key] = m
    for f in exported:
        meta = read_metadata(f)
        key = f"exported:{Path(f).name}"
        runner = load_runner(f, meta, threads)
        rows[key] = {"file": str(f), "bytes": Path(f).stat().st_size, "format": runner.kind}
        fns[key] = runner
    if training_params:
        _add_aggregated_branch(run, shape, rows, fns)
    runners = {k: fn for k, fn in fns.items() if k.startswith(("exported:", "aggregated:"))}
    if accuracy_inputs is not None:
        _score(run, dep, rows, runners, accuracy_inputs)
    x = dep.normalize(torch.zeros(1, *shape, dtype=torch.uint8)) if dep.modality == "image" \
        else torch.zeros(1, *shape)
    lat = measure_latency(fns, x, warmup, repeats, rounds)
    for key, v in lat.items():
        rows[key]["latency_ms"] = v["median_ms"]
        rows[key]["latency"] = v
    ckpt_bytes = run.checkpoint.stat().st_size
    train = {"params": None, "source": None, "checkpoint_bytes": ckpt_bytes}
    if training_params:
        try:
            method, _, _ = load_training_method(run)
            train.update(params=count_params(method), source="rebuilt method",
                         deploy_params=count_params(method.deploy()))
        except (DataError, ConfigError, CheckpointError, KeyError, OSError) as e:
            summary = run.checkpoint.with_name("summary.json")
            if summary.is_file():
                train.update(params=json.loads(summary.read_text()).get("params_train"),
                             source=str(summary))
            else:
                train["source"] = f"unavailable: {e}"
    d, p = rows["deployed"]["latency_ms"], rows["plain"]["latency_ms"]
    return {
        "checkpoint": str(run.checkpoint), "model": name, "method": cfg["method"]["name"],
        "input_shape": shape, "batch": 1, "threads": torch.get_num_threads(),
        "warmup": warmup, "repeats": rounds * max(1, repeats // max(1, rounds)),
        "rows": rows, "latency_ratio_deployed_over_plain": d / p if p > 0 else None,
        "training_model": train, "torch_version": torch.__version__, "lsskd_version": __version__,
    }
