"""The slice acquisition model shared by every method: forward operator and its exact adjoint.

Each acquired pixel ``p`` of slice ``n`` integrates the volume under a 3D Gaussian point-spread
function placed at the pixel and oriented with the slice::

    s_p = sum_k w_k V(T_n (c_p + o_k))                                  (cSVR paper eq. 1)

with ``T_n`` the slice pose, ``c_p`` the pixel's slice-frame position, and ``(o_k, w_k)`` a
quadrature of the PSF: in-plane FWHM ``inplane_fwhm * spacing`` (default 1.2, as in SVRTK /
NeSVoR), through-plane FWHM = slice thickness.  ``V`` is read by trilinear interpolation.

Quadrature (where the papers are silent we follow what SVRTK/NeSVoR do, with fewer samples).
A Gaussian with covariance ``diag(sx^2, sy^2, sz^2)`` is an isotropic Gaussian of variance
``vs^2 = min(sx, sy)^2`` convolved with one of covariance ``diag(sx^2 - vs^2, sy^2 - vs^2,
sz^2 - vs^2)``, and the isotropic part does not depend on the slice's orientation.  So the
``"normal"`` PSF (every reconstruction's) moves it to the volume: the operators convolve the
volume once with a separable Gaussian of ``PSF.volume_sigma = vs`` (the smallest in-plane sigma
of all slices; :func:`prefilter`, symmetric kernels with zero padding, so ``A`` and ``A^T`` stay
exact adjoints) and the nodes carry the rest: through-plane, equally spaced nodes no further
apart than ``step`` (default: the volume's voxel size) out to ``truncate`` standard deviations of
``sqrt(sz^2 - vs^2)``, weighted by the Gaussian and renormalised; in-plane, a single node when what
is left of the in-plane sigma is below the voxel size (at equal pixel spacings nothing is left),
else a 3-point Gauss-Hermite rule per axis (exact in mean and variance).  Before 2026-12-07 the
in-plane blur was left out altogether wherever it was below the voxel size ("trilinear
interpolation already blurs by a comparable amount"): but the reconstructed volume then has to
carry that blur itself, and it costs 1-2 dB (README, "PSF model"); ``PREFILTER = False`` restores
that model for A/B runs.  ``psf_kernel(..., quality="high")`` keeps every part in nodes (the 3x3
in-plane rule and half-voxel through-plane steps): the simulator uses it so reconstructions are not
tested with the exact operator that made their data.

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

__all__ = ["PSF", "psf_kernel", "isotropic_sigma", "prefilter", "forward", "adjoint", "forward_jacobian", "Projector",
           "sample_points", "backend", "FWHM_TO_SIGMA", "DEFAULT_CHUNK", "MAX_PSF_SAMPLES", "PREFILTER"]

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
DEFAULT_CHUNK = 1 << 17  # pixels per chunk; times K samples bounds the temporary memory
# Most PSF nodes per pixel, per quality.  At 1 mm pixels and 3 mm slices "normal" needs 7 nodes at
# 0.8 mm voxels, 9 at 0.6 mm and 11 at 0.5 mm (its in-plane part is in the volume prefilter; before
# it the 3x3 in-plane rule started at 0.5 mm, 117 nodes); "high" needs 207 at 0.5 mm.  Beyond the
# cap the through-plane step is widened instead (one log line), so an absurd thickness or
# resolution cannot ask for millions of samples per pixel.
MAX_PSF_SAMPLES = {"normal": 128, "high": 2048, "thin": 1}
# "normal" PSFs move their isotropic Gaussian part into a volume prefilter (module doc).  False
# restores the model before 2026-12-07 (in-plane blur left to trilinear interpolation), for A/B runs.
PREFILTER = True
_CAPPED_LOGGED: set = set()


@dataclass
class PSF:
    """PSF quadrature per slice: ``offsets (M, K, 3)`` slice-frame mm, ``weights (M, K)`` summing to 1,
    and ``volume_sigma`` (mm): the isotropic Gaussian part of the PSF, shared by all slices, which the
    operators apply to the volume by one separable convolution (:func:`prefilter`) before the nodes
    sample it (0: none; see the module doc)."""

    offsets: Tensor
    weights: Tensor
    volume_sigma: float = 0.0

    @property
    def n_samples(self) -> int:
        return int(self.offsets.shape[1])

    def select(self, index: Tensor) -> "PSF":
        """The PSF of the slices ``index`` (a ``(m,)`` index or bool mask)."""
        return PSF(self.offsets[index], self.weights[index], self.volume_sigma)

    def repeat(self, k: int) -> "PSF":
        """The PSF of ``k`` copies of the ``M`` slices, one after the other (``k M`` slices)."""
        return PSF(self.offsets.repeat(k, 1, 1), self.weights.repeat(k, 1), self.volume_sigma)

    def to(self, *args, **kwargs) -> "PSF":
        """Offsets and weights moved / cast as ``Tensor.to``."""
        return PSF(self.offsets.to(*args, **kwargs), self.weights.to(*args, **kwargs), self.volume_sigma)


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


def isotropic_sigma(pixel: float, thickness: float, inplane_fwhm: float = 1.2) -> float:
    """``PSF.volume_sigma`` (mm) of a ``"normal"`` PSF whose finest pixel spacing is ``pixel`` and
    thinnest slice ``thickness`` (mm): the in-plane sigma of that pixel, at most the through-plane
    one; 0 without a positive pixel spacing or with :data:`PREFILTER` off."""
    if not PREFILTER or not pixel > 0:
        return 0.0
    return min(inplane_fwhm * FWHM_TO_SIGMA * pixel, FWHM_TO_SIGMA * thickness)


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
    # "normal": the largest isotropic Gaussian inside every slice's PSF goes to the volume (prefilter)
    vs = 0.0
    if quality == "normal" and uniq.numel():
        vs = isotropic_sigma(float(uniq[:, :2].min()), float(uniq[:, 2].min()), inplane_fwhm)
    kernels = []
    for row in uniq.tolist():
        dx, dy, th = row
        sx, sy, sz = (math.sqrt(max(0.0, s * s - vs * vs))
                      for s in (inplane_fwhm * dx * FWHM_TO_SIGMA, inplane_fwhm * dy * FWHM_TO_SIGMA, th * FWHM_TO_SIGMA))
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
    return PSF(offsets=O[inverse].to(device, spacing.dtype), weights=Wt[inverse].to(device, spacing.dtype),
               volume_sigma=vs)


def _prefilter_kernel(sigma_vox: float) -> list[float]:
    """Symmetric 1D kernel ``[w0, w1, ..]`` (centre first) of variance exactly ``sigma_vox**2`` voxels^2.

    A sampled Gaussian falls short of its variance below about 0.6 voxels (at 0.51 voxels by 12 %;
    1 mm pixels on a 0.8 mm grid give 0.64), so up to ``sigma^2 = 1/2`` the 3-tap kernel
    ``[s^2/2, 1 - s^2, s^2/2]`` is used, and above it a sampled Gaussian whose width is corrected
    until its variance is the requested one."""
    v = sigma_vox * sigma_vox
    if v <= 0.5:
        return [1.0 - v, v / 2]
    half = max(1, int(math.ceil(3.0 * sigma_vox)))
    s2 = v
    for _ in range(20):
        w = [math.exp(-0.5 * d * d / s2) for d in range(half + 1)]
        total = w[0] + 2 * sum(w[1:])
        var = 2 * sum(d * d * x for d, x in enumerate(w)) / total
        if abs(var - v) < 1e-10 * v:
            break
        s2 *= v / var
    return [x / total for x in w]


def prefilter(volume: Tensor, affine, psf: PSF) -> Tensor:
    """The volume convolved with the PSF's isotropic part ``psf.volume_sigma`` (mm).

    Separable, symmetric kernels with zero padding, so the map is its own transpose and
    :func:`forward` / :func:`adjoint` stay exact adjoints.  Differentiable in ``volume``.

    Args:
        volume: ``(Ni, Nj, Nk)`` or ``(C, Ni, Nj, Nk)``.
        affine: ``(4, 4)`` voxel-to-world of the grid (its column norms are the voxel sizes).
        psf: the PSF whose ``volume_sigma`` is applied (0: ``volume`` is returned as it is).
    Returns:
        Tensor of ``volume``'s shape, dtype and device.
    """
    if psf.volume_sigma <= 0:
        return volume
    A = affine.detach().cpu().double().numpy() if isinstance(affine, Tensor) else np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    out = volume
    first = volume.dim() - 3
    for a in range(3):
        w = _prefilter_kernel(psf.volume_sigma / float(spacing[a]))
        ax = first + a
        n = out.shape[ax]
        res = out * w[0]
        for d in range(1, min(len(w), n)):
            res.narrow(ax, d, n - d).add_(out.narrow(ax, 0, n - d), alpha=w[d])
            res.narrow(ax, 0, n - d).add_(out.narrow(ax, d, n - d), alpha=w[d])
        out = res
    return out


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
    volume = prefilter(volume, affine, psf)
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
        return prefilter(fused.adjoint(values, fused.Geometry(shape, affine, poses, coords, slice_id, psf)), affine, psf)
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
    return prefilter(out[0, 0], affine, psf)


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
        self.affine, self.psf = affine, psf
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
        volume = prefilter(volume.to(self.dtype), self.affine, self.psf)
        if self.geom is not None:
            return fused.forward(volume, self.geom)
        vol = volume[None, None]
        out = [
            (F.grid_sample(vol, pts, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0, :, :, 0] * w).sum(-1)
            for pts, w in self.chunks
        ]
        return torch.cat(out) if out else volume.new_zeros(0)

    def adjoint(self, values: Tensor) -> Tensor:
        """``(P,)`` -> ``(Ni, Nj, Nk)``."""
        if self.geom is not None:
            return prefilter(fused.adjoint(values.to(self.dtype), self.geom), self.affine, self.psf)
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
        return prefilter(out[0, 0], self.affine, self.psf)


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
            the fused path a copy), of the volume **already** passed through :func:`prefilter`
            with this ``psf`` (the caller builds the channels once for many calls; then ``s``
            equals :func:`forward` of the unfiltered volume).
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
