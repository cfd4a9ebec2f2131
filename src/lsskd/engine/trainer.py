"""The training loop: the paper's recipe by default, resumable to the step.

Concerns live in their own modules: the run directory's files in
:mod:`lsskd.engine.rundir`, what a checkpoint holds in :mod:`lsskd.engine.state`,
config validation in :func:`lsskd.config.check_config`, the method's construction in
:func:`lsskd.methods.build_method`. Here: setup (device, AMP, DDP, compile), and the epoch
loop as train (:meth:`Trainer._train_epoch`), evaluate (:meth:`Trainer._evaluate_epoch`)
and log (:meth:`Trainer._log_epoch`), advancing one :class:`~lsskd.engine.state.Progress`.
At about 450 lines it is over the house's 400: the optimiser step with its non-finite
handling and the summary are the remaining bulk, and each reads the trainer's whole state.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..config import check_config
from ..data import BatchAugment, BatchIterator, DataBundle, build_run_data
from ..errors import ConfigError, NonFiniteError, ResourceError, StorageError, oom_errors
from ..methods.build import build_method
from ..methods.store import StoreBase
from ..version import __version__
from .checkpoint import save_checkpoint
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .metrics import evaluate, recalibrate_bn
from .profile import count_macs, count_params
from .rundir import RunDir, provenance
from .state import Progress, capture as capture_state, restore as restore_state


def resolve_device(pref: str, dist_info: DistInfo) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and dist_info.enabled:
        return torch.device("cuda", dist_info.local_rank)
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={pref} but CUDA is not available")
    return torch.device(pref)


def lr_at(cfg_optim: Dict, epochs: int, epoch0: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate for 0-based ``epoch0`` and step within it."""
    base = cfg_optim["lr"]
    t = epoch0 + step / max(1, steps_per_epoch)
    warm = cfg_optim.get("warmup_epochs", 0)
    if warm and t < warm:
        return base * (t + 1.0 / max(1, steps_per_epoch)) / warm
    if cfg_optim["schedule"] == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t / epochs))
    n = sum(epoch0 >= m for m in cfg_optim["milestones"])  # "step" (checked by check_config)
    return base * cfg_optim["lr_decay"] ** n


def build_optimizer(params, cfg_optim: Dict) -> torch.optim.Optimizer:
    # optim.name is "sgd", the only choice (checked by check_config).
    # No weight decay on norm parameters/biases is a common tweak; the paper decays all.
    return torch.optim.SGD(params, lr=cfg_optim["lr"], momentum=cfg_optim["momentum"],
                           nesterov=cfg_optim["nesterov"], weight_decay=cfg_optim["weight_decay"])


def compile_modules(method: nn.Module) -> list:
    """``torch.compile`` the compute-heavy modules that are entered through ``__call__``:
    the backbone's stem, stages, final block and classifier, and every member of the
    method's own ModuleLists (e.g. LSSKD's branches). Compiling the whole method instead
    would recompile each epoch (alpha_t is a Python float) and trace the store updates."""
    bb = method.backbone
    mods = [bb.stem, *bb.stages, bb.final, bb.classifier]
    for name, child in method.named_children():
        if isinstance(child, nn.ModuleList) and name != "backbone":
            mods.extend(child)
    for m in mods:
        m.compile()
    return mods


def _pinned_batch(xb: torch.Tensor) -> torch.Tensor:
    """A page-locked copy of the batch, so ``.to(cuda, non_blocking=True)`` is truly async.
    (Pinning the whole dataset tensor would not do: ``x[idx]`` allocates pageable memory.)
    The caching host allocator keeps the block alive until the copy has finished."""
    out = torch.empty(xb.shape, dtype=xb.dtype, pin_memory=True)
    return out.copy_(xb)


def _release_on_failure(init):
    """A Trainer whose construction fails gives its run directory's lock back at once
    (and removes the folder if it made it and nothing was written)."""
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:
            self.close()
            raise
    return wrapped


class Trainer:
    """``unsafe_load``: resume with ``torch.load(weights_only=False)`` (trusted files only).
    The main process holds the run directory's lock from construction until :meth:`fit`
    ends (or :meth:`close`)."""

    @_release_on_failure
    def __init__(self, cfg: Dict, resume: bool = False, bundle: DataBundle | None = None,
                 unsafe_load: bool = False):
        check_config(cfg)  # ranges, choices, names: before any data is loaded
        self.cfg = cfg
        self.tcfg = cfg["train"]
        self.unsafe_load = unsafe_load
        self._where = "setup"
        self.dist = init_distributed(self.tcfg["device"])
        self.device = resolve_device(self.tcfg["device"], self.dist)
        self.rundir = RunDir(cfg["out_dir"])
        self.run_dir = self.rundir.path
        self.resume = resume
        # One writer per run directory: locked before anything is read or written.
        self.lock = self.rundir.lock() if self.dist.is_main else None
        self.rundir.check(resume)
        if self.tcfg["threads"] > 0:
            torch.set_num_threads(self.tcfg["threads"])
        if self.tcfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg["seed"])
        self.bundle = bundle or build_run_data(cfg, self.dist.is_main)
        torch.manual_seed(cfg["seed"])  # model init independent of data loading
        try:
            self.method = build_method(cfg, self.bundle).to(self.device)
        except TypeError as e:
            if not cfg["model"].get("kwargs"):
                raise
            raise ConfigError(f"model.kwargs do not fit model {cfg['model']['name']!r}: {e}") from None
        if self.tcfg["channels_last"]:
            # Not the soft-target store: its 4-D buffers are tables, not images.
            for child in self.method.children():
                if not isinstance(child, StoreBase):
                    child.to(memory_format=torch.channels_last)
        if self.dist.enabled and self.tcfg["sync_bn"]:
            if self.device.type != "cuda":
                raise ConfigError("train.sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm "
                                  f"does not run on {self.device.type}); set train.sync_bn=false")
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        acfg = cfg["data"]["augment"]
        self.aug = BatchAugment(self.bundle.mean, self.bundle.std, self.bundle.modality,
                                acfg["crop_padding"], acfg["flip"], acfg["cutout"],
                                acfg["cutmix_prob"], acfg["cutmix_alpha"], acfg["jitter"], acfg["scaling"],
                                acfg["mixup_alpha"])
        self.optimizer = build_optimizer(self.method.parameters(), cfg["optim"])
        amp = self.tcfg["amp"]
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(amp == "fp16"))
        self.model_for_step = self._wrap_distributed() if self.dist.enabled else self.method
        if self.tcfg["compile"]:
            compile_modules(self.method)
        self.iterator = BatchIterator(self.bundle.train, self.tcfg["batch_size"] // self.dist.world_size
                                      * self.dist.world_size, True, self.tcfg["drop_last"],
                                      self.dist.rank, self.dist.world_size)
        self.data_gen = torch.Generator().manual_seed(cfg["seed"])
        self.aug_gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        self.progress = Progress()  # epoch, step, order, best, time, sums: saved in checkpoints
        self.writer = None
        self.resumed_from: Optional[Path] = None
        if resume:
            self.resumed_from = restore_state(self, self.rundir.last, weights_only=not unsafe_load)

    def _wrap_distributed(self) -> nn.Module:
        # Every rank writes the same gathered rows into its store (after_step), so the
        # store is left out of DDP's per-forward buffer broadcast (N x 4900 values).
        store_bufs = [f"{name}.{b}" for name, mod in self.method.named_modules()
                      if isinstance(mod, StoreBase) for b, _ in mod.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self.method, store_bufs)
        return nn.parallel.DistributedDataParallel(
            self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.method.may_leave_params_unused)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- checkpoints (contents: engine/state.py) -------------------------------------
    def save(self) -> None:
        """last.pt at the current progress. keep_previous: its predecessor stays as
        last.prev.pt (with its checksum), so a crash mid-save never leaves the run
        without a valid checkpoint."""
        if self.dist.is_main:
            save_checkpoint(capture_state(self), self.rundir.last, keep_previous=True)

    # --- loop ------------------------------------------------------------------
    def fit(self) -> Dict:
        """Train to ``train.epochs`` and return the summary. Out-of-memory errors come
        back as :class:`ResourceError` saying where they happened and what to lower."""
        try:
            return self._fit()
        except StorageError as e:
            last = self.run_dir / "last.pt"
            kept = (f"its last checkpoint is kept ({last}): free space, then `lsskd train --resume "
                    f"{self.run_dir}`" if last.is_file() else "no checkpoint had been written yet")
            raise StorageError(f"run {self.run_dir} stopped: {e}; {kept}") from e
        except oom_errors() as e:
            if isinstance(e, ResourceError):
                raise
            raise ResourceError(
                f"out of memory on {self.device} during {self._where} ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no details'}). Lower "
                f"train.batch_size (now {self.tcfg['batch_size']}) or train.eval_batch_size (now "
                f"{self.tcfg['eval_batch_size']}), or set method.store_dtype=float16 for methods "
                "with a soft-target store; resume with `lsskd train --resume "
                f"{self.run_dir}` once a checkpoint exists") from e
        finally:
            self.close()

    def close(self) -> None:
        """Close TensorBoard's writer, then give the run directory's lock back (:meth:`fit`
        does both when it ends, however it ends)."""
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
        lock, self.lock = getattr(self, "lock", None), None
        if lock is not None:
            lock.release()

    def _fit(self) -> Dict:
        t = self.tcfg
        start_epoch = self.progress.epoch
        if self.dist.is_main:
            self.rundir.start(self.cfg, self.resume, start_epoch)
            # On resume, drop events of epochs the checkpoint had not finished (they are replayed).
            self.writer = (self.rundir.tensorboard(start_epoch + 1 if self.resume else None)
                           if t["tensorboard"] else None)
        epochs = t["epochs"]
        steps = len(self.iterator)
        if t["max_steps_per_epoch"]:
            steps = min(steps, t["max_steps_per_epoch"])
        last_eval: Dict[str, float] = {}
        for epoch0 in range(start_epoch, epochs):
            t0 = time.time()
            train_stats, schedule, speed = self._train_epoch(epoch0, epochs, steps)
            last_eval, val_extra = self._evaluate_epoch(epoch0)
            self._log_epoch(epoch0, train_stats, schedule, last_eval, val_extra,
                            {"epoch_seconds": time.time() - t0, **speed})
        if not last_eval:  # resumed after the final epoch's checkpoint: nothing left to train
            if self.dist.is_main:
                print(f"note: {self.run_dir} had already finished all {epochs} epochs; nothing was "
                      "trained (the summary is re-evaluated from its last checkpoint)",
                      file=sys.stderr, flush=True)
            last_eval = self._evaluate(self._eval_split())
        summary = self._summary(last_eval)
        if self.dist.is_main:
            self.rundir.write_summary(summary)
            if self.writer is not None:
                self.writer.close()
        return summary

    def _train_epoch(self, epoch0: int, epochs: int, steps: int):
        """One epoch of optimiser steps (from a mid-epoch checkpoint's step on a resume).
        Returns (mean training stats, the schedule values it trained with, the speed of
        the steps this session ran: ``img_per_s``)."""
        t, main, p = self.tcfg, self.dist.is_main, self.progress
        self.method.train()
        self.method.on_epoch_start(epoch0 + 1, epochs)
        if p.step == 0 or p.order is None:
            p.order = self.iterator.order(self.data_gen)
            p.sums = {}
        first = p.step
        # Samples of this epoch trained before a resume: in the sums, not in this session's time.
        n_before = p.sums.get("n", 0.0)
        start = t0 = time.time()  # t0: the interval not yet added to train_seconds
        bar = _progress(t["progress"] and main, steps, first, f"epoch {epoch0 + 1}/{epochs}")
        for step, (idx, xb, yb) in enumerate(self.iterator.batches(p.order, first), start=first):
            if step >= steps:
                break
            for g in self.optimizer.param_groups:
                g["lr"] = lr_at(self.cfg["optim"], epochs, epoch0, step, steps)
            self._train_step(idx, xb, yb, epoch0, step)
            p.step = step + 1
            if bar is not None:
                n = max(1.0, p.sums.get("n", 1.0))
                bar.set_postfix(loss=f"{p.sums.get('loss', 0) / n:.3f}",
                                img_s=f"{(p.sums.get('n', 0) - n_before) / max(1e-9, time.time() - start):.0f}")
                bar.update(1)
            if t["ckpt_every_steps"] and p.step % t["ckpt_every_steps"] == 0 and p.step < steps:
                p.train_seconds += time.time() - t0
                t0 = time.time()
                self.save()
        if bar is not None:
            bar.close()
        train_stats = self._reduce_accum()
        schedule = self.method.schedule_stats()  # the values this epoch trained with
        self.method.on_epoch_end(train_stats)
        p.train_seconds += time.time() - t0
        p.epoch, p.step = epoch0 + 1, 0
        # Every rank restored the same sums on a resume, so the ranks' total before it is
        # world_size times this rank's.
        trained = train_stats.get("n", 0.0) - n_before * self.dist.world_size
        return train_stats, schedule, {"img_per_s": trained / max(1e-9, time.time() - start)}

    def _eval_split(self):
        return self.bundle.val if self.cfg["data"]["eval_on"] == "val" else self.bundle.test

    def _evaluate(self, ds) -> Dict[str, float]:
        t = self.tcfg
        return evaluate(self.method, ds, self.aug, t["eval_batch_size"], self.device,
                        t["channels_last"], self.autocast)

    def _evaluate_epoch(self, epoch0: int):
        """Scores after an epoch: (the ``data.eval_on`` split's, extra held-out columns)."""
        t = self.tcfg
        if t["bn_recalibrate"]:
            recalibrate_bn(self.method.backbone, self.bundle.train, self.aug, t["eval_batch_size"], self.device)
        self._where = f"evaluation after epoch {epoch0 + 1}"
        eval_ds = self._eval_split()
        last_eval = self._evaluate(eval_ds)
        val_extra: Dict[str, float] = {}
        if self.method.wants_val:
            # Methods that steer themselves by the held-out split (e.g. LSSKD's gap gate)
            # see it after every epoch; never the test set.
            if eval_ds is self.bundle.val:
                val_eval = last_eval
            else:
                val_eval = self._evaluate(self.bundle.val)
                val_extra = {"val_top1": val_eval["top1"], "val_loss": val_eval["loss"]}
            self.method.on_validation(val_eval)
        return last_eval, val_extra

    def _log_epoch(self, epoch0: int, train_stats: Dict, schedule: Dict, last_eval: Dict,
                   val_extra: Dict, timing: Dict) -> None:
        """The epoch's metrics row (metrics.jsonl, TensorBoard), best.pt when it is the
        best so far, and last.pt. ``timing``: ``epoch_seconds`` and ``img_per_s`` of the
        part of the epoch this session ran."""
        main, p = self.dist.is_main, self.progress
        row = {"epoch": epoch0 + 1, "lr": self.optimizer.param_groups[0]["lr"],
               **{f"train_{k}": v for k, v in train_stats.items()},
               **{f"method_{k}": v for k, v in schedule.items()},
               **{f"{self.cfg['data']['eval_on']}_{k}": v for k, v in last_eval.items()}, **val_extra,
               "epoch_seconds": timing["epoch_seconds"], "train_seconds": p.train_seconds,
               "img_per_s": timing["img_per_s"], "skipped_steps": p.skipped_steps}
        if last_eval["top1"] > p.best["top1"]:
            p.best = {"top1": last_eval["top1"], "top5": last_eval["top5"], "epoch": epoch0 + 1}
            if main:
                save_checkpoint(capture_state(self), self.rundir.best)
        if main:
            self.rundir.append_metrics(row)
            if self.writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self.writer.add_scalar(k.replace("_", "/", 1), v, epoch0 + 1)
                self.writer.flush()
            self.save()

    def _train_step(self, idx, xb, yb, epoch0, step):
        dev = self.device
        self._where = f"training step {step + 1} of epoch {epoch0 + 1}"
        # A skipped step must leave the model as it was, BN running stats included
        # (the forward pass that produced the NaN already updated them).
        bn_saved = self._bn_buffers() if self.tcfg["nonfinite"] == "skip" else None
        extra = self.method.sample_extra(idx, self.bundle.train.y, self.aug_gen)
        if extra is not None:
            idx = torch.cat([idx, extra])
            xb, yb = self.bundle.train.x[idx], self.bundle.train.y[idx]
        if dev.type == "cuda":
            xb, yb = _pinned_batch(xb), _pinned_batch(yb)
        xb = xb.to(dev, non_blocking=True)
        yb = yb.to(dev, non_blocking=True)
        x, mix = self.aug(xb, self.aug_gen, train=True)
        if self.tcfg["channels_last"] and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits, losses = self.model_for_step(x, yb, idx.to(dev), mix)
        loss = sum(losses.values())
        bad = not torch.isfinite(loss)
        if self.dist.enabled:
            # All ranks must take the same branch: DDP's backward and the store gather are collectives.
            bad = bool(all_reduce_sum(torch.tensor([float(bad)], device=dev)) > 0)
        if not bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), float("inf"))
            # With fp16 the scaler skips inf-gradient steps itself; elsewhere that is a fault.
            bad = not torch.isfinite(gnorm) and not self.scaler.is_enabled()
            which = "gradient"
        else:
            which = ", ".join(k for k, v in losses.items() if not torch.isfinite(v)) or "total"
        if bad:
            msg = (f"non-finite {'loss term(s) ' + which if which != 'gradient' else 'gradient'} "
                   f"at epoch {epoch0 + 1}, step {step + 1}")
            if self.tcfg["nonfinite"] == "skip" and self.progress.skipped_steps < self.tcfg["max_skipped_steps"]:
                self.progress.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buf, saved in bn_saved:
                        buf.copy_(saved)
                print(f"warning: {msg}; step skipped ({self.progress.skipped_steps}/{self.tcfg['max_skipped_steps']})",
                      file=sys.stderr)
                return
            last = self.run_dir / "last.pt"
            where = (f"the last good checkpoint is {last}" if last.is_file()
                     else "no checkpoint was written before it")
            limit = (f" after skipping {self.progress.skipped_steps} step(s) (train.max_skipped_steps)"
                     if self.tcfg["nonfinite"] == "skip" else "")
            raise NonFiniteError(f"{msg}{limit}; {where}. Lower optim.lr, or set train.nonfinite=skip "
                                 "(and train.max_skipped_steps) to skip such steps")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step()
        b = len(yb) if extra is None else len(yb) - len(extra)
        a = self.progress.sums
        a["n"] = a.get("n", 0.0) + b
        a["loss"] = a.get("loss", 0.0) + float(loss.detach()) * b
        for k, v in losses.items():
            a[f"loss_{k}"] = a.get(f"loss_{k}", 0.0) + float(v.detach()) * b
        a["correct"] = a.get("correct", 0.0) + float((logits[:b].argmax(1) == yb[:b]).sum())

    def _reduce_accum(self) -> Dict[str, float]:
        sums = self.progress.sums
        keys = sorted(sums)
        vals = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        vals = all_reduce_sum(vals)
        tot = dict(zip(keys, vals.tolist()))
        n = max(1.0, tot.get("n", 1.0))
        out = {k: v / n for k, v in tot.items() if k not in ("n", "correct")}
        out["top1"] = 100.0 * tot.get("correct", 0.0) / n
        out["n"] = tot.get("n", 0.0)
        return out

    def _bn_buffers(self):
        return [(b, b.detach().clone()) for m in self.method.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]

    def _summary(self, last_eval: Dict[str, float]) -> Dict:
        cfg = self.cfg
        deployed = self.method.deploy()
        shape = self.bundle.input_shape
        summary = {
            "method": cfg["method"]["name"],
            "model": cfg["model"]["name"],
            "dataset": cfg["data"]["name"],
            "seed": cfg["seed"],
            "epochs": cfg["train"]["epochs"],
            "eval_on": cfg["data"]["eval_on"],
            "train_size": len(self.bundle.train),
            "test_top1": last_eval.get("top1"),
            "test_top5": last_eval.get("top5"),
            "test_top1_best": self.progress.best["top1"],
            # With data.eval_on=val the three scores above are on the held-out split, and
            # val_* copies make that explicit; no test-set number is produced then.
            **({"val_top1": last_eval.get("top1"), "val_top5": last_eval.get("top5"),
                "val_top1_best": self.progress.best["top1"]} if cfg["data"]["eval_on"] == "val" else {}),
            "best_epoch": self.progress.best["epoch"],
            "params_deployed": count_params(deployed),
            "params_train": count_params(self.method),
            "macs_deployed": count_macs(deployed, shape),
            "macs_train": self.method.training_macs(shape),
            "train_seconds": round(self.progress.train_seconds, 2),
            "skipped_steps": self.progress.skipped_steps,
            "version": __version__,
            "provenance": provenance(),
        }
        branches = sorted(k for k in last_eval if k.startswith("branch") and k.endswith("_top1"))
        if branches:
            summary["branch_top1"] = [last_eval[k] for k in branches]
        # The ceiling the deployed head chases: view-aggregated branches and the ensemble.
        aggs = sorted((k for k in last_eval if k.startswith("agg") and k.endswith("_top1")),
                      key=lambda k: int(k[3:-5]))
        if aggs:
            summary["agg_top1"] = [last_eval[k] for k in aggs]
        if "ensemble_top1" in last_eval:
            summary["ensemble_top1"] = last_eval["ensemble_top1"]
        gates = [row["method_gate"] for row in self.rundir.metric_rows() if "method_gate" in row]
        if gates:
            summary["gate_max"] = max(gates)
        if self.dist.is_main:
            # Notes are for the user, on stderr: stdout carries only the summary JSON.
            for note in self.method.summary_notes(summary):
                print(f"note: {note}", file=sys.stderr, flush=True)
        return summary


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
