"""Robust statistics for slice outliers (Kuklisova-Murgasova et al. 2012, as in SVRTK).

Two nested mixtures, estimated by EM on the residuals ``e_p = y_p - a_n s_p``:

* pixel level: inlier residuals ~ N(0, sigma^2), outliers ~ uniform over the intensity range;
  ``p_p`` is the posterior inlier probability of each pixel;
* slice level: the slice potential ``sqrt(mean_p (1 - p_p)^2)`` (how much of the slice the pixel
  level rejects) is modelled by an inlier and an outlier Gaussian; ``q_n`` is the posterior
  inlier probability of each slice.  Slices with ``q_n < 0.5`` are reported as excluded.

The weights used by reconstruction and registration are ``p_p * q_n``.  Per-slice intensity
scales ``a_n`` are the weighted least-squares fit of simulated to acquired intensities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from slice2vol.core.stages import timed

__all__ = ["RobustState", "fit_scales", "em_weights"]


@dataclass
class RobustState:
    """Pixel weights ``(P,)``, slice weights ``(M,)``, inlier sigma, mixing proportions, and which
    slices had enough pixels to be judged (``valid (M,)``)."""

    pixel: Tensor
    slice: Tensor
    sigma: float
    inlier_fraction: float
    valid: Tensor | None = None

    def combined(self, slice_id: Tensor) -> Tensor:
        return self.pixel * self.slice[slice_id]

    def excluded(self) -> Tensor:
        """``(M,)`` bool: slices judged outliers (slices without pixels are not counted)."""
        out = self.slice < 0.5
        return out if self.valid is None else out & self.valid


def fit_scales(simulated: Tensor, values: Tensor, slice_id: Tensor, n_slices: int, weights: Tensor | None = None,
               bounds: tuple[float, float] = (0.2, 5.0)) -> Tensor:
    """Least-squares per-slice scale ``a_n`` with ``a_n s ~ y``; 1 where a slice has no signal."""
    w = torch.ones_like(values) if weights is None else weights
    num = torch.zeros(n_slices, dtype=values.dtype, device=values.device).index_add_(0, slice_id, w * simulated * values)
    den = torch.zeros(n_slices, dtype=values.dtype, device=values.device).index_add_(0, slice_id, w * simulated * simulated)
    a = torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.ones_like(den))
    return a.clamp(*bounds)


def _gauss(x: Tensor, mu, sd) -> Tensor:
    return torch.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


@timed("robust")
def em_weights(residual: Tensor, slice_id: Tensor, n_slices: int, intensity_range: float,
               state: RobustState | None = None, iterations: int = 5, min_pixels: int = 10) -> RobustState:
    """EM for the pixel and slice mixtures.

    Args:
        residual: ``(P,)`` ``y - a s``.
        slice_id: ``(P,)``.
        intensity_range: width of the uniform outlier density (max - min acquired intensity).
        state: previous estimate to start from.
        min_pixels: slices with fewer pixels get weight 0 (too little evidence to place them).
    """
    dev, dt = residual.device, residual.dtype
    m_out = 1.0 / max(intensity_range, 1e-6)
    e2 = residual * residual
    if state is None:
        sigma2 = float(e2.mean().clamp_min(1e-12))
        c = 0.9
        q = torch.ones(n_slices, device=dev, dtype=dt)
    else:
        sigma2, c, q = state.sigma**2, state.inlier_fraction, state.slice
    for _ in range(iterations):
        g = torch.exp(-0.5 * e2 / sigma2) / math.sqrt(2 * math.pi * sigma2)
        p = c * g / (c * g + (1 - c) * m_out)
        wq = q[slice_id]
        sigma2 = float((wq * p * e2).sum() / (wq * p).sum().clamp_min(1e-12))
        sigma2 = max(sigma2, 1e-12)
        c = float((wq * p).sum() / wq.sum().clamp_min(1e-12))
        c = min(max(c, 1e-3), 1 - 1e-3)
    counts = torch.zeros(n_slices, device=dev, dtype=dt).index_add_(0, slice_id, torch.ones_like(p))
    pot = torch.zeros(n_slices, device=dev, dtype=dt).index_add_(0, slice_id, (1 - p) ** 2)
    pot = torch.sqrt(pot / counts.clamp_min(1))
    valid = counts >= min_pixels
    q = _slice_mixture(pot, valid, float(counts[valid].median()) if bool(valid.any()) else 1.0)
    return RobustState(pixel=p, slice=q, sigma=math.sqrt(sigma2), inlier_fraction=c, valid=counts > 0)


def _slice_mixture(pot: Tensor, valid: Tensor, counts_median: float, iterations: int = 10) -> Tensor:
    """Posterior inlier probability of slice potentials.

    Inlier potentials ~ N(mu, sd) with ``mu``/``sd`` started from the median and MAD, outliers
    uniform on [0, 1] (the potential's range).  A two-Gaussian mixture, as in the original
    paper, splits a unimodal set of potentials in half when no slice is corrupted; the
    Gaussian-plus-uniform form excludes only slices far from the bulk.
    """
    q = torch.zeros_like(pot)
    x = pot[valid]
    if x.numel() < 4:
        q[valid] = 1.0
        return q
    # One rejected pixel among n raises a slice's potential by about 1/sqrt(n); the inlier spread
    # is floored there so a slice is never dropped for a handful of outlier pixels.
    floor = float(min(0.5, 2.0 / max(float(counts_median), 1.0) ** 0.5))
    mu = x.median()
    sd = (1.4826 * (x - mu).abs().median()).clamp_min(floor)
    pi_in = torch.tensor(0.9, dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        gi = pi_in * _gauss(x, mu, sd)
        inl = gi / (gi + (1 - pi_in)).clamp_min(1e-30)
        inl = torch.where(x <= mu, torch.ones_like(inl), inl)
        mu = (inl * x).sum() / inl.sum().clamp_min(1e-6)
        sd = (((inl * (x - mu) ** 2).sum() / inl.sum().clamp_min(1e-6)).sqrt()).clamp_min(floor)
        pi_in = inl.mean().clamp(0.5, 0.999)
    q[valid] = inl
    return q
