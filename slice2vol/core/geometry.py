"""Coordinate conventions of slice2vol, written down once.

World
    Millimetres, RAS+, exactly as nibabel's ``img.affine`` maps voxel indices to world points.

Volume
    A 3D tensor ``(Ni, Nj, Nk)`` indexed like the NIfTI data array (``data[i, j, k]``) with a
    ``(4, 4)`` voxel-to-world affine.  Reconstruction grids are axis-aligned with the world
    (``diag(res, res, res)`` plus an origin), but every function here accepts any affine.

Slice frame
    Every acquired 2D slice of shape ``(H, W)`` (``H`` along the stack's voxel axis ``i``, ``W``
    along ``j``) has its own frame in mm whose origin is the slice centre:
    ``u = (i - (H - 1) / 2) * dx``, ``v = (j - (W - 1) / 2) * dy``, ``w = 0`` on the slice plane,
    ``w`` along the slice normal.  A slice's *pose* is the rigid ``(4, 4)`` slice-to-world
    transform of that frame (``transforms`` module conventions), so rotating a pose rotates the
    slice about its own centre and the pose carries no scaling: in-plane spacing and thickness are
    stored beside it.  For the pose to be a proper rotation the slice frame must be right-handed;
    :func:`make_right_handed` flips the ``i`` axis of a stack whose affine has a negative
    determinant (the world position of every voxel is unchanged).

Counts from lengths
    A number of voxels or pixels derived from a length in mm (a grid covering a box, a stack
    resampled to another spacing) is rounded by :func:`count_ceil` / :func:`count_round`, which
    treat a ratio within :data:`COUNT_TOL` of an integer (or of a half) as exactly that: the same
    stack read from NIfTI (float32 affine) or from DICOM (decimal strings) differs in the 7th
    digit, and a plain ``ceil`` or ``round`` at an exact boundary (1 mm pixels, a 2 mm working
    grid, an odd width) then gives grids one voxel apart and visibly different reconstructions.

Sampling
    ``torch.nn.functional.grid_sample`` with ``align_corners=True``: normalised coordinate -1 is
    the centre of voxel 0 and +1 the centre of voxel ``N - 1``; the grid's last dimension is
    ``(k, j, i)`` for a volume stored ``(i, j, k)``.  Outside the volume the value is 0.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from slice2vol.errors import Slice2VolError

__all__ = [
    "COUNT_TOL",
    "count_ceil",
    "count_round",
    "check_affine",
    "make_right_handed",
    "nearest_rotation",
    "stack_slice_poses",
    "slice_pixel_coords",
    "world_to_grid",
    "slice_to_world",
    "grid_affine",
    "axis_aligned_grid",
    "slice_normal",
    "orientation_groups",
    "SAME_PLANE_DEG",
]

SHEAR_TOL = 1e-3
#: degrees: stacks whose slice normals are closer than this sample the anatomy alike and count as
#: one plane (:func:`orientation_groups`; the quality verdict's witnesses cross at least this much)
SAME_PLANE_DEG = 45.0


def check_affine(affine: np.ndarray, what: str = "image") -> np.ndarray:
    """Return the voxel spacing of ``affine`` (3,), raising if it shears, is singular or non-finite.

    Slices must be rigid planes, so a sheared voxel grid (non-orthogonal columns) is refused.
    """
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4) or not np.all(np.isfinite(A)):
        raise Slice2VolError(f"{what}: affine is not a finite 4x4 matrix")
    M = A[:3, :3]
    spacing = np.linalg.norm(M, axis=0)
    if np.any(spacing < 1e-6):
        raise Slice2VolError(f"{what}: affine is singular (zero voxel size)")
    U = M / spacing
    off = U.T @ U - np.eye(3)
    if np.abs(off).max() > SHEAR_TOL:
        raise Slice2VolError(
            f"{what}: affine has shear (voxel axes not orthogonal, max |cos| = {np.abs(off).max():.3g}); "
            "resample it to an orthogonal grid first"
        )
    return spacing


def make_right_handed(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Flip voxel axis ``i`` if ``det(affine) < 0`` so slice frames are right-handed.

    Returns ``(data, affine, flipped)``; world coordinates of every voxel are preserved.
    """
    A = np.asarray(affine, dtype=np.float64)
    if np.linalg.det(A[:3, :3]) > 0:
        return data, A, False
    n = data.shape[0]
    F = np.eye(4)
    F[0, 0] = -1
    F[0, 3] = n - 1
    return np.ascontiguousarray(data[::-1]), A @ F, True


def nearest_rotation(M: np.ndarray) -> np.ndarray:
    """The proper rotation closest to ``M`` (3, 3) in the Frobenius norm (polar decomposition).

    Header affines are stored in float32 and :func:`check_affine` tolerates tiny shear, so the
    normalised columns are only orthonormal to ~1e-7; poses must be exact rotations because the
    ``transforms`` module (axis-angle, inversion by transpose) relies on it.
    """
    U, _, Vt = np.linalg.svd(np.asarray(M, dtype=np.float64))
    if np.linalg.det(U @ Vt) < 0:
        raise ValueError("nearest_rotation: matrix is a reflection; make the affine right-handed first")
    return U @ Vt


def stack_slice_poses(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[float, float], float]:
    """Slice-to-world poses of every slice ``k`` of a stack.

    Args:
        affine: right-handed, shear-free voxel-to-world ``(4, 4)``.
        shape: ``(H, W, N)`` stack data shape.
    Returns:
        poses ``(N, 4, 4)`` float64, in-plane spacing ``(dx, dy)`` mm, slice spacing mm.
        The pose rotation is the :func:`nearest_rotation` to the affine's normalised columns, so
        pixels land on ``affine @ (i, j, k)`` to within the shear :func:`check_affine` allows.
    """
    A = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    R = nearest_rotation(A[:3, :3] / spacing)
    H, W, N = shape
    poses = np.tile(np.eye(4), (N, 1, 1))
    poses[:, :3, :3] = R
    idx = np.stack([np.full(N, (H - 1) / 2), np.full(N, (W - 1) / 2), np.arange(N), np.ones(N)], 1)
    poses[:, :3, 3] = (idx @ A.T)[:, :3]
    return poses, (float(spacing[0]), float(spacing[1])), float(spacing[2])


def slice_pixel_coords(H: int, W: int, spacing: tuple[float, float], dtype=torch.float32, device=None) -> Tensor:
    """Slice-frame coordinates (mm) of every pixel, ``(H, W, 3)`` with ``w = 0``."""
    u = (torch.arange(H, dtype=dtype, device=device) - (H - 1) / 2) * spacing[0]
    v = (torch.arange(W, dtype=dtype, device=device) - (W - 1) / 2) * spacing[1]
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    return torch.stack([uu, vv, torch.zeros_like(uu)], -1)


def grid_affine(affine: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """``(4, 4)`` map from world mm to ``grid_sample`` coordinates ``(k, j, i)`` of a volume.

    Folding the normalisation into one matrix means sampling costs one matrix-vector product.
    An axis of length 1 has no extent for ``grid_sample``: every point maps to its single voxel
    along that axis (never outside), so callers must bound such axes themselves.
    """
    A = affine.to(torch.float64)
    inv = torch.linalg.inv(A)
    N = torch.zeros(4, 4, dtype=torch.float64, device=A.device)
    for row, axis in enumerate((2, 1, 0)):  # grid x <- k, y <- j, z <- i
        n = shape[axis]
        scale = 2.0 / (n - 1) if n > 1 else 0.0
        N[row, axis] = scale
        N[row, 3] = -1.0 if n > 1 else 0.0
    N[3, 3] = 1
    return N @ inv


def slice_to_world(poses: Tensor, coords: Tensor, slice_id: Tensor) -> Tensor:
    """World positions ``(P, 3)`` mm of slice-frame points ``coords (P, 3)`` of slices ``slice_id``
    under ``poses (M, 4, 4)``."""
    return (poses[slice_id, :3, :3] @ coords[..., None])[..., 0] + poses[slice_id, :3, 3]


def world_to_grid(x: Tensor, affine: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """World points ``(..., 3)`` mm -> ``grid_sample`` coordinates ``(..., 3)`` of a volume."""
    G = grid_affine(affine, shape).to(x.device, x.dtype)
    return x @ G[:3, :3].T + G[:3, 3]


#: Ratios this close (in voxels) to an integer or a half count as exactly it (module docstring).
COUNT_TOL = 1e-4


def count_ceil(x):
    """``ceil(x)`` with ``x`` within :data:`COUNT_TOL` above an integer taken as that integer.

    >>> count_ceil(31.0000001), count_ceil(31.0), count_ceil(31.01)
    (31, 31, 32)
    >>> count_ceil(np.array([2.00000003, 2.5])).tolist()
    [2, 3]
    """
    c = np.ceil(np.asarray(x, dtype=np.float64) - COUNT_TOL).astype(int)
    return int(c) if c.ndim == 0 else c


def count_round(x: float) -> int:
    """``round(x)`` (halves to even, as Python's) with ``x`` within :data:`COUNT_TOL` of a half
    taken as exactly the half.

    >>> count_round(32.49999999), count_round(32.5), count_round(32.50000003), count_round(33.5000001)
    (32, 32, 32, 34)
    """
    x = float(x)
    half = np.floor(x) + 0.5
    return int(round(half)) if abs(x - half) <= COUNT_TOL else int(round(x))


def axis_aligned_grid(lo: np.ndarray, hi: np.ndarray, resolution: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """World-axis-aligned voxel grid covering the box ``[lo, hi]`` (mm) at ``resolution`` mm.

    Returns the ``(4, 4)`` affine (RAS, voxel centres on the box) and the shape.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    # Checked here because a zero/NaN resolution or an infinite box would otherwise surface as an
    # integer overflow or a giant allocation far from its cause.
    if not (np.isfinite(resolution) and resolution > 0):
        raise Slice2VolError(f"grid resolution must be a positive number of mm, got {resolution}")
    if lo.shape != (3,) or hi.shape != (3,) or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise Slice2VolError("grid box corners must be two finite 3-vectors (mm)")
    shape = tuple(int(n) for n in np.maximum(count_ceil((hi - lo) / resolution) + 1, 1))
    centre = (lo + hi) / 2
    origin = centre - (np.asarray(shape) - 1) / 2 * resolution
    A = np.eye(4)
    A[:3, :3] *= resolution
    A[:3, 3] = origin
    return A, shape  # type: ignore[return-value]


def slice_normal(affine: np.ndarray) -> np.ndarray:
    """``(3,)`` unit world normal of a stack's slices: its affine's third (slice) axis, normalised.

    >>> slice_normal(np.diag([1.0, 1.0, 3.0, 1.0])).tolist()
    [0.0, 0.0, 1.0]
    """
    n = np.asarray(affine, dtype=np.float64)[:3, 2]
    return n / max(float(np.linalg.norm(n)), 1e-12)


def orientation_groups(affines, max_angle: float = SAME_PLANE_DEG) -> list[list[int]]:
    """Indices of stacks grouped by slice orientation: a stack joins the first group whose first
    stack's normal is within ``max_angle`` degrees of its own (either sign), else starts a group.

    Two stacks in one group sample the anatomy alike (the same direction resolved worst), so the
    number of groups is the number of distinct planes an exam covers.

    >>> ax, cor = np.eye(4), np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    >>> orientation_groups([ax, cor, ax])
    [[0, 2], [1]]
    """
    normals = [slice_normal(A) for A in affines]
    limit = float(np.cos(np.radians(max_angle)))
    groups: list[list[int]] = []
    for i, n in enumerate(normals):
        for g in groups:
            if abs(float(normals[g[0]] @ n)) >= limit:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups
