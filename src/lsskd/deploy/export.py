"""Serialising the deployed backbone (TorchScript / ONNX) with its metadata, checked
for parity against PyTorch before anything is written."""
from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from ..errors import ConfigError
from ..engine.checkpoint import atomic_write_bytes, atomic_write_json
from .formats import (FORMATS, INPUT_NAME, META_KEY, ONNX_OPSET, OUTPUT_NAME, PARITY_TOL, SUFFIXES, ExportError,
                      metadata_path, quiet)
from .load import Deployed, core_metadata
from .runners import max_abs_diff, runner_from_bytes


def torchscript_bytes(model: nn.Module, example: torch.Tensor, meta: Dict | None = None) -> bytes:
    """Trace the eval-mode model. The CIFAR/HAPT backbones have no data-dependent
    control flow, so a trace is exact; the batch size stays free (checked by parity)."""
    model = model.eval()
    buf = io.BytesIO()
    with torch.no_grad(), quiet():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buf, _extra_files={META_KEY: json.dumps(meta)} if meta else {})
    return buf.getvalue()


def onnx_bytes(model: nn.Module, example: torch.Tensor, meta: Dict | None = None,
               opset: int = ONNX_OPSET) -> bytes:
    """ONNX via the TorchScript-based exporter (``dynamo=False``): it needs no
    ``onnxscript`` and works offline; the batch axis is dynamic."""
    model = model.eval()
    buf = io.BytesIO()
    with quiet():
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

    With ``parity_x`` (normalised inputs) the serialised bytes are first loaded back by
    their runtime and compared with the PyTorch model; only if the max absolute
    difference is <= ``tol`` are exactly those bytes written, atomically (temp file,
    fsync, rename: the checkpoint writer), so a failed export never replaces a good
    one. The metadata, which records the file's SHA-256, is written atomically after it."""
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
    if parity_x is not None:
        diff = max_abs_diff(runner_from_bytes(data, fmt, f"{out} (not yet written)"), model, parity_x)
        meta["parity"] = {"max_abs_diff": diff, "n": int(len(parity_x)), "inputs": parity_source,
                          "tolerance": tol, "dtype": "float32"}
        if not diff <= tol:  # also catches NaN
            raise ExportError(f"exported {fmt} model differs from the PyTorch model by {diff:.3g} "
                              f"(> {tol:g}) on {len(parity_x)} inputs; {out} was not written")
    atomic_write_bytes(out, data)
    atomic_write_json(metadata_path(out), meta)
    return meta
