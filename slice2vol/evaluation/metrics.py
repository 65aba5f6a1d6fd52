"""Evaluation: image metrics against a reference volume, slice pose errors (TRE) and
reference-free slice consistency, plus the ``slice2vol evaluate`` command.

Definitions (used everywhere in this module; "the mask" is the optional boolean mask argument,
the whole image when it is omitted):

* **data range** -- unless given, ``max - min`` of the *reference* inside the mask, so PSNR and
  SSIM do not depend on how dark the background is or on the image's storage type.
* **PSNR** -- ``10 log10(range^2 / MSE)`` dB with the MSE over the mask; ``inf`` when identical.
* **SSIM** -- ``pytorch_msssim.ssim`` (Gaussian window 11, sigma 1.5, K = (0.01, 0.03)); on a
  3D volume the window is 3D (the library convolves 5D tensors with ``conv3d``).  With a mask it
  is computed on the mask's bounding box with voxels outside the mask set to 0 in *both* images,
  so everything outside the mask counts as perfectly matching background.  The window shrinks to
  the largest odd size that fits the box (the library would otherwise silently skip smoothing).
* **NRMSE** -- ``RMSE / RMS(reference)`` over the mask (RMS, not the range or the mean, so it is
  a relative error: 0 is perfect, 1 is what an all-zero image scores).
* **NCC** -- the Pearson correlation over the mask, in ``[-1, 1]``; 0 when either image is
  constant there.  (The cSVR paper's Table 1 reports "NCC" of about 0.13 for good
  reconstructions, presumably another definition it does not state; do not compare with it.)
* **TRE** (cSVR eq. 10) -- per slice, the largest distance over its pixels between the pixel's
  world position under the estimated and under the ground-truth pose, after (by default) removing
  one global rigid transform (see :func:`slice_tre`).
* **Slice consistency** (cSVR Table 1) -- SSIM, PSNR and NCC between acquired slices and slices
  simulated from the reconstruction with the shared acquisition model (see
  :func:`slice_consistency`).

Image-metric functions take tensors of any matching shape and return 0-dim float tensors; the
report functions (:func:`compare_volumes`, :func:`tre_summary`, :func:`slice_consistency`) return
dicts of plain Python values (``inf``/NaN stay floats; ``evaluate`` writes them as JSON ``null``).
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pytorch_msssim
import torch
from torch import Tensor

from slice2vol.core.acquisition import forward, psf_kernel
from slice2vol.core.geometry import slice_pixel_coords, slice_to_world
from slice2vol.core.image import SliceSet, Stack, Volume
from slice2vol.core.resample import resample
from slice2vol.core.similarity import per_slice_ncc
from slice2vol.core.transforms import apply, kabsch
from slice2vol.errors import Slice2VolError

__all__ = [
    "psnr",
    "ssim3d",
    "nrmse",
    "ncc",
    "per_slice_ncc",
    "fit_intensity",
    "compare_volumes",
    "slice_tre",
    "tre_summary",
    "PoseMatch",
    "match_poses",
    "default_slice_coords",
    "simulate_slices",
    "slice_consistency",
    "naive_consistency",
    "evaluate_command",
    "format_report",
]

log = logging.getLogger(__name__)

SSIM_WIN_SIZE = 11
SSIM_WIN_SIGMA = 1.5
# Without the stacks the pixel layout of a slice is unknown; TRE is then evaluated on a square
# grid this large around each slice centre (a fetal brain is at most ~100 mm across).
DEFAULT_TRE_HALF_EXTENT_MM = 50.0
DEFAULT_TRE_STEP_MM = 2.5
ALIGNMENT_METHOD = "SimpleITK rigid (Euler3D, correlation)"
UNALIGNED_NOTE = ("note: compared WITHOUT alignment, in the volumes' world frames as stored; a reconstruction "
                  "sits in its template stack's scanner frame, so any bulk offset of the fetus lowers these "
                  "figures. Add --align for a rigid alignment (SimpleITK) before the metrics.")


# ----------------------------------------------------------------------------- image metrics

def _masked_pair(x: Tensor, ref: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Float64 values of ``x`` and ``ref`` inside ``mask`` (flattened)."""
    if x.shape != ref.shape:
        raise Slice2VolError(f"images differ in shape: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if mask is None:
        return x.reshape(-1).double(), ref.reshape(-1).double()
    if mask.shape != ref.shape:
        raise Slice2VolError(f"mask shape {tuple(mask.shape)} does not match the image {tuple(ref.shape)}")
    m = mask.to(ref.device).bool()
    if not bool(m.any()):
        raise Slice2VolError("the mask is empty")
    return x[m].double(), ref[m].double()


def _data_range(ref_values: Tensor, data_range: float | None) -> float:
    rng = float(ref_values.max() - ref_values.min()) if data_range is None else float(data_range)
    if not rng > 0:
        raise Slice2VolError("the reference is constant inside the mask (data range 0); give data_range")
    return rng


def psnr(x: Tensor, ref: Tensor, mask: Tensor | None = None, data_range: float | None = None) -> Tensor:
    """Peak signal-to-noise ratio (dB) of ``x`` against ``ref``.

    Args:
        x, ref: tensors of the same shape (any number of dimensions).
        mask: optional bool tensor of that shape; the MSE is taken over it.
        data_range: peak value; default ``max - min`` of ``ref`` inside the mask.
    Returns:
        0-dim float64 tensor; ``inf`` when ``x == ref`` inside the mask.
    """
    xv, rv = _masked_pair(x, ref, mask)
    rng = _data_range(rv, data_range)
    mse = ((xv - rv) ** 2).mean()
    return 10 * torch.log10(rng**2 / mse)


def nrmse(x: Tensor, ref: Tensor, mask: Tensor | None = None) -> Tensor:
    """Root-mean-square error normalised by the RMS of ``ref``, both over the mask.

    Args and shapes as in :func:`psnr`.  Returns a 0-dim float64 tensor (0 = identical,
    1 = as far as an all-zero image).
    """
    xv, rv = _masked_pair(x, ref, mask)
    rms_ref = rv.pow(2).mean().sqrt()
    if not float(rms_ref) > 0:
        raise Slice2VolError("the reference is zero inside the mask; NRMSE is undefined")
    return (xv - rv).pow(2).mean().sqrt() / rms_ref


def _pearson(xv: Tensor, rv: Tensor) -> Tensor:
    xc, rc = xv - xv.mean(), rv - rv.mean()
    den = (xc.pow(2).sum() * rc.pow(2).sum()).sqrt()
    return torch.where(den > 0, (xc * rc).sum() / den.clamp_min(1e-300), torch.zeros_like(den))


def ncc(x: Tensor, ref: Tensor, mask: Tensor | None = None) -> Tensor:
    """Normalised cross-correlation (Pearson) over the mask, a 0-dim float64 tensor in ``[-1, 1]``.

    Invariant to a positive linear intensity change of either image; 0 if one is constant.
    """
    xv, rv = _masked_pair(x, ref, mask)
    return _pearson(xv, rv)


def _ssim_window(spatial: Sequence[int], win_size: int) -> int:
    """Largest odd window <= ``win_size`` that fits every spatial dimension (at least 1)."""
    w = min(win_size, min(spatial))
    return max(1, w if w % 2 else w - 1)


def _bounding_box(mask: Tensor) -> tuple[slice, ...]:
    idx = torch.nonzero(mask, as_tuple=False)
    lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
    return tuple(slice(a, b + 1) for a, b in zip(lo, hi))


def ssim3d(
    x: Tensor,
    ref: Tensor,
    mask: Tensor | None = None,
    data_range: float | None = None,
    win_size: int = SSIM_WIN_SIZE,
    win_sigma: float = SSIM_WIN_SIGMA,
) -> Tensor:
    """Structural similarity of two volumes with a 3D Gaussian window.

    Args:
        x, ref: ``(Ni, Nj, Nk)``.
        mask: optional ``(Ni, Nj, Nk)`` bool.  SSIM is then computed on the mask's bounding box
            with voxels outside the mask zeroed in both volumes.
        data_range: default ``max - min`` of ``ref`` inside the mask.
        win_size, win_sigma: Gaussian window (shrunk to fit small boxes, see module doc).
    Returns:
        0-dim tensor (mean of the SSIM map over the window-valid voxels); 1 when identical.
    """
    _, rv = _masked_pair(x, ref, mask)
    rng = _data_range(rv, data_range)
    if mask is not None:
        box = _bounding_box(mask.to(ref.device).bool())
        m = mask.to(ref.device).bool()[box]
        x = torch.where(m, x[box], torch.zeros_like(x[box]))
        ref = torch.where(m, ref[box], torch.zeros_like(ref[box]))
    dtype = torch.promote_types(x.dtype, torch.float32)
    w = _ssim_window(x.shape, win_size)
    return pytorch_msssim.ssim(x[None, None].to(dtype), ref[None, None].to(dtype), data_range=rng,
                               win_size=w, win_sigma=win_sigma)


def fit_intensity(x: Tensor, ref: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
    """Least-squares ``(a, b)`` minimising ``sum_mask (a x + b - ref)^2``.

    If ``x`` is constant in the mask there is no slope to fit: ``a = 0``, ``b = mean(ref)``.
    """
    xv, rv = _masked_pair(x, ref, mask)
    xc = xv - xv.mean()
    var = float(xc.pow(2).sum())
    if not var > 0:
        log.warning("reconstruction is constant inside the mask; intensity fit is a constant")
        return 0.0, float(rv.mean())
    a = float((xc * (rv - rv.mean())).sum()) / var
    return a, float(rv.mean() - a * xv.mean())


def _reference_mask(reference: Volume, mask: Tensor | None) -> Tensor | None:
    m = reference.mask if mask is None else mask
    if m is None:
        return None
    if tuple(m.shape) != reference.shape:
        raise Slice2VolError(f"mask shape {tuple(m.shape)} does not match the reference grid {reference.shape}")
    m = m.to(reference.data.device).bool()
    if not bool(m.any()):
        raise Slice2VolError("the mask is empty")
    return m


def compare_volumes(
    recon: Volume,
    reference: Volume,
    mask: Tensor | None = None,
    align: bool = False,
    scale: bool = True,
) -> dict:
    """Compare a reconstruction with a reference volume on the reference grid.

    Exactly what is done:

    1. Mask: ``mask`` if given, else ``reference.mask``, else every voxel of the reference grid.
    2. If ``align``: ``T = align.align_rigid(recon, reference, fixed_mask=mask)`` (SimpleITK's
       rigid registration, independent of the registration core the methods use; maps
       reference-world points to recon-world points); else ``T = I`` and the volumes are compared
       in their world frames as they are (a reconstruction's frame is its template stack's
       scanner frame, so this reads low whenever the fetus's bulk position differs).
    3. The reconstruction is resampled trilinearly at the world points ``T @ x`` of every
       reference voxel ``x`` (0 outside its field of view).
    4. If ``scale``: ``a, b`` = least-squares fit of ``a * recon + b`` to the reference inside
       the mask, and the metrics use ``a * recon + b``; else ``a = 1, b = 0``.
    5. PSNR, SSIM (3D), NRMSE and NCC inside the mask with the definitions of this module; the
       data range is that of the reference inside the mask.

    Returns:
        dict with ``psnr`` (dB), ``ssim``, ``nrmse``, ``ncc``, ``data_range``, ``scale_a``,
        ``scale_b``, ``aligned``, ``alignment`` (how, or ``"none"``), ``transform`` (``T`` as
        nested lists, or None), ``mask_voxels``
        and ``fov_coverage`` (fraction of mask voxels inside the reconstruction's grid).
    """
    m = _reference_mask(reference, mask)
    device = reference.data.device
    T = np.eye(4)
    if align:
        from slice2vol.evaluation.align import align_rigid

        T = align_rigid(recon, reference, fixed_mask=m)
    target = T @ np.asarray(reference.affine, dtype=np.float64)
    x = resample(recon.data.to(device), recon.affine, target, reference.shape).float()
    ones = torch.ones_like(recon.data, device=device)
    inside = resample(ones, recon.affine, target, reference.shape, mode="nearest") > 0.5
    ref = reference.data.float()
    a, b = fit_intensity(x, ref, m) if scale else (1.0, 0.0)
    y = a * x + b
    n_mask = int(m.sum()) if m is not None else ref.numel()
    covered = int((inside & m).sum()) if m is not None else int(inside.sum())
    return {
        "psnr": float(psnr(y, ref, m)),
        "ssim": float(ssim3d(y, ref, m)),
        "nrmse": float(nrmse(y, ref, m)),
        "ncc": float(ncc(y, ref, m)),
        "data_range": _data_range(ref[m] if m is not None else ref, None),
        "scale_a": a,
        "scale_b": b,
        "aligned": bool(align),
        "alignment": ALIGNMENT_METHOD if align else "none",
        "transform": T.tolist() if align else None,
        "mask_voxels": n_mask,
        "fov_coverage": covered / n_mask,
    }


# ----------------------------------------------------------------------------- pose errors

def _world_points(poses: Tensor, coords: Tensor, slice_id: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``(P, 3)`` world positions of slice-frame pixels; chunked so ``(p, 4, 4)`` gathers stay small."""
    parts = [slice_to_world(poses, coords[s:s + chunk], slice_id[s:s + chunk]) for s in range(0, coords.shape[0], chunk)]
    return torch.cat(parts) if parts else coords.new_zeros(0, 3)


def slice_tre(
    est_poses: Tensor | np.ndarray,
    gt_poses: Tensor | np.ndarray,
    coords: Tensor,
    slice_id: Tensor,
    align: bool = True,
) -> Tensor:
    """Per-slice target registration error, cSVR eq. 10: ``max_p || est(p) - gt(p) ||``.

    Args:
        est_poses, gt_poses: ``(M, 4, 4)`` slice-to-world poses of the same slices.
        coords: ``(P, 3)`` slice-frame pixel positions (mm).
        slice_id: ``(P,)`` slice of each pixel.
        align: first map the estimated world positions of *all* pixels onto the ground-truth ones
            with one rigid transform (least squares, Kabsch), because SVR determines the poses
            only up to a global rigid motion.  (The paper registers the output volume to the
            ground truth instead; both remove the same global ambiguity.)
    Returns:
        ``(M,)`` float64 TRE in mm (computed on the CPU in float64); NaN for a slice without pixels.
    """
    est = torch.as_tensor(est_poses, dtype=torch.float64, device="cpu")
    gt = torch.as_tensor(gt_poses, dtype=torch.float64, device="cpu")
    if est.shape != gt.shape or est.dim() != 3 or est.shape[1:] != (4, 4):
        raise Slice2VolError(
            f"estimated and ground-truth poses differ in shape: {tuple(est.shape)} vs {tuple(gt.shape)}")
    c = coords.to("cpu", torch.float64)
    sid = slice_id.to("cpu", torch.long)
    pe, pg = _world_points(est, c, sid), _world_points(gt, c, sid)
    if align and pe.shape[0] >= 3:
        pe = apply(kabsch(pe, pg), pe)
    d = (pe - pg).norm(dim=-1)
    out = torch.full((est.shape[0],), float("nan"), dtype=torch.float64)
    return out.scatter_reduce(0, sid, d, reduce="amax", include_self=False)


def tre_summary(per_slice: Tensor | np.ndarray, stack_id: Tensor | np.ndarray) -> dict:
    """Summarise per-slice TRE (mm); NaN entries (slices without pixels) are ignored.

    Returns:
        dict with ``median`` = median over stacks of each stack's median per-slice TRE (the
        paper's "median maximum TRE per slice stack"), ``mean``, ``p90`` (90th percentile) and
        ``max`` over all slices, ``per_stack_median`` (list, NaN for an empty stack) and
        ``n_slices``.
    """
    t = np.asarray(per_slice.cpu() if isinstance(per_slice, Tensor) else per_slice, dtype=np.float64)
    s = np.asarray(stack_id.cpu() if isinstance(stack_id, Tensor) else stack_id, dtype=np.int64)
    ok = np.isfinite(t)
    if not ok.any():
        raise Slice2VolError("no slice has pixels to compute the TRE on")
    n_stacks = int(s.max()) + 1 if s.size else 0
    per_stack = [float(np.median(t[ok & (s == k)])) if (ok & (s == k)).any() else float("nan") for k in range(n_stacks)]
    return {
        "median": float(np.nanmedian(per_stack)),
        "mean": float(t[ok].mean()),
        "p90": float(np.percentile(t[ok], 90)),
        "max": float(t[ok].max()),
        "per_stack_median": per_stack,
        "n_slices": int(ok.sum()),
    }


@dataclass
class PoseMatch:
    """Slices present in both pose files, ordered by stack then slice index.

    ``est``, ``gt``: ``(M, 4, 4)`` float64; ``stack_id``, ``index``: ``(M,)`` int64.
    """

    est: np.ndarray
    gt: np.ndarray
    stack_id: np.ndarray
    index: np.ndarray


def _sorted_unique(entry: dict, what: str, s: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.asarray(entry["index"], dtype=np.int64)
    if np.unique(idx).size != idx.size:
        raise Slice2VolError(f"{what} poses, stack {s}: slice indices are repeated")
    order = np.argsort(idx, kind="stable")
    return idx[order], np.asarray(entry["poses"], dtype=np.float64)[order]


def match_poses(estimated: Sequence[dict], ground_truth: Sequence[dict]) -> PoseMatch:
    """Pair estimated and ground-truth poses (from :func:`slice2vol.io.load_poses_json`).

    Stacks are matched by their order in the files, slices by their ``index``.  The estimate may
    lack slices (excluded ones); a slice in the estimate that the ground truth lacks is an error.
    """
    if len(estimated) != len(ground_truth):
        raise Slice2VolError(f"the pose files describe {len(estimated)} and {len(ground_truth)} stacks")
    est, gt, sid, index = [], [], [], []
    for s, (e, g) in enumerate(zip(estimated, ground_truth)):
        ei, ep = _sorted_unique(e, "estimated", s)
        gi, gp = _sorted_unique(g, "ground-truth", s)
        missing = np.setdiff1d(ei, gi)
        if missing.size:
            raise Slice2VolError(f"stack {s}: estimated poses for slices {missing[:5].tolist()} have no ground truth")
        est.append(ep)
        gt.append(gp[np.searchsorted(gi, ei)])
        sid.append(np.full(ei.size, s, dtype=np.int64))
        index.append(ei)
    if not sum(len(i) for i in index):
        raise Slice2VolError("the estimated pose file has no slices")
    return PoseMatch(np.concatenate(est), np.concatenate(gt), np.concatenate(sid), np.concatenate(index))


def default_slice_coords(half_extent_mm: float = DEFAULT_TRE_HALF_EXTENT_MM,
                         step_mm: float = DEFAULT_TRE_STEP_MM) -> Tensor:
    """``(G, 3)`` float64 slice-frame points on a square grid of half-width ``half_extent_mm``."""
    n = 2 * int(round(half_extent_mm / step_mm)) + 1
    return slice_pixel_coords(n, n, (step_mm, step_mm), dtype=torch.float64).reshape(-1, 3)


# ----------------------------------------------------------------------------- slice consistency

def simulate_slices(volume: Volume, slice_set: SliceSet, resolution: float | None = None,
                    quality: str = "normal") -> Tensor:
    """Slices simulated from ``volume`` at ``slice_set.poses`` with the shared acquisition model.

    Args:
        volume: the reconstruction.
        slice_set: pixels and poses to simulate.
        resolution: voxel size handed to :func:`~slice2vol.core.acquisition.psf_kernel`; default the
            volume's smallest voxel size.
        quality: PSF quadrature quality (see ``psf_kernel``).
    Returns:
        ``(P,)`` float32 on the slice set's device.
    """
    res = float(np.min(volume.resolution)) if resolution is None else float(resolution)
    psf = psf_kernel(slice_set.psf_pixel, slice_set.thickness, res, quality=quality)
    with torch.no_grad():
        return forward(volume.data.to(slice_set.device, torch.float32), volume.affine, slice_set.poses,
                       slice_set.coords, slice_set.slice_id, psf)


def _stack_ssim(acquired: Tensor, simulated: Tensor, data_range: float) -> Tensor:
    """``(N,)`` 2D SSIM of each ``(N, H, W)`` slice pair (masked-out pixels already 0 in both)."""
    w = _ssim_window(acquired.shape[1:], SSIM_WIN_SIZE)
    return pytorch_msssim.ssim(acquired[:, None].float(), simulated[:, None].float(), data_range=data_range,
                               size_average=False, win_size=w, win_sigma=SSIM_WIN_SIGMA)


def slice_consistency(slice_set: SliceSet, simulated: Tensor, per_slice: bool = False) -> dict:
    """Reference-free agreement between acquired and simulated slices (cSVR Table 1).

    Args:
        slice_set: acquired pixels (``values``) and their slices.
        simulated: ``(P,)`` simulated intensities of the same pixels (e.g. :func:`simulate_slices`;
            no intensity scaling is fitted -- pass ``a_n * s`` to evaluate with slice scales).
        per_slice: also return ``per_slice = {"ssim": [...], "ncc": [...]}``, one value per slice
            of the slice set in its order (NaN for slices without pixels, or NCC without variance).
    Returns:
        dict with ``ssim`` (mean of the 2D SSIM of every slice that has pixels; each stack's
        ``(N, 1, H, W)`` images from ``SliceSet.to_images``, pixels outside the mask 0 in both,
        data range of that stack's acquired pixels), ``psnr`` and ``ncc`` over all pixels
        pooled (data range of all acquired pixels), ``n_pixels``, ``n_slices``, and
        ``per_stack``: a list of ``{"ssim", "psnr", "ncc", "n_slices"}`` computed the same way on
        each stack's pixels.
    """
    acq = slice_set.values
    if simulated.shape != acq.shape:
        raise Slice2VolError(f"simulated values have shape {tuple(simulated.shape)}, expected {tuple(acq.shape)}")
    sim = simulated.to(acq.device)
    has_pixels = torch.zeros(slice_set.n_slices, dtype=torch.bool, device=acq.device)
    has_pixels[slice_set.slice_id] = True
    acq_imgs, sim_imgs = slice_set.to_images(acq), slice_set.to_images(sim.to(acq.dtype))
    pstack = slice_set.pixel_stack()
    ssim_slices = torch.full((slice_set.n_slices,), float("nan"), dtype=torch.float64, device=acq.device)
    per_stack = []
    for s in range(slice_set.n_stacks):
        lo, hi = slice_set.stack_slices[s], slice_set.stack_slices[s + 1]
        sel = pstack == s
        valid = has_pixels[lo:hi]
        if not bool(sel.any()):
            per_stack.append({"ssim": float("nan"), "psnr": float("nan"), "ncc": float("nan"), "n_slices": 0})
            continue
        rng = _data_range(acq[sel].double(), None)
        ssim_slices[lo:hi] = torch.where(valid, _stack_ssim(acq_imgs[s], sim_imgs[s], rng).double(), ssim_slices[lo:hi])
        per_stack.append({
            "ssim": float(ssim_slices[lo:hi][valid].mean()),
            "psnr": float(psnr(sim[sel], acq[sel])),
            "ncc": float(ncc(sim[sel], acq[sel])),
            "n_slices": int(valid.sum()),
        })
    out = {
        "ssim": float(ssim_slices[has_pixels].mean()),
        "psnr": float(psnr(sim, acq)),
        "ncc": float(ncc(sim, acq)),
        "n_pixels": slice_set.n_pixels,
        "n_slices": int(has_pixels.sum()),
        "per_stack": per_stack,
    }
    if per_slice:
        out["per_slice"] = {
            "ssim": ssim_slices.cpu().tolist(),
            "ncc": per_slice_ncc(sim, acq, slice_set.slice_id, slice_set.n_slices).cpu().tolist(),
        }
    return out


# ----------------------------------------------------------------------------- command line

def naive_consistency(prep, per_slice: bool = False) -> dict:
    """Slice consistency of the motion-blind baseline (:func:`slice2vol.methods.naive.naive_baseline`),
    simulated back at the header poses with fitted slice scales."""
    from slice2vol.core.robust import fit_scales
    from slice2vol.methods.naive import naive_baseline

    base = naive_baseline(prep)
    header = base.header
    s = base.simulate(prep.affine)
    a = fit_scales(s, header.values, header.slice_id, header.n_slices)
    return slice_consistency(header, s * a[header.slice_id], per_slice=per_slice)


def _check_evaluate_args(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot produce a metric, and a bad --json, before any work."""
    from slice2vol.io import check_output_path

    if not (args.reference or args.stacks or (args.poses and args.gt_poses)):
        raise Slice2VolError("nothing to evaluate: give --reference, --stacks, or --poses with --gt-poses")
    if (args.mask or args.align) and not args.reference:
        raise Slice2VolError("--mask and --align need --reference")
    if args.gt_poses and not args.poses:
        raise Slice2VolError("--gt-poses needs --poses (the estimated poses to compare)")
    if args.thickness and not args.stacks:
        raise Slice2VolError("--thickness needs --stacks")
    if args.json:
        check_output_path(args.json, _input_paths(args))


def _input_paths(args: argparse.Namespace) -> list[str]:
    paths = [args.recon, args.reference, args.mask, args.poses, args.gt_poses, *(args.stacks or []),
             *(getattr(args, "stack_masks", None) or [])]
    return [p for p in paths if p]


def _stacks_with_poses(stacks: Sequence[Stack], poses: Sequence[dict]) -> list[Stack]:
    """Stacks restricted to the slices of a pose file (matched by stack order and slice index),
    carrying those poses, slices in ascending index order."""
    if len(poses) != len(stacks):
        raise Slice2VolError(f"the pose file describes {len(poses)} stacks but --stacks gives {len(stacks)}")
    out = []
    for s, (st, entry) in enumerate(zip(stacks, poses)):
        idx, P = _sorted_unique(entry, "estimated", s)
        pos = {int(k): i for i, k in enumerate(st.index)}
        absent = [int(k) for k in idx if int(k) not in pos]
        if absent:
            raise Slice2VolError(
                f"stack {st.name}: the pose file has slice indices {absent[:5]} beyond its {st.n_slices} slices")
        sel = st.select(np.isin(st.index, idx))  # keeps the stack's (ascending) index order
        out.append(replace(sel, poses=P))
    return out


def _poses_in_recon_frame(poses: list[dict], path) -> list[dict]:
    """The poses of a run are in the scanner world; a run with ``--output-space atlas`` wrote its
    volume in the atlas's, and recorded the scanner -> atlas transform: map the poses with it."""
    import json

    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if not isinstance(record, dict) or record.get("output_space") != "atlas":
        return poses
    try:
        T = np.asarray(record["atlas"]["transform_scanner_to_atlas"], dtype=np.float64).reshape(4, 4)
    except (KeyError, TypeError, ValueError):
        T = None
    if T is None or not np.all(np.isfinite(T)) or not np.allclose(T[:3, :3].T @ T[:3, :3], np.eye(3), atol=1e-4):
        raise Slice2VolError(f"poses file {path}: output in atlas space but no valid scanner -> atlas transform")
    return [{**e, "poses": T @ e["poses"]} for e in poses]


def _tre_pixels(match: PoseMatch, stacks: Sequence[Stack] | None) -> tuple[Tensor, Tensor, str]:
    """Slice-frame points and their slice ids for TRE: the stacks' masked pixels, else a default grid."""
    if stacks is not None:
        ss = SliceSet.from_stacks(stacks)
        # Both come from the estimated pose file in (stack, index) order, so they line up.
        assert ss.n_slices == match.est.shape[0]
        return ss.coords.double(), ss.slice_id, "masked pixels of --stacks"
    g = default_slice_coords()
    M = match.est.shape[0]
    return g.repeat(M, 1), torch.arange(M).repeat_interleave(g.shape[0]), (
        f"default grid +-{DEFAULT_TRE_HALF_EXTENT_MM:g} mm, step {DEFAULT_TRE_STEP_MM:g} mm (no --stacks)")


def _tre_report(match: PoseMatch, stacks: Sequence[Stack] | None) -> dict:
    coords, sid, points = _tre_pixels(match, stacks)
    aligned = slice_tre(match.est, match.gt, coords, sid, align=True)
    raw = slice_tre(match.est, match.gt, coords, sid, align=False)
    return {
        **tre_summary(aligned, match.stack_id),
        "unaligned": tre_summary(raw, match.stack_id),
        "points": points,
        "per_slice": {"stack": match.stack_id.tolist(), "index": match.index.tolist(), "tre": aligned.tolist()},
    }


def _consistency_report(recon: Volume, stacks: Sequence[Stack], poses: str, device: torch.device) -> dict:
    ss = SliceSet.from_stacks(stacks, device)
    con = slice_consistency(ss, simulate_slices(recon, ss), per_slice=True)
    con["per_slice"].update(stack=ss.stack_id.tolist(), index=np.concatenate([st.index for st in stacks]).tolist())
    return {**con, "poses": poses, "stack_names": [st.name for st in stacks]}




def _fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_report(results: dict) -> str:
    """Human-readable table of the results of :func:`evaluate_command`."""
    lines = [f"slice2vol evaluate: {results['recon']}"]
    img = results.get("image")
    if img:
        lines += [
            f"Image metrics vs {results['reference']} ({img['mask_voxels']} voxels, "
            f"aligned: {img['alignment'] if img['aligned'] else 'NO'}, intensity a={img['scale_a']:.4g} b={img['scale_b']:.4g})",
            f"  PSNR (dB)      {_fmt(img['psnr'], '.2f')}",
            f"  SSIM           {_fmt(img['ssim'])}",
            f"  NRMSE          {_fmt(img['nrmse'])}",
            f"  NCC            {_fmt(img['ncc'])}",
            f"  FOV coverage   {100 * img['fov_coverage']:.1f} %",
        ]
        if not img["aligned"]:
            lines.append(f"  {UNALIGNED_NOTE}")
    tre = results.get("tre")
    if tre:
        lines += [
            f"Slice TRE (mm) over {tre['n_slices']} slices, global rigid motion removed ({tre['points']})",
            f"  median of stack medians  {_fmt(tre['median'], '.3f')}"
            f"   (unaligned {_fmt(tre['unaligned']['median'], '.3f')})",
            f"  mean                     {_fmt(tre['mean'], '.3f')}",
            f"  90th percentile          {_fmt(tre['p90'], '.3f')}",
            f"  max                      {_fmt(tre['max'], '.3f')}",
        ]
    con = results.get("consistency")
    if con:
        lines.append(f"Slice consistency, acquired vs simulated (poses: {con['poses']})")
        lines.append(f"  {'stack':<28} {'slices':>6} {'SSIM':>7} {'PSNR':>7} {'NCC':>7}")
        rows = [(n, r) for n, r in zip(con["stack_names"], con["per_stack"])] + [("all", con)]
        for name, r in rows:
            lines.append(f"  {name[:28]:<28} {r['n_slices']:>6} {_fmt(r['ssim']):>7} "
                         f"{_fmt(r['psnr'], '.2f'):>7} {_fmt(r['ncc']):>7}")
    return "\n".join(lines)


def evaluate_command(args: argparse.Namespace) -> int:
    """``slice2vol evaluate``: compute every metric the options allow, print a table, write JSON.

    * image metrics (:func:`compare_volumes`) with ``--reference`` (``--mask``, ``--align``,
      ``--no-scale``);
    * TRE (:func:`slice_tre`, always with the global rigid motion removed; the unaligned summary
      is in the JSON too) with ``--poses`` and ``--gt-poses``, on the masked pixels of
      ``--stacks`` or, without stacks, on a default square grid around each slice centre;
    * slice consistency (:func:`slice_consistency`) with ``--stacks``, at the ``--poses``
      (only the slices listed there) or else at the stacks' header poses.
    """
    from slice2vol.core.runtime import resolve_device
    from slice2vol.io import load_poses_json, load_stacks, load_volume, write_json

    _check_evaluate_args(args)
    device = resolve_device(args.device)
    # Every input is read (and checked) before the first metric, so a bad file fails fast.
    recon = load_volume(args.recon).to(device)
    reference = load_volume(args.reference, mask=args.mask).to(device) if args.reference else None
    est = load_poses_json(args.poses) if args.poses else None
    match = match_poses(est, load_poses_json(args.gt_poses)) if args.gt_poses else None
    # --stack-masks is not an evaluate option yet; honoured as soon as the parser defines it.
    stack_masks = getattr(args, "stack_masks", None)
    stacks = load_stacks(args.stacks, args.thickness, stack_masks) if args.stacks else None
    posed = _stacks_with_poses(stacks, est) if stacks is not None and est is not None else stacks

    results: dict = {"recon": args.recon}
    if reference is not None:
        results["reference"] = args.reference
        results["image"] = compare_volumes(recon, reference, align=args.align, scale=not args.no_scale)
    if match is not None:
        results["tre"] = _tre_report(match, posed)
    if posed is not None:
        in_recon = _stacks_with_poses(stacks, _poses_in_recon_frame(est, args.poses)) if est is not None else posed
        results["consistency"] = _consistency_report(recon, in_recon, args.poses or "stack headers", device)
    print(format_report(results))
    if args.json:
        write_json(results, args.json, protect=_input_paths(args))
    return 0
