"""Shared test fixtures: where the shared data live, and small synthetic NIfTI images.

Keep this file generic (any test module may use it); module-specific helpers belong in the module.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest


def _shared_data_dir() -> Path:
    from slice2vol.io import shared_data_dir  # the package's one rule

    return shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (see its README.md); tests using it are skipped where it is absent."""
    root = _shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set SLICE2VOL_SHARED)")
    return root


def _write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    slope: float | None = None,
    inter: float = 0.0,
    sform_code: int = 2,
    qform_code: int = 1,
    qform: np.ndarray | None = None,
) -> Path:
    """Write ``data`` (stored with its own dtype) as NIfTI-1 with explicit header choices.

    ``qform`` defaults to ``affine``; a code of 0 leaves that form unset, so nibabel's choice of
    ``img.affine`` (sform, else qform, else a fallback) can be exercised.
    """
    img = nib.Nifti1Image(np.asarray(data), None)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine if qform is None else qform, code=qform_code)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return Path(path)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation (QR of a Gaussian matrix with the sign fixed)."""
    Q, R = np.linalg.qr(rng.normal(size=(3, 3)))
    Q = Q * np.sign(np.diag(R))
    return Q if np.linalg.det(Q) > 0 else -Q


def _make_affine(rotation: np.ndarray, spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel-to-world ``(4, 4)`` with orthonormal ``rotation`` columns scaled by ``spacing``."""
    A = np.eye(4)
    A[:3, :3] = np.asarray(rotation, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    A[:3, 3] = origin
    return A


def _blob(shape: tuple[int, int, int]) -> np.ndarray:
    """A positive ellipsoidal blob (float32) with a zero background: a tiny stand-in for a brain."""
    axes = [np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in shape]
    r2 = sum(g**2 for g in np.meshgrid(*axes, indexing="ij"))
    return np.where(r2 < 0.9, 100.0 * (1.2 - r2), 0.0).astype(np.float32)


@pytest.fixture(scope="session")
def nifti_writer() -> Callable[..., Path]:
    """``write_nifti(path, data, affine, *, slope, inter, sform_code, qform_code, qform)``.

    Writes ``data`` with its own dtype; a form code of 0 leaves that form unset.  Session-scoped
    so hypothesis tests (with ``tmp_path_factory``) can use it.
    """
    return _write_nifti


@pytest.fixture(scope="session")
def make_affine() -> Callable[..., np.ndarray]:
    """``make_affine(rotation (3, 3), spacing (3,), origin=(0, 0, 0)) -> (4, 4)`` voxel-to-world."""
    return _make_affine


@pytest.fixture(scope="session")
def blob() -> Callable[[tuple[int, int, int]], np.ndarray]:
    """``blob(shape)``: positive ellipsoid on a zero background (float32), a tiny brain stand-in."""
    return _blob


@pytest.fixture
def make_stack(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a small oblique synthetic stack into ``tmp_path``; returns its path.

    ``make_stack(name, shape=(12, 10, 5), data=None, affine=None, **write_nifti_options)``: data
    default to a blob, the affine to an oblique one with 1.5 mm pixels and 3 mm slices.
    """

    def make(name: str = "stack.nii.gz", shape=(12, 10, 5), data=None, affine=None, **kw) -> Path:
        if data is None:
            data = _blob(shape)
        if affine is None:
            affine = _make_affine(_random_rotation(np.random.default_rng(7)), (1.5, 1.5, 3.0), (-9.0, 4.0, 20.0))
        return _write_nifti(tmp_path / name, data, affine, **kw)

    return make


# Stack files that must be refused, with a regex the one-line error message must match.
_BAD_STACKS = {
    "missing": "file not found",
    "directory": "is a directory",
    "text_named_nii_gz": "not a readable NIfTI",
    "png": "not a readable NIfTI",
    "empty_file": "not a readable NIfTI",
    "truncated": "could not read the voxel data",
    "4d_three_volumes": "4D image with 3 volumes",
    "1d": "expected a 3D image",
    "shear": "shear",
    "all_zero": "all voxels are zero",
    "all_nan": "NaN or Inf",
}
_PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(17)


def _write_bad_stack(kind: str, folder: Path, make_stack: Callable[..., Path]) -> Path:
    shape = (12, 10, 5)
    if kind == "missing":
        return folder / "missing.nii.gz"
    if kind == "directory":
        (folder / "dir.nii.gz").mkdir()
        return folder / "dir.nii.gz"
    raw = {"text_named_nii_gz": b"not an image\n", "png": _PNG_BYTES, "empty_file": b""}
    if kind in raw:
        path = folder / ("image.png" if kind == "png" else f"{kind}.nii.gz")
        path.write_bytes(raw[kind])
        return path
    if kind == "truncated":
        good = make_stack("good-for-truncation.nii", shape=shape)  # uncompressed: header intact
        path = folder / "truncated.nii"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        good.unlink()
        return path
    if kind == "shear":
        A = _make_affine(np.eye(3), (1.0, 1.0, 3.0))
        A[0, 1] = 0.3
        return make_stack("shear.nii.gz", shape=shape, affine=A, qform_code=0)
    data = {
        "4d_three_volumes": lambda: np.stack([_blob(shape)] * 3, -1),
        "1d": lambda: _blob(shape).ravel(),
        "all_zero": lambda: np.zeros(shape, np.float32),
        "all_nan": lambda: np.full(shape, np.nan, np.float32),
    }[kind]()
    return make_stack(f"{kind}.nii.gz", data=data)


@pytest.fixture(params=sorted(_BAD_STACKS))
def bad_stack(request, tmp_path: Path, make_stack) -> tuple[Path, str]:
    """Parametrised over every kind of unusable stack file: ``(path, error-message regex)``."""
    return _write_bad_stack(request.param, tmp_path, make_stack), _BAD_STACKS[request.param]


_BAD_MASKS = {
    "mask_shape": "shape .* does not match",
    "mask_geometry": "geometry .* does not match",
    "mask_empty": "mask is empty",
}


@pytest.fixture(params=sorted(_BAD_MASKS))
def bad_stack_mask(request, make_stack) -> tuple[Path, Path, str]:
    """Parametrised over masks that do not fit their (good) stack: ``(stack, mask, regex)``."""
    shape = (12, 10, 5)
    stack = make_stack("masked-stack.nii.gz", shape=shape)
    ones = np.ones(shape, np.uint8)
    if request.param == "mask_shape":
        mask = make_stack("mask.nii.gz", data=ones[:, :, :4])
    elif request.param == "mask_geometry":  # a quarter-voxel shift: same shape, wrong place
        A = nib.load(stack).affine.copy()
        A[:3, 3] += 0.25 * A[:3, 0]
        mask = make_stack("mask.nii.gz", data=ones, affine=A)
    else:
        mask = make_stack("mask.nii.gz", data=0 * ones)
    return stack, mask, _BAD_MASKS[request.param]


# ----------------------------------------------------------------- real atlas at low resolution


def _atlas_lowres(folder: Path, resolution: float, margin: float):
    """An atlas volume and mask resampled to ``resolution`` mm on a world-axis-aligned grid
    cropped to the brain mask plus ``margin`` mm (anti-aliased by a Gaussian first)."""
    import torch

    from slice2vol.core.geometry import axis_aligned_grid
    from slice2vol.core.image import Volume
    from slice2vol.core.resample import gaussian_blur, resample

    img, msk = nib.load(folder / "t2.nii.gz"), nib.load(folder / "mask.nii.gz")
    data = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))
    mask = torch.from_numpy(np.asarray(msk.dataobj) > 0)
    A = img.affine
    src_res = float(np.linalg.norm(A[:3, :3], axis=0).mean())
    idx = np.argwhere(mask.numpy()).astype(np.float64)
    lo, hi = idx.min(0) @ A[:3, :3].T + A[:3, 3], idx.max(0) @ A[:3, :3].T + A[:3, 3]
    B, shape = axis_aligned_grid(np.minimum(lo, hi) - margin, np.maximum(lo, hi) + margin, resolution)
    sigma = math.sqrt(max(resolution**2 - src_res**2, 0.0)) / 2.3548
    smooth = gaussian_blur(data, sigma, [src_res] * 3) if sigma > 0 else data
    vol = resample(smooth, A, B, shape).clamp_min(0)
    m = resample(mask.float(), A, B, shape) > 0.5
    return Volume(vol.contiguous(), B, m)


@pytest.fixture(scope="session")
def atlas_lowres(shared_data):
    """CRL 2017 STA30 T2 atlas at 1.6 mm (58 x 68 x 59 voxels, brain mask as ``.mask``): a real
    fetal brain that is quick to simulate from and register to.  Skipped without shared data.
    Tests must not modify it (session-scoped)."""
    folder = shared_data / "fetal_atlases" / "crl2017" / "STA30"
    if not (folder / "t2.nii.gz").is_file():
        pytest.skip(f"atlas STA30 not found in {folder}")
    return _atlas_lowres(folder, 1.6, 6.0)


def _initial_threads() -> int:
    import torch

    return torch.get_num_threads()


INITIAL_TORCH_THREADS = _initial_threads()  # before any test changed it


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that pin torch to one thread (for determinism or speed) must not leave the rest of the
    suite on one thread: the thread count is restored after every test."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


_MEMLOG = os.environ.get("SLICE2VOL_TEST_MEMLOG")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``SLICE2VOL_TEST_MEMLOG=FILE``: append each test's process peak RSS (MB) and RSS after
    it to FILE, to find what drives the suite's peak memory (``python -m pytest`` is one process)."""
    yield
    if _MEMLOG:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        try:
            with open("/proc/self/statm") as f:
                now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            now = float("nan")
        with open(_MEMLOG, "a") as f:
            f.write(f"{peak:.0f}\t{now:.0f}\t{item.nodeid}\n")
