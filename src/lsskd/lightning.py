"""PyTorch Lightning: self-distillation as a ``LightningModule`` (``docs/api.md``).

Needs the optional extra: ``pip install -e ".[lightning]"`` (pytorch-lightning 2.6; the
``lightning`` package's ``lightning.pytorch`` is used when pytorch_lightning is absent)::

    from lsskd.lightning import SelfDistillModule
    module = SelfDistillModule(backbone, "lsskd_selfsup", num_train=len(train_set), epochs=30,
                               optim={"lr": 0.05, "weight_decay": 5e-4})
    trainer = pl.Trainer(max_epochs=30, precision="16-mixed")
    trainer.fit(module, DataLoader(WithIndex(train_set), batch_size=64, shuffle=True), val_loader)

The module drives :class:`lsskd.api.SelfDistiller`'s hooks from Lightning's: the epoch
hooks, ``after_step`` after each optimiser step, ``on_validation`` with the validation
loader's top-1 (give it a held-out split, never the test set). Everything the method keeps
is in the module's ``state_dict``, so Lightning's checkpoints resume it (``ckpt_path=``).
Logged: every loss term (``train/<term>``, per step), training top-1 (``train/top1``) and the
schedule values (``method/alpha``, ``method/gate``) per epoch,
validation top-1/loss and each branch's top-1 (``val/branch<l>_top1``).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - the unified package instead
    try:
        import lightning.pytorch as pl
    except ImportError:
        raise ImportError("lsskd.lightning needs PyTorch Lightning 2.6 or later: "
                          "pip install -e \".[lightning]\" (or pip install pytorch-lightning)") from None

from .api import RECOMMENDED, SelfDistiller
from .config import DEFAULTS, validate_section
from .engine.trainer import build_optimizer, lr_at
from .errors import UsageError

#: ``optim=`` keys and defaults: lsskd's ``optim.`` section, with a cosine schedule.
OPTIM_DEFAULTS = {**DEFAULTS["optim"], "schedule": "cosine"}


def _unpack(batch):
    """(x, y, idx or None) from a (x, y) or (x, y, idx) batch."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise UsageError("batches must be (x, y) or (x, y, idx) tuples: wrap your training set "
                         "as lsskd.WithIndex(train_set)")
    return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)


class SelfDistillModule(pl.LightningModule):
    """A :class:`SelfDistiller` (same arguments) trained by ``Trainer.fit``. ``optim``: SGD
    settings with lsskd's ``optim.`` keys (``lr``, ``momentum``, ``weight_decay``,
    ``nesterov``, ``schedule`` = cosine | step, ``milestones``, ``lr_decay``,
    ``warmup_epochs``); the learning rate is set every step as ``lsskd train`` sets it.
    Override :meth:`configure_optimizers` for another optimiser. ``train_set``: the
    training dataset the loader reads, for profiles that add samples to each batch
    (DDGSD, DLB, CS-KD; :meth:`SelfDistiller.with_extra`)."""

    def __init__(self, backbone, profile: str = RECOMMENDED, *, num_train: int, epochs: int,
                 optim: Optional[Mapping] = None, config: Optional[Mapping] = None,
                 stages: Optional[Mapping] = None, num_classes: Optional[int] = None,
                 input_shape: Optional[Sequence[int]] = None, has_val: bool = False,
                 modality: Optional[str] = None, train_set=None, seed: int = 0):
        super().__init__()
        self.sd = SelfDistiller(backbone, profile, num_train=num_train, epochs=epochs, config=config,
                                stages=stages, num_classes=num_classes, input_shape=input_shape,
                                has_val=has_val, modality=modality, seed=seed)
        if self.sd.loads_extra and train_set is None:
            raise UsageError(f"profile {profile!r} adds samples to every batch (SelfDistiller.with_extra): "
                             "pass train_set=, the training dataset your loader reads, so the module "
                             "can load them")
        # Not a submodule or hyperparameter: where with_extra loads the profile's extra rows.
        self.train_set = train_set
        self.optim_cfg = validate_section(dict(optim or {}), OPTIM_DEFAULTS, "optim.")
        # Under DDP every rank writes the same gathered rows into the store (after_step):
        # DDP need not broadcast it before every forward.
        self._ddp_params_and_buffers_to_ignore = [f"sd.{b}" for b in self.sd.store_buffers()]
        self._val: Dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sd.backbone(x)

    def deploy(self):
        """The trained model to ship (:meth:`SelfDistiller.deploy`)."""
        return self.sd.deploy()

    # --- optimisation ----------------------------------------------------------------
    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.optim_cfg)

    def on_fit_start(self) -> None:
        t = self.trainer
        if t.max_epochs is None or t.max_epochs < 0 or t.max_epochs > self.sd.epochs:
            raise UsageError(f"Trainer(max_epochs={t.max_epochs}) but the module was built with "
                             f"epochs={self.sd.epochs}, which its schedules span: make them equal")
        strategy_kwargs = getattr(t.strategy, "_ddp_kwargs", {})
        if (t.world_size > 1 and self.sd.may_leave_params_unused
                and not strategy_kwargs.get("find_unused_parameters")):
            raise UsageError(f"profile {self.sd.profile!r} skips its branches on some steps: use "
                             "strategy=DDPStrategy(find_unused_parameters=True)")

    def on_train_epoch_start(self) -> None:
        if self.sd.in_epoch and self.sd.epochs_done == self.current_epoch:
            return  # resumed from a mid-epoch checkpoint: the epoch goes on
        self.sd.on_epoch_start(self.current_epoch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        n = self.trainer.num_training_batches
        # An epoch of unknown length (an iterable loader): the epoch's rate for every step.
        step, steps = (batch_idx, int(n)) if math.isfinite(n) else (0, 1)
        lr = lr_at(self.optim_cfg, self.sd.epochs, self.current_epoch, step, steps)
        for opt in self.trainer.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    def training_step(self, batch, batch_idx: int):
        if self.sd.step_pending:  # gradient accumulation: the last micro-batch had no optimiser step
            self.sd.after_step()
        x, y, idx = _unpack(batch)
        x, y, idx = self.sd.with_extra(x, y, idx, self.train_set)  # unchanged unless the profile adds rows
        out = self.sd.step(x, y, idx)
        self.log_dict({f"train/{k}": v for k, v in out.terms.items()}, on_step=True, on_epoch=False)
        self.log("train/loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return out.loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Commit the step's store write right after the optimiser step, before any callback's
        # on_train_batch_end (a step checkpoint then holds it).
        if self.sd.step_pending:
            self.sd.after_step()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.sd.step_pending:
            self.sd.after_step()
        if batch_idx + 1 >= self.trainer.num_training_batches:
            # Close the epoch before validation and checkpointing (both run before
            # on_train_epoch_end), so a checkpoint holds a finished epoch.
            self._close_epoch()

    def on_train_epoch_end(self) -> None:
        if self.sd.in_epoch:  # the epoch stopped early (max_steps)
            self._close_epoch()

    def _close_epoch(self) -> None:
        stats = self.sd.on_epoch_end()
        names = {"top1": "train/top1", "loss": "train/epoch_loss", "n": None}
        self.log_dict({names.get(k, f"method/{k}"): float(v) for k, v in stats.items()
                       if names.get(k, "") is not None}, on_step=False, on_epoch=True)

    # --- validation: held-out accuracy, branch accuracies, the gap gate --------------
    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, _ = _unpack(batch)
        logits, branches = self.sd.eval_forward(x)
        v = self._val
        for name, lg in {"top1": logits, **{f"{k}_top1": b for k, b in branches.items()}}.items():
            v[name] = v.get(name, 0) + (lg.float().argmax(1) == y).sum()
        v["loss"] = v.get("loss", 0) + F.cross_entropy(logits.float(), y, reduction="sum")
        v["n"] = v.get("n", 0) + torch.tensor(len(y), device=y.device)

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        keys = sorted(self._val)
        tot = torch.stack([torch.as_tensor(self._val[k], dtype=torch.float64, device=self.device)
                           for k in keys])
        tot = dict(zip(keys, self.trainer.strategy.reduce(tot, reduce_op="sum").tolist()))
        n = max(1.0, tot.pop("n"))
        scores = {k: (tot[k] / n if k == "loss" else 100.0 * tot[k] / n) for k in tot}
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, on_step=False, on_epoch=True)
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.sd.on_validation(scores["top1"])  # not from trainer.validate() or the sanity check

    def on_save_checkpoint(self, checkpoint: Dict) -> None:
        checkpoint["lsskd"] = {"profile": self.sd.profile, "epochs": self.sd.epochs,
                               "num_train": self.sd.num_train}
