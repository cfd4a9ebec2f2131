"""Per-sample soft-target stores: the previous epoch's predictions (PS-KD / LSSKD).

A store holds, for every training sample i, the final head's softmax P[i] (C
values) and, per branch l and view k, the branch softmax Q_l[i, k] over the
M*C joint labels. Rows are written after the optimiser step with detached
predictions; a row never written yet is "empty" and its target falls back to
the hard label. Buffers are part of the method's state_dict, so checkpoints
carry the store and resume restores it.

Three layouts share one interface (``get_final``, ``get_branch``,
``branch_filled``, ``write``, ``filled``, ``nbytes``):

* :class:`SoftTargetStore` (dense, float32 or float16):
  N * (C + S*M*M*C) values per store.
* :class:`TopKStore` (sparse): per distribution, its k largest probabilities
  (float16) and their label indices (int16 when the label count fits, else
  int32). **Reconstruction rule**: the stored entries keep their values; the
  remaining mass r = max(0, 1 - sum(top-k)) is spread uniformly over the other
  D - k labels, each getting r / (D - k). The reconstruction sums to 1 (up to
  fp16 rounding), and its L1 distance to the true distribution is at most
  2 r + k * 2^-11 (tail error <= r + r, fp16 error on the top-k values).
  With k >= D it is the dense store up to fp16 rounding.

``host=True`` keeps the buffers in host (CPU) memory whatever device the
model moves to; reads copy the batch's rows to the model's device and writes
copy them back (one synchronising transfer per step, in exchange for no GPU
memory). :func:`choose_store` picks a layout for a memory budget and
:func:`store_bytes_per_sample` gives the per-sample cost of each option.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError

# Bytes of the per-sample "row written" flags: one for P, one per view for Q.
def _flag_bytes(num_views: int, num_branches: int) -> int:
    return 1 + (num_views if num_branches else 0)


class StoreBase(nn.Module):
    """Base of every soft-target store. The trainer recognises stores by this type and
    leaves their buffers out of channels_last conversion (they are tables, not images)
    and of DDP's buffer broadcasts (every rank writes the same gathered rows itself)."""

    def __init__(self, num_samples: int, num_classes: int, num_branches: int, num_views: int,
                 host: bool):
        super().__init__()
        self.num_samples, self.num_classes = num_samples, num_classes
        self.num_branches, self.num_views = num_branches, num_views
        self.joint = num_views * num_classes
        self.host = host
        self.register_buffer("filled", torch.zeros(num_samples, dtype=torch.bool))
        # Per (sample, view): branch rows written. views_per_step < M fills views one at a time.
        self.register_buffer("filled_views", torch.zeros(num_samples, num_views if num_branches else 0,
                                                         dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints from lsskd before per-view flags: every view of a written sample was written.
        key = prefix + "filled_views"
        if key not in state_dict and prefix + "filled" in state_dict:
            filled = state_dict[prefix + "filled"]
            state_dict[key] = filled[:, None].expand(-1, self.filled_views.shape[1]).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # host=True: stay in CPU memory when the method moves to an accelerator.
        if self.host:
            return self
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return self.filled.device

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _idx(self, idx: torch.Tensor) -> torch.Tensor:
        return idx.to(self.device)

    def _views(self, views: Optional[Sequence[int]]) -> torch.Tensor:
        if views is None:
            return torch.arange(self.num_views, device=self.device)
        return torch.as_tensor(list(views), dtype=torch.long, device=self.device)

    def get_final(self, idx: torch.Tensor):
        """(previous P rows as float32 on idx's device, mask of rows that hold a prediction)."""
        i = self._idx(idx)
        return self._read_final(i).to(idx.device), self.filled[i].to(idx.device)

    def get_branch(self, level: int, idx: torch.Tensor, views: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Branch ``level``'s stored rows for ``idx`` and ``views`` (default all M) in
        view-major order: (V*B, M*C) float32."""
        i, v = self._idx(idx), self._views(views)
        q = self._read_branch(level, i, v)  # B, V, MC
        return q.transpose(0, 1).reshape(-1, self.joint).to(idx.device)

    def branch_filled(self, idx: torch.Tensor, views: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(V*B,) view-major mask: has row (i, k) of the branch store been written?"""
        i, v = self._idx(idx), self._views(views)
        return self.filled_views[i][:, v].t().reshape(-1).to(idx.device)

    @torch.no_grad()
    def write(self, idx: torch.Tensor, final: torch.Tensor, branches: Optional[torch.Tensor] = None,
              views: Optional[Sequence[int]] = None) -> None:
        """``final``: (B, C) probabilities; ``branches``: (S, B, V, M*C) probabilities for
        ``views`` (default all M). Rows of views not written keep their previous values."""
        i = self._idx(idx)
        self._write_final(i, final.detach().to(self.device))
        if branches is not None and self.num_branches:
            v = self._views(views)
            self._write_branch(i, v, branches.detach().to(self.device))
            self.filled_views[i[:, None], v[None, :]] = True
        self.filled[i] = True


class SoftTargetStore(StoreBase):
    """Dense store: every probability kept, in ``dtype`` (float32 or float16)."""

    def __init__(self, num_samples: int, num_classes: int, num_branches: int = 0,
                 num_views: int = 1, dtype: torch.dtype = torch.float32, host: bool = False):
        super().__init__(num_samples, num_classes, num_branches, num_views, host)
        self.register_buffer("final", torch.zeros(num_samples, num_classes, dtype=dtype))
        self.register_buffer(
            "branches", torch.zeros(num_branches, num_samples, num_views, self.joint, dtype=dtype)
        )

    def _read_final(self, i):
        return self.final[i].float()

    def _read_branch(self, level, i, v):
        return self.branches[level, i][:, v].float()

    def _write_final(self, i, p):
        self.final[i] = p.to(self.final.dtype)

    def _write_branch(self, i, v, q):
        self.branches[:, i[:, None], v[None, :]] = q.to(self.branches.dtype)


class TopKStore(StoreBase):
    """Sparse store: top-k probabilities (fp16) + indices per distribution; the rest of
    the mass is spread uniformly over the other labels (module docstring)."""

    def __init__(self, num_samples: int, num_classes: int, num_branches: int = 0,
                 num_views: int = 1, k: int = 10, host: bool = False):
        super().__init__(num_samples, num_classes, num_branches, num_views, host)
        if k < 1:
            raise ConfigError(f"method.store_topk must be >= 1, got {k}")
        self.k_final = min(k, num_classes)
        self.k_joint = min(k, self.joint)
        itype = _index_dtype(self.joint)
        S, N, M = num_branches, num_samples, num_views
        self.register_buffer("final_val", torch.zeros(N, self.k_final, dtype=torch.float16))
        self.register_buffer("final_idx", torch.zeros(N, self.k_final, dtype=_index_dtype(num_classes)))
        self.register_buffer("branch_val", torch.zeros(S, N, M, self.k_joint, dtype=torch.float16))
        self.register_buffer("branch_idx", torch.zeros(S, N, M, self.k_joint, dtype=itype))

    @staticmethod
    def reconstruct(val: torch.Tensor, idx: torch.Tensor, size: int) -> torch.Tensor:
        """Dense (..., size) float32 distributions from top-k values/indices."""
        val = val.float()
        k = val.shape[-1]
        if k >= size:
            rest = torch.zeros_like(val[..., :1])
        else:
            rest = (1.0 - val.sum(-1, keepdim=True)).clamp_min(0.0) / (size - k)
        out = rest.expand(*val.shape[:-1], size).clone()
        return out.scatter_(-1, idx.long(), val)

    @staticmethod
    def compress(p: torch.Tensor, k: int):
        val, idx = p.float().topk(k, dim=-1)
        return val.to(torch.float16), idx

    def _read_final(self, i):
        return self.reconstruct(self.final_val[i], self.final_idx[i], self.num_classes)

    def _read_branch(self, level, i, v):
        return self.reconstruct(self.branch_val[level, i][:, v], self.branch_idx[level, i][:, v], self.joint)

    def _write_final(self, i, p):
        val, idx = self.compress(p, self.k_final)
        self.final_val[i] = val
        self.final_idx[i] = idx.to(self.final_idx.dtype)

    def _write_branch(self, i, v, q):
        val, idx = self.compress(q, self.k_joint)
        self.branch_val[:, i[:, None], v[None, :]] = val
        self.branch_idx[:, i[:, None], v[None, :]] = idx.to(self.branch_idx.dtype)


def _index_dtype(size: int) -> torch.dtype:
    return torch.int16 if size <= torch.iinfo(torch.int16).max + 1 else torch.int32


# --- sizing ------------------------------------------------------------------------
def store_bytes_per_sample(num_classes: int, num_branches: int, num_views: int, kind: str = "dense",
                           dtype: torch.dtype = torch.float32, k: int = 10) -> int:
    """Bytes one training sample costs in a store (values + indices + row flags)."""
    joint = num_views * num_classes
    flags = _flag_bytes(num_views, num_branches)
    if kind == "dense":
        size = torch.empty(0, dtype=dtype).element_size()
        return (num_classes + num_branches * num_views * joint) * size + flags
    if kind == "topk":
        kf, kj = min(k, num_classes), min(k, joint)
        fi = torch.empty(0, dtype=_index_dtype(num_classes)).element_size()
        ji = torch.empty(0, dtype=_index_dtype(joint)).element_size()
        return kf * (2 + fi) + num_branches * num_views * kj * (2 + ji) + flags
    raise ValueError(f"unknown store kind {kind!r}")


def store_options(num_classes: int, num_branches: int, num_views: int, k: int = 10) -> Dict[str, int]:
    """Bytes per sample of each option: dense fp32, dense fp16, top-k."""
    return {
        "dense_fp32": store_bytes_per_sample(num_classes, num_branches, num_views, "dense", torch.float32),
        "dense_fp16": store_bytes_per_sample(num_classes, num_branches, num_views, "dense", torch.float16),
        f"topk{k}": store_bytes_per_sample(num_classes, num_branches, num_views, "topk", k=k),
    }


def choose_store(num_samples: int, num_classes: int, num_branches: int, num_views: int,
                 mode: str = "auto", dtype: torch.dtype = torch.float32, k: int = 10,
                 budget_gb: float = 0.0) -> Dict:
    """The store layout to build: ``{"kind": "dense"|"topk", "dtype", "k", "bytes"}``.

    ``mode=dense`` / ``topk`` take that layout; ``auto`` without a budget (0) is dense
    in ``dtype``; ``auto`` with a budget takes the first of dense fp32, dense fp16,
    top-k that fits, and raises ConfigError if none does."""
    def total(kind, dt=torch.float32):
        return num_samples * store_bytes_per_sample(num_classes, num_branches, num_views, kind, dt, k)

    if mode == "dense" or (mode == "auto" and budget_gb <= 0):
        return {"kind": "dense", "dtype": dtype, "k": 0, "bytes": total("dense", dtype)}
    if mode == "topk":
        return {"kind": "topk", "dtype": torch.float16, "k": k, "bytes": total("topk")}
    if mode != "auto":
        raise ConfigError(f"method.store must be auto, dense or topk, got {mode!r}")
    budget = budget_gb * 1024 ** 3
    tried: List[str] = []
    for kind, dt in (("dense", torch.float32), ("dense", torch.float16), ("topk", torch.float16)):
        b = total(kind, dt)
        if b <= budget:
            return {"kind": kind, "dtype": dt, "k": k if kind == "topk" else 0, "bytes": b}
        tried.append(f"{kind}{'' if kind == 'topk' else '/' + str(dt).split('.')[-1]}: {b / 1024 ** 3:.3f} GB")
    raise ConfigError(
        f"method.store_budget_gb={budget_gb}: no soft-target store fits ({'; '.join(tried)}); "
        f"raise the budget or lower method.store_topk={k}"
    )


def build_store(num_samples: int, num_classes: int, num_branches: int, num_views: int, choice: Dict,
                host: bool = False) -> StoreBase:
    if choice["kind"] == "topk":
        return TopKStore(num_samples, num_classes, num_branches, num_views, choice["k"], host)
    return SoftTargetStore(num_samples, num_classes, num_branches, num_views, choice["dtype"], host)
