"""Parameter and FLOP (multiply-accumulate) counts by forward hooks."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: Sequence[int], forward=None) -> int:
    """Multiply-accumulates of one forward pass on a single input of ``input_shape``
    (conv, linear; norms/activations are ignored as is customary)."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.weight[0].numel()  # (C_in / groups) * kernel
        total += int(out.numel() * k)

    def linear_hook(m, inp, out):
        nonlocal total
        total += int(out.numel() * m.in_features)

    handles = []
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was = module.training
    module.eval()
    try:
        x = torch.zeros(1, *input_shape, device=next(module.parameters()).device)
        (forward or module)(x)
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    return total
