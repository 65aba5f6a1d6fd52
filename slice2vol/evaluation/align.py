"""Rigid alignment of a reconstruction to a reference volume, for evaluation only.

Evaluation must not share code with what it evaluates: a bug in slice2vol's own registration
core (:mod:`slice2vol.core.registration`, which every method uses) would otherwise hide itself by
aligning the volumes it produced in the same wrong way.  This module therefore uses SimpleITK's
(ITK's) registration framework and nothing of slice2vol but the :class:`~slice2vol.core.image.Volume`
container.

Conventions: slice2vol's world is RAS millimetres (nibabel); ITK's physical space is LPS
millimetres.  The two differ by ``F = diag(-1, -1, 1, 1)``, so a RAS affine ``A`` is the LPS
affine ``F @ A``, and an LPS transform ``T`` is the RAS transform ``F @ T @ F``.  slice2vol's
arrays are indexed ``[i, j, k]``; ``sitk.GetImageFromArray`` takes ``[k, j, i]``.

What is done (:func:`align_rigid`), in the spirit of the usual ANTs/ITK rigid stage:

* metric: normalised correlation inside the reference mask (a reconstruction is, up to a linear
  intensity map and noise, the same contrast as its reference, and correlation is blind to that
  map); regular sampling of a fifth of the masked voxels (deterministic);
* transform: a rigid ``Euler3DTransform`` about the centre of the reference mask, started from the
  identity, i.e. from the world frames as given (a reconstruction lives in the scanner frame its
  stacks were acquired in, which is the reference's up to the bulk motion of the fetus);
* optimiser: regular-step gradient descent with scales from physical shift, three levels
  (shrink 4, 2, 1; Gaussian smoothing 2, 1, 0 mm);
* two runs, kept is the one whose correlation over *every* masked voxel is better: the one with the
  sparse sampling above and one with every masked voxel (:data:`FULL_SAMPLING`).  A fifth is enough
  nearly always, but a sharp reconstruction 5.6 deg off its reference (test atlas GA21, four
  stacks) once converged 34 deg off and read 17.6 dB; every voxel found the 5.6 deg (and
  0.5 did too).  The second run costs about a second on a fetal brain at 0.8 mm.
"""
from __future__ import annotations

import numpy as np
import torch

from slice2vol.core.image import Volume
from slice2vol.errors import Slice2VolError

__all__ = ["align_rigid", "volume_to_sitk"]

_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
FULL_SAMPLING = 1.0  # the second run's sampling fraction (module docstring)


def volume_to_sitk(data: torch.Tensor | np.ndarray, affine: np.ndarray, pixel_type=None):
    """A SimpleITK image with the same voxels and the same world geometry as ``(data, affine)``.

    Args:
        data: ``(Ni, Nj, Nk)`` array (slice2vol index order).
        affine: ``(4, 4)`` voxel-to-world (RAS mm) matrix; its 3x3 part must be a rotation times
            positive spacings (ITK has no shear).
    """
    import SimpleITK as sitk

    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if pixel_type is None:
        arr = arr.astype(np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    if pixel_type is not None:
        img = sitk.Cast(img, pixel_type)
    A = _RAS_LPS @ np.asarray(affine, dtype=np.float64)
    M = A[:3, :3]
    spacing = np.linalg.norm(M, axis=0)
    if np.any(spacing <= 0):
        raise Slice2VolError("cannot align: a volume has a zero voxel size")
    D = M / spacing
    if not np.allclose(D.T @ D, np.eye(3), atol=1e-4):
        raise Slice2VolError("cannot align: a volume's affine has shear (ITK images are rotation x spacing)")
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in D.flatten()))
    img.SetOrigin(tuple(float(v) for v in A[:3, 3]))
    return img


def align_rigid(moving: Volume, fixed: Volume, fixed_mask: torch.Tensor | None = None,
                threads: int | None = None, sampling: float = 0.2) -> np.ndarray:
    """Rigid transform aligning ``moving`` (a reconstruction) to ``fixed`` (its reference).

    Args:
        moving, fixed: :class:`~slice2vol.core.image.Volume` (any grids; world geometry from their affines).
        fixed_mask: optional ``(Ni, Nj, Nk)`` bool on the fixed grid; the metric is evaluated there
            (default: ``fixed > 0``).
        threads: ITK threads (default: ITK's own choice).
        sampling: fraction of the masked fixed voxels the first run's metric uses (regular grid,
            deterministic); the second run uses every voxel (module docstring).
    Returns:
        ``(4, 4)`` float64 ``T`` in RAS millimetres mapping fixed-world points to moving-world
        points: the aligned moving image is ``moving`` sampled at ``T @ x`` for fixed points ``x``.
    """
    import SimpleITK as sitk

    m = (fixed.data > 0) if fixed_mask is None else fixed_mask.bool()
    if tuple(m.shape) != tuple(fixed.data.shape):
        raise Slice2VolError(f"mask shape {tuple(m.shape)} does not match the reference grid {tuple(fixed.data.shape)}")
    if not bool(m.any()):
        raise Slice2VolError("cannot align: the reference mask is empty")
    # the metric only looks inside the mask: crop the fixed image to its box (plus the smoothing's reach)
    nz = torch.nonzero(m)
    lo = (nz.min(0).values - 4).clamp_min(0).tolist()
    hi = [min(int(h) + 5, n) for h, n in zip(nz.max(0).values.tolist(), m.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    A_box = np.asarray(fixed.affine, dtype=np.float64).copy()
    A_box[:3, 3] = A_box[:3, :3] @ np.asarray(lo, dtype=np.float64) + A_box[:3, 3]
    f_img = volume_to_sitk(fixed.data[box].float(), A_box)
    m_img = volume_to_sitk(moving.data.float(), moving.affine)
    mask_img = volume_to_sitk(m[box].to(torch.uint8), A_box, pixel_type=sitk.sitkUInt8)

    idx = torch.nonzero(m).double().mean(0).cpu().numpy()
    centre = (_RAS_LPS @ np.asarray(fixed.affine, dtype=np.float64) @ np.r_[idx, 1.0])[:3]
    best = None
    for fraction in dict.fromkeys((float(sampling), FULL_SAMPLING)):
        tx = _register(f_img, m_img, mask_img, centre, fraction, threads)
        cost = _correlation_cost(f_img, m_img, mask_img, tx, threads)
        if best is None or cost < best[0]:
            best = (cost, tx)
    tx = best[1]

    R = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=np.float64)
    t = np.asarray(tx.GetTranslation(), dtype=np.float64)
    T_lps = np.eye(4)
    T_lps[:3, :3] = R
    T_lps[:3, 3] = c + t - R @ c
    return _RAS_LPS @ T_lps @ _RAS_LPS


def _register(f_img, m_img, mask_img, centre: np.ndarray, sampling: float, threads: int | None):
    """One run of the registration (module docstring) from the identity about ``centre`` (LPS mm);
    returns the fitted ``sitk.Euler3DTransform``."""
    import SimpleITK as sitk

    tx = sitk.Euler3DTransform()
    tx.SetCenter(tuple(float(c) for c in centre))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(mask_img)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(sampling, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=300,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(tx, inPlace=True)
    if threads is not None:
        reg.SetNumberOfThreads(int(threads))
    try:
        reg.Execute(f_img, m_img)
    except RuntimeError as exc:  # ITK raises e.g. when too few samples fall inside the moving image
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise Slice2VolError(f"rigid alignment (SimpleITK) failed: {first}") from None
    return tx


def _correlation_cost(f_img, m_img, mask_img, tx, threads: int | None) -> float:
    """ITK's correlation metric (lower is better) of ``tx`` over every voxel of the fixed mask at
    full resolution; ``inf`` where ITK cannot evaluate it (too little overlap)."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(mask_img)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(tx)
    if threads is not None:
        reg.SetNumberOfThreads(int(threads))
    try:
        return float(reg.MetricEvaluate(f_img, m_img))
    except RuntimeError:
        return float("inf")
