"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes).

A tiny real image dataset that needs no download: useful for smoke runs and
examples. Requires the optional dependency scikit-learn. The 17 grey levels
(0..16) become uint8 0..255, replicated to 3 channels; ``data.image_size`` 16
doubles each pixel (nearest neighbour), 0 or 8 keeps 8x8. Train/test is a
class-stratified 80/20 split with a fixed seed, so the test set never changes.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from ..registry import DATASETS
from .base import ArrayDataset, DataBundle, stratified_split
from ..errors import DataError

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@DATASETS.register("digits")
def digits_dataset(cfg: Dict) -> DataBundle:
    """The 8x8 digits of scikit-learn as an 80/20 stratified train/test split."""
    size = int(cfg.get("image_size", 0) or 0) or 8
    if size not in (8, 16):
        raise DataError(f"data.image_size={size} is not supported by dataset 'digits' (use 8 or 16)")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    levels = np.asarray(d.images, dtype=np.float64)  # N x 8 x 8, values 0..16
    img = np.rint(levels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    x = torch.from_numpy(img)[:, None].expand(-1, 3, -1, -1)
    if size == 16:
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    x = x.contiguous()
    y = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    classes = [str(int(c)) for c in d.target_names]
    full = ArrayDataset(x, y, classes, "digits")
    tr, te = stratified_split(y, TEST_FRACTION, seed=SPLIT_SEED)
    return DataBundle(full.subset(tr, "digits/train"), full.subset(te, "digits/test"),
                      info={"dataset": "digits", "source": "sklearn.datasets.load_digits"})
