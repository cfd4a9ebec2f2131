"""Serialising the deployed backbone (TorchScript / ONNX / ExecuTorch) with its metadata,
checked for parity against PyTorch before anything is written."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..engine.checkpoint import atomic_write_bytes, atomic_write_json
from . import edge, formats
from .formats import (FORMATS, INPUT_NAME, META_KEY, ONNX_DYNAMO_OPSET, ONNX_EXPORTERS, ONNX_OPSET, OUTPUT_NAME,
                      PARITY_TOL, SUFFIXES, ExportError, metadata_path, quiet)
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


class _DynamoUnavailable(Exception):
    """The torch.export-based ONNX exporter cannot be used here (the reason is the message)."""


def _onnx_dynamo(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """ONNX via the ``torch.export``-based exporter (``dynamo=True``; needs ``onnxscript``)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise _DynamoUnavailable("onnxscript is not installed (pip install 'lsskd[export]')") from None
    # It logs one warning per torchvision op it cannot register; lsskd uses none of them.
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with quiet():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        return program.model_proto.SerializeToString()
    except Exception as e:  # noqa: BLE001 - torch.export / onnxscript raise many types
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise _DynamoUnavailable(f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]) from None
    finally:
        log.setLevel(level)


def _onnx_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """ONNX via the TorchScript-based exporter (``dynamo=False``, legacy): needs no
    ``onnxscript``; deprecated in torch 2.13 but supported below torch 3."""
    buf = io.BytesIO()
    with quiet():
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    return buf.getvalue()


def onnx_bytes(model: nn.Module, example: torch.Tensor, meta: Dict | None = None,
               opset: int | None = None, exporter: str = "torchscript", info: Optional[Dict] = None) -> bytes:
    """ONNX bytes with a dynamic batch axis. ``exporter``: ``"dynamo"`` (the
    ``torch.export``-based exporter, opset 18), ``"torchscript"`` (the legacy
    TorchScript-based one, opset 17) or ``"auto"`` (dynamo where it works, else
    torchscript). ``info``, if given, receives ``exporter``, ``opset`` and, after a
    fallback, ``fallback_reason``."""
    if exporter not in ONNX_EXPORTERS:
        raise ConfigError(f"onnx exporter must be one of {', '.join(ONNX_EXPORTERS)}, got {exporter!r}")
    model = model.eval()
    info = {} if info is None else info
    data = None
    if exporter in ("auto", "dynamo"):
        op = opset or ONNX_DYNAMO_OPSET
        try:
            data = _onnx_dynamo(model, example, op)
            info.update(exporter="dynamo", opset=op)
        except _DynamoUnavailable as e:
            if exporter == "dynamo":
                raise ExportError(f"the torch.export-based ONNX exporter failed: {e}") from None
            info["fallback_reason"] = str(e)
    if data is None:
        op = opset or ONNX_OPSET
        data = _onnx_torchscript(model, example, op)
        info.update(exporter="torchscript", opset=op)
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


def serialize(model: nn.Module, fmt: str, example: torch.Tensor, meta: Dict | None = None,
              onnx_exporter: str = "torchscript", info: Optional[Dict] = None, name: str = "model") -> bytes:
    """The model's file bytes in ``fmt`` (``info`` receives ONNX's exporter and opset)."""
    if fmt == "torchscript":
        return torchscript_bytes(model, example, meta)
    if fmt == "onnx":
        return onnx_bytes(model, example, meta, exporter=onnx_exporter, info=info)
    if fmt == "executorch":
        return edge.pte_bytes(model, example, meta, name)
    raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def default_export_path(checkpoint: str | Path, fmt: str) -> Path:
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}{SUFFIXES[fmt]}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export(dep: Deployed, fmt: str, out: str | Path, parity_x: torch.Tensor | None = None,
           parity_source: str = "", tol: float = PARITY_TOL, onnx_exporter: str | None = None) -> Dict:
    """Write ``out`` (the model) and ``out.json`` (metadata) and return the metadata.

    ONNX uses ``onnx_exporter`` (default :data:`formats.DEFAULT_ONNX_EXPORTER`, ``"auto"``);
    the metadata records which exporter wrote the file and, after a fallback, why
    (``onnx_fallback_reason``). ExecuTorch programs have a fixed batch of 1 (``batch``).

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
    # A served branch instead of the head (--head aggregated): what it is and its cost in passes.
    meta.update({k: dep.source[k] for k in ("head", "passes") if k in dep.source})
    if fmt == "executorch":
        meta["batch"] = edge.PTE_BATCH
    info: Dict = {}
    try:
        data = serialize(model, fmt, example, meta, onnx_exporter or formats.DEFAULT_ONNX_EXPORTER, info,
                         meta["model"])
    except ExportError:
        raise
    except (RuntimeError, ValueError, TypeError) as e:
        raise ExportError(f"cannot export model '{meta['model']}' to {fmt}: {type(e).__name__}: {e}") from None
    meta.update({
        "model_format": fmt,
        "file": out.name,
        "bytes": len(data),
        "sha256": sha256_bytes(data),
        "params": sum(p.numel() for p in model.parameters()),
        "opset": info.get("opset") if fmt == "onnx" else None,
        "exporter": _exporter_name(fmt, info),
        "torch_version": torch.__version__,
        "source": dict(dep.source),
        "config": copy.deepcopy(dep.config),
    })
    if "fallback_reason" in info:
        meta["onnx_fallback_reason"] = info["fallback_reason"]
    if fmt == "executorch":
        meta["executorch_version"] = _version("executorch")
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


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _exporter_name(fmt: str, info: Dict) -> str:
    if fmt == "torchscript":
        return "torch.jit.trace (legacy)"
    if fmt == "executorch":
        return "torch.export + executorch XNNPACK"
    return "torch.onnx.export(dynamo=True)" if info.get("exporter") == "dynamo" \
        else "torch.onnx.export(dynamo=False) (legacy)"
