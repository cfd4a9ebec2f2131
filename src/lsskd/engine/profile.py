"""Parameter counts and the cost of one forward pass, counted by PyTorch's own
``torch.utils.flop_counter.FlopCounterMode``.

``count_flops`` is FlopCounterMode's total for one forward pass on a single input:
2 FLOPs per multiply-accumulate of every convolution (any kind, grouped, depthwise,
transposed), matrix product (``mm``/``addmm``/``bmm``/``baddbmm``, so ``nn.Linear`` and a
functional ``F.linear`` or ``@`` alike) and attention kernel; bias additions, batch norm,
activations, residual additions, pooling and other element-wise ops count 0.
``count_macs`` = ``count_flops / 2``, the MACs the papers and ``results/`` quote.

On every registered model and on the training forward of every method it equals the
hand count by conv/linear forward hooks this module used before (``out.numel() *
weight[0].numel()`` per conv, ``out.numel() * in_features`` per linear), e.g. resnet8
12,507,392 MACs at 32x32 (tests/test_profile.py keeps that counter as an independent
check). It differs where a model computes outside ``nn.Conv*``/``nn.Linear`` modules: a
functional matmul or attention is counted here and was missed by the hooks, and a
transposed conv is counted correctly here, not by the hooks' formula. The first count in
a process imports ``torch._dynamo`` (a few seconds on a CPU).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def flops_by_op(module: nn.Module, input_shape: Sequence[int], forward: Optional[Callable] = None) -> Dict[str, int]:
    """FLOPs of one forward pass (eval mode, batch of one zero input of ``input_shape``),
    by ATen op (``convolution``, ``addmm``, ...), from ``FlopCounterMode``. ``forward``
    replaces ``module(x)`` (e.g. a method's training forward through its branches)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    try:
        x = torch.zeros(1, *input_shape, device=next(module.parameters()).device)
        with counter:
            (forward or module)(x)
    finally:
        module.train(was)
    return {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(module: nn.Module, input_shape: Sequence[int], forward: Optional[Callable] = None) -> int:
    """Total FLOPs of one forward pass (see :func:`flops_by_op`); 2 per multiply-accumulate."""
    return sum(flops_by_op(module, input_shape, forward).values())


def count_macs(module: nn.Module, input_shape: Sequence[int], forward: Optional[Callable] = None) -> int:
    """Multiply-accumulates of one forward pass on a single input of ``input_shape``:
    :func:`count_flops` / 2 (convs, linear layers, matmuls; norms, activations, additions
    and pooling count 0, as is customary)."""
    return count_flops(module, input_shape, forward) // 2
