"""NIfTI input/output at the edge of the package.

Loading keeps geometry exact: the affine is nibabel's ``img.affine`` (sform if valid, else qform,
as nibabel chooses), data are read with ``scl_slope``/``scl_inter`` applied (``get_fdata``),
a singleton 4th dimension is dropped, and a stack whose affine has a negative determinant has its
``i`` axis flipped (world positions unchanged, see :mod:`slice2vol.geometry`).  Every problem with
the input raises :class:`~slice2vol.errors.Slice2VolError` with one clear sentence.  Outputs are
written atomically (temporary file in the destination folder, then ``os.replace``) and never over
an input.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from .errors import Slice2VolError
from .geometry import check_affine, make_right_handed, stack_slice_poses
from .image import Stack, Volume

__all__ = [
    "load_nifti",
    "load_volume",
    "load_stack",
    "load_mask",
    "save_volume",
    "save_stack",
    "atomic_write",
    "write_json",
]

log = logging.getLogger(__name__)


def load_nifti(path: str | os.PathLike, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image: ``(data float32 (Ni, Nj, Nk), affine float64 (4, 4))``.

    Non-finite voxels are set to 0 with a warning (never propagated).
    """
    p = Path(path)
    if not p.exists():
        raise Slice2VolError(f"{what} {p}: file not found")
    if p.is_dir():
        raise Slice2VolError(f"{what} {p}: is a directory, expected a NIfTI file")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for non-NIfTI files
        raise Slice2VolError(f"{what} {p}: not a readable NIfTI image ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise Slice2VolError(f"{what} {p}: not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) != 3:
        raise Slice2VolError(f"{what} {p}: expected a 3D image, got shape {tuple(img.shape)}")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:
        raise Slice2VolError(f"{what} {p}: could not read the voxel data ({exc})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, f"{what} {p}")
    bad = ~np.isfinite(data)
    if bad.any():
        log.warning("%s %s: %d NaN/Inf voxels set to 0 and excluded", what, p, int(bad.sum()))
        data = np.where(bad, 0, data).astype(np.float32)
    return data, affine


def load_volume(path: str | os.PathLike, mask: str | os.PathLike | None = None) -> Volume:
    data, affine = load_nifti(path, "volume")
    if not np.any(data):
        raise Slice2VolError(f"volume {path}: all voxels are zero")
    m = None
    if mask is not None:
        m = torch.from_numpy(load_mask(mask, data.shape, affine))
    return Volume(torch.from_numpy(data), affine, m)


def load_mask(path: str | os.PathLike, shape: tuple | None = None, affine: np.ndarray | None = None,
              what: str = "mask") -> np.ndarray:
    """Read a binary mask (``> 0``); if ``shape``/``affine`` are given they must match."""
    data, aff = load_nifti(path, what)
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise Slice2VolError(f"{what} {path}: shape {tuple(data.shape)} does not match its image {tuple(shape)}")
    if affine is not None and not np.allclose(aff, affine, atol=1e-3):
        raise Slice2VolError(f"{what} {path}: geometry (affine) does not match its image")
    m = data > 0
    if not m.any():
        raise Slice2VolError(f"{what} {path}: mask is empty")
    return m


def load_stack(
    path: str | os.PathLike,
    thickness: float | None = None,
    mask: str | os.PathLike | None = None,
    name: str | None = None,
) -> Stack:
    """Read a stack of slices (slices along voxel axis ``k``).

    Args:
        path: NIfTI file.
        thickness: slice thickness in mm; default the slice spacing from the header.
        mask: optional mask in the stack's voxel grid (same shape and affine).
    """
    data, affine = load_nifti(path, "stack")
    if data.shape[0] < 2 or data.shape[1] < 2:
        raise Slice2VolError(f"stack {path}: slices of shape {data.shape[:2]} are too small")
    if not np.any(data):
        raise Slice2VolError(f"stack {path}: all voxels are zero")
    m = np.ones(data.shape, dtype=bool) if mask is None else load_mask(mask, data.shape, affine, "stack mask")
    # Pixels with zero or negative intensity are background or padding in MR magnitude images.
    m &= data > 0
    if not m.any():
        raise Slice2VolError(f"stack {path}: no positive voxel inside its mask")
    data, affine_rh, flipped = make_right_handed(data, affine)
    m, _, _ = make_right_handed(m, affine)
    poses, spacing, dz = stack_slice_poses(affine_rh, data.shape)
    th = dz if thickness is None else float(thickness)
    if not np.isfinite(th) or th <= 0:
        raise Slice2VolError(f"stack {path}: thickness must be positive, got {thickness}")
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, 2, 0)))
    smask = torch.from_numpy(np.ascontiguousarray(np.moveaxis(m, 2, 0)))
    return Stack(
        slices=slices,
        mask=smask,
        poses=poses,
        spacing=spacing,
        thickness=th,
        affine=affine_rh,
        index=np.arange(data.shape[2]),
        name=name or Path(path).name,
        meta={"path": str(path), "flipped_i": flipped},
    )


def atomic_write(path: str | os.PathLike, write, protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``path`` through ``write(tmp_path)`` then rename, refusing to overwrite a protected input."""
    out = Path(path)
    for p in protect:
        try:
            if Path(p).exists() and out.exists() and os.path.samefile(p, out):
                raise Slice2VolError(f"output {out} would overwrite an input file")
        except FileNotFoundError:
            pass
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(out.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + out.name.split(".")[0], suffix=suffix, dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def save_volume(volume: Volume | np.ndarray, path: str | os.PathLike, affine: np.ndarray | None = None,
                protect: Sequence[str | os.PathLike] = (), dtype=np.float32) -> Path:
    """Write a 3D volume (float32 by default) atomically; sform and qform both set to its affine."""
    if isinstance(volume, Volume):
        data, affine = volume.data.detach().cpu().numpy(), volume.affine
    else:
        data = np.asarray(volume)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return atomic_write(path, lambda tmp: nib.save(img, tmp), protect)


def save_stack(stack: Stack, path: str | os.PathLike, data=None, protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write a stack's slices (or ``data`` (N, H, W) in its geometry) as a NIfTI image."""
    arr = (stack.slices if data is None else data)
    arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    vol = np.moveaxis(arr, 0, 2)
    return save_volume(vol, path, stack.affine, protect)


def write_json(obj, path: str | os.PathLike, protect: Sequence[str | os.PathLike] = ()) -> Path:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    return atomic_write(path, w, protect)


POSES_CONVENTION = (
    "slice-to-world rigid 4x4 (mm, RAS); slice frame origin at the slice centre, "
    "u along voxel axis i, v along j, w along the normal (see slice2vol.geometry)"
)


def poses_to_json(stacks: Sequence[Stack], poses: Sequence[np.ndarray], extra: dict | None = None) -> dict:
    """JSON-ready description of per-slice poses, one entry per stack (``poses[s]`` is ``(N_s, 4, 4)``).

    Slices are identified by their index ``k`` in the stack file, so excluded or missing slices
    are simply absent.
    """
    out = {"convention": POSES_CONVENTION, "stacks": []}
    for st, P in zip(stacks, poses):
        P = np.asarray(P, dtype=np.float64)
        entry = {
            "name": st.name,
            "file": st.meta.get("path", st.name),
            "thickness": st.thickness,
            "spacing": list(st.spacing),
            "affine": np.asarray(st.affine).tolist(),
            "slices": [
                {
                    "index": int(k),
                    **({"order": int(st.order[i])} if st.order is not None else {}),
                    "pose": P[i].tolist(),
                }
                for i, k in enumerate(st.index)
            ],
        }
        out["stacks"].append(entry)
    if extra:
        out.update(extra)
    return out


def load_poses_json(path: str | os.PathLike) -> list[dict]:
    """Read a poses JSON: per stack ``{"name", "index": (N,), "order": (N,) or None, "poses": (N, 4, 4)}``."""
    try:
        with open(path) as f:
            obj = json.load(f)
        out = []
        for st in obj["stacks"]:
            sl = st["slices"]
            out.append(
                {
                    "name": st.get("name"),
                    "index": np.array([s["index"] for s in sl], dtype=np.int64),
                    "order": np.array([s["order"] for s in sl], dtype=np.int64) if sl and "order" in sl[0] else None,
                    "poses": np.array([s["pose"] for s in sl], dtype=np.float64).reshape(-1, 4, 4),
                }
            )
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Slice2VolError(f"poses file {path}: cannot be read ({exc})") from None
