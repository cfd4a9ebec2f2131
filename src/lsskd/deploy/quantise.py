"""Static int8 quantisation: an exported ONNX model (onnxruntime, QDQ), or the deployed
backbone to an ExecuTorch program (PT2E for XNNPACK)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..engine.checkpoint import atomic_write_bytes, atomic_write_json
from . import edge
from .export import sha256_bytes
from .formats import INPUT_NAME, ExportError, metadata_path
from .load import Deployed, core_metadata
from .runners import read_metadata


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
        data = out_tmp.read_bytes()
        atomic_write_bytes(dst, data)
    finally:
        for p in (pre, out_tmp):
            if p.exists():
                p.unlink()
    meta = read_metadata(src) or {}
    meta.update({"file": dst.name, "bytes": len(data), "sha256": sha256_bytes(data),
                 "quantization": {"type": "static int8 QDQ", "per_channel": per_channel,
                                  "calibration_inputs": int(len(calib_x)), "source": src.name}})
    meta.pop("parity", None)
    atomic_write_json(metadata_path(dst), meta)


def quantize_executorch(dep: Deployed, dst: str | Path, calib_x: torch.Tensor, source: str | Path | None = None,
                        per_channel: bool = True) -> dict:
    """The deployed backbone as a static int8 ExecuTorch program (PT2E, XNNPACKQuantizer:
    symmetric int8 weights per output channel, int8 activations from histogram observers
    calibrated on ``calib_x``, normalised training inputs), lowered with XNNPACK and written
    atomically to ``dst`` with its metadata sidecar (the float export's, where ``source``
    names it). Returns the metadata."""
    dst = Path(dst)
    meta = core_metadata(dep)
    meta["batch"] = edge.PTE_BATCH
    quant = {"type": "static int8 PT2E (XNNPACKQuantizer, symmetric)", "per_channel": per_channel,
             "calibration_inputs": int(len(calib_x)), "source": Path(source).name if source else None}
    embedded = dict(meta, quantization=quant)
    model = edge.quantize_pt2e(dep.model, calib_x, meta["model"], per_channel)
    data = edge.pte_bytes(model, torch.zeros(1, *dep.input_shape), embedded, meta["model"])
    atomic_write_bytes(dst, data)
    full = dict(read_metadata(source) or {}) if source else {}
    full.update(embedded)
    full.pop("parity", None)
    full.update({"model_format": "executorch", "file": dst.name, "bytes": len(data), "sha256": sha256_bytes(data),
                 "params": sum(p.numel() for p in dep.model.parameters()), "opset": None,
                 "exporter": "torch.export + PT2E int8 + executorch XNNPACK", "torch_version": torch.__version__,
                 "source": dict(dep.source), "config": dep.config})
    atomic_write_json(metadata_path(dst), full)
    return full
