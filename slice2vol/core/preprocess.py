"""Preparing stacks for reconstruction; shared by every method.

Masks, bias-field correction, template choice, intensity normalisation, stack-to-template
registration and the output grid.  Where the papers are silent we follow SVRTK/NeSVoR and say so.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from slice2vol.core import acquisition as acq
from slice2vol.core import budget
from slice2vol.core.geometry import (axis_aligned_grid, make_right_handed, orientation_groups, slice_pixel_coords,
                                     slice_to_world)
from slice2vol.core.image import SliceSet, Stack, Volume
from slice2vol.core.noise import WHITE_RATIO_MAX, coarse_ratio, relative_noise
from slice2vol.core.reconstruction import DEFAULT_LAM, edge_threshold_for_noise, psf_average, regularisation_for_noise
from slice2vol.core.registration import register
from slice2vol.core.resample import gaussian_blur, max_filter, resample, sample_at
from slice2vol.core.runtime import NOTICE
from slice2vol.errors import Slice2VolError

__all__ = [
    "n4_correct",
    "auto_masks",
    "apply_volume_mask",
    "choose_template",
    "normalise_intensities",
    "register_stacks",
    "output_grid",
    "Prepared",
    "prepare",
]

log = logging.getLogger(__name__)


def n4_correct(stack: Stack) -> Stack:
    """N4 bias-field correction of a stack (SimpleITK), inside its mask; the field is divided out."""
    import SimpleITK as sitk

    data = stack.slices.cpu().numpy().astype(np.float32)
    img = sitk.GetImageFromArray(data)  # (N, H, W) -> ITK x=W, y=H, z=N: only the spacing matters
    img.SetSpacing((float(stack.spacing[1]), float(stack.spacing[0]), float(stack.slice_spacing)))
    mask = sitk.GetImageFromArray(stack.mask.cpu().numpy().astype(np.uint8))
    mask.CopyInformation(img)
    shrink = 2
    small = sitk.Shrink(img, [shrink, shrink, 1])
    small_mask = sitk.Shrink(mask, [shrink, shrink, 1])
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50, 40, 30])
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(img)
    field = np.exp(sitk.GetArrayFromImage(log_field)).astype(np.float32)
    out = data / np.maximum(field, 1e-3)
    return replace(stack, slices=torch.from_numpy(out).to(stack.slices.device))


def _world_points(stack: Stack, poses: np.ndarray | None = None) -> Tensor:
    """World positions ``(N, H, W, 3)`` of every pixel centre of a stack."""
    N, H, W = stack.slices.shape
    xy = slice_pixel_coords(H, W, stack.spacing, dtype=torch.float64)
    P = torch.as_tensor(stack.poses if poses is None else poses, dtype=torch.float64)
    return torch.einsum("nab,hwb->nhwa", P[:, :3, :3], xy) + P[:, None, None, :3, 3]


def apply_volume_mask(stacks: Sequence[Stack], mask: Volume, dilate_mm: float = 0.0) -> list[Stack]:
    """Restrict each stack's pixel mask to a 3D world-space mask (optionally dilated)."""
    m = mask
    if dilate_mm > 0:
        res = float(np.mean(np.linalg.norm(mask.affine[:3, :3], axis=0)))
        r = max(1, int(round(dilate_mm / res)))
        d = max_filter(mask.data.float(), r)
        m = Volume(d > 0, mask.affine)
    out = []
    for st in stacks:
        inside = sample_at(m.data.float(), m.affine, _world_points(st), mode="nearest") > 0.5
        out.append(replace(st, mask=st.mask & inside.to(st.mask.device)))
    return out


def _otsu(values: np.ndarray) -> float:
    import SimpleITK as sitk

    f = sitk.OtsuThresholdImageFilter()
    f.Execute(sitk.GetImageFromArray(values.astype(np.float32).reshape(1, 1, -1)))
    return float(f.GetThreshold())


def auto_masks(stacks: Sequence[Stack]) -> list[Stack]:
    """Automatic masks: the region seen by every stack, intersected with Otsu foreground.

    Logged as a warning: on real fetal MRI the maternal anatomy passes Otsu too, so a brain mask
    (``--mask`` or ``--stack-masks``) gives markedly better results.
    """
    log.warning("no mask given: using the intersection of the stacks' fields of view and an Otsu threshold; "
                "pass --mask or --stack-masks for a brain mask")
    out = []
    for s, st in enumerate(stacks):
        pts = _world_points(st)
        inside = torch.ones(pts.shape[:-1], dtype=torch.bool)
        for t, other in enumerate(stacks):
            if t == s:
                continue
            inside &= _inside_fov(other, pts)
        data = st.slices.cpu().numpy()
        cand = data[inside.numpy() & st.mask.cpu().numpy()]
        if cand.size < 100:
            raise Slice2VolError(f"stack {st.name}: the stacks do not overlap; check their geometry or give masks")
        thr = _otsu(cand)
        m = st.mask.cpu() & inside & torch.from_numpy(data > thr)
        out.append(replace(st, mask=m.to(st.mask.device)))
    return out


def _inside_fov(stack: Stack, pts: Tensor) -> Tensor:
    """Whether world points fall inside a stack's box of slices (nominal poses), ``(...)`` bool."""
    A = torch.as_tensor(stack.affine, dtype=torch.float64)
    ijk = (pts.reshape(-1, 3) - A[:3, 3]) @ torch.linalg.inv(A[:3, :3]).T
    N, H, W = stack.slices.shape
    lim = torch.tensor([H - 1, W - 1, N - 1], dtype=torch.float64)
    ok = ((ijk >= -0.5) & (ijk <= lim + 0.5)).all(-1)
    return ok.reshape(pts.shape[:-1])


def choose_template(stacks: Sequence[Stack]) -> int:
    """Least motion-corrupted stack: highest mean NCC between spatially adjacent slices.

    Adjacent slices of an interleaved acquisition are acquired far apart in time, so motion shows
    as disagreement between neighbours; this is NeSVoR/SVRTK's intuition made automatic.
    Stacks with fewer than 3 usable slices are never chosen.
    """
    scores = []
    for st in stacks:
        x = st.slices.float()
        m = st.mask
        ok = m.flatten(1).sum(1) > 20
        if int(ok.sum()) < 3:
            scores.append(-np.inf)
            continue
        a, b = x[:-1], x[1:]
        mm = (m[:-1] & m[1:]).float()
        n = mm.flatten(1).sum(1).clamp_min(1)
        ma = (a * mm).flatten(1).sum(1) / n
        mb = (b * mm).flatten(1).sum(1) / n
        da = (a - ma[:, None, None]) * mm
        db = (b - mb[:, None, None]) * mm
        ncc = (da * db).flatten(1).sum(1) / ((da * da).flatten(1).sum(1) * (db * db).flatten(1).sum(1)).sqrt().clamp_min(1e-12)
        valid = n > 20
        # weight by overlap so tiny edge slices do not dominate
        scores.append(float((ncc * n)[valid].sum() / n[valid].sum()) if bool(valid.any()) else -np.inf)
    log.info("template scores (neighbour NCC): %s", ", ".join(f"{s:.3f}" for s in scores))
    if not np.isfinite(max(scores)):
        raise Slice2VolError("no stack has enough masked slices to serve as a template")
    return int(np.argmax(scores))


#: Signal-loss detection (:func:`signal_loss_pixels`): in-plane smoothing sd (mm) and the ratio
#: to the darker spatial neighbour slice below which a pixel counts as lost.
SIGNAL_LOSS_SIGMA_MM = 4.0
SIGNAL_LOSS_RATIO = 0.6
#: Only where the mask fills at least this share of the smoothing window, in the slice and in the
#: neighbour it is compared with (mask edges differ between slices for reasons other than signal).
SIGNAL_LOSS_INTERIOR = 0.3


def signal_loss_pixels(stack: Stack, sigma_mm: float = SIGNAL_LOSS_SIGMA_MM, ratio: float = SIGNAL_LOSS_RATIO,
                       rounds: int = 1) -> Tensor:
    """Masked pixels darkened by signal loss, ``(N, H, W)`` bool.

    A fetus that moves while a single-shot slice is acquired leaves the slice dark, wholly or in
    a band.  Such a pixel is darker than the same place in *both* spatially neighbouring slices
    of its stack, which anatomy seen through 3 mm slices, and the motion between them, rarely is:
    a pixel is flagged when its masked local mean (Gaussian, ``sigma_mm`` in-plane) is below
    ``ratio`` x the darker neighbour's there.  Both neighbours must be there: the last slice
    through an object is darker than its one neighbour by partial volume with the background.
    Neighbours are consecutive file slices (``stack.index``) whose mask fills at least
    :data:`SIGNAL_LOSS_INTERIOR` of the window.  ``rounds=2`` compares again without the pixels
    already flagged, a flagged neighbour handing over to the slice beyond it (slices lost next to
    each other); it found more of the darkened pixels but gave no better reconstructions on the
    validation atlases (+0.11 dB mean PSNR at 15 % lost, -0.09 dB at 30 %), so one round is the
    default.  Our design: SVRTK and NeSVoR leave dark slices to their outlier rejection, which
    starts after the first registrations.

    Measured on simulated stacks (``SimulationConfig.signal_loss``, 3 moderate stacks with stack
    masks, validation atlases and STA30, seeds 0-1): 47-79 % of the pixels darkened below 0.6
    found, none of the undamaged ones flagged; on undamaged stacks at mild to extreme motion
    (GA22, STA25, STA33, seeds 0-2) at most 24 of 56,000-364,000 pixels.  Allowing one neighbour
    at the stack's ends found more (52-90 %) and gained 0.3 dB more on the validation atlases, but
    flagged the end slice of a synthetic object on a dark background.  Not for one 3D mask in the
    template's frame (``--mask``): that mask does not follow a brain that moved between slices,
    and on SVRTK's phantom stacks 1-5 % of the masked pixels, outside the moved brain, were
    flagged (none with per-stack Otsu masks).
    """
    y = stack.slices.to(torch.float32)
    m = stack.mask.to(torch.float32)
    N = y.shape[0]
    out = torch.zeros_like(stack.mask, dtype=torch.bool)
    if N < 2:
        return out
    sigma = (0.0, sigma_mm, sigma_mm)  # in-plane only: axis 0 runs over the slices
    spacing = (1.0, float(stack.spacing[0]), float(stack.spacing[1]))
    den = gaussian_blur(m, sigma, spacing)
    local = gaussian_blur(y * m, sigma, spacing) / den.clamp_min(1e-3)
    idx = np.asarray(stack.index)
    den_n, local_n = den, local
    for rnd in range(rounds):
        if rnd:
            # neighbours' local means without the pixels already flagged; a neighbour flagged
            # there hands over to the next slice beyond it (a second slice lost next to the first)
            mn = m * (~out).to(m.dtype)
            den_n = gaussian_blur(mn, sigma, spacing)
            local_n = gaussian_blur(y * mn, sigma, spacing) / den_n.clamp_min(1e-3)
        usable = den_n > SIGNAL_LOSS_INTERIOR
        darker = torch.full_like(local, float("inf"))
        both = torch.ones_like(stack.mask)
        for direction in (1, -1):
            best = torch.full_like(local, float("inf"))
            for dist in ((1, 2) if rnd else (1,)):
                for k in range(N):
                    j = k + direction * dist
                    if not (0 <= j < N) or abs(int(idx[j]) - int(idx[k])) != dist:
                        continue
                    take = torch.isinf(best[k]) & usable[j]
                    best[k] = torch.where(take, local_n[j], best[k])
            darker = torch.minimum(darker, best)
            both = both & torch.isfinite(best)
        # both neighbours: a slice at the object's end is darker than its one neighbour by partial volume
        flag = stack.mask & (den > SIGNAL_LOSS_INTERIOR) & both & (local < ratio * darker)
        if bool((flag & ~out).any()):
            out = out | flag
        else:
            break
    return out


def normalise_intensities(stacks: Sequence[Stack], template: int) -> tuple[list[Stack], list[float]]:
    """Scale each stack so its median in-mask intensity equals the template's (output keeps template units)."""
    def med(st):
        v = st.slices[st.mask]
        return float(v.median()) if v.numel() else 1.0

    ref = med(stacks[template])
    factors = [ref / max(med(st), 1e-12) for st in stacks]
    return [replace(st, slices=st.slices * f) for st, f in zip(stacks, factors)], factors


def _bbox(points: Tensor, margin: float) -> tuple[np.ndarray, np.ndarray]:
    lo = points.min(0).values.double().cpu().numpy() - margin
    hi = points.max(0).values.double().cpu().numpy() + margin
    return lo, hi


def register_stacks(ss: SliceSet, template: int, resolution: float = 1.5, sigmas=(4.0, 2.0, 1.0), iterations: int = 10,
                    subsample: int = 3) -> Tensor:
    """Rigid stack-to-template registration: one correction per stack, template fixed.

    The template stack's slices are PSF-averaged into a volume (at ``resolution`` mm, coarse
    because only a rigid fit is needed), then every other stack's slices are registered to it
    as one group through the shared acquisition model, using every ``subsample``-th pixel (six
    parameters per stack are well determined by a fraction of its tens of thousands of pixels).
    Returns new ``(M, 4, 4)`` poses.
    """
    dev = ss.device
    tsl = slice(ss.stack_slices[template], ss.stack_slices[template + 1])
    tpix = (ss.slice_id >= tsl.start) & (ss.slice_id < tsl.stop)
    lo, hi = _bbox(slice_to_world(ss.poses, ss.coords, ss.slice_id)[tpix], 15.0)
    affine, shape = axis_aligned_grid(lo, hi, resolution)
    psf = acq.psf_kernel(ss.psf_pixel, ss.thickness, resolution)
    vol = psf_average(ss.values[tpix], torch.ones_like(ss.values[tpix]), shape, affine, ss.poses,
                      ss.coords[tpix], ss.slice_id[tpix], psf)
    group = ss.stack_id.clone()
    moving = ~tpix & (torch.arange(ss.n_pixels, device=dev) % max(1, subsample) == 0)
    if not bool(moving.any()):
        return ss.poses
    res = register(vol, affine, ss.poses, ss.coords[moving], ss.slice_id[moving], ss.values[moving], psf,
                   group=group, sigmas=sigmas, iterations=iterations, max_step=(0.15, 5.0))
    poses = res.poses.clone()
    poses[tsl] = ss.poses[tsl]
    for s in range(ss.n_stacks):
        D = res.corrections[s]
        ang = math.degrees(float(torch.acos(((D[0, 0] + D[1, 1] + D[2, 2] - 1) / 2).clamp(-1, 1))))
        log.info("stack %d -> template %d: rotation %.1f deg, translation %.1f mm", s, template, ang, float(D[:3, 3].norm()))
    return poses


def _psf_keys(ss: SliceSet) -> list[tuple[float, float, float]]:
    """The distinct ``(psf pixel x, psf pixel y, thickness)`` (mm) of a slice set's slices."""
    keys = torch.cat([ss.psf_pixel, ss.thickness[:, None]], 1).double().cpu()
    return [tuple(row) for row in torch.unique(keys, dim=0).tolist()]


def _roi_points(roi: Volume) -> Tensor:
    """World positions ``(n, 3)`` of the voxels of a 3D mask."""
    idx = torch.nonzero(roi.data > 0).double()
    A = torch.as_tensor(roi.affine)
    return idx @ A[:3, :3].T + A[:3, 3]


def check_budget(stacks: Sequence[Stack], ss: SliceSet, resolution: float, roi: Volume | None = None,
                 margin: float = 3.0) -> None:
    """Refuse, before any registration, an output grid that :func:`output_grid` could not make:
    a PSF with an absurd number of samples per pixel, fewer than ``budget.MIN_GRID_VOXELS`` voxels
    across the brain region, or more memory than is available (see :mod:`slice2vol.core.budget`).
    The region is the 3D mask's bounding box, else that of the masked pixels at their header poses."""
    keys = [(float(st.psf_pixel[0]), float(st.psf_pixel[1]), float(st.thickness)) for st in stacks]
    pts = _roi_points(roi) if roi is not None else slice_to_world(ss.poses, ss.coords, ss.slice_id)
    lo, hi = _bbox(pts, 0.0)
    budget.check_grid(hi - lo + 2 * margin, resolution, roi_extent_mm=hi - lo, n_pixels=ss.n_pixels, keys=keys,
                      device=ss.device)
    budget.check_psf(keys, resolution, [st.name for st in stacks])


#: A voxel counts as covered by a stack where the stack's pixels, spread by the adjoint, put at least
#: this fraction of their mean density (voxels per pixel, :func:`_sample_density`) on it.  The
#: threshold used to be an absolute 0.1, i.e. this fraction for 1 x 1 x 3 mm pixels on a 0.8 mm
#: grid (density 0.171), but 1.4 x 1.4 x 3 mm pixels spread only 0.087 on that grid, so a clinical
#: stack's whole brain read uncovered and the region of interest collapsed.
COVERAGE_FRACTION = 0.1 / (0.8 ** 3 / 3.0)


def _sample_density(ss: SliceSet, stack: int, resolution: float) -> float:
    """Mean adjoint coverage of one stack's pixels inside the volume it samples: voxel volume over
    the volume of space per pixel (``dx * dy`` times the distance between neighbouring slices, from
    the slices' centres along their mean normal; the thickness where that is not defined)."""
    sl = slice(ss.stack_slices[stack], ss.stack_slices[stack + 1])
    P = ss.poses[sl].double().cpu()
    dx, dy = (float(v) for v in ss.spacing[sl].double().cpu().median(0).values)
    gap = float(ss.thickness[sl].double().cpu().median())
    if P.shape[0] > 1:
        normal = P[:, :3, 2].mean(0)
        z = torch.sort(P[:, :3, 3] @ (normal / normal.norm().clamp_min(1e-12))).values
        steps = z.diff()
        steps = steps[steps > 1e-3]
        if steps.numel():
            gap = float(steps.median())
    return resolution ** 3 / max(dx * dy * gap, 1e-12)


def output_grid(ss: SliceSet, resolution: float, roi: Volume | None = None, margin: float = 3.0,
                min_stacks: int | None = None) -> tuple[np.ndarray, tuple[int, int, int], Tensor]:
    """Axis-aligned world grid and region of interest for the reconstruction.

    With a 3D mask the ROI is that mask; otherwise voxels reached by the masked slices of at
    least ``min_stacks`` stacks (default: half of them, rounded up), dilated by ``margin``.
    Returns ``(affine, shape, roi_mask (Ni, Nj, Nk) bool)``.
    """
    pts = slice_to_world(ss.poses, ss.coords, ss.slice_id)
    if roi is not None:
        lo, hi = _bbox(_roi_points(roi), margin)
        affine, shape = axis_aligned_grid(lo, hi, resolution)
        budget.check_grid(hi - lo, resolution, n_pixels=ss.n_pixels, keys=_psf_keys(ss), device=ss.device, min_voxels=1)
        m = resample(roi.data.float(), roi.affine, affine, shape, mode="linear") > 0.5
        return affine, shape, m.to(ss.device)
    lo, hi = _bbox(pts, margin)
    affine, shape = axis_aligned_grid(lo, hi, resolution)
    budget.check_grid(hi - lo, resolution, n_pixels=ss.n_pixels, keys=_psf_keys(ss), device=ss.device, min_voxels=1)
    psf = acq.psf_kernel(ss.psf_pixel, ss.thickness, resolution)
    need = min_stacks or max(1, math.ceil(ss.n_stacks / 2))
    count = torch.zeros(shape, device=ss.device)
    pstack = ss.pixel_stack()
    for s in range(ss.n_stacks):
        sel = pstack == s
        cov = acq.adjoint(torch.ones(int(sel.sum()), device=ss.device), shape, affine, ss.poses, ss.coords[sel], ss.slice_id[sel], psf)
        count += (cov > COVERAGE_FRACTION * _sample_density(ss, s, resolution)).float()
    m = count >= need
    r = max(1, int(round(margin / resolution)))
    m = max_filter(m.float(), r) > 0
    if not bool(m.any()):
        raise Slice2VolError("the masked stacks do not overlap in space; check the masks and the stack geometry")
    # crop the grid to the ROI's bounding box
    nz = torch.nonzero(m)
    i0, i1 = nz.min(0).values.tolist(), nz.max(0).values.tolist()
    sl = tuple(slice(a, b + 1) for a, b in zip(i0, i1))
    A = affine.copy()
    A[:3, 3] = affine[:3, :3] @ np.array(i0, dtype=float) + affine[:3, 3]
    m = m[sl].contiguous()
    return A, tuple(m.shape), m


#: A 3D mask is on a stack's voxel grid when it has the stack's shape and its corner voxels lie
#: within this distance of the stack's (float32 header rounding is far smaller).
MASK_GRID_TOL_MM = 1e-3


def _on_stack_grid(st: Stack, mask: Volume) -> bool:
    """Whether ``mask`` was drawn on ``st``'s voxel grid (same shape, same voxel positions)."""
    N, H, W = st.slices.shape
    shape = tuple(mask.data.shape)
    if shape != (H, W, N):
        return False
    # the stack's affine is right-handed (i flipped where needed); flip the mask's the same way
    B = make_right_handed(np.empty((shape[0], 0)), mask.affine)[1]
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij"), dtype=np.float64).reshape(3, -1)
    homog = np.vstack([corners, np.ones(corners.shape[1])])
    return bool(np.abs((np.asarray(st.affine) - B)[:3] @ homog).max() <= MASK_GRID_TOL_MM)


def _template_for_mask(stacks: Sequence[Stack], mask: Volume) -> tuple[int, str]:
    """Template for a 3D mask (which lives in the frame of the stack it was drawn on): the stack
    whose voxel grid the mask is on, else the automatic choice with a warning.  ``(index, why)``."""
    on = [i for i, st in enumerate(stacks) if _on_stack_grid(st, mask)]
    if len(on) == 1:
        return on[0], "its voxel grid matches --mask"
    if on:
        return on[choose_template([stacks[i] for i in on])], "least motion-corrupted of the stacks on the --mask grid"
    tmpl = choose_template(stacks)
    log.warning("--mask matches no stack's voxel grid (same shape, voxels within %g mm): it is assumed to be in the "
                "frame of stack %d (%s), the automatic template choice; give --template I if it was drawn on "
                "another stack", MASK_GRID_TOL_MM, tmpl, stacks[tmpl].name)
    return tmpl, "automatic choice, --mask assumed in its frame"


@dataclass
class Prepared:
    """Everything a method needs: the slice set (stack-registered poses), stacks, template,
    intensity factors, and the output grid with its region of interest; ``signal_loss`` records
    what :func:`signal_loss_pixels` left out (JSON-ready: ``applied``, and per stack ``name``,
    ``pixels`` and the file ``slices`` touched; or why it did not run); ``noise`` the stacks' noise
    relative to their mean brain intensity (:func:`slice2vol.core.noise.relative_noise`; JSON-ready:
    ``median`` and ``per_stack``, NaN written as null; ``coarse_ratio`` and ``white``,
    :func:`slice2vol.core.noise.coarse_ratio`), from which the methods' regularisation and edge
    threshold follow (:func:`slice2vol.core.reconstruction.regularisation_for_noise`,
    :func:`~slice2vol.core.reconstruction.edge_threshold_for_noise`); ``inplane`` the in-plane pixel
    each stack's PSF models (:func:`_inplane_resolution`: ``mode``, and per stack ``name``,
    ``stored_mm``, ``psf_pixel_mm``, ``source`` and, when measured, the spectrum's ``factor``,
    ``cutoff_cycles_per_pixel`` and ``contrast``); ``layout`` the slice orientations the stacks
    cover (:func:`layout_record`)."""

    slices: SliceSet
    stacks: list[Stack]
    template: int
    factors: list[float]
    affine: np.ndarray
    shape: tuple[int, int, int]
    roi: Tensor
    signal_loss: dict | None = None
    noise: dict | None = None
    inplane: dict | None = None
    layout: dict | None = None

    @property
    def regularisation(self) -> float:
        """The super-resolution's relative regularisation weight for these stacks' noise."""
        return regularisation_for_noise((self.noise or {}).get("median"))

    @property
    def edge_threshold(self) -> float:
        """The super-resolution's relative edge threshold for these stacks' noise."""
        n = self.noise or {}
        return edge_threshold_for_noise(n.get("median"), white=bool(n.get("white")))


def layout_record(stacks: Sequence[Stack]) -> dict:
    """The distinct slice orientations the stacks cover (:func:`~slice2vol.core.geometry.orientation_groups`,
    normals within 45 deg together), JSON-ready: ``planes`` (their number) and ``orientation_groups``
    (stack names per group); warns where several stacks cover fewer than three planes.

    Why warn: a direction no stack resolves in-plane is seen only through thick slices, and slices
    are placed along it from what the other planes show.  On test atlases (README "Stack layouts",
    ``benchmarks/bench_stack_layout.py``) two sagittal stacks and a coronal one reconstructed
    below three orthogonal stacks at every motion level, and failed more often under severe motion.
    """
    groups = orientation_groups([st.affine for st in stacks])
    rec = {"planes": len(groups), "orientation_groups": [[stacks[i].name for i in g] for g in groups]}
    if len(stacks) > 1 and len(groups) < 3:
        log.warning("the %d stacks cover %d slice orientation(s) only (%s): motion correction has less to go on "
                    "than with stacks in three roughly orthogonal planes (README: Stack layouts)", len(stacks),
                    len(groups), "; ".join(", ".join(names) for names in rec["orientation_groups"]))
    return rec


def _noise_record(stacks: Sequence[Stack]) -> dict:
    """:func:`relative_noise` of the stacks as a JSON-ready record (NaN -> None), logged."""
    median, per = relative_noise(stacks)
    finite = [v if math.isfinite(v) else None for v in per]
    ratio = coarse_ratio(stacks, per)
    white = math.isfinite(ratio) and ratio <= WHITE_RATIO_MAX
    if math.isfinite(median):
        lam = regularisation_for_noise(median)
        edge = edge_threshold_for_noise(median, white=white)
        # a louder line when the noise moves the regularisation off its default
        log.log(NOTICE if lam > DEFAULT_LAM else logging.INFO,
                "noise: %.1f %% of the mean brain intensity (per stack %s)%s: regularisation %.3g, edge threshold %.3g",
                100 * median, ", ".join("n/a" if v is None else f"{100 * v:.1f} %" for v in finite),
                "" if white else " (not white: interpolated or very low, edge threshold kept at its default)", lam, edge)
    return {"median": median if math.isfinite(median) else None, "per_stack": finite,
            "coarse_ratio": ratio if math.isfinite(ratio) else None, "white": white}


def _inplane_resolution(stacks: list[Stack], inplane: str | float) -> tuple[list[Stack], dict]:
    """The stacks with the in-plane pixel their PSF models (``Stack.psf_spacing``), and the record.

    ``"auto"``: from the stored slices' spectra (:func:`slice2vol.core.inplane.estimate_inplane`;
    a stack found zero-filled gets its acquired pixel, logged); ``"stored"``: the stored spacing (the
    convention of SVRTK and NeSVoR); a number: the acquired in-plane pixel in mm for every stack
    (never finer than a stack's stored one).  A stack that already carries ``psf_spacing`` keeps it."""
    from slice2vol.core.inplane import estimate_inplane

    mode = inplane if isinstance(inplane, str) else "given"
    if mode not in ("auto", "stored", "given"):
        raise Slice2VolError(f"in-plane resolution must be 'auto', 'stored' or a size in mm, got {inplane!r}")
    if mode == "given" and not (math.isfinite(float(inplane)) and float(inplane) > 0):
        raise Slice2VolError(f"the in-plane resolution must be a positive size in mm, got {inplane!r}")
    out, per = [], []
    for st in stacks:
        rec: dict = {"name": st.name, "stored_mm": [float(v) for v in st.spacing]}
        if st.psf_spacing is not None or mode == "stored":
            rec["source"] = "stack" if st.psf_spacing is not None else "stored"
        elif mode == "given":
            v = float(inplane)
            st = replace(st, psf_spacing=(max(v, float(st.spacing[0])), max(v, float(st.spacing[1]))))
            rec["source"] = "given"
        else:
            est = estimate_inplane(st.slices)
            rec.update(source="spectrum", **est.record())
            if est.interpolated:
                st = replace(st, psf_spacing=(float(st.spacing[0]) * est.factor[0], float(st.spacing[1]) * est.factor[1]))
                log.log(NOTICE, "%s: stored at %.2f x %.2f mm but interpolated in-plane (k-space zero filling x%.2f x %.2f):"
                        " the PSF models %.2f x %.2f mm pixels (--inplane-resolution stored turns this off)",
                        st.name, *st.spacing, *est.factor, *st.psf_spacing)
        rec["psf_pixel_mm"] = [float(v) for v in st.psf_pixel]
        per.append(rec)
        out.append(st)
    return out, {"mode": mode, "stacks": per}


def _leave_out_signal_loss(stacks: list[Stack]) -> tuple[list[Stack], dict]:
    """The stacks with :func:`signal_loss_pixels` taken out of their masks (logged), and the record."""
    out, record = [], {"applied": True, "stacks": []}
    for st in stacks:
        lost = signal_loss_pixels(st)
        n = int(lost.sum())
        touched = [int(st.index[k]) for k in torch.nonzero(lost.reshape(lost.shape[0], -1).any(1)).flatten().tolist()]
        record["stacks"].append({"name": st.name, "pixels": n, "slices": touched})
        if n:
            log.log(NOTICE, "%s: %d pixels in %d slices darker than both neighbouring slices (signal loss) left out",
                    st.name, n, len(touched))
            st = replace(st, mask=st.mask & ~lost)
        out.append(st)
    return out, record


def prepare(stacks: Sequence[Stack], resolution: float, mask: Volume | None = None, have_stack_masks: bool = False,
            template: int | None = None, bias_field: bool = False, device: torch.device | str = "cpu",
            register: bool = True, detect_signal_loss: bool = True, inplane: str | float = "auto") -> Prepared:
    """In-plane resolution (:func:`_inplane_resolution`) -> masks -> bias field -> signal loss left
    out (:func:`signal_loss_pixels`) -> template -> intensities -> stack registration -> output grid."""
    stacks = list(stacks)
    if len(stacks) == 0:
        raise Slice2VolError("no input stacks")
    stacks, inplane_record = _inplane_resolution(stacks, inplane)
    if template is not None and not (0 <= template < len(stacks)):
        raise Slice2VolError(f"--template {template} is out of range for {len(stacks)} stacks")
    if mask is not None:
        # The 3D mask lives in the template's world frame (as in SVRTK); other stacks may have
        # moved, so they keep a generous margin until stack registration, and the methods then
        # drop pixels that land outside the region of interest.
        tight = apply_volume_mask(stacks, mask)
        loose = apply_volume_mask(stacks, mask, dilate_mm=10.0)
        tmpl, why = _template_for_mask(tight, mask) if template is None else (template, "given by --template")
        stacks = [tight[i] if i == tmpl else loose[i] for i in range(len(stacks))]
    else:
        if not have_stack_masks:
            stacks = auto_masks(stacks)
        tmpl = None
    for st in stacks:
        if int(st.mask.sum()) == 0:
            raise Slice2VolError(f"stack {st.name}: no pixel inside the brain mask")
    if bias_field:
        stacks = [n4_correct(st) for st in stacks]
    if detect_signal_loss and mask is None:
        # with per-stack masks only: one 3D mask in the template's frame does not follow a brain
        # that moved between slices, and a slice whose brain moved out of part of the mask is dark
        # there for that reason (seen on SVRTK's phantom stacks)
        stacks, lost = _leave_out_signal_loss(stacks)
    else:
        lost = {"applied": False, "why": "turned off" if not detect_signal_loss else "one 3D mask (--mask)"}
    if tmpl is None and template is None:
        tmpl, why = choose_template(stacks), "automatic choice"
    elif tmpl is None:
        tmpl, why = template, "given by --template"
    log.log(NOTICE, "template stack %d (%s): %s", tmpl, stacks[tmpl].name, why)
    stacks, factors = normalise_intensities(stacks, tmpl)
    ss = SliceSet.from_stacks(stacks, device=device)
    check_budget(stacks, ss, resolution, mask)
    if register and len(stacks) > 1:
        ss = ss.with_poses(register_stacks(ss, tmpl))
    affine, shape, roi = output_grid(ss, resolution, roi=mask)
    return Prepared(ss, stacks, tmpl, factors, affine, shape, roi, signal_loss=lost, noise=_noise_record(stacks),
                    inplane=inplane_record, layout=layout_record(stacks))
