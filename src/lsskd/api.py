"""Self-distillation inside your own training loop (``docs/api.md``).

A :class:`SelfDistiller` wraps a backbone in a registered method (profile) and drives the
method contract of :mod:`lsskd.methods.base` the way ``lsskd train`` does; your loop keeps
its data, optimiser, schedule and logging::

    sd = SelfDistiller(backbone, "lsskd_selfsup", num_train=len(train_set), epochs=E)
    opt = torch.optim.SGD(sd.parameters(), lr=0.05, momentum=0.9)   # branches included
    loader = DataLoader(WithIndex(train_set), batch_size=64, shuffle=True)
    for epoch in range(E):
        sd.train()
        sd.on_epoch_start(epoch)
        for x, y, idx in loader:
            out = sd.step(x, y, idx)
            opt.zero_grad(); out.loss.backward(); opt.step()
            sd.after_step()
        sd.on_epoch_end()
        sd.on_validation(val_top1)          # profiles with sd.wants_val only
    model = sd.deploy()                     # the bare backbone, nothing added

Everything the method keeps across steps (soft-target store, gate inputs, schedules, the
view-step counter, this wrapper's epoch counter and running training accuracy) is in
``sd.state_dict()``. Misuse (no indices for a profile that stores per-sample targets,
indices past ``num_train``, a hook left out) raises :class:`lsskd.errors.UsageError`
naming the fix.
"""
from __future__ import annotations

import numbers
from typing import Dict, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .data.augment import MixInfo
from .engine.distributed import all_reduce_sum
from .errors import ConfigError, UsageError
from .methods.base import Method, MethodContext
from .methods.store import StoreBase
from .models import StagedAdapter, StagedBackbone, build_model
from .registry import METHODS

#: The profile a :class:`SelfDistiller` builds when none is named (README, docs/robust.md).
RECOMMENDED = "lsskd_selfsup"


def method_class(profile: str) -> type:
    """The registered method class of ``profile`` (the one place this module looks
    methods up; ``lsskd train`` reads the same registry)."""
    try:
        return METHODS.get(profile)
    except KeyError as e:
        raise UsageError(f"{e.args[0]} (profile names: lsskd.METHODS.names())") from None


def profiles() -> list:
    """Every registered profile name (built-in methods and plugins)."""
    return list(METHODS.names())


class StepOutput(NamedTuple):
    """What :meth:`SelfDistiller.step` returns: ``loss`` to backpropagate, ``terms`` (each
    named loss term, detached, already weighted; they sum to ``loss``) to log, and the
    backbone's ``logits`` on the batch (for your own accuracy)."""

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]
    logits: torch.Tensor


class WithIndex(torch.utils.data.Dataset):
    """Any map-style ``Dataset`` with each sample's index appended: ``ds[i]`` returning
    ``(x, y)`` becomes ``(x, y, i)`` (a non-tuple sample ``s`` becomes ``(s, i)``). The
    index is the sample's row in the soft-target store, so it must come from the
    dataset, not from the batch; samplers (shuffling, ``DistributedSampler``) keep it."""

    def __init__(self, dataset):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise UsageError(f"WithIndex needs a map-style dataset (__len__ and __getitem__), got "
                             f"{type(dataset).__name__}: an iterable dataset has no stable sample "
                             "indices; index it yourself and yield (x, y, index)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        if isinstance(sample, (tuple, list)):
            return (*sample, i)
        return sample, i


def as_staged(backbone, stages: Optional[Mapping] = None, num_classes: Optional[int] = None,
              input_shape: Optional[Sequence[int]] = None) -> StagedBackbone:
    """A :class:`StagedBackbone` from a zoo name (with ``num_classes``), a staged backbone
    (zoo model or :class:`StagedAdapter`), or your own ``nn.Module`` with its parts named
    in ``stages``: ``{"stem": ..., "stages": [...], "classifier": ..., "final": ...}``
    (StagedAdapter's arguments; ``input_shape`` is the probe input)."""
    if isinstance(backbone, str):
        if not num_classes:
            raise UsageError(f"backbone {backbone!r} is a zoo name: pass num_classes= too")
        return build_model(backbone, num_classes)
    if isinstance(backbone, StagedBackbone):
        net = backbone
    elif isinstance(backbone, nn.Module):
        if not stages:
            raise UsageError(
                f"{type(backbone).__name__} is not a staged backbone: name its parts, e.g. "
                "SelfDistiller(net, stages={'stem': 'conv1', 'stages': ['layer1', 'layer2', "
                "'layer3'], 'classifier': 'fc'}), or wrap it in lsskd.models.StagedAdapter "
                "(docs/api.md)")
        kw = dict(stages)
        if input_shape is not None:
            kw.setdefault("probe_shape", tuple(input_shape))
        try:
            net = StagedAdapter(backbone, **kw)
        except (KeyError, TypeError) as e:
            raise UsageError(f"stages={dict(stages)!r} do not fit {type(backbone).__name__}: "
                             f"{e.args[0] if e.args else e}") from None
    else:
        raise UsageError(f"backbone must be an nn.Module or a zoo model name, got {type(backbone).__name__}")
    if len(getattr(net, "stages", ())) == 0:
        raise UsageError(f"{type(backbone).__name__} has no stages: self-distillation attaches its "
                         "branches after each stage; name at least one (stages=[...])")
    return net


class SelfDistiller(nn.Module):
    """A method (``profile``) around a backbone, driven by your own loop (module docstring).

    ``backbone``: a zoo model or its name (then ``num_classes``), a
    :class:`~lsskd.models.StagedAdapter`, or your ``nn.Module`` with ``stages`` naming its
    parts (:func:`as_staged`). ``profile``: any name in :func:`profiles`; default the
    recommended ``lsskd_selfsup``. ``num_train``: the training set's size (the store holds
    one row per sample). ``epochs``: the run's length (schedules span it). ``config``: the
    profile's keys as in a config's ``method:`` section (``docs/config.md``).
    ``has_val``: you will call :meth:`on_validation` with held-out top-1 after every epoch
    (``gate=auto`` then watches the train/held-out gap). ``modality``: ``image`` or
    ``signal`` (the self-supervised views; default from the backbone's probe shape).
    ``seed``: the generator that draws extra samples for profiles that add them to each
    batch (:meth:`with_extra`; CS-KD's partners), unless you pass your own."""

    def __init__(self, backbone, profile: str = RECOMMENDED, *, num_train: int, epochs: int,
                 config: Optional[Mapping] = None, stages: Optional[Mapping] = None,
                 num_classes: Optional[int] = None, input_shape: Optional[Sequence[int]] = None,
                 has_val: bool = False, modality: Optional[str] = None, seed: int = 0):
        super().__init__()
        for name, v in (("num_train", num_train), ("epochs", epochs)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise UsageError(f"{name} must be a positive int, got {v!r}")
        num_train, epochs = int(num_train), int(epochs)
        cls = method_class(profile)
        net = as_staged(backbone, stages, num_classes, input_shape)
        # Your own module, whose parameters the adapter shares: what deploy() hands back.
        self._own = (backbone,) if isinstance(backbone, nn.Module) and net is not backbone else ()
        probe = tuple(input_shape or getattr(net, "probe_shape", (3, 32, 32)))
        modality = modality or ("signal" if len(probe) == 2 else "image")
        ctx = MethodContext(num_train=num_train, input_shape=probe, modality=modality,
                            has_val=bool(has_val))
        try:
            self.method: Method = cls(net, dict(config or {}), ctx)
        except ConfigError as e:
            if has_val or "val_fraction" not in str(e):
                raise
            raise ConfigError(f"{e} (in your own loop: construct with has_val=True and call "
                              "sd.on_validation(top1) after every epoch)") from None
        if self.method.wants_val and not has_val:
            raise UsageError(f"profile {profile!r} reads held-out accuracy after every epoch: "
                             "construct with has_val=True and call on_validation(top1) each epoch")
        self.profile, self.num_train, self.epochs = profile, num_train, epochs
        #: The profile trains on samples added to each batch (DDGSD's second view, DLB's
        #: previous batch, CS-KD's same-class partner): call :meth:`with_extra` before step().
        self.loads_extra = cls.sample_extra is not Method.sample_extra
        #: The profile keeps per-sample state (or draws extra samples by index), so every
        #: step needs the samples' indices.
        self.needs_indices = self.loads_extra or any(isinstance(m, StoreBase) and m.num_samples > 0
                                                     for m in self.method.modules())
        # Draws the extra samples (CS-KD's partners) unless with_extra is given a generator.
        self._extra_gen = torch.Generator().manual_seed(int(seed))
        self._extra_rows = None  # (batch rows, rows with extras) of the batch with_extra built
        self._labels = None  # (dataset, its labels) for profiles whose extras depend on labels
        self._epochs_done, self._in_epoch, self._validated = 0, False, True
        self._pending = None  # (batch size, correct, loss) of a step awaiting after_step
        self._acc = {"n": 0.0, "correct": 0.0, "loss": 0.0}

    # --- facts --------------------------------------------------------------------
    @property
    def backbone(self) -> StagedBackbone:
        return self.method.backbone

    @property
    def wants_val(self) -> bool:
        """True when the profile steers itself by held-out accuracy (call on_validation)."""
        return bool(self.method.wants_val)

    @property
    def epochs_done(self) -> int:
        return self._epochs_done

    @property
    def step_pending(self) -> bool:
        """True between step() and after_step()/discard_step()."""
        return self._pending is not None

    @property
    def in_epoch(self) -> bool:
        """True between on_epoch_start() and on_epoch_end() (also in a mid-epoch checkpoint)."""
        return self._in_epoch

    @property
    def may_leave_params_unused(self) -> bool:
        """True when some steps leave parameters without gradients: DDP then needs
        ``find_unused_parameters=True``."""
        return bool(self.method.may_leave_params_unused)

    def store_buffers(self) -> list:
        """Names (in this module) of the soft-target store's buffers. Every DDP rank writes
        the same gathered rows itself, so DDP need not broadcast them every forward:
        ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(sd,
        sd.store_buffers())``."""
        return [f"{name}.{b}" for name, mod in self.named_modules() if isinstance(mod, StoreBase)
                for b, _ in mod.named_buffers()]

    # --- hooks ----------------------------------------------------------------------
    def on_epoch_start(self, epoch: Optional[int] = None) -> None:
        """Before an epoch's first step: the schedules (alpha_t, ramps) and the gate are
        per epoch. ``epoch`` (0-based, optional) is checked against the epochs done."""
        done = self._epochs_done
        if self._in_epoch:
            raise UsageError(f"on_epoch_start() again before on_epoch_end() closed epoch {done}: "
                             "call sd.on_epoch_end() after each epoch's last step")
        if epoch is not None and int(epoch) != done:
            raise UsageError(f"on_epoch_start({epoch}) but {done} epoch(s) are done (epochs count "
                             "from 0); after loading a checkpoint, load sd.state_dict() from it too")
        if done >= self.epochs:
            raise UsageError(f"all {self.epochs} epochs given as epochs= are done; build the "
                             "SelfDistiller with the run's full length")
        if not self._validated:
            raise UsageError(f"profile {self.profile!r} reads held-out accuracy: call "
                             f"sd.on_validation(top1) after epoch {done} (and every epoch)")
        self.method.on_epoch_start(done + 1, self.epochs)
        self._in_epoch, self._validated = True, not self.wants_val
        self._acc = {"n": 0.0, "correct": 0.0, "loss": 0.0}

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor] = None,
             mix: Optional[MixInfo] = None) -> StepOutput:
        """One training batch: ``(loss, terms, logits)``. ``idx``: the samples' dataset
        indices (:class:`WithIndex`), required when :attr:`needs_indices`. ``mix``: a
        :class:`lsskd.data.MixInfo` if you CutMix the batch yourself."""
        if not self.training:
            raise UsageError("step() is for training: call sd.train() first (sd.eval() to evaluate)")
        if not self._in_epoch:
            raise UsageError("step() outside an epoch: call sd.on_epoch_start() before each "
                             "epoch's first step and sd.on_epoch_end() after its last")
        if self._pending is not None:
            raise UsageError("step() before the previous step was committed: call sd.after_step() "
                             "after every optimiser step (sd.discard_step() for a step you skip)")
        if idx is not None or self.needs_indices:
            idx = self._check_indices(x, idx)
        b = len(y)
        if self.loads_extra:
            rows, self._extra_rows = self._extra_rows, None
            if rows is None or rows[1] != len(x):
                raise UsageError(f"profile {self.profile!r} trains on samples added to each batch: "
                                 "call x, y, idx = sd.with_extra(x, y, idx, train_set) on the loaded "
                                 "batch, before your augmentation, and pass its result to step()"
                                 + ("" if rows is None else f" (with_extra built {rows[1]} rows, "
                                    f"step() got {len(x)})"))
            b = rows[0]  # training accuracy counts the batch's own samples only
        logits, losses = self.method(x, y, idx, mix)
        loss = sum(losses.values())
        with torch.no_grad():
            correct = (logits[:b].argmax(1) == y[:b]).sum()
        self._pending = (b, correct, loss.detach())
        return StepOutput(loss, {k: v.detach() for k, v in losses.items()}, logits)

    def with_extra(self, x: torch.Tensor, y: torch.Tensor, idx, train_set,
                   generator: Optional[torch.Generator] = None):
        """The batch with the samples the profile adds to it, loaded from ``train_set``
        (your map-style training dataset, the one :class:`WithIndex` wraps): DDGSD a second
        view of every sample, DLB the previous batch's samples, CS-KD a same-class partner
        of each. Returns ``(x, y, idx)`` with the extra rows appended (unchanged for
        profiles that add none). Call it on the batch as loaded, before a batch
        augmentation of your own, so that every row is augmented alike; a transform inside
        your dataset runs again for each extra row (DDGSD's second view is a second draw
        of it, so give the dataset a random transform or augment the batch yourself).
        ``generator`` draws the extra samples (default: the SelfDistiller's own, seeded by
        ``seed`` and kept in :meth:`state_dict`)."""
        if not self.loads_extra:
            return x, y, idx
        idx = self._check_indices(x, idx)
        if isinstance(train_set, WithIndex):
            train_set = train_set.dataset
        if not hasattr(train_set, "__getitem__") or not hasattr(train_set, "__len__"):
            raise UsageError(f"with_extra needs the map-style training dataset, got "
                             f"{type(train_set).__name__}")
        if len(train_set) != self.num_train:
            raise UsageError(f"train_set has {len(train_set)} samples but num_train={self.num_train}: "
                             "pass the dataset the batch indices come from")
        labels = self._train_labels(train_set) if self.method.extra_needs_labels else None
        extra = self.method.sample_extra(idx.cpu(), labels, generator or self._extra_gen)
        if extra is None or len(extra) == 0:
            self._extra_rows = (len(x), len(x))
            return x, y, idx
        samples = [train_set[int(i)] for i in extra]
        try:
            xe, ye = torch.utils.data.default_collate([(s[0], s[1]) for s in samples])
        except (TypeError, IndexError, RuntimeError) as e:
            raise UsageError(f"with_extra could not batch {type(train_set).__name__}'s samples "
                             f"(expected (x, y) pairs like the loader's): {e}") from None
        if tuple(xe.shape[1:]) != tuple(x.shape[1:]):
            raise UsageError(f"{type(train_set).__name__}'s samples have shape {tuple(xe.shape[1:])}, "
                             f"the batch {tuple(x.shape[1:])}: call with_extra on the batch as the "
                             "loader returns it, before any resizing of your own")
        self._extra_rows = (len(x), len(x) + len(xe))
        return (torch.cat([x, xe.to(device=x.device, dtype=x.dtype)]),
                torch.cat([y, torch.as_tensor(ye).to(device=y.device, dtype=y.dtype)]),
                torch.cat([idx, extra.to(device=idx.device, dtype=idx.dtype)]))

    def _train_labels(self, train_set) -> torch.Tensor:
        if self._labels is not None and self._labels[0] is train_set:
            return self._labels[1]
        found = None
        for name in ("targets", "labels", "y"):
            v = getattr(train_set, name, None)
            if v is not None and not callable(v) and len(v) == len(train_set):
                found = torch.as_tensor(v)
                break
        if found is None and isinstance(train_set, torch.utils.data.TensorDataset):
            found = train_set.tensors[1]
        if found is None:  # one pass over the dataset (its transform runs once per sample)
            found = torch.as_tensor([int(train_set[i][1]) for i in range(len(train_set))])
        found = found.reshape(-1).long().cpu()
        self._labels = (train_set, found)
        return found

    def forward(self, x, y=None, idx=None, mix=None):
        """Training mode with labels: :meth:`step` (so ``DistributedDataParallel(sd)``
        works); otherwise the backbone's logits."""
        if self.training and y is not None:
            return self.step(x, y, idx, mix)
        return self.method.backbone(x)

    def after_step(self) -> None:
        """After the optimiser step: the store write of this step's predictions is
        committed only now, so a skipped step never stores predictions (under
        DDP every rank gathers all ranks' rows here). With gradient accumulation call it
        after each micro-batch's backward."""
        if self._pending is None:
            raise UsageError("after_step() without a step() before it: call it once per step()")
        b, correct, loss = self._pending
        self._pending = None
        self.method.after_step()
        a = self._acc
        a["n"] += b
        a["loss"] = a["loss"] + loss.double() * b
        a["correct"] = a["correct"] + correct

    def discard_step(self) -> None:
        """Forget a step you did not apply (e.g. a non-finite loss): nothing is stored and
        it does not count towards the epoch's training accuracy."""
        self._pending = None

    def on_epoch_end(self) -> Dict[str, float]:
        """After an epoch's last step: gates and ``alpha_mode=fit`` read the epoch's training
        top-1 (summed over DDP ranks). Returns it with the epoch's mean loss and the schedule
        values the epoch trained with (e.g. ``alpha``, ``gate``), for logging."""
        if not self._in_epoch:
            raise UsageError("on_epoch_end() without on_epoch_start(): call sd.on_epoch_start() "
                             "before each epoch's first step")
        if self._pending is not None:
            raise UsageError("on_epoch_end() before the last step was committed: call sd.after_step()")
        keys = ("correct", "loss", "n")  # the trainer's reduction (engine/trainer.py)
        vals = all_reduce_sum(torch.tensor([float(self._acc[k]) for k in keys], dtype=torch.float64,
                                           device=self._reduce_device()))
        tot = dict(zip(keys, vals.tolist()))
        n = max(1.0, tot["n"])
        stats = {"loss": tot["loss"] / n, "top1": 100.0 * tot["correct"] / n, "n": tot["n"]}
        schedule = {k: float(v) for k, v in self.method.schedule_stats().items()}
        self.method.on_epoch_end(stats)
        self._epochs_done += 1
        self._in_epoch = False
        return {**stats, **schedule}

    def on_validation(self, top1) -> None:
        """After evaluating the held-out split (never the test set): profiles with
        :attr:`wants_val` (``gate=gap``/``auto`` with ``has_val``) open their gate by the
        train/held-out gap. ``top1`` in percent, or a dict with ``top1``."""
        val = float(top1["top1"] if isinstance(top1, Mapping) else top1)
        if not 0.0 <= val <= 100.0:
            raise UsageError(f"on_validation expects held-out top-1 in percent (0..100), got {val}")
        if self.wants_val:
            self.method.on_validation({"top1": val})
        self._validated = True

    # --- evaluation / deployment ---------------------------------------------------
    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor):
        """(backbone logits, ``{'branch1': class scores, ...}``) in one pass (eval mode)."""
        return self.method.eval_forward(x)

    def deploy(self) -> nn.Module:
        """The model to ship: your own module if you gave one, else the bare backbone;
        the branches and the store stay behind."""
        return self._own[0] if self._own else self.method.deploy()

    # --- state -----------------------------------------------------------------------
    def get_extra_state(self):
        a = self._acc
        state = {"epochs_done": self._epochs_done, "in_epoch": self._in_epoch,
                 "validated": self._validated,
                 "acc": {k: float(v) for k, v in a.items()}}
        if self.loads_extra:
            state["extra_gen"] = self._extra_gen.get_state()
        return state

    def set_extra_state(self, state) -> None:
        self._epochs_done = int(state["epochs_done"])
        self._in_epoch = bool(state["in_epoch"])
        self._validated = bool(state["validated"])
        self._acc = {k: float(v) for k, v in state["acc"].items()}
        self._pending = self._extra_rows = None
        if "extra_gen" in state:
            self._extra_gen.set_state(state["extra_gen"])
        if self._in_epoch:  # a checkpoint from inside an epoch: its schedules, not on_epoch_start's
            self.method.epoch, self.method.total_epochs = self._epochs_done + 1, self.epochs

    def _check_indices(self, x: torch.Tensor, idx) -> torch.Tensor:
        if idx is None:
            raise UsageError(f"profile {self.profile!r} stores a soft target per training sample "
                             "and needs each batch's sample indices: wrap your dataset as "
                             "lsskd.WithIndex(train_set) and call sd.step(x, y, idx)")
        idx = torch.as_tensor(idx)
        if idx.dim() != 1 or len(idx) != len(x) or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise UsageError(f"idx must be one integer index per sample ({len(x)}), got shape "
                             f"{tuple(idx.shape)} of {idx.dtype}")
        if self.needs_indices and len(idx):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_train:
                bad = lo if lo < 0 else hi
                raise UsageError(f"sample index {bad} is outside 0..{self.num_train - 1} "
                                 f"(num_train={self.num_train}): pass num_train=len(train_set) "
                                 "and the dataset indices WithIndex returns")
        return idx.to(x.device).long()

    def _reduce_device(self) -> torch.device:
        # gloo reduces CPU tensors, NCCL CUDA ones: the device the model trains on.
        p = next(self.method.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
