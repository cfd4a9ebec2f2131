"""What the deploy modules share: the export file format's names and the error type."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

EXPORT_FORMAT = "lsskd-export-1"
FORMATS = ("torchscript", "onnx", "executorch")
SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx", "executorch": ".pte"}
ONNX_OPSET = 17  # the TorchScript-based ONNX exporter
ONNX_DYNAMO_OPSET = 18  # the torch.export-based ONNX exporter (its lowest native opset in torch 2.13)
# "auto": the torch.export-based exporter (needs onnxscript), else the TorchScript-based one,
# with the reason on stderr. Library callers may pin one; the tests pin the faster legacy one.
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_ONNX_EXPORTER = "auto"
# How every exported model's input is made from a raw input (images NCHW RGB, signals C x T).
PREPROCESS = ("float input = ((x / 255 if uint8 else x) - mean) / std, per channel "
              "(mean, std: these lists); images NCHW RGB, signals C x T")
EDGE_INSTALL = "pip install 'lsskd[edge]' (executorch 1.5 with torch 2.13)"
PARITY_TOL = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_KEY = "lsskd.json"  # name of the embedded metadata (TorchScript extra file / ONNX property)


class ExportError(RuntimeError):
    """Exporting, reloading or checking an exported model failed; the message names the file."""


def metadata_path(model_file: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (the metadata sidecar)."""
    p = Path(model_file)
    return p.with_name(p.name + ".json")


@contextlib.contextmanager
def quiet():
    # torch 2.13 marks torch.jit and the TorchScript-based ONNX exporter deprecated;
    # both still work and need no extra packages, so the warnings are noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield
