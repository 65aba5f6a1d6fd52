"""Data model: volumes, stacks of slices and the flat slice set the methods work on.

Geometry conventions are those of :mod:`slice2vol.core.geometry`.  Tensors are float32 on the
compute device unless stated; affines and poses are float64 on the host for I/O exactness and
float32 on the device when they enter the mathematics.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from slice2vol.core.geometry import slice_pixel_coords

__all__ = ["Volume", "Stack", "SliceSet"]


@dataclass
class Volume:
    """A 3D image on a voxel grid.

    Attributes:
        data: ``(Ni, Nj, Nk)`` intensities.
        affine: ``(4, 4)`` float64 numpy voxel-to-world (mm, RAS).
        mask: optional ``(Ni, Nj, Nk)`` bool.
    """

    data: Tensor
    affine: np.ndarray
    mask: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def resolution(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def to(self, device: torch.device | str) -> "Volume":
        return replace(
            self,
            data=self.data.to(device),
            mask=None if self.mask is None else self.mask.to(device),
        )


@dataclass
class Stack:
    """A stack of thick 2D slices, each with its own pose.

    Attributes:
        slices: ``(N, H, W)`` intensities (``H`` along the stack's voxel axis ``i``).
        mask: ``(N, H, W)`` bool, pixels to use.
        poses: ``(N, 4, 4)`` float64 slice-to-world rigid transforms (mm).
        spacing: in-plane pixel spacing ``(dx, dy)`` mm.
        thickness: slice thickness (FWHM of the through-plane PSF), mm.
        affine: the right-handed stack affine the slices were read with (``(4, 4)`` float64);
            poses at acquisition ("nominal") follow from it; used to write stacks back.
        index: ``(N,)`` int64 slice index ``k`` in the stack file.
        order: ``(N,)`` int64 acquisition order (time index within the stack), if known.
        name: a label for logs and reports (file name).
        psf_spacing: the in-plane pixel spacing ``(dx, dy)`` mm the slices were *acquired* with,
            where the scanner stored them on a finer grid (:mod:`slice2vol.core.inplane`); the PSF
            is built from it.  ``None``: stored as acquired.
    """

    slices: Tensor
    mask: Tensor
    poses: np.ndarray
    spacing: tuple[float, float]
    thickness: float
    affine: np.ndarray
    index: np.ndarray
    order: np.ndarray | None = None
    name: str = "stack"
    meta: dict = field(default_factory=dict)
    psf_spacing: tuple[float, float] | None = None

    @property
    def n_slices(self) -> int:
        return int(self.slices.shape[0])

    @property
    def psf_pixel(self) -> tuple[float, float]:
        """The in-plane pixel the PSF models, mm: ``psf_spacing``, else ``spacing``."""
        return tuple(self.psf_spacing) if self.psf_spacing is not None else tuple(self.spacing)  # type: ignore[return-value]

    @property
    def slice_spacing(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 2]))

    def select(self, keep: np.ndarray | Tensor) -> "Stack":
        """The stack restricted to slices where ``keep`` (``(N,)`` bool) is true."""
        keep_np = np.asarray(keep.cpu() if isinstance(keep, Tensor) else keep, dtype=bool)
        keep_t = torch.as_tensor(keep_np, device=self.slices.device)
        return replace(
            self,
            slices=self.slices[keep_t],
            mask=self.mask[keep_t],
            poses=self.poses[keep_np],
            index=self.index[keep_np],
            order=None if self.order is None else self.order[keep_np],
        )


@dataclass
class SliceSet:
    """All masked pixels of all stacks, flattened: the form every method computes with.

    ``P`` pixels belong to ``M`` slices which belong to ``S`` stacks.

    Attributes:
        values: ``(P,)`` acquired intensities.
        coords: ``(P, 3)`` slice-frame coordinates (mm, ``w = 0``).
        slice_id: ``(P,)`` int64 slice of each pixel.
        poses: ``(M, 4, 4)`` float32 slice-to-world transforms (the estimate being worked on).
        spacing: ``(M, 2)`` in-plane spacing mm (of the stored pixels: the geometry).
        thickness: ``(M,)`` mm.
        stack_id: ``(M,)`` int64 stack of each slice.
        flat_index: ``(P,)`` int64 position of each pixel in its stack's ``(N, H, W)`` array.
        stack_slices: ``(S + 1,)`` offsets: slices of stack ``s`` are ``stack_slices[s]:stack_slices[s+1]``.
        shapes: ``(H, W)`` per stack.
        psf_spacing: ``(M, 2)`` in-plane pixel of the acquisition, mm (``Stack.psf_pixel``), which
            the PSF models; ``None``: ``spacing``.  Use :attr:`psf_pixel`.
    """

    values: Tensor
    coords: Tensor
    slice_id: Tensor
    poses: Tensor
    spacing: Tensor
    thickness: Tensor
    stack_id: Tensor
    flat_index: Tensor
    stack_slices: list[int]
    shapes: list[tuple[int, int]]
    psf_spacing: Tensor | None = None

    @property
    def psf_pixel(self) -> Tensor:
        """``(M, 2)`` in-plane pixel of the PSF, mm: ``psf_spacing``, else ``spacing``."""
        return self.spacing if self.psf_spacing is None else self.psf_spacing

    @property
    def n_pixels(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_slices(self) -> int:
        return int(self.poses.shape[0])

    @property
    def n_stacks(self) -> int:
        return len(self.shapes)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @classmethod
    def from_stacks(cls, stacks: Sequence[Stack], device: torch.device | str = "cpu") -> "SliceSet":
        values, coords, sid, fidx, poses, spacing, thick, stack_id, psf_sp = [], [], [], [], [], [], [], [], []
        offsets = [0]
        shapes = []
        for s, st in enumerate(stacks):
            N, H, W = st.slices.shape
            xy = slice_pixel_coords(H, W, st.spacing, device=device)  # (H, W, 3)
            m = st.mask.to(device).reshape(N, H * W)
            flat = torch.nonzero(m.reshape(-1), as_tuple=False).squeeze(1)
            values.append(st.slices.to(device, torch.float32).reshape(-1)[flat])
            coords.append(xy.reshape(H * W, 3)[flat % (H * W)])
            sid.append(flat // (H * W) + offsets[-1])
            fidx.append(flat)
            poses.append(torch.as_tensor(st.poses, dtype=torch.float32, device=device))
            spacing.append(torch.tensor([st.spacing] * N, dtype=torch.float32, device=device).reshape(N, 2))
            psf_sp.append(torch.tensor([st.psf_pixel] * N, dtype=torch.float32, device=device).reshape(N, 2))
            thick.append(torch.full((N,), float(st.thickness), dtype=torch.float32, device=device))
            stack_id.append(torch.full((N,), s, dtype=torch.int64, device=device))
            offsets.append(offsets[-1] + N)
            shapes.append((H, W))
        return cls(
            values=torch.cat(values),
            coords=torch.cat(coords),
            slice_id=torch.cat(sid),
            poses=torch.cat(poses),
            spacing=torch.cat(spacing),
            thickness=torch.cat(thick),
            stack_id=torch.cat(stack_id),
            flat_index=torch.cat(fidx),
            stack_slices=offsets,
            shapes=shapes,
            psf_spacing=None if all(st.psf_spacing is None for st in stacks) else torch.cat(psf_sp),
        )

    def with_poses(self, poses: Tensor) -> "SliceSet":
        return replace(self, poses=poses)

    def pixel_stack(self) -> Tensor:
        """``(P,)`` stack index of every pixel."""
        return self.stack_id[self.slice_id]

    def to_images(self, pixel_values: Tensor, fill: float = 0.0) -> list[Tensor]:
        """Scatter ``(P,)`` per-pixel values back to one ``(N, H, W)`` image per stack."""
        out = []
        pstack = self.pixel_stack()
        for s, (H, W) in enumerate(self.shapes):
            n = self.stack_slices[s + 1] - self.stack_slices[s]
            img = torch.full((n * H * W,), fill, dtype=pixel_values.dtype, device=pixel_values.device)
            sel = pstack == s
            img[self.flat_index[sel]] = pixel_values[sel]
            out.append(img.reshape(n, H, W))
        return out

    def slice_sum(self, pixel_values: Tensor) -> Tensor:
        """Sum ``(P, ...)`` per-pixel values over each slice -> ``(M, ...)``."""
        out = torch.zeros((self.n_slices,) + tuple(pixel_values.shape[1:]), dtype=pixel_values.dtype, device=pixel_values.device)
        return out.index_add_(0, self.slice_id, pixel_values)
