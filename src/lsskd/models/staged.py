"""The stage contract every backbone honours.

A ``StagedBackbone`` is ``stem -> stages[0..S-1] -> final -> pool -> classifier``.
Auxiliary heads (LSSKD/HSAKD branches, BYOT exits) are built from this contract
alone, so any model that fills it in gets them without being edited, and the
deployed model is exactly the backbone.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn

from ..registry import MODELS


def kaiming_init(m: nn.Module) -> None:
    """The initialisation shared by the CIFAR model zoo (He et al. for convs)."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
        if m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        m.reset_parameters()


class GlobalPool(nn.Module):
    """Global average pooling over all spatial/temporal dims, flattened to (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1)


class StagedBackbone(nn.Module):
    """Base class. Subclasses set ``stem``, ``stages``, ``final``, ``classifier``.

    Attributes filled by :meth:`_finish`:
      ``stage_channels[l]``, ``stage_strides[l]`` (stride of stage l w.r.t. its input),
      ``feature_dim`` (size of the pooled feature h), ``num_classes``.
    The zoo declares channels and strides (``_finish(probe, channels, strides)``); a
    model that does not is probed with one forward pass (:func:`describe_stages`).
    """

    stem: nn.Module
    stages: nn.ModuleList
    final: nn.Module
    pool: nn.Module
    classifier: nn.Linear
    # Input used to probe channels/strides; 1D models override.
    probe_shape: Tuple[int, ...] = (3, 32, 32)

    def init_module(self, m: nn.Module) -> None:
        kaiming_init(m)

    def _finish(self, probe_shape: Sequence[int] | None = None, channels: Sequence[int] | None = None,
                strides: Sequence[int] | None = None) -> None:
        """Initialise the weights and fill the attributes above. ``channels`` and
        ``strides`` declare each stage's output channels and stride; without them one
        probe input of ``probe_shape`` is run to read them."""
        if not hasattr(self, "pool"):
            self.pool = GlobalPool()
        if probe_shape is not None:
            self.probe_shape = tuple(probe_shape)
        self.apply(self.init_module)
        if channels is None or strides is None:
            self.stage_channels, self.stage_strides = describe_stages(self)
        else:
            self.stage_channels, self.stage_strides = [int(c) for c in channels], [int(s) for s in strides]
        self.feature_dim = self.classifier.in_features
        self.num_classes = self.classifier.out_features

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward_stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def head(self, last: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Last stage output -> (pooled feature h, logits)."""
        h = self.pool(self.final(last))
        return h, self.classifier(h)

    def forward_features(self, x: torch.Tensor):
        """Returns (stage outputs, pooled feature h, logits)."""
        feats = self.forward_stages(x)
        h, logits = self.head(feats[-1])
        return feats, h, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_stages(x)[-1])[1]

    # --- branch building -------------------------------------------------
    def fresh_copy(self, module: nn.Module) -> nn.Module:
        new = copy.deepcopy(module)
        new.apply(self.init_module)
        for m in new.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
        return new

    def extra_block(self) -> nn.Module:
        """One stride-1 block of the last stage's type (for the deepest branch).

        Default: a fresh copy of the last stage's last block, which in every
        standard design maps C_S -> C_S at stride 1. Override if not.
        """
        last = self.stages[-1]
        block = list(last.children())[-1] if len(list(last.children())) else last
        return self.fresh_copy(block)

    def last_stage_blocks(self) -> List[nn.Module]:
        """The deepest branch's blocks under ``last="stage"``: the last stage rebuilt at
        stride 1 on its own output width C_S (HSAKD's deepest ``block_extractor``).

        Default, right for a stage that is an ``nn.Sequential`` of blocks whose first block
        changes width/stride and whose others map C_S -> C_S at stride 1 (every
        :func:`stack_stages` model): :meth:`extra_block` in place of the first block, then
        fresh copies of the others, so the result has as many blocks as the stage. A stage
        of one block gives exactly ``[extra_block()]``, the ``last="block"`` trunk (the same
        modules and random draws). Override for stages of another shape."""
        blocks = list(self.stages[-1].children())
        return [self.extra_block()] + [self.fresh_copy(b) for b in blocks[1:]]

    def branch_trunk(self, level: int, last: str = "stage") -> nn.Module:
        """Layers a branch reading stage ``level`` (0-based) applies before pooling:
        fresh copies of stages level+1..S-1, then a fresh copy of ``final``. The deepest
        branch (level S-1) has no later stage; ``last`` chooses what it gets instead:
        ``stage`` = :meth:`last_stage_blocks` (HSAKD's code), ``block`` = one
        :meth:`extra_block` (lsskd before issue 18)."""
        if last not in ("stage", "block"):
            raise ValueError(f"last must be 'stage' or 'block', got {last!r}")
        if level < self.num_stages - 1:
            parts = [self.fresh_copy(s) for s in self.stages[level + 1 :]]
        elif last == "stage":
            parts = list(self.last_stage_blocks())
        else:
            parts = [self.extra_block()]
        parts.append(self.fresh_copy(self.final))
        return nn.Sequential(*parts)


@torch.no_grad()
def describe_stages(model: StagedBackbone) -> Tuple[List[int], List[int]]:
    """Probe one input to read each stage's channels and stride (w.r.t. its input)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *model.probe_shape)
    chans, strides = [], []
    x = model.stem(x)
    for stage in model.stages:
        y = stage(x)
        chans.append(y.shape[1])
        strides.append(max(1, round(x.shape[-1] / y.shape[-1])))
        x = y
    model.train(was_training)
    return chans, strides


def _resolve(root: nn.Module, name: str) -> nn.Module:
    mod = root
    for part in name.split("."):
        if not hasattr(mod, part):
            raise KeyError(f"module has no submodule '{name}' (failed at '{part}')")
        mod = getattr(mod, part)
    return mod


class StagedAdapter(StagedBackbone):
    """Wrap a user's own ``nn.Module`` into the stage contract by naming submodules.

    >>> net = StagedAdapter(my_net, stem=["conv1", "bn1", "relu"],
    ...                     stages=["layer1", "layer2", "layer3"], classifier="fc")

    The wrapped model's parameters are shared (not copied); its forward must be
    ``stem -> stages -> [final] -> global average pool -> classifier``.

    The deepest branch: ``extra_block`` (a C_S -> C_S stride-1 module; default a fresh
    copy of the last stage's last child) is its one block under ``last="block"``; under
    ``last="stage"`` it replaces the last stage's first child, followed by fresh copies
    of the other children (right when the last stage is a sequence of blocks whose first
    one changes width or stride). If that rule does not fit your stage, pass
    ``last_stage``: a C_S -> C_S stride-1 module copied fresh for that branch.
    """

    def __init__(
        self,
        model: nn.Module,
        stem: str | Sequence[str],
        stages: Sequence[str],
        classifier: str,
        final: str | Sequence[str] | None = None,
        probe_shape: Sequence[int] = (3, 32, 32),
        extra_block: nn.Module | None = None,
        last_stage: nn.Module | None = None,
    ):
        super().__init__()

        def seq(names):
            if names is None:
                return nn.Identity()
            if isinstance(names, str):
                names = [names]
            mods = [_resolve(model, n) for n in names]
            return mods[0] if len(mods) == 1 else nn.Sequential(*mods)

        self.stem = seq(stem)
        self.stages = nn.ModuleList([_resolve(model, n) for n in stages])
        self.final = seq(final)
        self.pool = GlobalPool()
        clf = _resolve(model, classifier)
        if not isinstance(clf, nn.Linear):
            raise TypeError(f"classifier '{classifier}' must be nn.Linear, got {type(clf).__name__}")
        self.classifier = clf
        self._extra = extra_block
        self._last_stage = last_stage
        self.probe_shape = tuple(probe_shape)
        # No re-initialisation: the user's weights are kept.
        self.stage_channels, self.stage_strides = describe_stages(self)
        self.feature_dim = clf.in_features
        self.num_classes = clf.out_features

    def extra_block(self) -> nn.Module:
        if self._extra is not None:
            return self.fresh_copy(self._extra)
        return super().extra_block()

    def last_stage_blocks(self) -> List[nn.Module]:
        if self._last_stage is not None:
            return [self.fresh_copy(self._last_stage)]
        return super().last_stage_blocks()


def plan_layout(plan: Sequence[Tuple[int, int, int]], expansion: int = 1) -> Tuple[List[int], List[int]]:
    """(stage output channels, stage strides) of a :func:`stack_stages` plan."""
    return [w * expansion for w, _, _ in plan], [s for _, _, s in plan]


def stack_stages(cin: int, plan: Sequence[Tuple[int, int, int]],
                 make_block: Callable[[int, int, int], nn.Module], expansion: int = 1) -> Tuple[nn.ModuleList, int]:
    """Stages as an ``nn.ModuleList`` of ``nn.Sequential`` blocks. ``plan`` gives one
    (width, blocks, stride) per stage; the stage's first block takes the stride, the others
    stride 1. ``make_block(cin, width, stride)`` builds one block, whose output has
    ``width * expansion`` channels. Returns (stages, output channels of the last stage)."""
    stages = []
    for width, n, stride in plan:
        blocks = []
        for b in range(n):
            blocks.append(make_block(cin, width, stride if b == 0 else 1))
            cin = width * expansion
        stages.append(nn.Sequential(*blocks))
    return nn.ModuleList(stages), cin


def register_variant(name: str, cls: Callable[..., "StagedBackbone"], *args, doc: str,
                     aliases: Sequence[str] = (), num_classes: int = 100, **fixed) -> Callable:
    """Register ``name`` (and ``aliases``) as the factory
    ``f(num_classes=num_classes, **kw) = cls(*args, num_classes=num_classes, **fixed, **kw)``
    and return it, so that each zoo variant is one findable line::

        resnet20 = register_variant("resnet20", CifarResNet, 20, doc="CIFAR ResNet-20 ...")
    """
    def factory(num_classes: int = num_classes, **kw):
        return cls(*args, num_classes=num_classes, **fixed, **kw)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__module__ = cls.__module__
    return MODELS.register(name, *aliases)(factory)
