"""Running an exported model: TorchScript / ONNX / ExecuTorch runners behind one callable, and
reading an export's metadata. (Opening a checkpoint or an exported file for prediction:
:func:`lsskd.deploy.load.open_model`.)"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch import nn

from ..data.download import file_digest
from ..errors import DataError
from . import edge
from .formats import FORMATS, META_KEY, ExportError, metadata_path, quiet


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
    """onnxruntime on the CPU; ``source`` is a file or the model's bytes."""

    kind = "onnx"

    def __init__(self, source: str | Path | bytes, threads: int = 0, name: str = ""):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running ONNX models needs onnxruntime: pip install 'lsskd[export]'") from None
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        model = source if isinstance(source, bytes) else str(source)
        try:
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExportError(f"cannot load ONNX model {name or source}: {e}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


class ExecuTorchRunner(Runner):
    """The ExecuTorch runtime (``executorch.runtime``) on a ``.pte`` program; ``source`` is
    a file or the program's bytes. The program has a fixed batch (1 for lsskd's exports):
    a larger batch is fed in chunks of it, the last one zero-padded."""

    kind = "executorch"

    def __init__(self, source: str | Path | bytes, threads: int = 0, name: str = ""):
        edge.set_threads(threads)
        self.program = edge._load_program(source, name)
        if "forward" not in self.program.method_names:
            raise ExportError(f"ExecuTorch program {name or source} has no 'forward' method")
        self.method = self.program.load_method("forward")
        self.input_size = list(self.method.metadata.input_tensor_meta(0).sizes())
        self.batch = int(self.input_size[0])

    def __call__(self, x):
        x = x.detach().float().contiguous()
        if list(x.shape[1:]) != self.input_size[1:]:
            raise ExportError(f"ExecuTorch program takes inputs of shape {self.input_size[1:]}, "
                              f"got {list(x.shape[1:])}")
        outs = []
        for s in range(0, len(x), self.batch):
            xb = x[s:s + self.batch]
            n = len(xb)
            if n < self.batch:
                xb = torch.cat([xb, xb.new_zeros(self.batch - n, *xb.shape[1:])])
            outs.append(self.method.execute([xb])[0][:n].clone())
        return torch.cat(outs) if outs else torch.zeros(0)


def detect_format(path: str | Path, meta: Dict | None = None) -> str:
    p = Path(path)
    if meta and meta.get("model_format") in FORMATS:
        return meta["model_format"]
    if p.suffix.lower() == ".onnx":
        return "onnx"
    if p.suffix.lower() == ".pte" or edge.is_pte(p):
        return "executorch"
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
    if p.suffix.lower() == ".pte" or (p.is_file() and edge.is_pte(p)):
        return edge.embedded_metadata(p)
    extra = {META_KEY: ""}
    try:
        torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except Exception:  # noqa: BLE001
        return None
    return json.loads(extra[META_KEY]) if extra[META_KEY] else None


def runner_from_bytes(data: bytes, fmt: str, name: str = "", threads: int = 0) -> Runner:
    """A runner for a serialised model held in memory (``name`` labels errors)."""
    if fmt == "onnx":
        return OnnxRunner(data, threads, name)
    if fmt == "executorch":
        return ExecuTorchRunner(data, threads, name)
    try:
        with quiet():
            model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot load TorchScript model {name}: {type(e).__name__}: {e}") from None
    return TorchRunner(model, "torchscript")


def load_runner(path: str | Path, meta: Dict | None = None, threads: int = 0) -> Runner:
    """A runner for an exported TorchScript, ONNX or ExecuTorch file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    fmt = detect_format(path, meta)
    if fmt == "onnx":
        return OnnxRunner(path, threads)
    if fmt == "executorch":
        return ExecuTorchRunner(path, threads, str(path))
    return runner_from_bytes(path.read_bytes(), fmt, str(path), threads)


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


@torch.no_grad()
def accuracy(runner: Runner, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 (%) of a runner on normalised inputs."""
    correct = 0
    for s in range(0, len(x), batch):
        correct += int((runner(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    return 100.0 * correct / max(1, len(y))
