"""Reading a training run: its config and checkpoint state (read and verified once),
the deployed backbone extracted from it, the full training method rebuilt from it, the
run's data when a check needs it, and a model opened for prediction (a checkpoint or an
exported file). :func:`read_run` is the one reader of a training checkpoint: evaluation
(``lsskd eval``), export, profile, predict and KD's teacher all go through it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import build_config, merge
from ..data import build_run_data
from ..data.augment import BatchAugment
from ..data.base import DataBundle
from ..data.tiny_imagenet import class_words
from ..engine.checkpoint import load_checkpoint
from ..errors import CheckpointError, ConfigError, DataError
from ..methods.build import build_method
from ..models import build_model
from ..plugins import import_plugins
from ..version import __version__
from .formats import EXPORT_FORMAT, INPUT_NAME, OUTPUT_NAME, PREPROCESS, ExportError, metadata_path
from .runners import TorchRunner, load_runner, read_metadata, sha256_file

BACKBONE_PREFIX = "backbone."


@dataclass
class TrainedRun:
    """One training checkpoint, read and verified once: ``config`` (the run's config
    merged over today's defaults, with ``overrides`` applied) and ``state`` (the
    checkpoint dict). :meth:`bundle` builds the run's data on first use and keeps it."""

    checkpoint: Path
    config: Dict
    state: Dict
    _bundle: Optional[DataBundle] = field(default=None, repr=False)

    def bundle(self, hint: str = "") -> DataBundle:
        """The run's data (built once); ``hint`` is added to a data error's message."""
        if self._bundle is None:
            try:
                self._bundle = build_run_data(self.config)
            except DataError as e:
                if not hint:
                    raise
                raise DataError(f"{e} ({hint})") from None
        return self._bundle


def read_run(checkpoint: str | Path | TrainedRun, overrides: List[str] | None = None,
             weights_only: bool = True) -> TrainedRun:
    """The one reader of a ``last.pt``/``best.pt`` written by ``lsskd train`` (a
    :class:`TrainedRun` passes through unchanged): the verified checkpoint, and the run's
    stored config merged over today's defaults with ``overrides`` (``key=value``)
    applied. The config's ``plugins`` are imported (a model or method of the user's own).
    Builds no method and reads no data."""
    if isinstance(checkpoint, TrainedRun):
        return checkpoint
    st = load_checkpoint(checkpoint, weights_only=weights_only)
    missing = [k for k in ("config", "method") if k not in st]
    if missing:
        raise CheckpointError(f"{checkpoint} is not an lsskd checkpoint: a torch file without "
                              f"{', '.join(repr(k) for k in missing)} (lsskd writes <run>/last.pt and <run>/best.pt)")
    cfg = merge(st["config"])
    import_plugins(cfg["plugins"])
    if overrides:
        over = build_config(None, overrides)
        for item in overrides:
            key = item.split("=", 1)[0].split(".")
            src, dst = over, cfg
            for k in key[:-1]:
                src, dst = src[k], dst[k]
            dst[key[-1]] = src[key[-1]]
    return TrainedRun(Path(checkpoint), cfg, st)


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
    # Human-readable class names where the dataset has them (Tiny-ImageNet's words.txt).
    descriptions: Optional[List[str]] = None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The evaluation-time transform: uint8 images are scaled to [0, 1], then
    ``(x - mean) / std`` per channel (the same op as ``BatchAugment.normalize``)."""
    return BatchAugment(mean, std).normalize(x)


def backbone_weights(method_state: Dict[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a method's state dict, prefix removed."""
    sub = {k[len(BACKBONE_PREFIX):]: v for k, v in method_state.items() if k.startswith(BACKBONE_PREFIX)}
    if not sub:
        raise CheckpointError(f"{source}'s method state has no 'backbone.*' entries")
    return sub


def extract_backbone(cfg: Dict, method_state: Dict[str, torch.Tensor], num_classes: int,
                     source: str = "checkpoint") -> nn.Module:
    """Build ``cfg.model`` fresh and load the ``backbone.*`` entries of a method's
    state dict into it (strictly); eval mode. By the method contract ``deploy()`` returns
    ``self.backbone``, so this is the deployed model without rebuilding the method (no
    branches, no store, no teacher, no training data needed). ``source`` names the
    checkpoint in error messages. KD's teacher is loaded through it too."""
    model = build_model(cfg["model"]["name"], num_classes, **cfg["model"].get("kwargs", {}))
    try:
        model.load_state_dict(backbone_weights(method_state, source), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: backbone weights do not fit model '{cfg['model']['name']}': {e}") from None
    return model.eval()


def load_deployed(checkpoint: str | Path | TrainedRun, weights_only: bool = True) -> Deployed:
    """The deployed model of a ``last.pt``/``best.pt`` written by ``lsskd train`` (or of a
    run already read by :func:`read_run`)."""
    run = read_run(checkpoint, None, weights_only)
    classes = _deployment_entries(run)
    model = extract_backbone(run.config, run.state["method"], len(classes), f"checkpoint {run.checkpoint}")
    return _deployed(run, model)


def _deployment_entries(run: TrainedRun) -> List[str]:
    """The class names, after checking that the checkpoint has what an export needs."""
    for key in ("classes", "mean", "std", "input_shape", "method"):
        if key not in run.state:
            raise CheckpointError(f"checkpoint {run.checkpoint} has no '{key}' entry (not written by lsskd train?)")
    return list(run.state["classes"])


def _deployed(run: TrainedRun, model: nn.Module, **source) -> Deployed:
    """``model`` with the run's preprocessing, classes and provenance (``source`` adds entries)."""
    st = run.state
    classes = list(st["classes"])
    return Deployed(model, classes, [float(v) for v in st["mean"]], [float(v) for v in st["std"]],
                    [int(v) for v in st["input_shape"]], st.get("modality", "image"), run.config,
                    {"checkpoint": str(run.checkpoint), "epoch": st.get("epoch"),
                     "checkpoint_version": st.get("version"), **source},
                    class_words(run.config.get("data", {}), classes))


def core_metadata(dep: Deployed) -> Dict:
    """What a runtime needs to feed the model and read its output (also embedded in the file)."""
    cfg = dep.config
    meta = {
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
        "preprocess": PREPROCESS,
        "lsskd_version": __version__,
    }
    if dep.descriptions:
        meta["class_descriptions"] = list(dep.descriptions)
    return meta


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


def load_training_method(checkpoint: str | Path | TrainedRun, overrides: List[str] | None = None,
                         weights_only: bool = True):
    """(method, cfg, bundle): the full training-time method with its weights, rebuilt
    on the run's data (needed for anything the method's constructor sizes from it)."""
    run = read_run(checkpoint, overrides, weights_only)
    bundle = run.bundle()
    method = build_method(run.config, bundle)
    method.load_state_dict(run.state["method"])
    return method.eval(), run.config, bundle


def load_aggregated(checkpoint: str | Path | TrainedRun, weights_only: bool = True) -> Deployed:
    """The deepest auxiliary branch aggregated over all M views, as a model to ship instead of
    the head (``lsskd export --head aggregated``): M passes of the backbone per input for the
    branch's accuracy. Its ``source`` records ``head`` and ``passes``, written to the export's
    metadata. Methods without branches are refused with the method named."""
    run = read_run(checkpoint, None, weights_only)
    _deployment_entries(run)
    method, _, _ = load_training_method(run)
    if not hasattr(method, "aggregated_branch") or not len(getattr(method, "aux", [])):
        raise ConfigError(f"checkpoint {run.checkpoint}: method '{run.config['method']['name']}' has no "
                          "auxiliary branches to aggregate; export the deployed head (--head deployed)")
    agg = method.aggregated_branch().eval()
    passes = int(method.num_views)
    return _deployed(run, agg, head=f"deepest branch aggregated over {passes} views", passes=passes)


def parity_inputs(checkpoint: str | Path | TrainedRun, dep: Deployed, n: int, overrides: List[str] | None = None,
                  split: str = "test") -> torch.Tensor:
    """``n`` inputs of the run's test split, normalised like evaluation does."""
    run = read_run(checkpoint, overrides)
    bundle = run.bundle("the parity check reads the run's test data: override data.root=PATH, "
                        "or use random inputs")
    ds = bundle.test if split == "test" else bundle.val
    if ds is None:
        raise DataError(f"split '{split}' is not available for {run.checkpoint}")
    if list(ds.x.shape[1:]) != dep.input_shape:
        raise DataError(f"{split} inputs under data.root={run.config['data']['root']} have shape "
                        f"{list(ds.x.shape[1:])} but the model expects {dep.input_shape}")
    # Evenly spaced, so the sample spans the classes (folders are stored class by class).
    idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique()
    return dep.normalize(ds.x[idx])
