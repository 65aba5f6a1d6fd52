"""Per-slice similarity of acquired and simulated pixels, shared by the pose search, the cSVR start
choice and the metrics (which re-export it)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["per_slice_ncc"]


def per_slice_ncc(x: Tensor, y: Tensor, slice_id: Tensor, n_slices: int) -> Tensor:
    """``(M,)`` Pearson correlation of ``x`` and ``y`` (``(P,)`` pixel values) within each slice;
    NaN for slices with < 2 pixels or no variance.  On the CPU with the fused operators
    (:mod:`slice2vol.core.fused`) one kernel computes the same two-pass float64 sums."""
    from slice2vol.core import fused

    if (x.device.type == "cpu" and y.device.type == "cpu" and fused.available()
            and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))):
        return fused.segment_ncc(x, y, slice_id, n_slices)
    x, y = x.double(), y.double()

    def ssum(v: Tensor) -> Tensor:
        return torch.zeros(n_slices, dtype=torch.float64, device=v.device).index_add_(0, slice_id, v)

    n = ssum(torch.ones_like(x))
    mx, my = ssum(x) / n.clamp_min(1), ssum(y) / n.clamp_min(1)
    xc, yc = x - mx[slice_id], y - my[slice_id]
    den = (ssum(xc * xc) * ssum(yc * yc)).sqrt()
    return torch.where((n >= 2) & (den > 0), ssum(xc * yc) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
