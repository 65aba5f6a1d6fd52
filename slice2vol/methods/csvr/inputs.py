"""Input normalisation of the cSVR network: what the stacks look like when they enter it.

The network was trained on slices in a fixed form, so every caller (training, validation,
inference) goes through :func:`prepare_inputs`:

1. **Crop** each stack in-plane to the bounding box of its brain mask (over all its slices) plus
   ``margin_px`` pixels: maternal tissue and empty field of view carry no information and cost time.
2. **Resample** the cropped slices to the network's working in-plane spacing (``spacing`` mm,
   2 mm for the shipped model; antialiased bilinear, the same number of pixels along an axis
   for all slices of a stack).  The new slice centre is the crop centre, so every pose changes by
   the fixed in-plane offset recorded in :attr:`StackInput.offset`; :func:`to_original_poses`
   undoes it.  Masks are resampled the same way and thresholded at 0.5.
3. **Intensities**: divided by the stack's median inside the mask, multiplied by the mask
   (background 0), clipped to ``[0, 4]``; the mask is the second input channel.
4. **Centring**: all header (nominal) poses are translated by ``-centre``, the mean world
   position of all masked pixels of all stacks.  The network's feature volumes are cubes around
   the origin, so it needs the brain roughly centred; it does not need a stack-to-stack
   registration.  It does assume that the world frame is roughly the brain's anatomical (RAS)
   frame, as in the atlases it was trained on: stack orientations enter through their header
   rotation (eq. 8), and the learned anatomy prior is orientation specific.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slice2vol.core.geometry import count_round, slice_pixel_coords
from slice2vol.core.image import Stack
from slice2vol.errors import Slice2VolError

__all__ = ["StackInput", "NetworkInput", "prepare_inputs", "to_original_poses", "to_network_poses"]


@dataclass
class StackInput:
    """One stack in network form.

    Attributes:
        images: ``(N, 2, H, W)`` float32: normalised masked intensity, mask.
        mask: ``(N, H, W)`` float32 in {0, 1}.
        poses: ``(N, 4, 4)`` float32 nominal slice-to-world poses of the cropped slices, centred
            (world minus :attr:`NetworkInput.centre`), mm.
        spacing: ``(dx, dy)`` working pixel spacing mm.
        offset: ``(4, 4)`` float64: cropped slice frame -> original slice frame (an in-plane shift).
    """

    images: Tensor
    mask: Tensor
    poses: Tensor
    spacing: tuple[float, float]
    offset: np.ndarray


@dataclass
class NetworkInput:
    """All stacks plus the world centre (``(3,)`` float64 mm) that was subtracted from the poses."""

    stacks: list[StackInput]
    centre: np.ndarray

    @property
    def n_slices(self) -> int:
        return sum(int(s.images.shape[0]) for s in self.stacks)

    def to(self, device: torch.device | str) -> "NetworkInput":
        """The same input with its tensors on ``device``."""
        return NetworkInput([StackInput(s.images.to(device), s.mask.to(device), s.poses.to(device), s.spacing, s.offset)
                             for s in self.stacks], self.centre)


def _crop_box(mask: Tensor, margin: int) -> tuple[int, int, int, int]:
    """In-plane bounding box ``(i0, i1, j0, j1)`` (inclusive) of a stack mask ``(N, H, W)``."""
    N, H, W = mask.shape
    any_ij = mask.any(0)
    if not bool(any_ij.any()):
        return 0, H - 1, 0, W - 1
    ii = torch.nonzero(any_ij.any(1)).squeeze(1)
    jj = torch.nonzero(any_ij.any(0)).squeeze(1)
    return (max(int(ii[0]) - margin, 0), min(int(ii[-1]) + margin, H - 1),
            max(int(jj[0]) - margin, 0), min(int(jj[-1]) + margin, W - 1))


def _stack_to_input(st: Stack, spacing: float, margin_px: int) -> tuple[StackInput, Tensor]:
    """Crop, resample and normalise one stack; returns it with poses NOT yet centred, plus the
    world positions ``(Q, 3)`` of its masked working pixels (for the centre)."""
    x = st.slices.detach().to("cpu", torch.float32)
    m = st.mask.detach().to("cpu").bool()
    N, H, W = x.shape
    i0, i1, j0, j1 = _crop_box(m, margin_px)
    dx, dy = float(st.spacing[0]), float(st.spacing[1])
    h = max(1, count_round((i1 - i0 + 1) * dx / spacing))
    w = max(1, count_round((j1 - j0 + 1) * dy / spacing))
    sp = ((i1 - i0 + 1) * dx / h, (j1 - j0 + 1) * dy / w)
    crop = torch.stack([x * m, m.float()], 1)[:, :, i0:i1 + 1, j0:j1 + 1]
    if (h, w) != tuple(crop.shape[-2:]):
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                             antialias=True)
    img, msk = crop[:, 0], (crop[:, 1] > 0.5).float()
    # The crop centre in the original slice frame (mm): the new frame's origin.
    offset = np.eye(4)
    offset[0, 3] = ((i0 + i1) / 2 - (H - 1) / 2) * dx
    offset[1, 3] = ((j0 + j1) / 2 - (W - 1) / 2) * dy
    vals = img[msk > 0]
    scale = float(vals.median()) if vals.numel() else 1.0
    img = (img / max(scale, 1e-12)).clamp(0, 4) * msk
    poses = torch.as_tensor(np.asarray(st.poses, dtype=np.float64) @ offset)
    xy = slice_pixel_coords(h, w, sp, dtype=torch.float64).reshape(-1, 3)
    world = (poses[:, None, :3, :3] @ xy[None, :, :, None])[..., 0] + poses[:, None, :3, 3]
    pts = world[msk.reshape(N, -1) > 0]
    return StackInput(torch.stack([img, msk], 1), msk, poses, sp, offset), pts


def prepare_inputs(stacks: Sequence[Stack], spacing: float = 2.0, margin_px: int = 3) -> NetworkInput:
    """Stacks (header poses in ``Stack.poses``) -> :class:`NetworkInput` (see the module doc).

    Args:
        stacks: the acquired stacks with their masks; any number, any sizes.
        spacing: working in-plane spacing mm (the model's ``config.spacing``).
        margin_px: crop margin around the mask, in original pixels.
    """
    if not stacks:
        raise Slice2VolError("cSVR needs at least one stack")
    items, pts = zip(*(_stack_to_input(st, spacing, margin_px) for st in stacks))
    allp = torch.cat(pts)
    if allp.shape[0] == 0:
        raise Slice2VolError("cSVR: no stack has pixels inside its brain mask")
    centre = allp.mean(0).numpy()
    out = []
    for it in items:
        P = it.poses.clone()
        P[:, :3, 3] -= torch.as_tensor(centre)
        out.append(StackInput(it.images, it.mask, P.float(), it.spacing, it.offset))
    return NetworkInput(out, centre)


def to_network_poses(poses: Sequence[np.ndarray], inp: NetworkInput) -> list[Tensor]:
    """Original-frame slice-to-world poses (per stack ``(N, 4, 4)``, e.g. the ground truth) ->
    the network's cropped, centred frames (float32)."""
    out = []
    for P, st in zip(poses, inp.stacks):
        Q = np.asarray(P, dtype=np.float64) @ st.offset
        Q[:, :3, 3] -= inp.centre
        out.append(torch.as_tensor(Q, dtype=torch.float32))
    return out


def to_original_poses(poses: Tensor, inp: NetworkInput) -> np.ndarray:
    """Network output ``(M, 4, 4)`` (cropped, centred frames) -> original-frame world poses
    ``(M, 4, 4)`` float64."""
    P = poses.detach().to("cpu", torch.float64).numpy().copy()
    P[:, :3, 3] += inp.centre
    out, s0 = [], 0
    for st in inp.stacks:
        n = st.images.shape[0]
        out.append(P[s0:s0 + n] @ np.linalg.inv(st.offset))
        s0 += n
    return np.concatenate(out)
