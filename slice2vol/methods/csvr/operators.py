"""Push (trilinear splatting) and pull (trilinear sampling) between slice pixels and a feature volume.

These are the ``V`` and ``V*`` of the cSVR paper (eqs. 5 and 6) on the shared conventions of
:mod:`slice2vol.core.geometry`: a volume is stored ``(C, Ni, Nj, Nk)`` and points are given either in
world mm (with the volume's voxel-to-world affine) or directly in ``grid_sample`` coordinates
``(k, j, i)`` in ``[-1, 1]`` with ``align_corners=True`` (-1 is the centre of voxel 0).  Outside
the volume a pull reads 0 and a push drops the contribution (``padding_mode="zeros"``).

``pull`` is ``torch.nn.functional.grid_sample``; ``push`` is its exact transpose, written as an
explicit scatter (``index_add_``) with the same trilinear weights so that it stays differentiable
with respect to both the pushed values and the positions (autograd of ``grid_sample``'s backward
w.r.t. the grid is not available in every PyTorch build).  ``<pull(V, x), y> == <V, push(y, x)>``
holds to rounding, which ``tests/test_csvr.py`` checks in float64.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slice2vol.core.geometry import world_to_grid

__all__ = ["trilinear_corners", "pull", "push", "push_normalised", "world_grid"]


def world_grid(x: Tensor, affine: np.ndarray | Tensor, shape: tuple[int, int, int]) -> Tensor:
    """World points ``(..., 3)`` mm -> ``grid_sample`` coordinates ``(..., 3)`` of a volume of ``shape``."""
    return world_to_grid(x, torch.as_tensor(affine, dtype=torch.float64), shape)


def trilinear_corners(grid: Tensor, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """The 8 voxels a trilinear read at each point touches, and their weights.

    Args:
        grid: ``(P, 3)`` ``grid_sample`` coordinates ``(k, j, i)`` (align_corners=True).
        shape: volume shape ``(Ni, Nj, Nk)``.
    Returns:
        ``idx (P, 8)`` int64 flat voxel indices (``i * Nj * Nk + j * Nk + k``; 0 where outside) and
        ``w (P, 8)`` weights (0 for corners outside the volume), differentiable w.r.t. ``grid``.
    """
    Ni, Nj, Nk = shape
    sizes = grid.new_tensor([Nk - 1, Nj - 1, Ni - 1])
    pos = (grid + 1) * 0.5 * sizes  # continuous (k, j, i) voxel index, same formula as grid_sample
    base = torch.floor(pos.detach())
    frac = pos - base
    base = base.long()
    idx, w = [], []
    for dk in (0, 1):
        for dj in (0, 1):
            for di in (0, 1):
                k, j, i = base[:, 0] + dk, base[:, 1] + dj, base[:, 2] + di
                wk = frac[:, 0] if dk else 1 - frac[:, 0]
                wj = frac[:, 1] if dj else 1 - frac[:, 1]
                wi = frac[:, 2] if di else 1 - frac[:, 2]
                inside = (k >= 0) & (k < Nk) & (j >= 0) & (j < Nj) & (i >= 0) & (i < Ni)
                idx.append(torch.where(inside, (i * Nj + j) * Nk + k, torch.zeros_like(k)))
                w.append(wk * wj * wi * inside.to(grid.dtype))
    return torch.stack(idx, 1), torch.stack(w, 1)


def pull(volume: Tensor, grid: Tensor) -> Tensor:
    """Trilinear samples (eq. 6) of ``volume (C, Ni, Nj, Nk)`` at ``grid (P, 3)`` -> ``(P, C)``."""
    g = grid.to(volume.dtype).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(volume[None], g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(volume.shape[0], -1).T


def push(values: Tensor, grid: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Trilinear splat of ``values (P, C)`` at ``grid (P, 3)`` into a ``(C, Ni, Nj, Nk)`` volume.

    The exact adjoint of :func:`pull` (unnormalised); differentiable w.r.t. values and grid.
    """
    idx, w = trilinear_corners(grid, shape)
    C = values.shape[1]
    n = int(shape[0]) * int(shape[1]) * int(shape[2])
    contrib = (w.to(values.dtype)[:, :, None] * values[:, None, :]).reshape(-1, C)  # (P*8, C)
    vol = values.new_zeros(n, C).index_add_(0, idx.reshape(-1), contrib)
    return vol.T.reshape(C, *shape)


def push_normalised(values: Tensor, weights: Tensor, grid: Tensor, shape: tuple[int, int, int],
                    eps: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Eq. 5: ``push(w * values) / push(w)``, the weighted average of what lands in each voxel.

    Args:
        values: ``(P, C)`` pixel features; weights: ``(P,)`` non-negative pixel weights (the
            paper's ``[I_n > 0]``; here the brain mask, soft at coarse scales).
        grid, shape: as in :func:`push`.
        eps: added to the pushed weights so voxels reached by almost nothing fade to 0 instead of
            amplifying a single stray contribution.
    Returns:
        ``(C, Ni, Nj, Nk)`` normalised feature volume and ``(1, Ni, Nj, Nk)`` pushed weights.
    """
    both = push(torch.cat([values * weights[:, None], weights[:, None]], 1), grid, shape)
    den = both[-1:]
    return both[:-1] / (den + eps), den
