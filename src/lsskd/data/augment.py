"""Batch augmentation as tensor ops, so it runs wherever the batch lives (CPU or GPU).

Every op draws from an explicit ``torch.Generator`` (on the CPU, so it is
reproducible and checkpointable whatever the device) and works on a whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class MixInfo:
    """Mixing bookkeeping (CutMix or Mixup): sample i was mixed with ``perm[i]`` at weight
    ``lam`` on itself (the share of its own image: box area for CutMix, the pixel weight
    for Mixup), so every method mixes its targets the same way for both."""

    perm: torch.Tensor
    lam: float


def _rand(g, *shape):
    return torch.rand(*shape, generator=g)


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and take a random HxW crop per sample (images: B,C,H,W)."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None])  # B,H
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None])  # B,W
    bi = torch.arange(b, device=x.device)[:, None, None]
    # gather rows then cols: (B, C, H, W)
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, g: torch.Generator, dim: int = -1) -> torch.Tensor:
    flip = (_rand(g, x.shape[0]) < 0.5).to(x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.where(flip.view(shape), x.flip(dim), x)


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero a size x size square (centre uniform over the image, clipped) per sample."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=g).to(x.device)
    cx = torch.randint(0, w, (b,), generator=g).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    my = ((ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None]))
    mx = ((xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None]))
    mask = (my[:, :, None] & mx[:, None, :])[:, None]
    return x.masked_fill(mask, 0)


def cutmix(x: torch.Tensor, alpha: float, g: torch.Generator):
    """CutMix (Yun et al. 2019): paste a random box from a shuffled partner.
    Returns the mixed batch and :class:`MixInfo` with the area-corrected lambda."""
    b, _, h, w = x.shape
    lam = _beta(alpha, g)
    perm = torch.randperm(b, generator=g).to(x.device)
    ratio = (1.0 - lam) ** 0.5
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return x, MixInfo(perm=perm, lam=lam)


def mixup(x: torch.Tensor, alpha: float, g: torch.Generator):
    """Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018):
    x'_i = lam * x_i + (1 - lam) * x_perm(i), lam ~ Beta(alpha, alpha), one lam and one
    permutation per batch (as in the authors' CIFAR code and Self-KD-Lib). Works on any
    batch shape (images or signals). Returns the mixed batch and :class:`MixInfo`."""
    lam = _beta(alpha, g)
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], MixInfo(perm=perm, lam=lam)


def _beta(alpha: float, g: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; seed numpy's from g to stay reproducible.
    if alpha <= 0:
        return 0.5
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


class BatchAugment:
    """Train-time augmentation for a uint8 (images) or float (signals) batch.

    Images: crop with padding, horizontal flip, to float, normalise, Cutout, CutMix.
    Signals: normalise, Gaussian jitter, per-channel scaling.
    Then, for both: Mixup (``mixup_alpha`` > 0) on every batch that CutMix left unmixed
    (so Mixup alone mixes every batch; with both, CutMix takes a ``cutmix_prob`` share).
    Returns ``(x, mix)`` where ``mix`` is a :class:`MixInfo` or ``None``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], modality: str = "image",
                 crop_padding: int = 4, flip: bool = True, cutout: int = 0,
                 cutmix_prob: float = 0.0, cutmix_alpha: float = 1.0,
                 jitter: float = 0.0, scaling: float = 0.0, mixup_alpha: float = 0.0):
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.modality = modality
        self.crop_padding, self.flip, self.cutout_size = crop_padding, flip, cutout
        self.cutmix_prob, self.cutmix_alpha = cutmix_prob, cutmix_alpha
        self.jitter, self.scaling = jitter, scaling
        self.mixup_alpha = mixup_alpha

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = self.mean.to(x.device).view(shape)
        std = self.std.to(x.device).view(shape)
        xf = x.float()
        if x.dtype == torch.uint8:
            xf = xf / 255.0
        return (xf - mean) / std

    def __call__(self, x: torch.Tensor, g: torch.Generator, train: bool = True):
        if not train:
            return self.normalize(x), None
        mix = None
        if self.modality == "image":
            x = random_crop(x, self.crop_padding, g)
            if self.flip:
                x = random_flip(x, g)
            x = self.normalize(x)
            x = cutout(x, self.cutout_size, g)
            if self.cutmix_prob > 0 and float(_rand(g, 1)) < self.cutmix_prob:
                x, mix = cutmix(x, self.cutmix_alpha, g)
        else:
            x = self.normalize(x)
            if self.scaling > 0:
                x = x * (1 + self.scaling * torch.randn(x.shape[0], x.shape[1], 1, generator=g)).to(x.device)
            if self.jitter > 0:
                x = x + self.jitter * torch.randn(x.shape, generator=g).to(x.device)
        # Drawn only when enabled, so runs without Mixup keep their random streams.
        if mix is None and self.mixup_alpha > 0:
            x, mix = mixup(x, self.mixup_alpha, g)
        return x, mix
