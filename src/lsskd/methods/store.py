"""Per-sample soft-target store: the previous epoch's predictions (PS-KD / LSSKD).

Holds, for every training sample i, the final head's softmax P[i] (C) and, per
branch l and view k, the branch softmax Q_l[i, k] (M*C). Rows are written after
the optimiser step with detached predictions; a row never written yet is
"empty" and its target falls back to the hard label. Buffers are part of the
method's state_dict, so checkpoints carry the store and resume restores it.

Memory: N * (C + S*M*M*C) values; ``dtype`` float16 halves the fp32 cost.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class SoftTargetStore(nn.Module):
    def __init__(self, num_samples: int, num_classes: int, num_branches: int = 0,
                 num_views: int = 1, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_samples, self.num_classes = num_samples, num_classes
        self.num_branches, self.num_views = num_branches, num_views
        self.register_buffer("final", torch.zeros(num_samples, num_classes, dtype=dtype))
        self.register_buffer("filled", torch.zeros(num_samples, dtype=torch.bool))
        joint = num_views * num_classes
        self.register_buffer(
            "branches", torch.zeros(num_branches, num_samples, num_views, joint, dtype=dtype)
        )

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def get_final(self, idx: torch.Tensor):
        """(previous P rows as float32, mask of rows that hold a prediction)."""
        return self.final[idx].float(), self.filled[idx]

    def get_branch(self, level: int, idx: torch.Tensor) -> torch.Tensor:
        """Branch ``level``'s stored rows for ``idx`` in view-major order: (M*B, M*C)."""
        q = self.branches[level, idx].float()  # B, M, MC
        return q.transpose(0, 1).reshape(-1, q.shape[-1])

    @torch.no_grad()
    def write(self, idx: torch.Tensor, final: torch.Tensor, branches: Optional[torch.Tensor] = None) -> None:
        """``final``: (B, C) probabilities; ``branches``: (S, B, M, M*C) probabilities."""
        self.final[idx] = final.detach().to(self.final.dtype)
        if branches is not None and self.num_branches:
            self.branches[:, idx] = branches.detach().to(self.branches.dtype)
        self.filled[idx] = True
