"""In-plane resolution of stored stacks: finding scanner interpolation (k-space zero filling).

Scanners often store a slice on a finer grid than it was acquired on: the k-space of, say, a
1.4 mm acquisition is padded with zeros and reconstructed at 0.7 mm (Siemens "interpolation",
GE "ZIP", a Philips reconstruction matrix above the acquisition matrix).  The stored pixel spacing
then understates the in-plane blur by the padding factor, and a PSF built from it (FWHM 1.2 x the
stored pixel, :func:`slice2vol.core.acquisition.psf_kernel`, SVRTK's and NeSVoR's convention) is
too sharp: the reconstruction has to carry the missing blur itself.  On simulated 1.4 mm stacks
stored at 0.7 mm the PSF of the acquired pixel gained +1.25..+1.67 dB on the test atlases
(``benchmarks/bench_inplane.py``; README "In-plane resolution").

Signature.  Zero filling leaves nothing above the acquired band: along an in-plane axis the power
spectrum of the stored slices falls by orders of magnitude within a few hundredths of a cycle per
pixel at ``f_c = 0.5 / factor`` and stays there (noise included: it was padded too).  A slice
stored as acquired has no such cliff: its noise fills the band up to Nyquist, and without noise the
spectrum of anatomy blurred by a Gaussian PSF falls smoothly.  :func:`spectral_cliff` scans
``f_c`` over ``[CLIFF_MIN_F, CLIFF_MAX_F]`` for the largest ratio of the mean power in the band
just below to that just above (:data:`CLIFF_BAND` wide, :data:`CLIFF_GAP` away from ``f_c``) or,
if larger, to the mean power everywhere above.  Measured before any test-set run (training STA30,
validation GA22 / GA27 at 0, 2 and 8 % noise, 1 mm pixels; SVRTK's phantom stacks): stacks stored as
acquired 1.6-10.1 (phantom 2.8-5.1); stored zero-filled x1.5 or x2 78-771, the factor within 4 %;
bilinear upsampling x2 with noise 4.6-17.  :data:`CLIFF_MIN_CONTRAST` (30) sits between.

Not detected (give ``--inplane-resolution``): interpolation by a spatial kernel (bilinear,
bicubic: the spectrum dips at Nyquist instead of ending at ``f_c``, and the factor cannot be read
from it; without noise a bilinear x2 reads 30-57, as a zero filling of x2.5-2.9, which is about its
total blur); factors below ``0.5 / CLIFF_MAX_F`` (1.19), whose PSF change is small, or above
``0.5 / CLIFF_MIN_F`` (2.8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["CLIFF_MIN_CONTRAST", "InplaneEstimate", "line_spectrum", "spectral_cliff", "estimate_inplane",
           "fourier_resize"]

#: Lowest and highest cut-off searched, cycles per stored pixel (padding factors 2.8 .. 1.19).
CLIFF_MIN_F = 0.18
CLIFF_MAX_F = 0.42
#: Width of the bands compared on either side of a candidate cut-off, and their distance from it.
CLIFF_BAND = 0.04
CLIFF_GAP = 0.01
#: Power ratio across the cut-off above which a stack counts as zero-filled (see module doc).
CLIFF_MIN_CONTRAST = 30.0
#: Fewest pixels along an axis for a spectrum fine enough to place a cliff (0.03 cycles/pixel).
MIN_LINE = 32


@dataclass
class InplaneEstimate:
    """What :func:`estimate_inplane` found for one stack, per in-plane axis ``(i, j)``.

    Attributes:
        factor: the padding factor (1.0: stored as acquired, or not measurable).
        cutoff: the cliff's frequency, cycles per stored pixel (``None``: no cliff).
        contrast: the power ratio across it (``None``: axis too short to measure).
    """

    factor: tuple[float, float]
    cutoff: tuple[float | None, float | None]
    contrast: tuple[float | None, float | None]

    @property
    def interpolated(self) -> bool:
        return any(f > 1.0 for f in self.factor)

    def record(self) -> dict:
        """JSON-ready form."""
        return {"factor": list(self.factor), "cutoff_cycles_per_pixel": list(self.cutoff),
                "contrast": list(self.contrast)}


def line_spectrum(slices: Tensor | np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean power spectrum of the lines of ``slices`` ``(N, H, W)`` along ``axis`` (1: ``H``, 2: ``W``).

    Each line has its mean removed and a Hann window applied (a line's ends would otherwise leak
    broadband power over the band a cliff leaves empty).  Returns ``(frequencies in cycles per pixel,
    power)``, both ``(L // 2 + 1,)``.
    """
    x = slices.detach().cpu().double().numpy() if isinstance(slices, Tensor) else np.asarray(slices, np.float64)
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    x = (x - x.mean(-1, keepdims=True)) * np.hanning(n)
    power = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    return np.fft.rfftfreq(n), power.reshape(-1, power.shape[-1]).mean(0)


def spectral_cliff(freq: np.ndarray, power: np.ndarray) -> tuple[float, float]:
    """``(contrast, cutoff)`` of the steepest fall of ``power`` over ``f`` in ``[CLIFF_MIN_F, CLIFF_MAX_F]``.

    The contrast at ``f`` is the mean power in ``[f - gap - band, f - gap)`` over the larger of the
    mean powers in ``(f + gap, f + gap + band]`` and in ``(f + gap, 0.5]``: a cliff must fall *and*
    leave the band above it empty up to Nyquist (a bilinear interpolation's aliased copies fill it,
    and without noise its spectrum has a steep shoulder near 0.2 cycles/pixel that would otherwise
    read as a cliff)."""
    grid = np.arange(CLIFF_MIN_F, CLIFF_MAX_F + 1e-9, 0.0025)
    ratios = np.zeros(len(grid))
    for n, f in enumerate(grid):
        below = power[(freq >= f - CLIFF_GAP - CLIFF_BAND) & (freq < f - CLIFF_GAP)]
        above = power[(freq > f + CLIFF_GAP) & (freq <= f + CLIFF_GAP + CLIFF_BAND)]
        rest = power[freq > f + CLIFF_GAP]
        if below.size and above.size:
            ratios[n] = float(below.mean()) / max(float(above.mean()), float(rest.mean()), 1e-300)
    k = int(np.argmax(ratios))
    if ratios[k] <= 0:
        return 0.0, float("nan")
    # place the cliff on the spectrum itself: where the power first falls below the geometric
    # mean of the levels on either side (the band ratio is near its peak for any f within the gap)
    f = grid[k]
    live = float(power[(freq >= f - CLIFF_GAP - CLIFF_BAND) & (freq < f - CLIFF_GAP)].mean())
    level = math.sqrt(live * live / ratios[k])
    near = np.nonzero((freq >= f - CLIFF_GAP - CLIFF_BAND / 2) & (freq <= f + CLIFF_GAP + CLIFF_BAND / 2))[0]
    df = float(freq[1] - freq[0])
    for n in near:
        if power[n] < level and n > 0:
            # the Hann window's main lobe carries the live power about a bin past the edge
            return float(ratios[k]), float(freq[n] - 1.5 * df)
    return float(ratios[k]), float(f)


def estimate_inplane(slices: Tensor | np.ndarray) -> InplaneEstimate:
    """The in-plane zero-filling factor of a stack's stored slices ``(N, H, W)``, per axis.

    A factor above 1 means the slices were acquired with pixels ``factor`` times the stored ones
    (the PSF should use those).  Axes shorter than :data:`MIN_LINE` pixels are not measured.
    """
    factor, cutoff, contrast = [1.0, 1.0], [None, None], [None, None]
    for k, axis in enumerate((1, 2)):
        if slices.shape[axis] < MIN_LINE:
            continue
        c, f = spectral_cliff(*line_spectrum(slices, axis))
        contrast[k] = c
        if c >= CLIFF_MIN_CONTRAST and math.isfinite(f):
            cutoff[k] = f
            factor[k] = 0.5 / f
    return InplaneEstimate(tuple(factor), tuple(cutoff), tuple(contrast))  # type: ignore[arg-type]


def fourier_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Real slices ``x (N, H, W)`` on ``size = (h, w)`` pixels by zero-padding (zero filling, as scanners
    interpolate) or cutting (undoing it) their centred 2D spectrum, per axis; scaled by
    ``h * w / (H * W)`` so intensities keep their level.  Pixel 0 stays where it was (the DFT's
    samples are anchored there): the zero frequency, at index ``n // 2`` after ``fftshift``, is
    placed at ``h // 2``.  Returns the complex ``(N, h, w)`` (complex128) result; callers take the
    magnitude (a scanner's image) or the real part.

    Zero filling by 2 keeps the acquired samples (on every second pixel), and cutting the spectrum
    back returns them (odd sizes here: an even one has an unpaired Nyquist frequency):

    >>> x = torch.rand(2, 7, 5, dtype=torch.float64)
    >>> z = fourier_resize(x, (14, 10)).real
    >>> torch.allclose(z[:, ::2, ::2], x), torch.allclose(fourier_resize(z, (7, 5)).real, x)
    (True, True)
    """
    N, H, W = x.shape
    h, w = size
    X = torch.fft.fftshift(torch.fft.fft2(x.to(torch.float64)), dim=(-2, -1))
    out = torch.zeros(N, h, w, dtype=X.dtype, device=X.device)

    def spans(old: int, new: int) -> tuple[slice, slice]:
        """``(source, destination)`` index ranges along one axis."""
        if new <= old:
            return slice(old // 2 - new // 2, old // 2 - new // 2 + new), slice(None)
        return slice(None), slice(new // 2 - old // 2, new // 2 - old // 2 + old)

    (si, di), (sj, dj) = spans(H, h), spans(W, w)
    out[:, di, dj] = X[:, si, sj]
    return torch.fft.ifft2(torch.fft.ifftshift(out, dim=(-2, -1))) * (h * w / (H * W))
