"""Edge deployment: export the bare backbone, check parity, profile, predict.

LSSKD's auxiliary branches, view heads and soft-target store exist only at
training time; the shipped model is ``method.deploy()``, i.e. the backbone alone
(paper: "no additional inference cost"). This module turns a training
checkpoint into that model and serialises it:

* TorchScript (``torch.jit.trace``) or ONNX (opset 17, dynamic batch axis), written
  atomically, with a ``<file>.json`` metadata sidecar (class names, input shape,
  normalisation, modality, source config, version, SHA-256 of the model file,
  measured parity). The core metadata is also embedded in the model file itself.
* Parity: the exported file is loaded back (``torch.jit.load`` /
  ``onnxruntime``) and compared with the PyTorch model on real, identically
  normalised test inputs.
* Profile: parameters, MACs, file sizes and batch-1 CPU latency of the deployed
  model next to the same architecture built plainly.
* Predict: top-k class names for image (or ``.npy`` signal) files with a
  checkpoint, a TorchScript file or an ONNX file.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ConfigError
from .data.base import DataError
from .data.download import file_digest
from .engine.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json

EXPORT_FORMAT = "lsskd-export-1"
FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx"}
ONNX_OPSET = 17
PARITY_TOL = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_KEY = "lsskd.json"  # name of the embedded metadata (TorchScript extra file / ONNX property)


class ExportError(RuntimeError):
    """Exporting, reloading or checking an exported model failed; the message names the file."""


# --------------------------------------------------------------------------- loading
@dataclass
class Deployed:
    """The deployed backbone (eval mode, CPU) and what is needed to feed it."""

    model: nn.Module
    classes: List[str]
    mean: List[float]
    std: List[float]
    input_shape: List[int]
    modality: str
    config: Dict
    source: Dict = field(default_factory=dict)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The evaluation-time transform: uint8 images are scaled to [0, 1], then
    ``(x - mean) / std`` per channel (the same op as ``BatchAugment.normalize``)."""
    from .data.augment import BatchAugment

    return BatchAugment(mean, std).normalize(x)


def extract_backbone(cfg: Dict, method_state: Dict[str, torch.Tensor], num_classes: int) -> nn.Module:
    """Build ``cfg.model`` fresh and load the ``backbone.*`` entries of a method's
    state dict into it (strictly). By the method contract ``deploy()`` returns
    ``self.backbone``, so this is the deployed model without rebuilding the
    method (no branches, no store, no teacher, no training data needed)."""
    from .models import build_model

    model = build_model(cfg["model"]["name"], num_classes, **cfg["model"].get("kwargs", {}))
    prefix = "backbone."
    sub = {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}
    if not sub:
        raise CheckpointError("checkpoint's method state has no 'backbone.*' entries")
    try:
        model.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"backbone weights do not fit model '{cfg['model']['name']}': {e}") from None
    return model.eval()


def load_deployed(checkpoint: str | Path, weights_only: bool = True) -> Deployed:
    """Read a ``last.pt``/``best.pt`` written by ``lsskd train`` and return its deployed model."""
    from .engine.evaluation import load_trained

    cfg, st = load_trained(checkpoint, None, weights_only)
    for key in ("classes", "mean", "std", "input_shape", "method"):
        if key not in st:
            raise CheckpointError(f"checkpoint {checkpoint} has no '{key}' entry (not written by lsskd train?)")
    model = extract_backbone(cfg, st["method"], len(st["classes"]))
    return Deployed(model, list(st["classes"]), [float(v) for v in st["mean"]], [float(v) for v in st["std"]],
                    [int(v) for v in st["input_shape"]], st.get("modality", "image"), cfg,
                    {"checkpoint": str(checkpoint), "epoch": st.get("epoch"),
                     "checkpoint_version": st.get("version")})


def load_training_method(checkpoint: str | Path, overrides: List[str] | None = None, weights_only: bool = True):
    """(method, cfg, bundle): the full training-time method with its weights, rebuilt
    on the run's data (needed for anything the method's constructor sizes from it)."""
    from .data import build_data
    from .engine.evaluation import load_trained
    from .engine.trainer import build_method

    cfg, st = load_trained(checkpoint, overrides, weights_only)
    bundle = build_data(cfg["data"])
    method = build_method(cfg, bundle)
    method.load_state_dict(st["method"])
    return method.eval(), cfg, bundle


def parity_inputs(checkpoint: str | Path, dep: Deployed, n: int, overrides: List[str] | None = None,
                  split: str = "test") -> torch.Tensor:
    """``n`` inputs of the run's test split, normalised like evaluation does."""
    from .data import build_data
    from .engine.evaluation import load_trained

    cfg, _ = load_trained(checkpoint, overrides)
    try:
        bundle = build_data(cfg["data"])
    except DataError as e:
        raise DataError(f"{e} (the parity check reads the run's test data: override data.root=PATH, "
                        "or use random inputs)") from None
    ds = bundle.test if split == "test" else bundle.val
    if ds is None:
        raise DataError(f"split '{split}' is not available for {checkpoint}")
    if list(ds.x.shape[1:]) != dep.input_shape:
        raise DataError(f"{split} inputs under data.root={cfg['data']['root']} have shape "
                        f"{list(ds.x.shape[1:])} but the model expects {dep.input_shape}")
    # Evenly spaced, so the sample spans the classes (folders are stored class by class).
    idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique()
    return dep.normalize(ds.x[idx])


# --------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet():
    # torch 2.13 marks torch.jit and the TorchScript-based ONNX exporter deprecated;
    # both still work and need no extra packages, so the warnings are noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def core_metadata(dep: Deployed) -> Dict:
    cfg = dep.config
    return {
        "format": EXPORT_FORMAT,
        "classes": list(dep.classes),
        "input_shape": list(dep.input_shape),
        "mean": list(dep.mean),
        "std": list(dep.std),
        "modality": dep.modality,
        "model": cfg["model"]["name"],
        "model_kwargs": dict(cfg["model"].get("kwargs", {})),
        "method": cfg["method"]["name"],
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "preprocess": "float input = (x / 255 if uint8 image else x - mean) / std, per channel; "
                      "images NCHW RGB",
        "lsskd_version": __version__,
    }


def torchscript_bytes(model: nn.Module, example: torch.Tensor, meta: Dict | None = None) -> bytes:
    """Trace the eval-mode model. The CIFAR/HAPT backbones have no data-dependent
    control flow, so a trace is exact; the batch size stays free (checked by parity)."""
    model = model.eval()
    buf = io.BytesIO()
    with torch.no_grad(), _quiet():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buf, _extra_files={META_KEY: json.dumps(meta)} if meta else {})
    return buf.getvalue()


def onnx_bytes(model: nn.Module, example: torch.Tensor, meta: Dict | None = None,
               opset: int = ONNX_OPSET) -> bytes:
    """ONNX via the TorchScript-based exporter (``dynamo=False``): it needs no
    ``onnxscript`` and works offline; the batch axis is dynamic."""
    model = model.eval()
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    data = buf.getvalue()
    if meta:
        try:
            import onnx
        except ImportError:  # the sidecar JSON still carries everything
            return data
        proto = onnx.load_from_string(data)
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        data = proto.SerializeToString()
    return data


def serialize(model: nn.Module, fmt: str, example: torch.Tensor, meta: Dict | None = None) -> bytes:
    if fmt == "torchscript":
        return torchscript_bytes(model, example, meta)
    if fmt == "onnx":
        return onnx_bytes(model, example, meta)
    raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def default_export_path(checkpoint: str | Path, fmt: str) -> Path:
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}{SUFFIXES[fmt]}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export(dep: Deployed, fmt: str, out: str | Path, parity_x: torch.Tensor | None = None,
           parity_source: str = "", tol: float = PARITY_TOL) -> Dict:
    """Write ``out`` (the model) and ``out.json`` (metadata) and return the metadata.

    The model goes to a temporary file in ``out``'s folder first; with ``parity_x``
    (normalised inputs) that file is loaded back and its outputs compared with the
    PyTorch model, and only if the max absolute difference is <= ``tol`` is it
    renamed over ``out`` (so a failed export never replaces a good one). The
    metadata, which records the file's SHA-256, is written atomically after it."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    model = dep.model.eval()
    example = torch.zeros(2, *dep.input_shape)
    meta = core_metadata(dep)
    try:
        data = serialize(model, fmt, example, meta)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ExportError(f"cannot export model '{meta['model']}' to {fmt}: {type(e).__name__}: {e}") from None
    meta.update({
        "model_format": fmt,
        "file": out.name,
        "bytes": len(data),
        "sha256": sha256_bytes(data),
        "params": sum(p.numel() for p in model.parameters()),
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "torch_version": torch.__version__,
        "source": dict(dep.source),
        "config": copy.deepcopy(dep.config),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp" + SUFFIXES[fmt])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if parity_x is not None:
            diff = max_abs_diff(load_runner(tmp, {"model_format": fmt}), model, parity_x)
            meta["parity"] = {"max_abs_diff": diff, "n": int(len(parity_x)), "inputs": parity_source,
                              "tolerance": tol, "dtype": "float32"}
            if not diff <= tol:  # also catches NaN
                raise ExportError(f"exported {fmt} model differs from the PyTorch model by {diff:.3g} "
                                  f"(> {tol:g}) on {len(parity_x)} inputs; {out} was not written")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_json(metadata_path(out), meta)
    return meta


def metadata_path(model_file: str | Path) -> Path:
    p = Path(model_file)
    return p.with_name(p.name + ".json")


# --------------------------------------------------------------------------- runners
class Runner:
    """Callable ``normalised float inputs (N, ...) -> logits (N, K)`` as a torch tensor."""

    kind = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchRunner(Runner):
    def __init__(self, model: nn.Module, kind: str):
        self.model, self.kind = model.eval(), kind

    @torch.no_grad()
    def __call__(self, x):
        return self.model(x.float()).float()


class OnnxRunner(Runner):
    kind = "onnx"

    def __init__(self, path: str | Path, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running ONNX models needs onnxruntime: pip install 'lsskd[export]'") from None
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExportError(f"cannot load ONNX model {path}: {e}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


def detect_format(path: str | Path, meta: Dict | None = None) -> str:
    p = Path(path)
    if meta and meta.get("model_format") in FORMATS:
        return meta["model_format"]
    if p.suffix.lower() == ".onnx":
        return "onnx"
    with open(p, "rb") as f:
        head = f.read(4)
    # TorchScript archives are zip files; lsskd checkpoints are torch.save zips too,
    # told apart by the embedded metadata/constants.pkl when loading.
    return "torchscript" if head.startswith(b"PK") else "onnx"


def read_metadata(path: str | Path) -> Dict | None:
    """The sidecar ``<file>.json``, else the metadata embedded in the model file, else None."""
    side = metadata_path(path)
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"metadata file {side} is not valid JSON: {e}") from None
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        try:
            import onnx

            proto = onnx.load(str(p), load_external_data=False)
            for prop in proto.metadata_props:
                if prop.key == META_KEY:
                    return json.loads(prop.value)
        except Exception:  # noqa: BLE001 - fall through to "no metadata"
            return None
        return None
    extra = {META_KEY: ""}
    try:
        torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except Exception:  # noqa: BLE001
        return None
    return json.loads(extra[META_KEY]) if extra[META_KEY] else None


def load_runner(path: str | Path, meta: Dict | None = None, threads: int = 0) -> Runner:
    """A runner for an exported TorchScript or ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    fmt = detect_format(path, meta)
    if fmt == "onnx":
        return OnnxRunner(path, threads)
    try:
        with _quiet():
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot load TorchScript model {path}: {type(e).__name__}: {e}") from None
    return TorchRunner(model, "torchscript")


def open_model(checkpoint: str | Path | None = None, model: str | Path | None = None,
               weights_only: bool = True, threads: int = 0):
    """(runner, metadata) from a training checkpoint or an exported file."""
    if (checkpoint is None) == (model is None):
        raise ConfigError("give exactly one of --checkpoint or --model")
    if checkpoint is not None:
        dep = load_deployed(checkpoint, weights_only)
        return TorchRunner(dep.model, "checkpoint"), core_metadata(dep)
    path = Path(model)
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    meta = read_metadata(path)
    if meta is None:
        raise DataError(f"no metadata for {path}: expected {metadata_path(path)} "
                        "(written by `lsskd export`) or metadata embedded in the file")
    for key in ("classes", "input_shape", "mean", "std"):
        if key not in meta:
            raise DataError(f"metadata for {path} lacks '{key}'")
    if meta.get("sha256") and sha256_file(path) != meta["sha256"]:
        raise ExportError(f"{path} does not match the sha256 in {metadata_path(path)} "
                          "(file altered or metadata from another export)")
    return load_runner(path, meta, threads), meta


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


@torch.no_grad()
def max_abs_diff(runner: Runner, model: nn.Module, x: torch.Tensor, batch: int = 64) -> float:
    """Max |runner(x) - model(x)| over all logits, in chunks of ``batch``."""
    model = model.eval()
    worst = 0.0
    for s in range(0, len(x), batch):
        xb = x[s:s + batch].float()
        a, b = runner(xb).float(), model(xb).float()
        if a.shape != b.shape:
            raise ExportError(f"exported model returns shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}")
        worst = max(worst, float((a - b).abs().max()))
    return worst


# --------------------------------------------------------------------------- predict
def collect_files(paths: Sequence[str | Path], modality: str = "image") -> List[Path]:
    """Files named directly, plus (recursively, sorted) the image / ``.npy`` files in folders."""
    from .data.folder import IMAGE_EXTENSIONS

    exts = IMAGE_EXTENSIONS if modality == "image" else {".npy"}
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not found:
                raise DataError(f"folder {p} contains no {'image' if modality == 'image' else '.npy'} files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"input not found: {p}")
    return out


def load_inputs(files: Sequence[Path], input_shape: Sequence[int], modality: str) -> torch.Tensor:
    """Raw inputs stacked: uint8 N x 3 x H x W images resized to the model's size
    (bilinear, as ``data/folder.decode_image``), or float signals from ``.npy`` files."""
    from .data.folder import decode_image

    if modality == "image":
        if input_shape[0] != 3:
            raise DataError(f"model expects {input_shape[0]}-channel images; only RGB is supported")
        size = (int(input_shape[1]), int(input_shape[2]))
        arrs = [decode_image(f, size).transpose(2, 0, 1) for f in files]
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrs)))
    arrs = []
    for f in files:
        if f.suffix.lower() != ".npy":
            raise DataError(f"{f}: a {modality} model takes .npy arrays of shape {list(input_shape)}")
        try:
            a = np.load(f, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {f}: {e}") from None
        if list(a.shape) != list(input_shape):
            raise DataError(f"{f} has shape {list(a.shape)}, the model expects {list(input_shape)}")
        arrs.append(a)
    return torch.from_numpy(np.stack(arrs))


def predict(runner: Runner, meta: Dict, files: Sequence[Path], topk: int = 5, batch: int = 64) -> List[Dict]:
    """Per file: the ``topk`` classes by softmax probability, most likely first."""
    classes = meta["classes"]
    k = max(1, min(int(topk), len(classes)))
    out = []
    for s in range(0, len(files), batch):
        chunk = list(files[s:s + batch])
        x = normalize(load_inputs(chunk, meta["input_shape"], meta.get("modality", "image")),
                      meta["mean"], meta["std"])
        prob = torch.softmax(runner(x).float(), dim=-1)
        p, i = prob.topk(k, dim=-1)
        for f, pr, ix in zip(chunk, p.tolist(), i.tolist()):
            out.append({"file": str(f), "topk": [{"class": classes[c], "index": c, "prob": q}
                                                 for q, c in zip(pr, ix)]})
    return out


# --------------------------------------------------------------------------- profile
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


def _nbytes_state(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def profile(checkpoint: str | Path, compare_models: Sequence[str] = (), exported: Sequence[str | Path] = (),
            threads: int = 1, warmup: int = 10, repeats: int = 50, rounds: int = 5,
            overrides: List[str] | None = None, training_params: bool = True,
            weights_only: bool = True) -> Dict:
    """Size and batch-1 CPU latency of the deployed model vs the same architecture
    built plainly (their ratio is 1 by construction: same graph, same weights' shapes)."""
    from .engine.profile import count_macs, count_params
    from .models import build_model

    if threads > 0:
        torch.set_num_threads(threads)
    dep = load_deployed(checkpoint, weights_only)
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
    x = dep.normalize(torch.zeros(1, *shape, dtype=torch.uint8)) if dep.modality == "image" \
        else torch.zeros(1, *shape)
    lat = measure_latency(fns, x, warmup, repeats, rounds)
    for key, v in lat.items():
        rows[key]["latency_ms"] = v["median_ms"]
        rows[key]["latency"] = v
    ckpt_bytes = Path(checkpoint).stat().st_size
    train = {"params": None, "source": None, "checkpoint_bytes": ckpt_bytes}
    if training_params:
        try:
            method, _, _ = load_training_method(checkpoint, overrides, weights_only)
            train.update(params=count_params(method), source="rebuilt method",
                         deploy_params=count_params(method.deploy()))
        except (DataError, ConfigError, CheckpointError, KeyError, OSError) as e:
            summary = Path(checkpoint).with_name("summary.json")
            if summary.is_file():
                train.update(params=json.loads(summary.read_text()).get("params_train"),
                             source=str(summary))
            else:
                train["source"] = f"unavailable: {e}"
    d, p = rows["deployed"]["latency_ms"], rows["plain"]["latency_ms"]
    return {
        "checkpoint": str(checkpoint), "model": name, "method": cfg["method"]["name"],
        "input_shape": shape, "batch": 1, "threads": torch.get_num_threads(),
        "warmup": warmup, "repeats": rounds * max(1, repeats // max(1, rounds)),
        "rows": rows, "latency_ratio_deployed_over_plain": d / p if p > 0 else None,
        "training_model": train, "torch_version": torch.__version__, "lsskd_version": __version__,
    }


# --------------------------------------------------------------------------- int8
class _CalibReader:
    """onnxruntime calibration reader over normalised float inputs."""

    def __init__(self, x: torch.Tensor, input_name: str, batch: int = 32):
        self.chunks = [x[s:s + batch].numpy().astype(np.float32) for s in range(0, len(x), batch)]
        self.input_name, self.i = input_name, 0

    def get_next(self):
        if self.i >= len(self.chunks):
            return None
        self.i += 1
        return {self.input_name: self.chunks[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize_onnx(src: str | Path, dst: str | Path, calib_x: torch.Tensor, per_channel: bool = True) -> None:
    """Static int8 quantisation (QDQ, onnxruntime) calibrated on ``calib_x`` (normalised
    training inputs, MinMax). The written file gets the source's metadata sidecar."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ExportError("int8 quantisation needs onnxruntime: pip install 'lsskd[export]'") from None
    src, dst = Path(src), Path(dst)
    reader = type("Reader", (_CalibReader, CalibrationDataReader), {})(calib_x, INPUT_NAME)
    tmp_dir = dst.parent
    tmp_dir.mkdir(parents=True, exist_ok=True)
    pre = tmp_dir / f".{dst.name}.pre.onnx"
    out_tmp = tmp_dir / f".{dst.name}.q.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_tmp), reader, quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
        atomic_write_bytes(dst, out_tmp.read_bytes())
    finally:
        for p in (pre, out_tmp):
            if p.exists():
                p.unlink()
    meta = read_metadata(src) or {}
    data = dst.read_bytes()
    meta.update({"file": dst.name, "bytes": len(data), "sha256": sha256_bytes(data),
                 "quantization": {"type": "static int8 QDQ", "per_channel": per_channel,
                                  "calibration_inputs": int(len(calib_x)), "source": src.name}})
    meta.pop("parity", None)
    atomic_write_json(metadata_path(dst), meta)


@torch.no_grad()
def accuracy(runner: Runner, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 (%) of a runner on normalised inputs."""
    correct = 0
    for s in range(0, len(x), batch):
        correct += int((runner(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    return 100.0 * correct / max(1, len(y))


__all__ = [
    "Deployed", "ExportError", "FORMATS", "Runner", "accuracy", "collect_files", "core_metadata",
    "default_export_path", "export", "extract_backbone", "load_deployed", "load_inputs", "load_runner",
    "load_training_method", "max_abs_diff", "measure_latency", "metadata_path", "normalize", "open_model",
    "parity_inputs", "predict", "profile", "quantize_onnx", "read_metadata", "serialize", "sha256_file",
]
