"""Size checks made before anything large is allocated, so an impossible request is one clear line.

Pure functions (no allocation beyond a few numbers).  Units: lengths in mm, sizes in bytes,
memory figures printed in decimal GB.  The memory model is deliberately rough; it is there to
refuse requests far beyond the machine, not to predict the peak exactly.  Fitted to the demo case
(``--method svr --iterations 1``, 286k pixels, peak RSS above the loaded inputs: 0.45 / 0.71 /
1.81 GB at 0.8 / 0.6 / 0.5 mm, estimated 0.29 / 0.60 / 1.94 GB):

* ``BYTES_PER_VOXEL`` per voxel of the uncropped output grid (32 float32 volumes' worth: the
  estimate, CG vectors, weights, regulariser terms, coverage counts);
* ``BYTES_PER_SAMPLE`` per PSF sample of every acquired pixel (the cached sample positions and
  weights of :class:`slice2vol.core.acquisition.Projector`, 16 bytes, plus per-chunk temporaries).

Limits can be changed with environment variables: ``SLICE2VOL_MAX_VOXELS`` (voxels in one input
image, default ``2**28``) and ``SLICE2VOL_MEMORY_LIMIT`` (bytes a reconstruction may plan to use,
default: the memory available now).
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

from slice2vol.errors import Slice2VolError

__all__ = [
    "BYTES_PER_VOXEL",
    "BYTES_PER_SAMPLE",
    "MIN_GRID_VOXELS",
    "PSF_SAMPLE_LIMIT",
    "available_memory",
    "memory_limit",
    "max_image_voxels",
    "format_bytes",
    "grid_shape",
    "psf_samples",
    "reconstruction_bytes",
    "check_image_size",
    "check_psf",
    "check_grid",
]

BYTES_PER_VOXEL = 128
BYTES_PER_SAMPLE = 32
MIN_GRID_VOXELS = 8  # fewer voxels than this along an axis of the brain region is not a reconstruction
PSF_SAMPLE_LIMIT = 4096  # uncapped PSF nodes per pixel beyond which the thickness/resolution is refused
DEFAULT_MAX_IMAGE_VOXELS = 2**28  # 268 million voxels (e.g. 645^3): far beyond any MRI stack or atlas
# Bytes per voxel to read one NIfTI image on top of its stored dtype: nibabel's float64 scaling,
# the float32 copy and the finite-voxel map (see slice2vol.io.read_nifti).
READ_BYTES_PER_VOXEL = 8 + 4 + 1


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        value = int(float(text))
    except ValueError:
        raise Slice2VolError(f"${name}={text!r} is not a number") from None
    if value <= 0:
        raise Slice2VolError(f"${name}={text!r} must be positive")
    return value


def available_memory(device=None) -> int | None:
    """Bytes that can be allocated now on ``device`` (a ``torch.device``, its name, or None for
    the CPU): ``torch.cuda.mem_get_info`` on CUDA, else psutil's ``available`` if psutil is
    installed, else ``MemAvailable`` of ``/proc/meminfo``; None where unknown."""
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if kind == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no CUDA runtime, or the query is unsupported: no figure rather than no run
            return None
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def memory_limit(device=None) -> int | None:
    """Bytes a reconstruction may plan to use: ``$SLICE2VOL_MEMORY_LIMIT`` if set, else
    :func:`available_memory`; None where unknown (no memory check is then made)."""
    env = _env_int("SLICE2VOL_MEMORY_LIMIT")
    return env if env is not None else available_memory(device)


def max_image_voxels() -> int:
    """Most voxels one input image may have: ``$SLICE2VOL_MAX_VOXELS``, default ``2**28``."""
    env = _env_int("SLICE2VOL_MAX_VOXELS")
    return env if env is not None else DEFAULT_MAX_IMAGE_VOXELS


def format_bytes(n: float) -> str:
    """``n`` bytes as a short decimal figure: ``'41 GB'``, ``'3.2 TB'``, ``'750 MB'``."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} bytes"


def grid_shape(extent_mm: Sequence[float], resolution: float) -> tuple[int, int, int]:
    """Shape of a grid covering a box of ``extent_mm`` (3 side lengths, mm) at ``resolution`` mm,
    as :func:`slice2vol.core.geometry.axis_aligned_grid` makes it (``ceil(extent / res) + 1``)."""
    if not (math.isfinite(resolution) and resolution > 0):
        raise Slice2VolError(f"--resolution must be a positive number of mm, got {resolution}")
    out = []
    for e in extent_mm:
        n = e / resolution
        if not math.isfinite(n):
            raise Slice2VolError(f"the region to reconstruct is not finite (extent {e} mm)")
        out.append(max(int(math.ceil(n)) + 1, 1))
    return tuple(out)  # type: ignore[return-value]


def psf_samples(spacing: tuple[float, float], thickness: float, resolution: float, inplane_fwhm: float = 1.2,
                truncate: float = 2.0, capped: bool = False) -> int:
    """PSF nodes per pixel of :func:`slice2vol.core.acquisition.psf_kernel` (quality ``normal``) for
    slices of this ``spacing`` and ``thickness`` alone: the isotropic part ``vs``
    (:func:`slice2vol.core.acquisition.isotropic_sigma`) goes to the volume prefilter; then 3 in-plane
    nodes per axis whose remaining in-plane sigma exceeds ``resolution``, times
    ``2 ceil(truncate sigma_z' / resolution) + 1`` through-plane nodes with
    ``sigma_z' = sqrt(sigma_z^2 - vs^2)`` (``spacing``, ``thickness`` and ``resolution`` in mm); with
    ``capped`` after the kernel's cap ``MAX_PSF_SAMPLES['normal']``, else as asked for before it."""
    from slice2vol.core import acquisition as acq

    sig = [inplane_fwhm * d * acq.FWHM_TO_SIGMA for d in spacing]
    sz = thickness * acq.FWHM_TO_SIGMA
    vs = acq.isotropic_sigma(min(spacing), thickness, inplane_fwhm)
    n_xy = 1
    for s in sig:
        if math.sqrt(max(0.0, s * s - vs * vs)) > resolution:
            n_xy *= 3
    sz = math.sqrt(max(0.0, sz * sz - vs * vs)) if math.isfinite(sz) else sz
    max_half = (acq.MAX_PSF_SAMPLES["normal"] // n_xy - 1) // 2
    if not math.isfinite(sz / resolution):
        return n_xy * (2 * max(max_half, 0) + 1) if capped else math.inf  # type: ignore[return-value]
    half = int(math.ceil(truncate * sz / resolution)) if sz > 0 else 0
    if capped and half > max_half:
        half = max(max_half, 0)
    return n_xy * (2 * half + 1)


def _capped_samples(spacing, thickness, resolution) -> int:
    return psf_samples(spacing, thickness, resolution, capped=True)


def reconstruction_bytes(shape: Sequence[int], n_pixels: int = 0, samples: int = 1) -> int:
    """Rough bytes a reconstruction on a grid of ``shape`` voxels needs, with ``n_pixels``
    acquired pixels of ``samples`` PSF nodes each (see the module doc for the model)."""
    return int(math.prod(int(n) for n in shape) * BYTES_PER_VOXEL + n_pixels * samples * BYTES_PER_SAMPLE)


def check_image_size(shape: Sequence[int], itemsize: int, what: str) -> None:
    """Refuse an image whose header promises more than ``$SLICE2VOL_MAX_VOXELS`` voxels, or more
    memory to read (stored ``itemsize`` bytes + :data:`READ_BYTES_PER_VOXEL` per voxel) than is
    available: called before the (possibly compressed) data are read."""
    n = math.prod(int(d) for d in shape)
    dims = "x".join(str(int(d)) for d in shape)
    need = n * (int(itemsize) + READ_BYTES_PER_VOXEL)
    limit = max_image_voxels()
    if n > limit:
        raise Slice2VolError(f"{what}: header says {dims} = {n} voxels ({format_bytes(need)} to read), more than the "
                             f"limit of {limit} voxels per image (set SLICE2VOL_MAX_VOXELS to raise it)")
    avail = available_memory()
    if avail is not None and need > avail:
        raise Slice2VolError(f"{what}: header says {dims} voxels, which would need {format_bytes(need)} to read; "
                             f"about {format_bytes(avail)} of memory is available")


def check_psf(keys: Iterable[tuple[float, float, float]], resolution: float, names: Sequence[str] | None = None) -> int:
    """Refuse slice geometries whose PSF at ``resolution`` mm would need more than
    :data:`PSF_SAMPLE_LIMIT` nodes per pixel (an absurd ``--thickness``); returns the largest
    number of nodes per pixel that will be used (after :func:`~slice2vol.core.acquisition.psf_kernel`'s cap).

    ``keys`` are ``(spacing_x, spacing_y, thickness)`` in mm, one per stack (``names`` for the message).
    """
    used = 1
    for i, (dx, dy, th) in enumerate(keys):
        if not (math.isfinite(th) and th >= 0):
            raise Slice2VolError(f"slice thickness {th} mm is not a finite number")
        k = psf_samples((dx, dy), th, resolution)
        if k > PSF_SAMPLE_LIMIT:
            who = f"stack {names[i]}: " if names else ""
            raise Slice2VolError(f"{who}slice thickness {th:g} mm at --resolution {resolution:g} mm would need {k} "
                                 f"PSF samples per pixel (limit {PSF_SAMPLE_LIMIT}); check --thickness and --resolution (mm)")
        used = max(used, _capped_samples((dx, dy), th, resolution))
    return used


def _finest_fitting(extent_mm, n_pixels, keys, limit) -> float | None:
    """Smallest resolution (mm, rounded up to 2 significant digits) whose estimate fits in ``limit``."""
    keys = list(keys) or [(1.0, 1.0, 0.0)]

    def fits(r: float) -> bool:
        k = max(_capped_samples((dx, dy), th, r) for dx, dy, th in keys)
        return reconstruction_bytes(grid_shape(extent_mm, r), n_pixels, k) <= limit

    hi = max(max(extent_mm), 1.0) * 2
    if not fits(hi):
        return None  # the pixels alone do not fit
    lo = hi / 1e6
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    digits = 1 - int(math.floor(math.log10(hi)))
    r = math.ceil(hi * 10**digits - 1e-9) / 10**digits
    return r if fits(r) else hi


def check_grid(extent_mm: Sequence[float], resolution: float, *, roi_extent_mm: Sequence[float] | None = None,
               n_pixels: int = 0, keys: Iterable[tuple[float, float, float]] = (), device=None,
               what: str = "output grid", min_voxels: int = MIN_GRID_VOXELS) -> tuple[int, int, int]:
    """Refuse an output grid that is absurdly coarse or too large for memory; returns its shape.

    Args:
        extent_mm: side lengths (mm) of the box the grid covers.
        resolution: voxel size, mm.
        roi_extent_mm: side lengths of the brain region itself (default ``extent_mm``): fewer
            than ``min_voxels`` voxels along one of them is refused.
        n_pixels: acquired pixels the methods will project (0: grid memory only).
        keys: ``(spacing_x, spacing_y, thickness)`` mm of the slices, for the PSF samples per pixel.
        device: where the grid lives (memory figure from :func:`memory_limit`).
        what: the grid's name in the message.
        min_voxels: fewest voxels along each side of the region (default :data:`MIN_GRID_VOXELS`).
    """
    keys = list(keys)
    shape = grid_shape(extent_mm, resolution)
    roi = roi_extent_mm if roi_extent_mm is not None else extent_mm
    roi_shape = grid_shape(roi, resolution)
    if min(roi_shape) < min_voxels:
        coarsest = min(roi) / max(min_voxels - 1, 1)
        sides = " x ".join(f"{e:.0f}" for e in roi)
        raise Slice2VolError(
            f"--resolution {resolution:g} mm gives a {'x'.join(map(str, roi_shape))} grid over the {sides} mm "
            f"brain region (fewer than {min_voxels} voxels along an axis); use --resolution <= {coarsest:.2g}")
    k = max([_capped_samples((dx, dy), th, resolution) for dx, dy, th in keys] or [1])
    need = reconstruction_bytes(shape, n_pixels, k)
    limit = memory_limit(device)
    if limit is not None and need > limit:
        finest = _finest_fitting(extent_mm, n_pixels, keys, limit)
        hint = f"; use --resolution >= {finest:g}" if finest is not None else ""
        raise Slice2VolError(
            f"{what} {'x'.join(map(str, shape))} at {resolution:g} mm would need about {format_bytes(need)} "
            f"({k} PSF samples per pixel), but about {format_bytes(limit)} is available{hint}")
    return shape
