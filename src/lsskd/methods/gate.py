"""The fit/gap gate of the LSSKD profiles: how far self-distillation may act on the backbone.

Regularisers pay off only once a model fits its data (docs/robust.md), so the gated
profiles read two numbers after every epoch and scale every alpha_t, and the gradient
the branches send into the backbone, by g in [0, 1]:

  f = previous epoch's training top-1 (0 in epoch 1), v = held-out top-1 after it
  fit:  g = clip((f - gate_floor) / (1 - gate_floor), 0, 1)
  gap:  g = g_fit * clip((f - v - gap_floor) / gap_width, 0, 1)
  none: g = 1 (the paper)

With g = 0 the backbone trains exactly as with cross-entropy. ``auto`` is ``gap`` when the
run holds out a split (``data.val_fraction`` > 0, never the test set) and ``fit`` otherwise.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn



class FitGapGate(nn.Module):
    """The gate's state (``fit_acc`` = f, ``val_acc`` = v, as fractions; both in the
    method's checkpoints) and its value. ``fit_acc`` also drives ``alpha_mode=fit``."""

    def __init__(self, mode: str, has_val: bool, gate_floor: float, gap_floor: float, gap_width: float):
        super().__init__()
        # gate=gap without a held-out split is refused by the method's config check.
        self.mode = mode if mode != "auto" else ("gap" if has_val else "fit")
        self.gate_floor, self.gap_floor, self.gap_width = gate_floor, gap_floor, gap_width
        self.register_buffer("fit_acc", torch.tensor(0.0))
        # 1 = "no evidence of a gap yet" until the first validation.
        self.register_buffer("val_acc", torch.tensor(1.0))

    @property
    def wants_val(self) -> bool:
        return self.mode == "gap"

    def value(self) -> float:
        """g for the current epoch (1 with mode none)."""
        if self.mode == "none":
            return 1.0
        f = float(self.fit_acc)
        g = min(1.0, max(0.0, (f - self.gate_floor) / (1.0 - self.gate_floor)))
        if self.mode == "gap":
            g *= min(1.0, max(0.0, (f - float(self.val_acc) - self.gap_floor) / self.gap_width))
        return g

    def record_fit(self, train_stats: Dict[str, float]) -> None:
        self.fit_acc.fill_(train_stats.get("top1", 0.0) / 100.0)

    def record_val(self, val_stats: Dict[str, float]) -> None:
        self.val_acc.fill_(val_stats["top1"] / 100.0)

    def never_opened_note(self, summary: Dict) -> List[str]:
        """A gate that never opened (``gate_max`` 0) made the run plain cross-entropy."""
        if summary.get("gate_max") != 0.0:
            return []
        why = f"training top-1 stayed below method.gate_floor={self.gate_floor}"
        if self.mode == "gap":
            why += f", or the train-minus-held-out gap below method.gap_floor={self.gap_floor}"
        return [f"the {summary.get('method', 'lsskd')} gate never opened ({why}), so the backbone "
                "trained as with plain cross-entropy; method=ce gives the same model at a fraction "
                "of the cost"]
