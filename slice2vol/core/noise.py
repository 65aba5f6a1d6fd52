"""Noise level of thick-slice stacks, for noise-adaptive regularisation.

Fetal single-shot T2 stacks differ widely in signal-to-noise ratio (field strength, coil, maternal
body habitus, acceleration), and the super-resolution's regularisation weight that suits one
noise level over- or under-smooths another (:func:`slice2vol.core.reconstruction.regularisation_for_noise`).

Estimator (Immerkaer, "Fast noise variance estimation", CVIU 1996, in its robust form): the 3x3
kernel ``[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]`` (the difference of two Laplacians) cancels
intensity that is locally quadratic, so on smooth anatomy its response is mostly noise; white noise
of standard deviation ``s`` gives responses of standard deviation ``6 s`` (the kernel's L2 norm).
We take the median absolute response over the pixels inside the (eroded) brain mask divided by
``0.6745 * 6`` -- the median, not Immerkaer's mean, keeps edges and fine anatomy (heavy tails) out
-- and report it relative to the mean intensity inside the mask, the unit our simulator's
``noise`` is given in.  scikit-image's ``estimate_sigma`` (the wavelet MAD of Donoho) has no mask:
outside the brain our stacks are zero (simulated, skull-stripped) or background with a different,
Rician noise, which would bias it.

Measured on simulated stacks (:mod:`slice2vol.simulation.simulate`, GA22_notoperated and STA30,
3 orthogonal 1 mm x 3 mm stacks, no and moderate motion): noise 0.01 / 0.02 / 0.04 / 0.08 / 0.12
read 0.0107-0.0111 / 0.0207-0.0210 / 0.0403-0.0416 / 0.0804-0.0824 / 0.1199-0.1232; noise-free
stacks read 0.0013-0.0020 (the anatomy's own curvature at 1 mm).  SVRTK's six phantom stacks
(real anatomy, automatic masks) read 0.0085-0.0112.

Pitfall: noise that is correlated between neighbouring pixels -- in-plane interpolation by the
scanner (e.g. a 1.4 mm acquisition stored at 0.7 mm) -- has less energy at the kernel's frequencies,
so it reads lower than it is: STA30 stacks at 2 % / 8 % noise, upsampled 2x in-plane, read 0.0013 /
0.0051 (bilinear) and 0.0022 / 0.0087 (bicubic).  Estimating on every second pixel instead only
partly undid it (bilinear 0.0082 / 0.0308) and made 1 mm stacks read high (noise-free 0.014, 2 %:
0.029: anatomy at 2 mm), so it was not kept.  The regularisation rule therefore never goes below its
default, and ``--regularisation`` is there for interpolated noisy scans.

Where the acquired pixel is known -- zero filling detected from the spectrum
(:mod:`slice2vol.core.inplane`) or given (``--inplane-resolution``) -- the estimate is taken on the
acquired grid (:func:`acquired_grid`, :data:`ACQUIRED_GRID`): the stored spectrum cut to the
acquired band undoes zero filling exactly, and the noise is white again.  GA22_notoperated and
STA30, 3 moderate-motion stacks acquired at 1.4 mm, 2 % / 8 % noise: stored zero-filled at 0.7 mm
they read 0.0032 / 0.0121 (coarse ratio 6.8-7.0, not white) on the stored grid, 0.0223-0.0225 /
0.0818-0.0820 (ratio 1.2-1.9) on the acquired one, as the same stacks stored as acquired
(0.0223-0.0226 / 0.0828).  Spatially interpolated stacks (bilinear) are not detected and still read
low; with ``--inplane-resolution`` they are estimated on the acquired grid too, where their band is
attenuated rather than cut (not measured).

White or not (:func:`coarse_ratio`): the same estimate on every second pixel in-plane, divided by
the full-resolution one.  White noise reads about the same on both grids; noise correlated by
interpolation, and noise so low that the anatomy's curvature dominates, read several times higher
on the coarse grid.  Measured (STA30, GA22_notoperated, 3 moderate-motion 1 mm x 3 mm stacks; median
over stacks): white noise 1 / 2 / 4 / 8 % 1.84-1.85 / 1.35-1.41 / 1.15-1.16 / 1.04-1.05; noise-free
8.0-9.1; upsampled 2x in-plane (bilinear or bicubic) at 0-8 % noise 6.0-12.5; SVRTK's phantom
stacks 6.6.  Above :data:`WHITE_RATIO_MAX` the estimate is not trusted to set the super-resolution's
edge threshold (:func:`slice2vol.core.reconstruction.edge_threshold_for_noise`).
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch
import torch.nn.functional as F

from slice2vol.core.geometry import count_round
from slice2vol.core.image import Stack
from slice2vol.core.inplane import fourier_resize

__all__ = ["MIN_NOISE_PIXELS", "WHITE_RATIO_MAX", "stack_noise", "relative_noise", "coarse_ratio", "acquired_grid"]

#: estimate on the acquired pixel grid where a stack's PSF pixel is coarser than its stored one
#: (:func:`acquired_grid`); False restores the estimate on the stored grid, for A/B runs
ACQUIRED_GRID = True
#: fewest interior mask pixels from which a stack's noise is estimated (else NaN)
MIN_NOISE_PIXELS = 1000
_KERNEL = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_MAD_TO_SD = 0.6745  # median |x| of a standard normal
#: largest :func:`coarse_ratio` of an estimate taken as white noise (white 1-8 %: 1.0-1.9; interpolated
#: or noise-free: 6-12)
WHITE_RATIO_MAX = 3.0


def stack_noise(stack: Stack, step: int = 1) -> float:
    """Noise standard deviation of one stack relative to its mean intensity inside the mask.

    Args:
        stack: a :class:`~slice2vol.core.image.Stack`; ``slices (N, H, W)`` and ``mask (N, H, W)``.
        step: estimate on every ``step``-th pixel in-plane (1: all; 2: :func:`coarse_ratio`).
    Returns:
        ``sd / mean`` (dimensionless; 0.02 = 2 %), or NaN when fewer than :data:`MIN_NOISE_PIXELS`
        pixels have their whole 3x3 neighbourhood inside the mask, or the mean is not positive.

    >>> import numpy as np
    >>> g = torch.Generator().manual_seed(0)
    >>> x = 100 + 5 * torch.randn(4, 64, 64, generator=g)
    >>> st = Stack(x, torch.ones_like(x, dtype=torch.bool), np.tile(np.eye(4), (4, 1, 1)), (1.0, 1.0), 3.0,
    ...            np.eye(4), np.arange(4))
    >>> round(stack_noise(st), 2)
    0.05
    """
    x = stack.slices.detach().to(torch.float32)
    m = stack.mask.to(torch.float32)
    if x.ndim != 3 or x.shape != m.shape:
        raise ValueError(f"stack_noise: slices {tuple(x.shape)} and mask {tuple(m.shape)} must be the same (N, H, W)")
    if ACQUIRED_GRID:
        x, m = acquired_grid(x, m, stack.spacing, stack.psf_pixel)
    if step > 1:
        x, m = x[:, ::step, ::step], m[:, ::step, ::step]
    if min(x.shape[1:]) < 3:
        return float("nan")
    inside = m > 0
    mean = float(x[inside].mean()) if bool(inside.any()) else 0.0
    # pixels whose whole 3x3 neighbourhood is in the mask: the response sees no mask edge
    interior = -F.max_pool2d(-m[:, None], 3, 1, 0)[:, 0] > 0.5
    if int(interior.sum()) < MIN_NOISE_PIXELS or not mean > 0:
        return float("nan")
    r = F.conv2d(x[:, None], _KERNEL.to(x.device)[None, None])[:, 0]
    return float(r[interior].abs().median()) / (_MAD_TO_SD * 6.0) / mean


def acquired_grid(x: torch.Tensor, m: torch.Tensor, spacing, pixel) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices ``x (N, H, W)`` and mask ``m`` brought back to the acquired pixel ``pixel`` (mm) from the
    stored ``spacing``, where it is coarser: the spectrum is cut to the acquired band
    (``H * spacing / pixel`` frequencies per axis) and transformed back on that many pixels (scaled
    so the mean intensity stays; :func:`slice2vol.core.inplane.fourier_resize`); the mask is sampled
    at the new pixel centres (nearest).  Scanner zero filling is exactly undone, so the noise is white again (module docstring).  Unchanged
    where ``pixel`` is not coarser than ``spacing`` by more than 5 %.
    """
    H, W = x.shape[1:]
    h = min(H, max(3, count_round(H * float(spacing[0]) / float(pixel[0]))))
    w = min(W, max(3, count_round(W * float(spacing[1]) / float(pixel[1]))))
    if h >= 0.95 * H and w >= 0.95 * W:
        return x, m
    y = fourier_resize(x, (h, w)).real
    mm = torch.nn.functional.interpolate(m[:, None], size=(h, w), mode="nearest")[:, 0]
    return y.to(x.dtype), mm


def relative_noise(stacks: Sequence[Stack]) -> tuple[float, list[float]]:
    """Median of :func:`stack_noise` over the stacks that have an estimate, and every stack's.

    Returns:
        ``(median, per_stack)``; the median is NaN when no stack has an estimate.
    """
    per = [stack_noise(st) for st in stacks]
    ok = sorted(v for v in per if math.isfinite(v))
    if not ok:
        return float("nan"), per
    return float(statistics.median(ok)), per


def coarse_ratio(stacks: Sequence[Stack], fine: Sequence[float] | None = None) -> float:
    """Median over the stacks of :func:`stack_noise` on every second pixel over the full-resolution
    estimate (module docstring: about 1-2 for white noise, 6 and more for interpolated or
    noise-free stacks); NaN when no stack has both estimates.  ``fine``: the full-resolution
    estimates when already known (:func:`relative_noise`'s ``per_stack``)."""
    full = list(fine) if fine is not None else [stack_noise(st) for st in stacks]
    r = []
    for st, f in zip(stacks, full):
        if math.isfinite(f) and f > 0:
            coarse = stack_noise(st, step=2)
            if math.isfinite(coarse):
                r.append(coarse / f)
    return float(statistics.median(r)) if r else float("nan")
