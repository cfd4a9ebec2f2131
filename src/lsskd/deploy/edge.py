"""ExecuTorch (``.pte``): ``torch.export`` of the deployed backbone, lowered with the
XNNPACK partitioner, in float32 or PT2E static int8; and a runner over the ExecuTorch
runtime.

The program is exported at a fixed batch of :data:`PTE_BATCH` (1: one input per call, the
on-device case; the runner feeds larger batches one input at a time). The metadata is
embedded as a constant method :data:`META_METHOD` returning the JSON string, beside the
sidecar ``<file>.json``. Needs the optional ``executorch`` package (``lsskd[edge]``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from .formats import EDGE_INSTALL, ExportError, quiet

PTE_BATCH = 1
META_METHOD = "lsskd_json"
PTE_MAGIC = b"ET"  # flatbuffer file identifier "ET12" etc. at byte offset 4

_OP = re.compile(r"\b(?:aten|prims|quantized_decomposed|torchao)(?:::|\.)[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)?")
# torch.export's own errors end with the user's line: 'File "m.py", line 6, in forward\n    code'
_CALL = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(\S[^\n]*)')


@contextlib.contextmanager
def _quiet():
    """Silence what torch.export / executorch / torchao print that is no news to a user:
    deprecation warnings, torchao's optional CUDA kernels, pytree registration notes."""
    logs = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "torch._export", "executorch")]
    levels = [lg.level for lg in logs]
    for lg in logs:
        lg.setLevel(logging.ERROR)
    try:
        with quiet():
            yield
    finally:
        for lg, lv in zip(logs, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def _mute_native_stderr():
    """The runtime's C++ code prints CPU-probing notes on file descriptor 2 when it first
    loads a program; errors still reach Python as exceptions."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no real descriptor 2 (an embedding host): print as is
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def available() -> bool:
    try:
        with _quiet():
            import executorch.exir  # noqa: F401
            import executorch.runtime  # noqa: F401
    except ImportError:
        return False
    return True


def _require(what: str = "--format executorch") -> None:
    if not available():
        raise ExportError(f"{what} needs the executorch package: {EDGE_INSTALL}")


def failing_op(err: BaseException) -> str:
    """The operator an export/lowering error is about, as far as its message names one."""
    text = f"{err}"
    op = _OP.search(text)
    if op:
        return op.group(0)
    calls = _CALL.findall(text)
    if calls:
        file, line, fn, code = calls[-1]
        return f"`{code.strip()}` ({Path(file).name}:{line}, in {fn})"
    return "an operator the message does not name"


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in f"{err}".splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def export_program(model: nn.Module, example: torch.Tensor, name: str, dynamic_batch: bool = False):
    """``torch.export`` of the eval-mode model; a failure names the model and the op."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    if not isinstance(model, torch.fx.GraphModule):  # a PT2E-converted graph has no eval()
        model = model.eval()
    try:
        with _quiet():
            return torch.export.export(model, (example,), dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        raise ExportError(f"torch.export cannot take model '{name}': it fails at {failing_op(e)} "
                          f"({_first_line(e)})") from None


def quantize_pt2e(model: nn.Module, calib_x: torch.Tensor, name: str, per_channel: bool = True,
                  batch: int = 32) -> nn.Module:
    """PT2E static int8 for XNNPACK: symmetric int8 weights (per output channel) and
    activations (histogram observers), calibrated on ``calib_x`` (normalised inputs),
    returned as the converted (quantise/dequantise) graph module."""
    _require("--int8 with --format executorch")
    with _quiet():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                              get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if len(calib_x) == 0:
        raise ExportError("int8 calibration needs at least one input")
    graph = export_program(model, calib_x[:2], name, dynamic_batch=True).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    try:
        with _quiet():
            prepared = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for s in range(0, len(calib_x), batch):
                    prepared(calib_x[s:s + batch].float())
            return convert_pt2e(prepared)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot quantise model '{name}' for XNNPACK: {failing_op(e)} ({_first_line(e)})") from None


def pte_bytes(model: nn.Module, example: torch.Tensor, meta: Dict | None = None, name: str = "model",
              calib_x: torch.Tensor | None = None) -> bytes:
    """The ``.pte`` program of ``model`` at batch :data:`PTE_BATCH`, XNNPACK-lowered; int8
    (PT2E static) when ``calib_x`` is given. ``meta`` is embedded as :data:`META_METHOD`."""
    _require()
    with _quiet():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    x1 = example[:PTE_BATCH].float()
    if calib_x is not None:
        model = quantize_pt2e(model, calib_x, name)
    program = export_program(model, x1, name)
    try:
        with _quiet():
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                               constant_methods={META_METHOD: json.dumps(meta)} if meta else None)
            return bytes(edge.to_executorch().buffer)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot lower model '{name}' to ExecuTorch (XNNPACK): it fails at {failing_op(e)} "
                          f"({_first_line(e)})") from None


def set_threads(threads: int) -> None:
    """Threads of the ExecuTorch (XNNPACK) thread pool for this process (0: leave as is)."""
    if threads <= 0:
        return
    try:
        from executorch.extension.pybindings import portable_lib

        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
    except (ImportError, AttributeError):  # an executorch without the (experimental) hook
        pass


def _load_program(source: str | Path | bytes, name: str):
    _require("running a .pte file")
    from executorch.runtime import Runtime

    try:
        with _mute_native_stderr():
            program = Runtime.get().load_program(
                bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source))
            for name in program.method_names:  # XNNPACK initialises (and probes the CPU) here
                program.load_method(name)
        return program
    except Exception as e:  # noqa: BLE001 - the runtime raises RuntimeError / ValueError
        raise ExportError(f"cannot load ExecuTorch program {name or source}: {_first_line(e)}") from None


def embedded_metadata(source: str | Path | bytes) -> Dict | None:
    """The metadata embedded in a ``.pte`` (None without executorch or without one)."""
    if not available():
        return None
    try:
        program = _load_program(source, str(source) if not isinstance(source, bytes) else "")
        if META_METHOD not in program.method_names:
            return None
        return json.loads(program.load_method(META_METHOD).execute([])[0])
    except (ExportError, RuntimeError, ValueError, IndexError):
        return None


def is_pte(path: str | Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head[4:6] == PTE_MAGIC
