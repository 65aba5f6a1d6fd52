"""Coarse slices for GaussianSVR's first stage: every slice averaged over 2x2 pixel blocks.

The coarse slice keeps the slice's pose parameters.  A coarse pixel's position is the mean of
2x2 block's centre, and its frame origin (the coarse lattice centre) may sit half a fine
pixel off the fine one when a side has odd length; ``shift (M, 3)`` (slice-frame mm) records
that, so the coarse pose is ``pose @ translate(shift)``.  Only blocks at least half inside the
mask are kept; their value is the mean over their masked fine pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slice2vol.core.geometry import slice_pixel_coords
from slice2vol.core.image import SliceSet

__all__ = ["downsample_slices", "shift_poses"]


def downsample_slices(ss: SliceSet, factor: int = 2) -> tuple[SliceSet, Tensor]:
    """``(coarse SliceSet, shift (M, 3))``; see the module docstring.  Poses are copied unchanged."""
    dev = ss.device
    images = ss.to_images(ss.values)
    masks = ss.to_images(torch.ones_like(ss.values))
    values, coords, sid, fidx, spacing, shapes = [], [], [], [], [], []
    shift = torch.zeros(ss.n_slices, 3, device=dev, dtype=ss.values.dtype)
    for s, (img, msk) in enumerate(zip(images, masks)):
        n, H, W = img.shape
        a, b = ss.stack_slices[s], ss.stack_slices[s + 1]
        sp = ss.spacing[a].tolist()
        ph, pw = (-H) % factor, (-W) % factor
        pad = lambda t: F.pad(t, (0, pw, 0, ph))  # noqa: E731 -- pads the last two axes at the far end
        m_sum = F.avg_pool2d(pad(msk)[:, None], factor)[:, 0] * factor * factor
        v_sum = F.avg_pool2d(pad(img * msk)[:, None], factor)[:, 0] * factor * factor
        H2, W2 = m_sum.shape[1:]
        keep = m_sum >= factor * factor / 2
        mean_v = v_sum / m_sum.clamp_min(1)
        # coarse lattice positions: the block centres of the padded image, centred
        sp2 = (sp[0] * factor, sp[1] * factor)
        lat = slice_pixel_coords(H2, W2, sp2, device=dev)
        # fine pixel (i, j) sits at ((i - (H-1)/2) dx, ...); block k covers i = 2k, 2k+1 ->
        # its centre is (2k + 0.5 - (H-1)/2) dx, the coarse lattice puts it at (k - (H2-1)/2) 2 dx
        off = torch.tensor([(factor * (H2 - 1) / 2 + (factor - 1) / 2 - (H - 1) / 2) * sp[0],
                            (factor * (W2 - 1) / 2 + (factor - 1) / 2 - (W - 1) / 2) * sp[1], 0.0], device=dev)
        shift[a:b] = off
        flat = torch.nonzero(keep.reshape(-1), as_tuple=False).squeeze(1)
        values.append(mean_v.reshape(-1)[flat])
        coords.append(lat.reshape(-1, 3)[flat % (H2 * W2)])
        sid.append(flat // (H2 * W2) + a)
        fidx.append(flat)
        spacing.append(torch.tensor(sp2, device=dev).expand(b - a, 2))
        shapes.append((H2, W2))
    coarse = SliceSet(values=torch.cat(values), coords=torch.cat(coords), slice_id=torch.cat(sid),
                      poses=ss.poses, spacing=torch.cat(spacing).to(ss.spacing.dtype), thickness=ss.thickness,
                      stack_id=ss.stack_id, flat_index=torch.cat(fidx), stack_slices=list(ss.stack_slices),
                      shapes=shapes, psf_spacing=None if ss.psf_spacing is None else ss.psf_spacing * factor)
    return coarse, shift


def shift_poses(poses: Tensor, shift: Tensor) -> Tensor:
    """``poses @ translate(shift)``: the coarse slices' frames.  ``(M, 4, 4)``, ``(M, 3)``."""
    out = poses.clone()
    out[:, :3, 3] = poses[:, :3, 3] + (poses[:, :3, :3] @ shift[..., None])[..., 0]
    return out
