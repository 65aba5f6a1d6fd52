"""The slice acquisition model shared by every method: forward operator and its exact adjoint.

Each acquired pixel ``p`` of slice ``n`` integrates the volume under a 3D Gaussian point-spread
function placed at the pixel and oriented with the slice::

    s_p = sum_k w_k V(T_n (c_p + o_k))                                  (cSVR paper eq. 1)

with ``T_n`` the slice pose, ``c_p`` the pixel's slice-frame position, and ``(o_k, w_k)`` a
quadrature of the PSF: in-plane FWHM ``inplane_fwhm * spacing`` (default 1.2, as in SVRTK /
NeSVoR), through-plane FWHM = slice thickness.  ``V`` is read by trilinear interpolation.

Quadrature (where the papers are silent we follow what SVRTK/NeSVoR do, with fewer samples):
through-plane, equally spaced nodes no further apart than ``step`` (default: the volume's voxel
size) out to ``truncate`` standard deviations, weighted by the Gaussian and renormalised; in-plane,
a single node when the in-plane standard deviation is below the volume voxel size (trilinear
interpolation already blurs by a comparable amount), else a 3-point Gauss-Hermite rule per axis
(exact in mean and variance).  ``psf_kernel(..., quality="high")`` always uses the 3x3 rule and
half-voxel through-plane steps: the simulator uses it so reconstructions are not tested with
the exact operator that made their data.

The adjoint is the transpose of exactly this linear map (trilinear splatting with the same
weights), computed with the backward kernel of ``grid_sample`` so ``<A x, y> == <x, A^T y>`` to
rounding (see ``tests/test_acquisition.py``).  Both are chunked over pixels so memory stays
bounded at ``chunk * K`` samples.  :func:`forward_jacobian` is the registration's operator: the
simulated pixels and their derivatives with respect to a rigid correction of each slice.

Two implementations, the same numbers: on CPU tensors the fused numba kernels of
:mod:`slice2vol.core.fused` (no per-node temporaries, deterministic adjoint) run when numba is
importable; otherwise, on other devices, with ``SLICE2VOL_NO_NUMBA=1``, or where an autograd
gradient with respect to the poses is wanted, the PyTorch code below runs (it is the reference
the fused kernels are tested against).  :func:`backend` says which one a CPU call gets.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slice2vol.core import fused
from slice2vol.core.geometry import grid_affine

__all__ = ["PSF", "psf_kernel", "forward", "adjoint", "forward_jacobian", "Projector", "sample_points", "backend",
           "FWHM_TO_SIGMA", "DEFAULT_CHUNK", "MAX_PSF_SAMPLES"]

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
DEFAULT_CHUNK = 1 << 17  # pixels per chunk; times K samples bounds the temporary memory
# Most PSF nodes per pixel, per quality.  At 1 mm pixels and 3 mm slices "normal" needs 9 nodes at
# 0.8 mm voxels, 11 at 0.6 mm and 117 at 0.5 mm (the 3x3 in-plane rule starts there); "high" needs
# 207 at 0.5 mm.  Beyond the cap the through-plane step is widened instead (one log line), so an
# absurd thickness or resolution cannot ask for millions of samples per pixel.
MAX_PSF_SAMPLES = {"normal": 128, "high": 2048, "thin": 1}
_CAPPED_LOGGED: set = set()


@dataclass
class PSF:
    """PSF quadrature per slice: ``offsets (M, K, 3)`` slice-frame mm, ``weights (M, K)`` summing to 1."""

    offsets: Tensor
    weights: Tensor

    @property
    def n_samples(self) -> int:
        return int(self.offsets.shape[1])


_GH3 = (torch.tensor([-math.sqrt(3.0), 0.0, math.sqrt(3.0)], dtype=torch.float64),
        torch.tensor([1 / 6, 2 / 3, 1 / 6], dtype=torch.float64))


def _axis_nodes(sigma: float, step: float, truncate: float, max_half: int | None = None) -> tuple[Tensor, Tensor]:
    half = int(math.ceil(truncate * sigma / step)) if sigma > 0 else 0
    if max_half is not None:
        half = min(half, max(0, max_half))
    if half == 0:
        return torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    x = torch.linspace(-truncate * sigma, truncate * sigma, 2 * half + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return x, w / w.sum()


def psf_kernel(
    spacing: Tensor,
    thickness: Tensor,
    resolution: float,
    inplane_fwhm: float = 1.2,
    truncate: float = 2.0,
    quality: str = "normal",
    max_samples: int | None = None,
) -> PSF:
    """Build the PSF quadrature for ``M`` slices.

    Args:
        spacing: ``(M, 2)`` in-plane pixel spacing, mm.
        thickness: ``(M,)`` slice thickness (through-plane FWHM), mm.
        resolution: voxel size of the volume the PSF samples, mm.
        inplane_fwhm: in-plane FWHM as a multiple of the pixel spacing.
        truncate: through-plane support in standard deviations.
        quality: ``"normal"`` (fast, see module doc), ``"high"`` (simulation) or ``"thin"``
            (a single node: slices as unit-thin planes, for coarse registration).
        max_samples: most nodes per pixel (default: ``MAX_PSF_SAMPLES[quality]``); a kernel that
            would have more gets fewer, more widely spaced through-plane nodes (logged once).
    Returns:
        :class:`PSF` with the same ``K`` for all slices (unused nodes have weight 0).
    """
    device = spacing.device
    keys = torch.cat([spacing, thickness[:, None]], 1).cpu().to(torch.float64)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    kernels = []
    for row in uniq.tolist():
        dx, dy, th = row
        sx, sy, sz = inplane_fwhm * dx * FWHM_TO_SIGMA, inplane_fwhm * dy * FWHM_TO_SIGMA, th * FWHM_TO_SIGMA
        if quality == "thin":
            offs, wts = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        else:
            step = resolution / 2 if quality == "high" else resolution
            axes = []
            for s in (sx, sy):
                if quality == "high" or s > resolution:
                    axes.append((_GH3[0].double() * s, _GH3[1].double()))
                else:
                    axes.append((torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)))
            cap = MAX_PSF_SAMPLES.get(quality, 128) if max_samples is None else int(max_samples)
            n_xy = axes[0][0].numel() * axes[1][0].numel()
            max_half = (cap // n_xy - 1) // 2
            half = math.ceil(truncate * sz / step) if sz > 0 else 0  # as _axis_nodes, without allocating
            zs, zw = _axis_nodes(sz, step, truncate, max_half if half > max_half else None)
            if half > max_half:
                want = (2 * half + 1) * n_xy
                key = (dx, dy, th, resolution, quality, truncate, cap)
                if key not in _CAPPED_LOGGED:
                    _CAPPED_LOGGED.add(key)
                    log.warning("PSF of %g x %g mm pixels, %g mm slices at %g mm voxels: %d samples per pixel "
                                "capped at %d (through-plane step %.3g mm instead of %.3g mm)", dx, dy, th, resolution,
                                want, zs.numel() * n_xy,
                                float(zs[1] - zs[0]) if zs.numel() > 1 else 0.0, step)
            gx, gy, gz = torch.meshgrid(axes[0][0], axes[1][0], zs, indexing="ij")
            wx, wy, wz = torch.meshgrid(axes[0][1], axes[1][1], zw, indexing="ij")
            offs = torch.stack([gx, gy, gz], -1).reshape(-1, 3)
            wts = (wx * wy * wz).reshape(-1)
        kernels.append((offs, wts))
    K = max(o.shape[0] for o, _ in kernels)
    O = torch.zeros(len(kernels), K, 3, dtype=torch.float64)
    Wt = torch.zeros(len(kernels), K, dtype=torch.float64)
    for u, (o, w) in enumerate(kernels):
        O[u, : o.shape[0]] = o
        Wt[u, : w.shape[0]] = w
    return PSF(offsets=O[inverse].to(device, spacing.dtype), weights=Wt[inverse].to(device, spacing.dtype))


def sample_points(
    poses: Tensor,
    coords: Tensor,
    slice_id: Tensor,
    psf: PSF,
    to_frame: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Positions of the PSF nodes of each pixel.

    Args:
        poses: ``(M, 4, 4)`` slice-to-world.
        coords: ``(P, 3)`` slice-frame pixel positions.
        slice_id: ``(P,)``.
        psf: quadrature.
        to_frame: optional ``(4, 4)`` applied after the pose (e.g. world -> grid coordinates).
    Returns:
        points ``(P, K, 3)`` and weights ``(P, K)``.
    """
    T = poses if to_frame is None else to_frame.to(poses.dtype) @ poses
    A = T[:, :3, :3]
    base = (A[slice_id] @ coords[..., None]).squeeze(-1) + T[slice_id, :3, 3]  # (P, 3)
    rot_off = psf.offsets @ A.transpose(-1, -2)  # (M, K, 3)
    return base[:, None, :] + rot_off[slice_id], psf.weights[slice_id]


def _grid(volume_shape, affine, dtype, device) -> Tensor:
    return grid_affine(torch.as_tensor(affine, dtype=torch.float64), volume_shape).to(device, dtype)


def backend(device: torch.device | str = "cpu") -> str:
    """``"numba"`` when operators on ``device`` run the fused kernels, else ``"torch"``."""
    return "numba" if torch.device(device).type == "cpu" and fused.available() else "torch"


_FLOATS = (torch.float32, torch.float64)


def _use_fused(data: Tensor | torch.dtype, poses: Tensor, coords: Tensor) -> bool:
    """Fused path: CPU float tensors, and no autograd graph through poses or pixel positions
    (the fused kernels differentiate in the volume / values only).  ``data``: the volume or
    values (or just the dtype they will have)."""
    dtype = data if isinstance(data, torch.dtype) else data.dtype
    if poses.device.type != "cpu" or (isinstance(data, Tensor) and data.device.type != "cpu") or dtype not in _FLOATS:
        return False
    if torch.is_grad_enabled() and (poses.requires_grad or coords.requires_grad):
        return False
    return fused.available()


def forward(
    volume: Tensor,
    affine,
    poses: Tensor,
    coords: Tensor,
    slice_id: Tensor,
    psf: PSF,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """Simulate the acquired pixels from a volume: ``A(T) V``.

    Args:
        volume: ``(Ni, Nj, Nk)`` (or ``(C, Ni, Nj, Nk)`` for ``C`` channels).
        affine: ``(4, 4)`` voxel-to-world of the volume (numpy or tensor).
        poses: ``(M, 4, 4)`` slice-to-world.
        coords, slice_id: ``(P, 3)``, ``(P,)`` pixel positions and slices.
        psf: quadrature for the ``M`` slices.
        chunk: pixels per chunk.
    Returns:
        ``(P,)`` (or ``(C, P)``) simulated intensities; differentiable in ``volume`` and ``poses``
        (a graph through ``poses`` takes the PyTorch path).
    """
    if _use_fused(volume, poses, coords):
        return fused.forward(volume, fused.Geometry(volume.shape[-3:], affine, poses, coords, slice_id, psf))
    vol = volume[None] if volume.dim() == 4 else volume[None, None]
    G = _grid(tuple(volume.shape[-3:]), affine, poses.dtype, poses.device)
    out = []
    for start in range(0, coords.shape[0], chunk):
        sl = slice(start, start + chunk)
        pts, w = sample_points(poses, coords[sl], slice_id[sl], psf, G)
        s = F.grid_sample(vol, pts[None, :, :, None, :].to(vol.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
        out.append((s[0, :, :, :, 0] * w.to(vol.dtype)).sum(-1))  # (C, p)
    res = torch.cat(out, -1) if out else vol.new_zeros(vol.shape[1], 0)
    return res if volume.dim() == 4 else res[0]


def adjoint(
    values: Tensor,
    shape: tuple[int, int, int],
    affine,
    poses: Tensor,
    coords: Tensor,
    slice_id: Tensor,
    psf: PSF,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """Transpose of :func:`forward` in the volume: ``A(T)^T y`` (PSF-weighted splatting).

    Args:
        values: ``(P,)`` per-pixel values ``y``.
        shape: ``(Ni, Nj, Nk)`` of the volume grid.
        (others as in :func:`forward`)
    Returns:
        ``(Ni, Nj, Nk)`` volume.  Not differentiable on the PyTorch path (it is itself a
        gradient); the fused path is differentiable in ``values`` (its backward is :func:`forward`).
    """
    if _use_fused(values, poses, coords):
        return fused.adjoint(values, fused.Geometry(shape, affine, poses, coords, slice_id, psf))
    dtype = values.dtype
    G = _grid(shape, affine, poses.dtype, poses.device)
    vol = torch.zeros((1, 1) + tuple(shape), dtype=dtype, device=values.device)
    out = torch.zeros_like(vol)
    with torch.no_grad():
        for start in range(0, coords.shape[0], chunk):
            sl = slice(start, start + chunk)
            pts, w = sample_points(poses, coords[sl], slice_id[sl], psf, G)
            grad_out = (values[sl, None] * w.to(dtype))[None, None, :, :, None]
            g, _ = torch.ops.aten.grid_sampler_3d_backward(
                grad_out, vol, pts[None, :, :, None, :].to(dtype), 0, 0, True, [True, False]
            )
            out += g
    return out[0, 0]


class Projector:
    """:func:`forward` and :func:`adjoint` for fixed poses, with the PSF node positions computed once.

    Reconstruction applies ``A`` and ``A^T`` tens of times with the same poses.  The PyTorch path
    caches the ``(P, K, 3)`` sample positions (12 bytes per node) to remove the per-call gathers;
    the fused path caches only its slice geometry and the adjoint's slab assignment
    (``O(M K + P)``).  Differentiable in the volume only.
    """

    def __init__(self, shape, affine, poses: Tensor, coords: Tensor, slice_id: Tensor, psf: PSF,
                 chunk: int = DEFAULT_CHUNK, dtype: torch.dtype | None = None):
        self.shape = tuple(shape)
        self.dtype = dtype or poses.dtype
        self.chunks = []
        self.geom = None
        if _use_fused(self.dtype, poses, coords):
            self.geom = fused.Geometry(self.shape, affine, poses, coords, slice_id, psf)
            return
        G = _grid(self.shape, affine, poses.dtype, poses.device)
        with torch.no_grad():
            for start in range(0, coords.shape[0], chunk):
                sl = slice(start, start + chunk)
                pts, w = sample_points(poses, coords[sl], slice_id[sl], psf, G)
                self.chunks.append((pts[None, :, :, None, :].to(self.dtype).contiguous(), w.to(self.dtype)))

    def forward(self, volume: Tensor) -> Tensor:
        """``(Ni, Nj, Nk)`` -> ``(P,)``."""
        if self.geom is not None:
            return fused.forward(volume.to(self.dtype), self.geom)
        vol = volume.to(self.dtype)[None, None]
        out = [
            (F.grid_sample(vol, pts, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0, :, :, 0] * w).sum(-1)
            for pts, w in self.chunks
        ]
        return torch.cat(out) if out else volume.new_zeros(0)

    def adjoint(self, values: Tensor) -> Tensor:
        """``(P,)`` -> ``(Ni, Nj, Nk)``."""
        if self.geom is not None:
            return fused.adjoint(values.to(self.dtype), self.geom)
        values = values.to(self.dtype)
        vol = torch.zeros((1, 1) + self.shape, dtype=values.dtype, device=values.device)
        out = torch.zeros_like(vol)
        start = 0
        with torch.no_grad():
            for pts, w in self.chunks:
                p = w.shape[0]
                grad_out = (values[start:start + p, None] * w)[None, None, :, :, None]
                g, _ = torch.ops.aten.grid_sampler_3d_backward(grad_out, vol, pts, 0, 0, True, [True, False])
                out += g
                start += p
        return out[0, 0]


def forward_jacobian(
    channels: Tensor,
    affine,
    poses: Tensor,
    coords: Tensor,
    slice_id: Tensor,
    psf: PSF,
    centres: Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Simulated pixels and their Jacobian with respect to a rigid correction of each slice.

    The correction ``D`` (rotation ``omega`` about ``centres[n]``, then translation ``t``, world
    mm) acts on the left of the pose, ``D @ T_n``; at ``D = I``::

        s_p = sum_k w_k V(x_k),     d s_p / d(omega, t) = sum_k w_k [(x_k - c_n) x g_k, g_k]

    with ``x_k`` the world position of PSF node ``k`` and ``g_k`` the world gradient of ``V``
    there, read from ``channels`` (trilinear, like ``V``).

    Args:
        channels: ``(4, Ni, Nj, Nk)``: ``V`` and its index-space derivatives along ``i, j, k``
            (:func:`slice2vol.core.registration.gradient_channels`; channels-last storage spares
            the fused path a copy).
        affine: ``(4, 4)`` voxel-to-world of the grid.
        poses, coords, slice_id, psf: as in :func:`forward`.
        centres: ``(M, 3)`` world rotation centre of each slice's correction (mm).
        chunk: pixels per chunk (PyTorch path).
    Returns:
        ``s (P,)`` and ``J (P, 6)`` (columns ``omega`` per rad, ``t`` per mm); not differentiable.
    """
    A = torch.as_tensor(np.asarray(affine, dtype=np.float64) if not isinstance(affine, Tensor) else affine,
                        dtype=torch.float64)
    to_world = torch.linalg.inv(A)[:3, :3].T.to(channels.device, channels.dtype)
    if _use_fused(channels, poses, coords):
        geom = fused.Geometry(channels.shape[-3:], affine, poses, coords, slice_id, psf)
        return fused.forward_jacobian(channels, to_world, geom, centres)
    G = _grid(tuple(channels.shape[-3:]), affine, channels.dtype, channels.device)
    vol = channels[None]
    s_all, J_all = [], []
    with torch.no_grad():
        for start in range(0, coords.shape[0], chunk):
            sl = slice(start, start + chunk)
            pts, w = sample_points(poses, coords[sl], slice_id[sl], psf)  # world (p, K, 3)
            grid = pts @ G[:3, :3].T + G[:3, 3]
            smp = F.grid_sample(vol, grid[None, :, :, None, :].to(vol.dtype), mode="bilinear", padding_mode="zeros",
                                align_corners=True)[0, :, :, :, 0]  # (4, p, K)
            s_all.append((smp[0] * w).sum(-1))
            g = smp[1:].permute(1, 2, 0) @ to_world.T  # (p, K, 3) world gradient
            r = pts - centres[slice_id[sl]][:, None, :]
            jw = torch.cat([torch.cross(r, g, dim=-1), g], -1)  # (p, K, 6)
            J_all.append((jw * w[..., None]).sum(1))
    if not s_all:
        return channels.new_zeros(0), channels.new_zeros(0, 6)
    return torch.cat(s_all), torch.cat(J_all)
