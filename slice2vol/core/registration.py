"""The one rigid registration core: batched Levenberg-Marquardt through the acquisition model.

Every registration in slice2vol is the same problem: pixels (points in their slice frame, with
intensities) belong to slices with poses; groups of slices share one rigid correction; find the
corrections ``D_g`` so that the PSF-simulated intensities of the volume at the corrected poses
``D_g @ T_n`` match the acquired ones::

    min_{D_g}  sum_p  w_p (a_n s_p(D_g T_n) - y_p)^2,     s_p = sum_k w_k V(D_g T_n (c_p + o_k))

* slice-to-volume registration: one group per slice (cSVR paper eq. 4);
* stack-to-template registration: one group per stack;
* volume-to-volume registration (metrics): the fixed image's voxels are the "pixels" of one
  slice whose pose is the identity.

``D_g`` acts in world coordinates about the group's centre ``c_g`` (``rotation_about``), so the
six parameters are decoupled and rotating a slice does not swing it around the world origin.
The Jacobian is analytic: with ``g = grad V`` (world mm) at a PSF node ``x``,
``d s / d(omega, t) = sum_k w_k [(x_k - c) x g_k, g_k]``; ``V`` and its three derivatives are
read in one pass (:func:`slice2vol.core.acquisition.forward_jacobian`, fused on CPU), and the
6x6 normal equations of all groups are accumulated (``index_add``, or one fused pass with the
costs and slice scales on CPU) and solved in one batched call.  Each group has its own
Levenberg-Marquardt damping and accepts a step only if its own cost decreases by more than
:data:`MIN_DECREASE` (relative).  ``a_n`` is the
least-squares intensity scale of each slice, re-fitted at every iteration (SVRTK scales slices
the same way).  Coarse-to-fine is done by Gaussian smoothing of the volume (``sigmas`` in mm).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from slice2vol.core import fused
from slice2vol.core.acquisition import DEFAULT_CHUNK, PSF, backend, forward, forward_jacobian, prefilter, psf_kernel
from slice2vol.core.geometry import slice_to_world
from slice2vol.core.resample import gaussian_blur
from slice2vol.core.stages import timed
from slice2vol.core.transforms import rotation_about

__all__ = ["RegistrationResult", "register", "register_volumes", "smooth", "gradient_channels", "slice_centres"]

log = logging.getLogger(__name__)

#: A Levenberg-Marquardt step is accepted when it lowers its group's cost by more than this
#: fraction (a few float32 ulps; see ``register``).
MIN_DECREASE = 1e-6


@dataclass
class RegistrationResult:
    """``poses (M, 4, 4)`` corrected poses; ``corrections (G, 4, 4)``; ``cost (G,)`` final
    weighted mean squared residual per group; ``scales (M,)`` fitted intensity scales."""

    poses: Tensor
    corrections: Tensor
    cost: Tensor
    scales: Tensor


def smooth(volume: Tensor, sigma_mm: float, spacing: np.ndarray | float) -> Tensor:
    """Separable Gaussian smoothing of ``(Ni, Nj, Nk)`` with ``sigma_mm`` (mm) on a grid of ``spacing``."""
    if sigma_mm <= 0:
        return volume
    return gaussian_blur(volume, sigma_mm, np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))


def slice_centres(poses: Tensor, coords: Tensor, slice_id: Tensor, weights: Tensor | None = None,
                  group: Tensor | None = None, n_groups: int | None = None) -> Tensor:
    """``(G, 3)`` world centroid of the (weighted) pixels of each group of slices (default: one
    group per slice, ``G = M``); a group without pixel weight gets the mean origin of its slices."""
    M = poses.shape[0]
    group = torch.arange(M, device=poses.device) if group is None else group
    G = M if n_groups is None else n_groups
    w = torch.ones_like(coords[:, 0]) if weights is None else weights.to(coords.dtype)
    x = slice_to_world(poses, coords, slice_id)
    pg = group[slice_id]
    s = torch.zeros(G, 3, dtype=x.dtype, device=x.device).index_add_(0, pg, x * w[:, None])
    n = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, pg, w)
    o = torch.zeros(G, 3, dtype=x.dtype, device=x.device).index_add_(0, group, poses[:, :3, 3])
    no = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, group, torch.ones_like(poses[:, 0, 0]))
    return torch.where(n[:, None] > 0, s / n.clamp_min(1e-12)[:, None], o / no.clamp_min(1)[:, None])


def gradient_channels(volume: Tensor, affine) -> tuple[Tensor, Tensor]:
    """``(4, Ni, Nj, Nk)`` = volume and its index-space central differences, plus the ``(3, 3)``
    matrix turning index-space derivatives into world-space (mm^-1) gradients.  The channels are
    stored last in memory (the tensor is a permuted view), so the fused operator reads the four
    values of a voxel from one cache line without a copy (on CPU the fused kernel writes them in
    one pass, the same numbers as ``torch.gradient``)."""
    inv = torch.linalg.inv(torch.as_tensor(affine, dtype=torch.float64))[:3, :3]
    to_world = inv.T.to(volume.dtype).to(volume.device)
    if (backend(volume.device) == "numba" and volume.dtype in (torch.float32, torch.float64) and min(volume.shape) >= 2
            and not (volume.requires_grad and torch.is_grad_enabled())):
        return fused.gradient_channels(volume).permute(3, 0, 1, 2), to_world
    gi, gj, gk = torch.gradient(volume)
    return torch.stack([volume, gi, gj, gk], -1).permute(3, 0, 1, 2), to_world


def _normal_equations(J: Tensor, scale: Tensor, weights: Tensor, r: Tensor, pix_group: Tensor,
                      n_groups: int) -> tuple[Tensor, Tensor]:
    """``H (G, 6, 6) = sum w a^2 J J^T`` and ``b (G, 6) = sum w a J r`` per group (``scale``: the
    slice scale ``a`` of each pixel); fused on CPU (float64 sums, no ``(P, 36)`` temporary)."""
    if backend(J.device) == "numba":
        return fused.normal_equations(J, scale, weights, r, pix_group, n_groups)
    Js = J * scale[:, None]
    H = torch.zeros(n_groups, 36, device=J.device, dtype=J.dtype).index_add_(
        0, pix_group, (weights[:, None, None] * Js[:, :, None] * Js[:, None, :]).reshape(-1, 36)
    ).reshape(n_groups, 6, 6)
    b = torch.zeros(n_groups, 6, device=J.device, dtype=J.dtype).index_add_(0, pix_group, weights[:, None] * Js * r[:, None])
    return H, b


@timed("registration")
def register(
    volume: Tensor,
    affine,
    poses: Tensor,
    coords: Tensor,
    slice_id: Tensor,
    values: Tensor,
    psf: PSF,
    group: Tensor | None = None,
    weights: Tensor | None = None,
    centres: Tensor | None = None,
    sigmas: tuple[float, ...] = (2.0, 1.0, 0.0),
    iterations: int = 8,
    fit_scale: bool = True,
    max_step: tuple[float, float] = (0.1, 3.0),
    chunk: int = DEFAULT_CHUNK,
) -> RegistrationResult:
    """Rigidly register groups of slices to a volume (see module docstring).

    Args:
        volume: ``(Ni, Nj, Nk)``; affine: its voxel-to-world ``(4, 4)``.
        poses: ``(M, 4, 4)`` current slice-to-world poses.
        coords, slice_id, values: ``(P, 3)`` slice-frame pixels, ``(P,)`` slice, ``(P,)`` intensity.
        psf: quadrature for the ``M`` slices.
        group: ``(M,)`` group of each slice (default: every slice its own group).
        weights: ``(P,)`` non-negative pixel weights (robust weights, masks).
        centres: ``(G, 3)`` rotation centres in world mm (default: weighted centroid of the group's pixels).
        sigmas: smoothing levels in mm, coarse to fine.
        iterations: LM iterations per level.
        fit_scale: re-fit a per-slice intensity scale every iteration (else 1).
        max_step: largest rotation (rad) / translation (mm) change per iteration, a trust region
            that keeps a bad linearisation from throwing a slice out of the volume.
    Returns:
        :class:`RegistrationResult`.
    """
    device, dtype = volume.device, volume.dtype
    M = poses.shape[0]
    group = torch.arange(M, device=device) if group is None else group.to(device)
    n_groups = int(group.max().item()) + 1
    weights = torch.ones_like(values) if weights is None else weights
    pix_group = group[slice_id]
    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)

    if centres is None:
        centres = slice_centres(poses, coords, slice_id, weights, group, n_groups)

    params = torch.zeros(n_groups, 6, device=device, dtype=dtype)
    lam = torch.full((n_groups,), 1e-3, device=device, dtype=dtype)
    ones_M = torch.ones(M, device=device, dtype=dtype)

    def current_poses(p):
        D = rotation_about(p, centres)
        return D[group] @ poses

    fused_costs = backend(device) == "numba" and dtype in (torch.float32, torch.float64)

    def costs(s):
        if fused_costs:
            a, r, c = fused.registration_costs(s, values, weights, slice_id, pix_group, M, n_groups, fit_scale)
            return c, r, a
        if fit_scale:
            num = torch.zeros(M, device=device, dtype=dtype).index_add_(0, slice_id, weights * s * values)
            den = torch.zeros(M, device=device, dtype=dtype).index_add_(0, slice_id, weights * s * s)
            a = torch.where(den > 1e-12, num / den.clamp_min(1e-12), ones_M).clamp(0.2, 5.0)
        else:
            a = ones_M
        r = a[slice_id] * s - values
        c = torch.zeros(n_groups, device=device, dtype=dtype).index_add_(0, pix_group, weights * r * r)
        n = torch.zeros(n_groups, device=device, dtype=dtype).index_add_(0, pix_group, weights)
        return c / n.clamp_min(1e-12), r, a

    cost = torch.zeros(n_groups, device=device, dtype=dtype)
    a = ones_M
    eye6 = torch.eye(6, device=device, dtype=dtype)
    for sigma in sigmas:
        smoothed = smooth(volume, sigma, spacing)
        # forward_jacobian reads channels of the prefiltered volume (acquisition.prefilter, once per
        # level); forward(smoothed) below applies the prefilter itself
        channels, _ = gradient_channels(prefilter(smoothed, affine, psf), affine)
        centres_sl = centres[group]
        s, J = forward_jacobian(channels, affine, current_poses(params), coords, slice_id, psf, centres_sl, chunk)
        cost, r, a = costs(s)
        H, b = _normal_equations(J, a[slice_id], weights, r, pix_group, n_groups)
        for it in range(iterations):
            diag = torch.diagonal(H, dim1=-2, dim2=-1)
            A = H + lam[:, None, None] * torch.diag_embed(diag) + 1e-9 * (diag.mean(-1, keepdim=True)[..., None] + 1e-12) * eye6
            delta = -torch.linalg.solve(A, b[..., None])[..., 0]
            delta = torch.nan_to_num(delta)
            # trust region: cap the step so one bad linearisation cannot fling a slice away
            rot_n = delta[:, :3].norm(dim=-1, keepdim=True)
            tr_n = delta[:, 3:].norm(dim=-1, keepdim=True)
            shrink = torch.minimum(max_step[0] / rot_n.clamp_min(1e-12), max_step[1] / tr_n.clamp_min(1e-12)).clamp(max=1.0)
            delta = delta * shrink
            # compose the increment with the current correction (both about the same centre)
            trial = _compose_params(delta, params, centres)
            last = it == iterations - 1  # its Jacobian would never be used: the level ends
            if last:
                s_new, J_new = forward(smoothed, affine, current_poses(trial), coords, slice_id, psf, chunk=chunk), None
            else:
                s_new, J_new = forward_jacobian(channels, affine, current_poses(trial), coords, slice_id, psf,
                                                centres_sl, chunk)
            cost_new, r_new, a_new = costs(s_new)
            # a step must lower the cost by more than float32 can resolve: accepting ties let the
            # rounding of one run (or one float32 ulp of the input geometry) steer the slices
            # whose cost is flat, so two runs on the same data in two encodings diverged
            accept = cost_new <= cost * (1 - MIN_DECREASE)
            params = torch.where(accept[:, None], trial, params)
            lam = torch.where(accept, (lam / 3).clamp_min(1e-6), (lam * 8).clamp_max(1e6))
            if not bool(accept.any()):
                break
            # each group's normal equations are sums over its own pixels, so the trial's are selected
            # per group: no per-pixel selection of the Jacobian, residuals and simulated values
            if not last:
                H_new, b_new = _normal_equations(J_new, a_new[slice_id], weights, r_new, pix_group, n_groups)
                H = torch.where(accept[:, None, None], H_new, H)
                b = torch.where(accept[:, None], b_new, b)
            a = torch.where(accept[group], a_new, a)
            cost = torch.where(accept, cost_new, cost)
        lam = torch.full_like(lam, 1e-3)
    D = rotation_about(params, centres)
    return RegistrationResult(poses=D[group] @ poses, corrections=D, cost=cost, scales=a)


def _compose_params(delta: Tensor, params: Tensor, centres: Tensor) -> Tensor:
    """Parameters (about ``centres``) of ``D(delta) @ D(params)``."""
    from slice2vol.core.transforms import matrix_to_params

    D = rotation_about(delta, centres) @ rotation_about(params, centres)
    # back to "about centre" parameters: t_c = t - c + R c
    p = matrix_to_params(D)
    R = D[:, :3, :3]
    p = p.clone()
    p[:, 3:] = D[:, :3, 3] - centres + (R @ centres[..., None])[..., 0]
    return p


def register_volumes(moving, fixed, fixed_mask: Tensor | None = None, sigmas=(4.0, 2.0, 1.0, 0.0),
                     iterations: int = 10, max_points: int = 200_000, initial: np.ndarray | None = None) -> np.ndarray:
    """Rigid volume-to-volume registration with the same core.

    Args:
        moving, fixed: :class:`~slice2vol.core.image.Volume`.
        fixed_mask: optional ``(Ni, Nj, Nk)`` bool in the fixed grid (default: ``fixed > 0``).
        initial: optional ``(4, 4)`` starting transform.
    Returns:
        ``(4, 4)`` float64 ``T`` mapping fixed-world points to moving-world points (the aligned
        moving image is ``moving`` sampled at ``T @ x`` for fixed-grid points ``x``).
    """
    dev = moving.data.device
    dtype = torch.float32
    m = (fixed.data > 0) if fixed_mask is None else fixed_mask.to(fixed.data.device).bool()
    idx = torch.nonzero(m, as_tuple=False)
    if idx.shape[0] > max_points:
        # deterministic subsample: every n-th voxel keeps the result reproducible
        idx = idx[:: int(np.ceil(idx.shape[0] / max_points))]
    A = torch.as_tensor(fixed.affine, dtype=torch.float64, device=idx.device)
    pts = (idx.to(torch.float64) @ A[:3, :3].T + A[:3, 3]).to(dev, dtype)
    vals = fixed.data[idx[:, 0], idx[:, 1], idx[:, 2]].to(dev, dtype)
    T0 = torch.eye(4, dtype=dtype, device=dev)[None] if initial is None else torch.as_tensor(initial, dtype=dtype, device=dev)[None]
    res_fixed = float(np.linalg.norm(fixed.affine[:3, :3], axis=0).mean())
    psf = psf_kernel(torch.tensor([[res_fixed, res_fixed]], device=dev), torch.tensor([res_fixed], device=dev), res_fixed, quality="thin")
    out = register(
        moving.data.to(dev, dtype), moving.affine, T0, pts, torch.zeros(pts.shape[0], dtype=torch.long, device=dev), vals, psf,
        sigmas=sigmas, iterations=iterations, fit_scale=True, max_step=(0.2, 5.0),
    )
    return out.poses[0].double().cpu().numpy()
