"""Model-based volume reconstruction from posed slices, shared by every method.

* :func:`psf_average` -- the PSF-weighted initial volume (cSVR paper eq. 2).
* :func:`super_resolve` -- super-resolution reconstruction: minimise (cSVR eq. 3 with weights)::

      sum_p w_p (a_n (A V)_p - y_p)^2 + lam * sum_d sum_x b_d(x) (D_d V)(x)^2

  by conjugate gradients on the normal equations, where ``D_d`` are forward differences along
  the three axes and the face diagonals (SVRTK uses 13 directions; 9 here, see ``DIRECTIONS``),
  and ``b_d = 1 / sqrt(1 + ((D_d V0)/delta)^2)`` are edge-preserving weights from the current
  estimate ``V0`` (one iteratively-reweighted step per outer SVR iteration, the quadratic
  majoriser of the Huber-like edge-preserving prior SVRTK uses, so CG applies).  ``lam`` is
  relative: it multiplies the mean of ``A^T W A 1`` (the weighted coverage, i.e. the row sums of
  the data term) inside the mask so its effect does
  not depend on intensity units or slice counts.  The volume is restricted to a mask (voxels
  outside stay 0) and clamped at 0 after solving (magnitude images are non-negative).

* :func:`regularisation_for_noise` -- ``lam`` from the stacks' noise level
  (:mod:`slice2vol.core.noise`): the default 0.02 (tuned at 2 % noise) up to 4 % noise, half the
  relative noise above.
* :func:`edge_threshold_for_noise` -- the edge threshold ``delta`` (relative to the slices' 99th
  percentile) from the same noise level: twice the relative noise, at least 0.03; the previous
  fixed 0.1 where the noise estimate is not white.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from slice2vol.core import acquisition as acq
from slice2vol.core.acquisition import PSF
from slice2vol.core.stages import timed

__all__ = ["psf_average", "super_resolve", "normal_diag", "regularisation_for_noise", "edge_threshold_for_noise",
           "DEFAULT_LAM", "NOISE_LAM_SLOPE", "EDGE_DELTA", "EDGE_FLOOR", "EDGE_NOISE_SLOPE", "DIRECTIONS"]

log = logging.getLogger(__name__)

#: relative regularisation weight of :func:`super_resolve` at low noise (tuned at 2 % noise)
DEFAULT_LAM = 0.02
#: ``lam`` per unit of relative noise above the point where it exceeds :data:`DEFAULT_LAM`
NOISE_LAM_SLOPE = 0.5
#: edge threshold of :func:`super_resolve` relative to the 99th percentile of the slices, where the
#: noise is unknown or not white (SVRTK's delta 150 at its mean brain intensity 700 is about this)
EDGE_DELTA = 0.1
#: :func:`edge_threshold_for_noise`: lowest relative threshold, and threshold per unit of relative noise
EDGE_FLOOR = 0.03
EDGE_NOISE_SLOPE = 2.0


def regularisation_for_noise(noise: float | None, floor: float = DEFAULT_LAM, slope: float = NOISE_LAM_SLOPE) -> float:
    """Relative regularisation weight ``lam = max(floor, slope * noise)`` of :func:`super_resolve`.

    ``noise`` is the stacks' noise standard deviation relative to the mean brain intensity
    (:func:`slice2vol.core.noise.relative_noise`); ``None`` or NaN (no estimate) gives ``floor``.

    Why this rule (``benchmarks/bench_noise.py --sweep``, ``benchmarks/results/noise_sweep_cpu.txt``;
    classical SVR, 3 orthogonal moderate-motion 1 mm x 3 mm stacks, seed 0, ``lam`` on a grid
    0.01-0.32): on the training atlases STA24/30/36 the best ``lam`` was about half the noise above
    4 % noise (8 %: 0.04, 12 %: 0.08) and 0.01-0.02 below.  The rule, run with the estimated noise,
    against 0.02: training -0.03..+0.00 dB at 4 %, +0.57..+0.60 at 8 %, +1.26..+1.56 at 12 %;
    validation atlases (spina bifida, smoother anatomy) -0.16..+0.02, +1.02..+1.45, +2.15..+2.51,
    where the grid's best was up to 0.73 dB higher still (they wanted about the noise itself, a
    slope that cost the training atlases 0.20-0.54 dB at 4 %).  Below 4 % the floor stays even
    though ``lam`` 0.01 gained up to +0.86 dB at 1-2 % noise on the training atlases: correlated
    noise (in-plane interpolation by the scanner) reads low (:mod:`slice2vol.core.noise`), and an
    underestimate must not under-regularise.

    >>> regularisation_for_noise(0.02), regularisation_for_noise(0.08), regularisation_for_noise(float("nan"))
    (0.02, 0.04, 0.02)
    """
    if noise is None or not math.isfinite(noise):
        return floor
    return max(floor, slope * float(noise))


def edge_threshold_for_noise(noise: float | None, white: bool = True, floor: float = EDGE_FLOOR,
                             slope: float = EDGE_NOISE_SLOPE) -> float:
    """Edge threshold of :func:`super_resolve`, relative to the slices' 99th percentile:
    ``max(floor, slope * noise)``, or :data:`EDGE_DELTA` when ``noise`` is ``None``/NaN or not
    ``white`` (:func:`slice2vol.core.noise.coarse_ratio`).

    The edge weights ``1 / sqrt(1 + (gradient / delta)^2)`` leave a gradient well above ``delta``
    nearly unpenalised (an edge) and smooth one well below it (noise); so ``delta`` should follow the
    noise.  Why these numbers (default pipeline ``auto``, 3 orthogonal moderate-motion 1 mm x 3 mm
    stacks, seed 0, fixed thresholds 0.02-0.3; training atlases STA24/30/36 and validation atlases
    GA22_notoperated/GA27_operated/GA32_operated): the best threshold grew with the noise -- at 1 %
    0.02 (against the old 0.1: training +0.9..+2.4 dB, validation +0.3..+0.9), at 2 % 0.03-0.05
    (training +0.4..+1.0, validation +0.0..+0.4; severe motion GA22 -0.2 at 0.05), at 4 % 0.05
    (training) or 0.1 (validation), at 8-12 % 0.1-0.2 (training) or 0.2-0.3 (validation).  Slope 2
    sits between; the floor 0.03 keeps a threshold above the anatomy's fine texture when the noise
    reads very low.  On SVRTK's real phantom stacks, leaving each stack out of a reconstruction at
    fixed poses and predicting it, the held-out NCC rose monotonically from 0.9852 (0.1) to 0.9864
    (0.02); on a simulated case (STA30, 2 %) that check and PSNR both peaked at 0.03.  But the
    phantom's noise is not white (interpolated), so the rule keeps 0.1 for it: with noise correlated
    by in-plane interpolation the estimate reads 6-16x low (:mod:`slice2vol.core.noise`) and a
    threshold from it would keep noise as edges.  :func:`slice2vol.methods.svr.reconstruct_svr` uses
    it for the output's final solves only (``SVRConfig.edge``); results in ``benchmarks/bench_edge.py``.

    >>> edge_threshold_for_noise(0.01), edge_threshold_for_noise(0.02), edge_threshold_for_noise(0.08)
    (0.03, 0.04, 0.16)
    >>> edge_threshold_for_noise(0.02, white=False), edge_threshold_for_noise(None)
    (0.1, 0.1)
    """
    if noise is None or not math.isfinite(noise) or not white:
        return EDGE_DELTA
    return max(floor, slope * float(noise))


DIRECTIONS = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, -1, 0), (1, 0, 1), (1, 0, -1), (0, 1, 1), (0, 1, -1))


def _regions(shape, d):
    """Slices ``(src, dst)`` such that ``x[src]`` is ``x[i + d]`` for every ``i`` in ``x[dst]``."""
    src = tuple(slice(max(0, k), n + min(0, k)) for n, k in zip(shape, d))
    dst = tuple(slice(max(0, -k), n + min(0, -k)) for n, k in zip(shape, d))
    return src, dst


def _edge_weights(volume: Tensor, delta: float) -> list[Tensor]:
    """``b_d = 1 / sqrt(1 + (D_d V / delta)^2)`` on the valid region of each direction."""
    out = []
    for d in DIRECTIONS:
        src, dst = _regions(volume.shape, d)
        g = (volume[src] - volume[dst]) / (sum(k * k for k in d) ** 0.5)
        out.append(torch.rsqrt(1.0 + (g / delta) ** 2) / sum(k * k for k in d))
    return out


def _regulariser(v: Tensor, edge: list[Tensor]) -> Tensor:
    """Gradient (halved) of ``sum_d sum_x b_d(x) (v(x + d) - v(x))^2 / |d|^2``."""
    out = torch.zeros_like(v)
    for d, b in zip(DIRECTIONS, edge):
        src, dst = _regions(v.shape, d)
        g = (v[src] - v[dst]) * b
        out[src] += g
        out[dst] -= g
    return out


def _regulariser_diag(v: Tensor, edge: list[Tensor]) -> Tensor:
    """Diagonal of the (halved) regulariser's operator :func:`_regulariser`: ``sum_d b_d`` over the
    pairs each voxel belongs to."""
    out = torch.zeros_like(v)
    for d, b in zip(DIRECTIONS, edge):
        src, dst = _regions(v.shape, d)
        out[src] += b
        out[dst] += b
    return out


@timed("reconstruction")
def psf_average(values, weights, shape, affine, poses, coords, slice_id, psf: PSF, eps: float = 1e-6) -> Tensor:
    """PSF-weighted average of slices in a volume (cSVR eq. 2), ``(Ni, Nj, Nk)``.

    Voxels no slice reaches are 0; :func:`normal_diag` gives the coverage itself.
    """
    num = acq.adjoint(values * weights, shape, affine, poses, coords, slice_id, psf)
    den = acq.adjoint(weights, shape, affine, poses, coords, slice_id, psf)
    return torch.where(den > eps * den.max().clamp_min(1e-12), num / den.clamp_min(1e-12), torch.zeros_like(num))


def normal_diag(weights, shape, affine, poses, coords, slice_id, psf: PSF) -> Tensor:
    """Coverage ``A^T w``: how much slice weight reaches each voxel, ``(Ni, Nj, Nk)``."""
    return acq.adjoint(weights, shape, affine, poses, coords, slice_id, psf)


@timed("reconstruction")
def super_resolve(
    volume: Tensor,
    affine,
    poses: Tensor,
    coords: Tensor,
    slice_id: Tensor,
    values: Tensor,
    psf: PSF,
    weights: Tensor | None = None,
    scales: Tensor | None = None,
    mask: Tensor | None = None,
    lam: float = DEFAULT_LAM,
    delta: float | None = None,
    edge: float = EDGE_DELTA,
    iterations: int = 10,
    tol: float = 1e-4,
    precondition: bool = False,
) -> Tensor:
    """Conjugate-gradient super-resolution reconstruction (module docstring).

    Args:
        volume: ``(Ni, Nj, Nk)`` starting estimate (also sets the edge weights).
        affine: voxel-to-world ``(4, 4)``.
        poses, coords, slice_id, values, psf: the slices (see :mod:`slice2vol.core.acquisition`).
        weights: ``(P,)`` pixel weights (robust statistics x masks), default 1.
        scales: ``(M,)`` per-slice intensity scales ``a_n``, default 1.
        mask: ``(Ni, Nj, Nk)`` bool region to reconstruct, default everything.
        lam: relative regularisation weight.
        delta: edge threshold in intensity units (default: ``edge`` x the 99th percentile of ``values``).
        edge: the threshold relative to that percentile when ``delta`` is not given
            (:func:`edge_threshold_for_noise`).
        iterations: CG iterations.
        precondition: preconditioned CG with a diagonal preconditioner: the data term's row sums
            ``A^T W A 1`` (a bound on its diagonal that costs nothing: it is computed anyway) plus
            the regulariser's diagonal, so voxels seen by many slices and voxels at the edge of the
            coverage converge at similar rates.
    Returns:
        ``(Ni, Nj, Nk)`` non-negative volume.
    """
    shape = tuple(volume.shape)
    w = torch.ones_like(values) if weights is None else weights
    a = torch.ones(poses.shape[0], dtype=values.dtype, device=values.device) if scales is None else scales
    ap = a[slice_id]
    m = torch.ones_like(volume) if mask is None else mask.to(volume.dtype)
    if delta is None:
        delta = edge * float(torch.quantile(values[:: max(1, values.numel() // 100000)], 0.99))
    delta = max(delta, 1e-6)
    proj = acq.Projector(shape, affine, poses, coords, slice_id, psf, dtype=values.dtype)
    wa2 = w * ap * ap

    def data_term(v):
        return proj.adjoint(wa2 * proj.forward(v * m)) * m

    edge = _edge_weights(volume, delta)
    diag = data_term(m)
    scale = float(diag[m > 0].mean()) if bool((m > 0).any()) else 1.0
    lam_eff = lam * scale

    def normal(v):
        return data_term(v) + lam_eff * _regulariser(v, edge) * m

    rhs = proj.adjoint(w * ap * values) * m
    x = volume * m
    r = rhs - normal(x)
    if precondition:
        # row sums of the normal operator: data term (``diag``, already A^T W A m) plus the
        # regulariser's diagonal; floored so voxels no slice reaches stay well scaled
        rows = diag + lam_eff * _regulariser_diag(volume, edge) * m
        floor = 1e-3 * float(rows[m > 0].mean()) if bool((m > 0).any()) else 1.0
        inv = torch.where(m > 0, 1.0 / rows.clamp_min(max(floor, 1e-30)), torch.zeros_like(rows))
    else:
        inv = None
    z = r * inv if inv is not None else r
    p = z.clone()
    rs = torch.sum(r * z)
    rr0 = float(torch.sum(r * r))
    for it in range(iterations):
        Ap = normal(p)
        alpha = rs / torch.sum(p * Ap).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * Ap
        if float(torch.sum(r * r)) < tol * tol * rr0:
            break
        z = r * inv if inv is not None else r
        rs_new = torch.sum(r * z)
        p = z + (rs_new / rs) * p
        rs = rs_new
    return x.clamp_min(0)
