"""The motion-blind baseline ("naive"), defined once: the PSF-weighted average of the
(intensity-normalised) slices at their *header* poses on the prepared output grid, with the
acquisition model's PSF for that grid's resolution.  The benchmark's ``naive`` row, the
"before" slice consistency the CLI and report print, and the quality verdict's reference all
come from :func:`naive_baseline`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from slice2vol.core import acquisition as acq
from slice2vol.core.image import SliceSet
from slice2vol.core.reconstruction import psf_average

__all__ = ["NaiveBaseline", "naive_baseline"]


@dataclass
class NaiveBaseline:
    """``header``: the slices at their header poses; ``psf``: the PSF used; ``volume``: ``(Ni, Nj, Nk)``
    PSF average on ``prep``'s grid (``prep.affine``)."""

    header: SliceSet
    psf: Tensor
    volume: Tensor

    def simulate(self, affine: np.ndarray) -> Tensor:
        """``(P,)`` the header slices simulated back from :attr:`volume` (no slice scales)."""
        h = self.header
        return acq.forward(self.volume, affine, h.poses, h.coords, h.slice_id, self.psf)


def naive_baseline(prep) -> NaiveBaseline:
    """The baseline of a prepared problem (:class:`~slice2vol.core.preprocess.Prepared`)."""
    header = SliceSet.from_stacks(prep.stacks, device=prep.slices.device)
    res = float(np.linalg.norm(prep.affine[:3, :3], axis=0).mean())
    psf = acq.psf_kernel(header.psf_pixel, header.thickness, res)
    V = psf_average(header.values, torch.ones_like(header.values), prep.shape, prep.affine, header.poses,
                    header.coords, header.slice_id, psf)
    return NaiveBaseline(header, psf, V)
