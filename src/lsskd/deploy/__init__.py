"""Edge deployment: export the bare backbone, check parity, profile, predict.

LSSKD's auxiliary branches, view heads and soft-target store exist only at
training time; the shipped model is ``method.deploy()``, i.e. the backbone alone
(paper: "no additional inference cost"). This package turns a training
checkpoint into that model and serialises it. One concern per module:

* :mod:`.load` -- :func:`read_run`, the one reader of a checkpoint (config and state,
  read and verified once; the run's data built at most once), the deployed
  backbone extracted from it (:func:`extract_backbone`, :func:`load_deployed`), its
  metadata (:func:`core_metadata`), and :func:`open_model` (a runner for a checkpoint or
  an exported file).
* :mod:`.export` -- ONNX (the ``torch.export``-based exporter, opset 18, falling back to the
  TorchScript-based one, opset 17; dynamic batch axis), ExecuTorch ``.pte`` (:mod:`.edge`) or
  legacy TorchScript (``torch.jit.trace``) bytes, checked for parity (reloaded by their runtime and compared with the
  PyTorch model on real, identically normalised test inputs) and only then written
  atomically (``engine.checkpoint.atomic_write_bytes``), with a ``<file>.json``
  metadata sidecar (class names, input shape, normalisation, modality, source config,
  version, SHA-256 of the model file, measured parity). The core metadata is also
  embedded in the model file itself.
* :mod:`.edge` -- ExecuTorch: ``torch.export``, XNNPACK lowering, PT2E int8 (optional
  ``executorch`` package, ``lsskd[edge]``).
* :mod:`.runners` -- one callable over TorchScript / ONNX / ExecuTorch / a checkpoint; metadata reading.
* :mod:`.quantise` -- static int8: ONNX (onnxruntime) and ExecuTorch (PT2E, XNNPACK).
* :mod:`.predict` -- top-k class names for image (or ``.npy`` signal) files; unreadable
  files can be skipped and listed.
* :mod:`.profile` -- parameters, MACs, file sizes and batch-1 CPU latency of the deployed
  model next to the same architecture built plainly.
* :mod:`.formats` -- the names the modules share (file format, metadata key, error type).
"""
from .formats import (EXPORT_FORMAT, FORMATS, INPUT_NAME, META_KEY, ONNX_DYNAMO_OPSET, ONNX_EXPORTERS,  # noqa: F401
                      ONNX_OPSET, OUTPUT_NAME, PARITY_TOL, PREPROCESS, SUFFIXES, ExportError, metadata_path)
from .load import (Deployed, TrainedRun, backbone_weights, core_metadata, extract_backbone, load_deployed,  # noqa: F401
                   load_aggregated, load_training_method, normalize, open_model, parity_inputs, read_run)
from .runners import (ExecuTorchRunner, OnnxRunner, Runner, TorchRunner, accuracy, detect_format, load_runner,  # noqa: F401
                      max_abs_diff, read_metadata, runner_from_bytes, sha256_file)
from .export import (default_export_path, export, onnx_bytes, serialize,  # noqa: F401
                     sha256_bytes, torchscript_bytes)
from .quantise import quantize_executorch, quantize_onnx  # noqa: F401
from .evaluate import evaluate_exported  # noqa: F401
from .predict import class_descriptions, collect_files, load_inputs, predict, read_input  # noqa: F401
from .profile import measure_latency, profile  # noqa: F401

__all__ = [
    "Deployed", "ExportError", "FORMATS", "Runner", "TrainedRun", "accuracy", "backbone_weights",
    "class_descriptions", "collect_files", "core_metadata", "default_export_path", "export",
    "extract_backbone", "load_deployed", "load_inputs", "load_runner", "load_training_method", "max_abs_diff",
    "load_aggregated", "measure_latency", "metadata_path", "normalize", "open_model", "parity_inputs", "predict", "profile",
    "quantize_onnx", "quantize_executorch", "evaluate_exported", "ExecuTorchRunner", "read_input", "read_metadata", "read_run", "serialize", "sha256_file",
]
