"""NIfTI input/output at the edge of the package.

Loading keeps geometry exact: the affine is nibabel's ``img.affine`` (sform if valid, else qform,
as nibabel chooses), voxel values are nibabel's ``get_fdata()`` (``scl_slope``/``scl_inter``
applied in float64) rounded once to float32, trailing singleton dimensions are dropped (a 2D image
is a stack of one slice), and a stack whose affine has a negative determinant has its ``i`` axis
flipped (world positions unchanged, see :mod:`slice2vol.core.geometry`).  NaN/Inf voxels are excluded
with a warning: zeroed in the data and left out of a stack's mask.  Complex-valued images and a
zero or non-finite voxel size in the header (``pixdim``) are refused.  Every problem with the input
raises :class:`~slice2vol.errors.Slice2VolError` with one clear sentence.  Outputs are written
atomically (temporary file in the destination folder, then ``os.replace``) and never over an input.
A stack given as a folder is a DICOM series (or several): :mod:`slice2vol.io.dicom`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch

from slice2vol.core import budget
from slice2vol.core.geometry import check_affine, make_right_handed, stack_slice_poses
from slice2vol.core.image import Stack, Volume
from slice2vol.core.runtime import NOTICE
from slice2vol.errors import Slice2VolError
from slice2vol.io import timing

__all__ = [
    "shared_data_dir",
    "jsonable",
    "read_nifti",
    "load_nifti",
    "load_volume",
    "load_world_mask",
    "load_stack",
    "load_stacks",
    "load_mask",
    "check_stack_set",
    "save_volume",
    "save_stack",
    "check_output_path",
    "atomic_write",
    "write_json",
    "poses_to_json",
    "load_poses_json",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Two grids are "the same" when their corner voxels agree to this fraction of a voxel: loose
# enough for a mask whose header stores the affine as a qform quaternion (float32 rounding),
# tight enough to catch any real offset or reorientation.
GRID_TOL = 1e-2

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def shared_data_dir() -> Path:
    """The shared data folder (atlases, SVRTK's stacks), by the one rule every part of slice2vol
    uses: ``$SLICE2VOL_SHARED`` if set; else ``shared/data`` beside the checkout that holds this
    package (an editable install, the tests and benchmarks); else ``../shared/data`` from the
    working folder.  Nothing at run time needs it: the demo and the weights ship in the package."""
    env = os.environ.get("SLICE2VOL_SHARED")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside if beside.is_dir() else Path("..") / "shared" / "data"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _open_nifti(p: Path, what: str) -> nib.Nifti1Pair:
    """Open ``p`` with nibabel (header only), refusing anything that is not a NIfTI image."""
    if not p.exists():
        raise Slice2VolError(f"{what} {p}: file not found")
    if p.is_dir():
        raise Slice2VolError(f"{what} {p}: is a directory, expected a NIfTI file")
    try:
        img = nib.load(p)
    except Exception as exc:  # nibabel raises many types for non-NIfTI or corrupt files
        raise Slice2VolError(f"{what} {p}: not a readable NIfTI file ({_one_line(exc)})") from None
    # Nifti1Pair is the base class of every NIfTI-1/2 image, single-file or pair.
    if not isinstance(img, nib.Nifti1Pair):
        raise Slice2VolError(f"{what} {p}: not a NIfTI image (nibabel reads it as {type(img).__name__})")
    return img


def _spatial_shape(shape: tuple[int, ...], what: str, p: Path) -> tuple[int, int, int]:
    """The 3D shape of an image: trailing singleton dimensions dropped, a 2D image as one slice."""
    dims = list(shape)
    # Converters often write a single volume as 4D (or 5D) with length-1 time/extra dimensions.
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 2:
        dims.append(1)
    if len(dims) > 3:
        n = int(np.prod(dims[3:]))
        raise Slice2VolError(
            f"{what} {p}: a {len(shape)}D image with {n} volumes (shape {tuple(shape)}); give one 3D image per file"
        )
    if len(dims) < 3:
        raise Slice2VolError(f"{what} {p}: expected a 3D image, got shape {tuple(shape)}")
    if min(dims) < 1:
        raise Slice2VolError(f"{what} {p}: image has no voxels (shape {tuple(shape)})")
    return int(dims[0]), int(dims[1]), int(dims[2])


def _warn_about_header(img: nib.Nifti1Pair, what: str, p: Path) -> None:
    """Warn where the header leaves the world geometry uncertain (the load itself goes on)."""
    hdr = img.header
    if int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        log.warning("%s %s: header has no sform or qform; voxel axes are taken along the world axes", what, p)
    try:
        unit = hdr.get_xyzt_units()[0]
    except (KeyError, ValueError):  # a unit code NIfTI does not define
        log.warning("%s %s: header spatial unit code %d is not a NIfTI unit; coordinates are used as millimetres",
                    what, p, int(hdr["xyzt_units"]))
        return
    if unit not in ("mm", "unknown"):
        log.warning("%s %s: spatial unit is %s; coordinates are used as millimetres unchanged", what, p, unit)


def _check_voxel_data(img: nib.Nifti1Pair, what: str, p: Path) -> None:
    """Refuse what ``get_fdata`` would silently change: complex voxels (nibabel drops the imaginary
    part) and a zero or non-finite voxel size in ``pixdim`` (nibabel replaces a 0 by 1 mm)."""
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise Slice2VolError(f"{what} {p}: complex-valued voxels ({dtype.name}); give a magnitude image")
    # nibabel fixes pixdim while it reads the header, so read the stored header again unchecked
    key = "header" if "header" in img.file_map else "image"
    try:
        with img.file_map[key].get_prepare_fileobj("rb") as f:
            raw = type(img.header).from_fileobj(f, check=False)
        pixdim = np.asarray(raw["pixdim"], dtype=np.float64)
        ndim = int(raw["dim"][0])
    except Exception:  # unreadable a second time: the data read below reports it
        return
    for axis in range(min(max(ndim, 0), 3)):
        v = pixdim[axis + 1]
        if not (np.isfinite(v) and v != 0):
            raise Slice2VolError(f"{what} {p}: header voxel size (pixdim[{axis + 1}]) is {v:g} along voxel axis "
                                 f"{'ijk'[axis]}; a voxel size must be a non-zero finite number of mm")


def read_nifti(path: PathLike, what: str = "image") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image as nibabel sees it: ``(data, affine, finite)``.

    ``data`` is float32 ``(Ni, Nj, Nk)`` equal to ``float32(img.get_fdata())``, non-finite values
    kept; ``affine`` is ``img.affine`` as float64 (checked: finite, no shear); ``finite`` is the
    boolean map of finite voxels (values beyond the float32 range count as non-finite).
    """
    p = Path(path)
    img = _open_nifti(p, what)
    shape = _spatial_shape(img.shape, what, p)
    _check_voxel_data(img, what, p)
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, f"{what} {p}")  # before the (possibly large) data are read
    # The header's size, before reading: a small compressed file can promise gigabytes of voxels.
    budget.check_image_size(img.shape, img.get_data_dtype().itemsize, f"{what} {p}")
    _warn_about_header(img, what, p)
    try:
        # Scale in float64 and round once, so every voxel is the nearest float32 to nibabel's value.
        values = np.asarray(img.get_fdata(dtype=np.float64)).reshape(shape)
    except Exception as exc:  # truncated file, unsupported data type (complex, RGB), ...
        raise Slice2VolError(f"{what} {p}: could not read the voxel data ({_one_line(exc)})") from None
    with np.errstate(over="ignore"):
        data = values.astype(np.float32)
    return data, affine, np.isfinite(data)


def _zero_non_finite(data: np.ndarray, finite: np.ndarray, what: str, p: PathLike) -> np.ndarray:
    """``data`` with NaN/Inf set to 0 (warning once); an image with no finite voxel is refused."""
    if not finite.any():
        raise Slice2VolError(f"{what} {p}: all voxels are NaN or Inf")
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad == 0:
        return data
    log.warning("%s %s: %d NaN/Inf voxels set to 0 and excluded", what, p, n_bad)
    return np.where(finite, data, np.float32(0))


def load_nifti(path: PathLike, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image: ``(data float32 (Ni, Nj, Nk), affine float64 (4, 4))``.

    Non-finite voxels are set to 0 with a warning (never propagated); use :func:`read_nifti` to
    know which they were.
    """
    data, affine, finite = read_nifti(path, what)
    return _zero_non_finite(data, finite, what, path), affine


def load_volume(path: PathLike, mask: PathLike | None = None) -> Volume:
    """Read a 3D volume and optionally its mask (same grid)."""
    data, affine = load_nifti(path, "volume")
    if not np.any(data):
        raise Slice2VolError(f"volume {path}: all voxels are zero")
    m = None
    if mask is not None:
        m = torch.from_numpy(load_mask(mask, data.shape, affine))
    return Volume(torch.from_numpy(data), affine, m)


def _same_grid(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether affines ``a`` and ``b`` put every voxel of ``shape`` at the same world point.

    The difference of two affine maps is affine, so its largest value over the grid is at a corner.
    """
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij")).reshape(3, -1)
    homog = np.vstack([corners, np.ones(corners.shape[1])])
    err = np.abs((a - b)[:3] @ homog).max()
    return bool(err <= GRID_TOL * np.linalg.norm(b[:3, :3], axis=0).min())


def load_mask(path: PathLike, shape: tuple | None = None, affine: np.ndarray | None = None,
              what: str = "mask") -> np.ndarray:
    """Read a binary mask (``> 0``; NaN/Inf count as outside).

    If ``shape``/``affine`` are given the mask must be on that grid (same shape, same voxel
    positions up to a hundredth of a voxel).
    """
    data, aff = load_nifti(path, what)
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise Slice2VolError(f"{what} {path}: shape {tuple(data.shape)} does not match its image {tuple(shape)}")
    if affine is not None and not _same_grid(aff, np.asarray(affine, dtype=np.float64), data.shape):
        raise Slice2VolError(f"{what} {path}: geometry (affine) does not match its image")
    return _binary(data, path, what)


def _binary(data: np.ndarray, path: PathLike, what: str) -> np.ndarray:
    m = data > 0
    if not m.any():
        raise Slice2VolError(f"{what} {path}: mask is empty")
    return m


def load_world_mask(path: PathLike, what: str = "mask") -> Volume:
    """A binary mask with its own grid (``--mask``: world space, any grid), read once."""
    data, aff = load_nifti(path, what)
    return Volume(torch.from_numpy(_binary(data, path, what)), aff)


def _checked_thickness(thickness: float | None, default: float, path: PathLike) -> float:
    if thickness is None:
        return default
    try:
        th = float(thickness)
    except (TypeError, ValueError):
        th = float("nan")
    if not (np.isfinite(th) and th > 0):
        raise Slice2VolError(f"stack {path}: thickness must be a positive number of mm, got {thickness!r}")
    return th


def _mm(v: float) -> str:
    """``3.0``, ``2.75``: millimetres to two decimals without trailing zeros."""
    text = f"{v:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _sidecar(path: PathLike) -> tuple[dict | None, Path | None]:
    """The BIDS-style JSON sidecar of a NIfTI file (``X.json`` beside ``X.nii.gz``) and its path;
    ``(None, ...)`` where there is none or it cannot be read (a warning says why)."""
    p = Path(path)
    stem = next((p.name[: -len(s)] for s in (".nii.gz", ".nii") if p.name.endswith(s)), None)
    side = p.with_name(f"{stem}.json") if stem else None
    if side is None or not side.is_file():
        return None, None
    try:
        if side.stat().st_size > 10**7:
            raise ValueError("larger than 10 MB")
        obj = json.loads(side.read_text(encoding="utf-8"))
    except RecursionError:
        log.warning("sidecar %s: not read (nested too deeply); SliceThickness and SliceTiming not used", side)
        return None, side
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        log.warning("sidecar %s: not read (%s); SliceThickness and SliceTiming not used", side,
                    _one_line(exc)[:120])
        return None, side
    return (obj if isinstance(obj, dict) else None), side


def _sidecar_thickness(sidecar: dict | None, side: Path | None) -> float | None:
    """``SliceThickness`` (mm) of a read sidecar (:func:`_sidecar`); ``None`` where it has none or
    it cannot be used (a warning says why)."""
    v = sidecar.get("SliceThickness") if sidecar is not None else None
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        log.warning("sidecar %s: SliceThickness %.40r is not a positive number of mm; ignored", side, v)
        return None
    return float(v)


def _report_thickness(name: str, th: float, given: bool, sidecar: dict | None, side: Path | None) -> None:
    """Say which thickness a stack gets (shown at normal verbosity) and warn where its JSON
    sidecar's SliceThickness says otherwise."""
    log.log(NOTICE, "%s: thickness %s mm (%s)", name, _mm(th), "given" if given else
            "slice spacing; give --thickness to change")
    side_th = _sidecar_thickness(sidecar, side)
    if side_th is not None and not math.isclose(th, side_th, rel_tol=1e-3, abs_tol=1e-3):
        how = "given" if given else "slice spacing"
        hint = "" if given else f"; give --thickness {_mm(side_th)} to use it"
        log.warning("stack %s: thickness %s mm (%s) differs from SliceThickness %s mm in %s%s", name, _mm(th), how,
                    _mm(side_th), side, hint)


def _nifti_order(path: PathLike, sidecar: dict | None, side: Path | None, n: int) -> tuple[np.ndarray | None, str]:
    """A NIfTI stack's acquisition order (:mod:`slice2vol.io.timing`): the sidecar's
    ``SliceTiming``, else the header's slice timing; ``(None, "")`` where neither gives it."""
    if sidecar is not None:
        order, src = timing.sidecar_order(sidecar, side, n)
        if order is not None:
            return order, f"{src} in {side.name}"
    return timing.header_order(_open_nifti(Path(path), "stack"), n)


def load_stack(
    path: PathLike,
    thickness: float | None = None,
    mask: PathLike | None = None,
    name: str | None = None,
    *,
    series_description: Sequence[str] | str | None = None,
) -> Stack:
    """Read a stack of slices (slices along voxel axis ``k``).

    The stack's mask marks the pixels to use: finite, positive (zero or negative intensities are
    background or padding in MR magnitude images) and inside ``mask`` if one is given.

    Args:
        path: NIfTI file, or a folder holding one DICOM series (or several, one of them picked by
            ``series_description``; :mod:`slice2vol.io.dicom`).
        thickness: slice thickness in mm; default the slice spacing from the NIfTI header (DICOM:
            ``SliceThickness``, else the spacing of the positions; see :mod:`slice2vol.io.dicom`).
        mask: optional mask in the stack's voxel grid (same shape and affine; for a DICOM stack
            any grid with the same voxels, its axes in another order or direction, is accepted).
        name: label of the stack; default the file name (DICOM: series description and number).
        series_description: DICOM folders: fnmatch pattern(s) picking the series.
    """
    if Path(path).is_dir():
        from slice2vol.io import dicom

        refs = dicom.find_series(path, series_description)
        if len(refs) > 1:
            raise Slice2VolError(f"stack {path}: {len(refs)} series match ({'; '.join(r.label() for r in refs)}); "
                                 f"give a pattern that picks one, or read them with load_stacks")
        return _dicom_stack(path, refs[0], thickness, mask, name)
    data, affine, finite = read_nifti(path, "stack")
    data = _zero_non_finite(data, finite, "stack", path)
    if data.shape[0] < 2 or data.shape[1] < 2:
        raise Slice2VolError(f"stack {path}: slices of shape {data.shape[:2]} are too small")
    if not np.any(data):
        raise Slice2VolError(f"stack {path}: all voxels are zero")
    th = _checked_thickness(thickness, float(np.linalg.norm(affine[:3, 2])), path)
    sidecar, side = _sidecar(path)
    _report_thickness(name or Path(path).name, th, thickness is not None, sidecar, side)
    use = finite & (data > 0)
    if mask is not None:
        use &= load_mask(mask, data.shape, affine, "stack mask")
    order, source = _nifti_order(path, sidecar, side, data.shape[2])
    return _make_stack(path, data, affine, use, th, name or Path(path).name, {}, order, source)


def _order_text(order: np.ndarray, show: int = 12) -> str:
    """``"slices 0 2 4 ... 1 3 5 in time"``: the file indices in acquisition order, for a log line."""
    k = np.argsort(order, kind="stable")
    text = " ".join(map(str, k[:show])) + (" ..." if k.size > show else "")
    return f"slices {text} in time"


def _make_stack(path: PathLike, data: np.ndarray, affine: np.ndarray, use: np.ndarray, th: float, name: str,
                meta: dict, order: np.ndarray | None = None, order_source: str = "") -> Stack:
    """The :class:`Stack` of checked ``data (H, W, N)`` on ``affine``, pixels ``use`` kept;
    ``order``: the acquisition time rank of every slice where the files give it (``order_source``
    says which field, :mod:`slice2vol.io.timing`)."""
    if order is not None:
        log.info("%s: acquisition order from %s: %s", name, order_source, _order_text(order))
        meta = {**meta, "order_source": order_source}
    if not use.any():
        raise Slice2VolError(f"stack {path}: no positive voxel inside its mask")
    data, affine_rh, flipped = make_right_handed(data, affine)
    use, _, _ = make_right_handed(use, affine)
    poses, spacing, _ = stack_slice_poses(affine_rh, data.shape)
    return Stack(
        slices=torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, 2, 0))),
        mask=torch.from_numpy(np.ascontiguousarray(np.moveaxis(use, 2, 0))),
        poses=poses,
        spacing=spacing,
        thickness=th,
        affine=affine_rh,
        index=np.arange(data.shape[2]),
        order=None if order is None else np.asarray(order, dtype=np.int64),
        name=name,
        meta={"path": str(path), "flipped_i": flipped, **meta},
    )


def _mask_on_grid(path: PathLike, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """A stack mask for a DICOM stack: on the stack's grid, or on a grid with the same voxels whose
    axes come in another order or direction (e.g. a NIfTI converted by another tool), reindexed."""
    data, aff = load_nifti(path, "stack mask")
    A = np.asarray(affine, dtype=np.float64)
    if data.shape == tuple(shape) and _same_grid(aff, A, data.shape):
        return load_mask(path, shape, affine, "stack mask")
    M = np.linalg.solve(A, aff)  # mask voxel -> stack voxel
    P = np.rint(M[:3, :3])
    is_perm = (np.abs(M[:3, :3] - P).max() < GRID_TOL and np.all(np.abs(P).sum(0) == 1)
               and np.all(np.abs(P).sum(1) == 1) and np.abs(M[:3, 3] - np.rint(M[:3, 3])).max() < GRID_TOL)
    if is_perm:
        t = np.rint(M[:3, 3]).astype(np.int64)
        idx = np.indices(shape).reshape(3, -1) - t[:, None]  # stack voxel -> mask voxel: P^T (s - t)
        src = (P.T.astype(np.int64) @ idx)
        if np.all(src >= 0) and np.all(src < np.array(data.shape)[:, None]) and data.size == int(np.prod(shape)):
            m = data[tuple(src)].reshape(shape) > 0
            if not m.any():
                raise Slice2VolError(f"stack mask {path}: mask is empty")
            log.info("stack mask %s: voxel axes reordered onto its DICOM stack's grid", path)
            return m
    return load_mask(path, shape, affine, "stack mask")  # refuses with the usual message


def _dicom_stack(path: PathLike, ref, thickness: float | None, mask: PathLike | None, name: str | None) -> Stack:
    """A DICOM series (:class:`slice2vol.io.dicom.SeriesRef`) read as a stack."""
    from slice2vol.io import dicom

    series = dicom.read_series(ref)
    data, affine = series.data, series.affine
    where = f"stack {path} ({ref.label()})"
    if not np.any(data):
        raise Slice2VolError(f"{where}: all voxels are zero")
    th = _checked_thickness(thickness, series.thickness, path)
    label = name or series.name
    log.log(NOTICE, "%s: thickness %s mm (%s)", label, _mm(th), "given" if thickness is not None else
            f"{series.thickness_source} of the DICOM series; give --thickness to change")
    if thickness is None and not math.isclose(th, series.slice_spacing, rel_tol=1e-3, abs_tol=1e-3):
        log.info("%s: slices %s mm thick, %s mm apart", label, _mm(th), _mm(series.slice_spacing))
    use = data > 0
    if mask is not None:
        use &= _mask_on_grid(mask, data.shape, affine)
    return _make_stack(path, data, affine, use, th, label,
                       {"series_uid": ref.uid, "dicom": series.meta}, series.order, series.order_source)


def _per_stack(values: Sequence | None, n: int, noun: str, broadcast: bool, note: str = "") -> list:
    """One value per stack: ``None`` -> all ``None``; a single value is shared if ``broadcast``.
    ``note`` ends the error message (how DICOM folders expanded into stacks)."""
    if values is None:
        return [None] * n
    values = list(values)
    if broadcast and len(values) == 1:
        return values * n
    if len(values) != n:
        hint = "one value for all stacks or one per stack" if broadcast else "one per stack"
        plural = "" if len(values) == 1 else "s"
        raise Slice2VolError(
            f"{len(values)} {noun}{plural} for {n} stack{'' if n == 1 else 's'} (give {hint}){note}"
        )
    return values


def load_stacks(
    paths: Sequence[PathLike],
    thicknesses: Sequence[float] | None = None,
    masks: Sequence[PathLike | None] | None = None,
    *,
    series_description: Sequence[str] | str | None = None,
    series_uids: Sequence[str | None] | None = None,
) -> list[Stack]:
    """Read several stacks, as the CLI's ``STACK... --thickness MM... --stack-masks M...`` give them.

    A path that is a folder is DICOM (:mod:`slice2vol.io.dicom`): one series, or every series of a
    folder of several that ``series_description`` picks, each its own stack, in ``SeriesNumber``
    order at the folder's place among the paths.  Per-stack lists count the stacks after this
    expansion (a message lists them when the count is wrong).

    Args:
        paths: stack files or DICOM folders (at least one).
        thicknesses: ``None`` (each stack's own, see :func:`load_stack`), one value for all
            stacks, or one per stack.
        masks: ``None`` or exactly one mask per stack (``None`` entries for stacks without a mask).
        series_description: fnmatch pattern(s) picking series out of DICOM folders.
        series_uids: instead, one ``SeriesInstanceUID`` (or ``None``) per path: each DICOM folder
            gives exactly that series (a recorded run reloaded; a folder may then appear once per
            series it holds).
    """
    if isinstance(paths, (str, os.PathLike)):  # a lone path is not a sequence of paths
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise Slice2VolError("no input stacks given")
    if series_uids is not None and len(series_uids) != len(paths):
        raise Slice2VolError(f"{len(series_uids)} series UIDs for {len(paths)} stack paths")
    sources: list[tuple] = []  # (path, dicom SeriesRef or None)
    for k, p in enumerate(paths):
        if Path(p).is_dir():
            from slice2vol.io import dicom

            uid = series_uids[k] if series_uids is not None else None
            sources += [(p, ref) for ref in dicom.find_series(p, None if uid else series_description, series_uid=uid)]
        else:
            sources.append((p, None))
    note = ""
    if len(sources) != len(paths):
        note = "; the stacks, DICOM folders expanded: " + ", ".join(
            f"{k}: {p}" + (f" {ref.label()}" if ref is not None else "") for k, (p, ref) in enumerate(sources))
    ths = _per_stack(thicknesses, len(sources), "thickness value", broadcast=True, note=note)
    ms = _per_stack(masks, len(sources), "stack mask", broadcast=False, note=note)
    stacks = [load_stack(p, t, m) if ref is None else _dicom_stack(p, ref, t, m, None)
              for (p, ref), t, m in zip(sources, ths, ms)]
    names = [st.name for st in stacks]
    for k, st in enumerate(stacks):  # two DICOM series of one description: names must tell them apart
        if "series_uid" in st.meta and names.count(st.name) > 1:
            st.name = f"{st.name}_{k}"
    return stacks


#: A stack whose centre is farther than this from the median centre of the stacks is warned about.
CENTRE_WARN_MM = 100.0


def _stack_centre(st: Stack) -> np.ndarray:
    N, H, W = st.slices.shape
    return st.affine[:3, :3] @ ((np.array([H, W, N], dtype=np.float64) - 1) / 2) + st.affine[:3, 3]


def check_stack_set(stacks: Sequence[Stack]) -> None:
    """Refuse a stack given twice (the same file, or identical voxel data and geometry); warn in one
    line about stacks whose centre is more than :data:`CENTRE_WARN_MM` from the median centre of
    the stacks (another subject, or a broken header geometry)."""
    for j, b in enumerate(stacks):
        pb = b.meta.get("path", b.name)
        for a in stacks[:j]:
            pa = a.meta.get("path", a.name)
            if "series_uid" in a.meta or "series_uid" in b.meta:  # DICOM: one folder may hold several stacks
                if a.meta.get("series_uid") == b.meta.get("series_uid"):
                    where = "" if str(pa) == str(pb) else f" (in {pa} and {pb})"
                    raise Slice2VolError(f"DICOM series {b.name} is given twice{where}")
            elif _same_file(pa, pb):
                same = "" if str(pa) == str(pb) else f" (the same file as {pa})"
                raise Slice2VolError(f"stack {pb} is given twice{same}")
            if (a.slices.shape == b.slices.shape and np.array_equal(a.affine, b.affine)
                    and torch.equal(a.slices, b.slices)):
                raise Slice2VolError(f"stacks {pa} and {pb} have identical voxel data and geometry "
                                     f"(the same acquisition given twice?)")
    if len(stacks) < 2:
        return
    centres = np.array([_stack_centre(st) for st in stacks])
    dist = np.linalg.norm(centres - np.median(centres, axis=0), axis=1)
    far = [f"{st.name}: centre {d:.0f} mm" for st, d in zip(stacks, dist) if d > CENTRE_WARN_MM]
    if far:
        log.warning("%s from the median centre of the stacks (over %.0f mm): check that every stack shows the "
                    "same brain and that its header geometry is right", "; ".join(far), CENTRE_WARN_MM)


def _same_file(a: PathLike, b: PathLike) -> bool:
    """Whether writing ``a`` could replace ``b``: the same file now, or the same path once the
    output's missing folders exist (``new/../input`` resolves to ``input`` after ``mkdir new``)."""
    try:
        if os.path.samefile(a, b):  # symbolic and hard links, different spellings
            return True
    except OSError:  # one of them does not exist (yet)
        pass
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def check_output_path(path: PathLike, protect: Sequence[PathLike] = ()) -> Path:
    """Raise unless ``path`` may be written as an output: not a folder, none of the inputs ``protect``.

    Commands call it before any work so a bad output path fails in seconds, not after a run.
    """
    out = Path(path)
    if out.is_dir():
        raise Slice2VolError(f"output {out} is a directory, expected a file name")
    for p in protect:
        if _same_file(out, p):
            raise Slice2VolError(f"output {out} would overwrite the input file {p}")
    return out


def _umask_file_mode() -> int:
    # mkstemp creates owner-only files; outputs should get the mode any new file gets.  Reading the
    # umask needs setting it; the CLI writes outputs from one thread, so the swap is harmless.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: PathLike, write: Callable[[str], None], protect: Sequence[PathLike] = ()) -> Path:
    """Write ``path`` through ``write(tmp_path)`` then rename, refusing to overwrite a protected input.

    On any failure the temporary file is removed and an existing ``path`` is left untouched.
    OS errors (no permission, disk full) become :class:`Slice2VolError`.
    """
    out = check_output_path(path, protect)
    # The temporary file keeps the output's extensions so writers (nibabel) pick the same format.
    suffix = "".join(out.suffixes) or ".tmp"
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, _umask_file_mode())
        os.replace(tmp, out)
        tmp = None
    except BaseException as exc:  # KeyboardInterrupt too (Ctrl-C, and SIGTERM through the CLI)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise Slice2VolError(f"cannot write output {out}: {exc.strerror or _one_line(exc)}") from None
        raise
    return out


def _check_nifti_name(path: PathLike) -> None:
    if not str(path).endswith(NIFTI_SUFFIXES):
        raise Slice2VolError(f"output {path}: a NIfTI file name must end in .nii or .nii.gz")


def save_volume(volume: Volume | np.ndarray, path: str | os.PathLike, affine: np.ndarray | None = None,
                protect: Sequence[str | os.PathLike] = (), dtype=np.float32) -> Path:
    """Write a 3D volume (float32 by default) atomically; sform and qform both set to its affine."""
    _check_nifti_name(path)
    if isinstance(volume, Volume):
        data, affine = volume.data.detach().cpu().numpy(), volume.affine
    else:
        data = np.asarray(volume)
    if affine is None:
        raise ValueError("save_volume: an affine is required for an array")
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


def jsonable(obj):
    """``obj`` as strict JSON values: NaN/Inf -> None, numpy scalars and arrays and torch tensors
    -> Python numbers and lists, tuples -> lists.  The one converter every JSON output uses."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(obj, path: str | os.PathLike, protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``obj`` as indented strict JSON (:func:`jsonable`), atomically and never over an input."""
    clean = jsonable(obj)

    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(clean, f, indent=1, allow_nan=False)
    return atomic_write(path, w, protect)


POSES_CONVENTION = (
    "slice-to-world rigid 4x4 (mm, RAS); slice frame origin at the slice centre, "
    "u along voxel axis i, v along j, w along the normal (see slice2vol.core.geometry)"
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
            **({"series_instance_uid": st.meta["series_uid"]} if "series_uid" in st.meta else {}),
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


#: Bounds of a pose record: slice indices (and acquisition orders) in ``[0, MAX_SLICE_INDEX]``, every
#: pose entry within ``MAX_POSE_VALUE`` (mm for a translation; a rotation's entries are within 1)
#: and a last row of ``0 0 0 1``.
MAX_SLICE_INDEX = 2**31 - 1
MAX_POSE_VALUE = 1e5


class _BadRecord(ValueError):
    """What is wrong with a poses record, as one phrase."""


def _field(obj, key: str, where: str):
    if not isinstance(obj, dict):
        raise _BadRecord(f"{where} must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise _BadRecord(f"{where}: missing key {key!r}")
    return obj[key]


def _json_list(obj, key: str, where: str) -> list:
    v = _field(obj, key, where)
    if not isinstance(v, list):
        raise _BadRecord(f"{where}: {key!r} must be a list, got {type(v).__name__}")
    return v


def _slice_int(obj, key: str, where: str) -> int:
    v = _field(obj, key, where)
    if isinstance(v, bool) or not isinstance(v, int):
        got = json.dumps(v)[:40] if _plain(v) else type(v).__name__
        raise _BadRecord(f"{where}: {key} must be an integer, got {got}")
    if not 0 <= v <= MAX_SLICE_INDEX:
        raise _BadRecord(f"{where}: {key} {str(v)[:40]} is out of range (0 to {MAX_SLICE_INDEX})")
    return v


def _plain(v) -> bool:
    return isinstance(v, (int, float, str)) or v is None


def _pose_matrix(obj, where: str) -> np.ndarray:
    """A finite ``(4, 4)`` homogeneous slice-to-world matrix with bounded entries, else :class:`_BadRecord`."""
    value = _field(obj, "pose", where)
    try:
        P = np.array(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # ragged, text, nested objects, huge integers
        P = None
    if P is None or P.shape != (4, 4) or not np.all(np.isfinite(P)):
        raise _BadRecord(f"{where}: pose is not a finite 4x4 matrix")
    if np.abs(P).max() > MAX_POSE_VALUE or np.abs(P[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise _BadRecord(f"{where}: pose is not a slice-to-world transform (entries within {MAX_POSE_VALUE:g}, "
                         f"last row 0 0 0 1)")
    return P


def load_poses_json(path: str | os.PathLike) -> list[dict]:
    """Read a poses JSON: per stack ``{"name", "index": (N,), "order": (N,) or None, "poses": (N, 4, 4)}``.

    The record is untrusted: anything but the structure :func:`poses_to_json` writes (integer slice
    indices, finite bounded 4x4 poses, see :data:`MAX_SLICE_INDEX`) is one :class:`Slice2VolError` line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except RecursionError:
        raise Slice2VolError(f"poses file {path}: not valid JSON (nested too deeply)") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Slice2VolError(f"poses file {path}: cannot be read ({_one_line(exc)[:200]})") from None
    try:
        if not isinstance(obj, dict):
            raise _BadRecord(f"not a poses record (a JSON object with 'stacks' expected, got {type(obj).__name__})")
        out = []
        for s, st in enumerate(_json_list(obj, "stacks", "record")):
            sl = _json_list(st, "slices", f"stack {s}")
            where = [f"stack {s}, slice {i}" for i in range(len(sl))]
            has_order = bool(sl) and isinstance(sl[0], dict) and "order" in sl[0]
            name = st.get("name")
            out.append({
                "name": name if isinstance(name, str) else None,
                "index": np.array([_slice_int(x, "index", w) for x, w in zip(sl, where)], dtype=np.int64),
                "order": np.array([_slice_int(x, "order", w) for x, w in zip(sl, where)], dtype=np.int64)
                if has_order else None,
                "poses": np.array([_pose_matrix(x, w) for x, w in zip(sl, where)]).reshape(len(sl), 4, 4),
            })
        return out
    except _BadRecord as exc:
        raise Slice2VolError(f"poses file {path}: {exc}") from None
