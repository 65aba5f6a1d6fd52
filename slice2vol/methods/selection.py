"""Stack assessment and selection (issue 14, item 3): which input stacks to reconstruct from.

A clinical exam has up to 20 stacks, re-scans after motion among them.  A stack that cannot be
reconciled with the others (another fetus, another contrast, a corrupt series, a stack ruined by
motion) pulls the reconstruction away from the truth, while a stack that merely moved a lot, like
the others, is data SVR can use.  :func:`assess_stacks` measures every stack without a ground
truth and decides keep / drop with a reason.  Measures (``S`` stacks, each against the others):

* **neighbour-slice agreement** ``neighbour_ncc``: overlap-weighted mean NCC of spatially adjacent
  slices inside the mask (adjacent slices of an interleaved acquisition were acquired far apart
  in time, so motion shows as disagreement between neighbours: the intuition of SVRTK / NeSVoR's
  template choice and :func:`slice2vol.core.preprocess.choose_template`), and
  ``interleave_ncc = NCC(k, k+2) - NCC(k, k+1)`` (slices two apart share a package of a
  2-package acquisition; positive when the packages disagree, negative on a still stack).  Both
  depend on the anatomy and the slice orientation as much as on motion (a sagittal stack of a
  still brain has lower values than an axial one), so they are shown and used for ranking and the
  registration reference, not to drop stacks.
* **agreement** with the other stacks after rigid registration: every stack is registered to a
  reference stack (the one whose neighbours agree best) with the project's stack registration
  (:func:`slice2vol.core.preprocess.register_stacks`, coarse settings); each stack's slices are
  then predicted from the PSF average of all *other* stacks on a :data:`GRID_MM` grid; the
  agreement is the median per-slice NCC over the slices the others cover (a held-out prediction,
  as in :mod:`slice2vol.evaluation.quality`).
* **motion** ``motion_mm``: each stack's slices are registered to that same average of the others
  (the project's registration core, one rigid group per slice, :data:`SLICE_REGISTRATION`); the
  75th percentile over slices of how far that moves a slice's pixels (mm) estimates the motion
  within the stack that a rigid stack registration cannot remove; ``interleave_mm`` is the
  distance between the mean displacement of its even and its odd slices (packages of a 2-package
  acquisition that moved apart).  Coarse and few iterations: it under-estimates large motion,
  but ranks stacks.
* **coverage**: the masked brain volume (mL) and the extent along the slice normal (mm).

Decision rule.  Every measure is compared with its median over *all* stacks of the exam, so a
heavily moved but consistent exam is not bad data and nothing is dropped from it.  A stack is
dropped when

1. it does not overlap the other stacks at all (no slice of it is covered by them); or
2. its agreement is below the median by more than ``max(4 x 1.4826 MAD, 0.25)``, the MAD (about
   that median) taken over the *other* stacks (:data:`AGREEMENT_RULE`; since 2026-12-07, so that an
   outlier does not widen its own margin): another fetus, another contrast, noise, a corrupt
   series; or
3. it moved much more than the others *and* agrees less: ``motion_mm`` above
   :data:`MOTION_RATIO` (1.45) x the median and agreement more than :data:`MOTION_AGREEMENT_DEFICIT`
   (0.09) below the median (a stack ruined by motion; either symptom alone is common in good
   exams); or
4. with per-stack brain masks (``--stack-masks``), its masked brain volume is outside
   :data:`COVERAGE_RATIO` (0.4 - 1.5) x the median: another subject, or a wrong or partial mask
   (with ``--mask`` every stack shares one mask, without masks the Otsu foreground includes
   maternal tissue and varies with the field of view: then coverage is only shown).

Guards: with fewer than :data:`MIN_STACKS_TO_DROP` (3) stacks nothing is dropped (with two that
disagree there is no telling which is wrong); at most ``ceil(S / 2) - 1`` stacks are dropped,
the worst first, so the kept ones are a strict majority and at least 2 (a 2 + 2 split, e.g. two
fetuses, is no consensus: nothing is dropped and the quality verdict fails the reconstruction
instead of a silent choice of half); a stack given as ``--template`` is never dropped.  Medians
over all stacks (not leave-one-out) are what make the rule a vote.  ``max_stacks`` then keeps the
best N of the remaining stacks by :func:`ranking_score`.

Second reference.  Every measure depends on the stack registration, and that on its reference.
When a stack would be dropped, the measures are taken again against a second reference (the best
of the stacks neither flagged nor the first reference) and the measurement with the higher median
agreement (the better registration of the exam as a whole) decides; when the first reference is
itself flagged, the second always decides.  Why: a stack with smooth, large motion often has the
best neighbour agreement and becomes the reference; a good stack of its orientation then
registers badly to it and looked like the outlier (3 of 84 tuning exams with an extreme coronal
stack lost their good coronal stack instead; none with the second reference).

Thresholds and rule were set on simulated exams of the training and validation atlases only
(``benchmarks/selection_sweep.py --atlases train validation --seeds 0,1,2,3``: 21 atlases x 4
seeds, 3 orthogonal 1 mm x 3 mm stacks with stack masks; the figures below are of the current
code): of 1344 stacks in 420 good exams (moderate, with a moderate re-scan, or all mild, severe
or extreme) 1 was dropped (an all-extreme exam).  In the first tuning (``bench_selection.py
--atlases validation STA23 STA26 STA29 STA32 STA35 --assess-only``, seeds 0 and 1) noise stacks
(agreement ~0) and stacks of an atlas 5 weeks apart (agreement deficit 0.14-0.5, brain volume
x0.2 or x1.7-2.9) were all dropped.  Extreme motion among moderate stacks is detected only
in part: 40 of 84 axial and 23 of 84 coronal ``extreme`` stacks dropped (a ``severe`` one: 66 of
84).  The simulator's ``extreme`` level is a smooth random walk.  On 9 tuning exams (GA22, STA25,
STA30, seeds 0-2) 8 of the extreme stacks truly moved 1.6-4.1 x as much as the median good stack
(residual slice displacement after the best rigid stack fit), one 1.1 x; the coarse slice
registration to the blurred average of moderately moving stacks measured 0.9-2.1 x, and such
stacks often agree with the others as well as the good ones do.  Tried and not kept: one round of
joint slice registration of all stacks before measuring (a sharper average) caught 45 + 25
instead of 41 + 23 but dropped 13 of the 1344 good-exam stacks; a wider slice registration
(sigma 6/4/2 mm, larger steps) made the good stacks' estimates noisier (the 9 exams).  When such
a stack is kept, the default pipeline's robust statistics use it: on the test atlases keeping it
gave +0.2-0.8 dB.  Not detected: a stack of an atlas 1 week apart (the same brain to these
measures).  The test atlases are reported in ``benchmarks/results/selection_cpu.txt``.

Cost: one coarse stack registration, ``S`` PSF averages / projections and one slice registration
per stack on a :data:`GRID_MM` grid (1-3 s for 3-4 stacks on one CPU thread); a second
measurement only when a stack is flagged.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from slice2vol.core import acquisition as acq
from slice2vol.core.geometry import axis_aligned_grid, slice_to_world
from slice2vol.core.image import SliceSet, Stack, Volume
from slice2vol.core.noise import stack_noise
from slice2vol.core.preprocess import apply_volume_mask, normalise_intensities, register_stacks
from slice2vol.core.registration import register
from slice2vol.core.similarity import per_slice_ncc
from slice2vol.errors import Slice2VolError

__all__ = ["StackScore", "Selection", "Rule", "CrossStack", "AGREEMENT_RULE", "MOTION_RATIO",
           "MOTION_AGREEMENT_DEFICIT", "COVERAGE_RATIO", "GRID_MM", "MIN_STACKS_TO_DROP", "neighbour_ncc",
           "coverage", "cross_stack_measures", "ranking_score", "decide", "assess_stacks"]

log = logging.getLogger(__name__)

#: Grid (mm) of the PSF averages the agreement is measured on, and of the stack registration.
GRID_MM = 3.0
#: The slice registration that estimates within-stack motion (coarse, few iterations; finer
#: settings -- 2 mm grid, 1 mm smoothing, 10 iterations -- separated bad stacks no better at
#: twice the time on the tuning cases).
SLICE_REGISTRATION = {"sigmas": (4.0, 2.0), "iterations": 5, "max_step": (0.1, 3.0)}
#: Every n-th pixel of a stack takes part in its slice registration.
SLICE_SUBSAMPLE = 2
#: Slices with fewer masked pixels take no part in the statistics.
MIN_PIXELS = 30
#: With fewer stacks than this nothing is dropped.
MIN_STACKS_TO_DROP = 3
#: Rule 3: motion above this multiple of the median ...
MOTION_RATIO = 1.45
#: ... and agreement more than this below the median.
MOTION_AGREEMENT_DEFICIT = 0.09
#: Rule 4: masked brain volume outside these multiples of the median (with stack masks only).
COVERAGE_RATIO = (0.4, 1.5)


@dataclass(frozen=True)
class Rule:
    """An outlier rule: a value is out when ``median - value > max(k * 1.4826 * MAD, floor)``."""

    k: float
    floor: float

    def margin(self, values: np.ndarray, centre: float | None = None) -> tuple[float, float]:
        """``(median, margin)`` over the finite ``values``; the MAD about ``centre`` when given."""
        v = values[np.isfinite(values)]
        if v.size == 0:
            return float("nan"), float("inf")
        med = float(np.median(v))
        c = med if centre is None else float(centre)
        mad = float(np.median(np.abs(v - c)))
        return med, max(self.k * 1.4826 * mad, self.floor)


#: Rule 2, on the agreement with the other stacks.  Good stacks fell at most 0.19 below the
#: median on the tuning cases, noise stacks 0.36 or more.
AGREEMENT_RULE = Rule(k=4.0, floor=0.25)


@dataclass
class StackScore:
    """The assessment of one stack (NCCs in [-1, 1], mm, mL; NaN where undefined)."""

    index: int
    name: str
    n_slices: int
    neighbour_ncc: float
    interleave_ncc: float
    motion_mm: float
    interleave_mm: float
    agreement: float
    coverage_ml: float
    extent_mm: float
    score: float = float("nan")
    noise: float = float("nan")
    keep: bool = True
    reason: str = ""
    path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Selection:
    """The outcome of :func:`assess_stacks`: one :class:`StackScore` per input stack (input
    order), the reference stack of the registration, the settings and the time taken (s)."""

    stacks: list[StackScore]
    reference: int | None
    settings: dict = field(default_factory=dict)
    time_s: float = 0.0

    @property
    def kept(self) -> list[int]:
        return [s.index for s in self.stacks if s.keep]

    @property
    def dropped(self) -> list[int]:
        return [s.index for s in self.stacks if not s.keep]

    def to_dict(self) -> dict:
        return {"kept": self.kept, "dropped": self.dropped, "reference": self.reference,
                "stacks": [s.to_dict() for s in self.stacks], "settings": self.settings, "time_s": self.time_s}

    def table(self) -> str:
        """A plain-text table, one row per stack."""
        head = (f"{'#':>2}  {'stack':<24} {'slices':>6} {'nbr NCC':>7} {'il NCC':>6} {'motion':>6} {'il mm':>5} "
                f"{'agree':>6} {'brain mL':>8} {'extent':>6} {'noise %':>7} {'score':>6}  decision")
        rows = [head, "-" * len(head)]
        for s in self.stacks:
            name = s.name if len(s.name) <= 24 else s.name[:21] + "..."
            rows.append(f"{s.index:>2}  {name:<24} {s.n_slices:>6} {_f(s.neighbour_ncc, 7, 3)} "
                        f"{_f(s.interleave_ncc, 6, 2)} {_f(s.motion_mm, 6, 2)} {_f(s.interleave_mm, 5, 1)} "
                        f"{_f(s.agreement, 6, 3)} {_f(s.coverage_ml, 8, 1)} {_f(s.extent_mm, 6, 0)} "
                        f"{_f(100 * s.noise, 7, 1)} {_f(s.score, 6, 3)}  {'keep' if s.keep else 'drop'}{': ' + s.reason if s.reason else ''}")
        rows.append("nbr NCC: mean NCC of adjacent slices; il NCC: NCC(k, k+2) - NCC(k, k+1); motion: slice "
                    "displacement (mm, 75th percentile) when registered to the others; il mm: even vs odd slices; "
                    "agree: median slice NCC against the other stacks; extent: mm along the slice normal; noise: "
                    "sd relative to the mean brain intensity (reads low on interpolated stacks; not used to decide)")
        return "\n".join(rows)


def _f(v: float, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if v is None or not np.isfinite(v) else f"{v:>{width}.{digits}f}"


# ------------------------------------------------------------------------------ measures


def neighbour_ncc(slices: Tensor, mask: Tensor, step: int = 1, min_pixels: int = MIN_PIXELS) -> float:
    """Overlap-weighted mean NCC of slices ``k`` and ``k + step`` inside both masks.

    Args:
        slices: ``(N, H, W)`` intensities; mask: ``(N, H, W)`` bool.
        step: slice distance of the pairs (1: adjacent).
    Returns:
        The mean over pairs with at least ``min_pixels`` common masked pixels, weighted by that
        count (small edge slices do not dominate); NaN without such a pair.
    """
    if slices.shape[0] <= step:
        return float("nan")
    x = slices.double()
    a, b = x[:-step], x[step:]
    m = (mask[:-step] & mask[step:]).double()
    n = m.flatten(1).sum(1)
    ma = (a * m).flatten(1).sum(1) / n.clamp_min(1)
    mb = (b * m).flatten(1).sum(1) / n.clamp_min(1)
    da, db = (a - ma[:, None, None]) * m, (b - mb[:, None, None]) * m
    den = ((da * da).flatten(1).sum(1) * (db * db).flatten(1).sum(1)).sqrt()
    ncc = (da * db).flatten(1).sum(1) / den.clamp_min(1e-300)
    ok = (n >= min_pixels) & (den > 0)
    if not bool(ok.any()):
        return float("nan")
    return float((ncc * n)[ok].sum() / n[ok].sum())


def coverage(stack: Stack) -> tuple[float, float]:
    """``(volume mL, extent mm)``: masked pixels x pixel area x slice spacing, and the distance
    between the first and last slice with masked pixels plus one slice spacing."""
    dz = stack.slice_spacing
    n = int(stack.mask.sum())
    ml = n * float(stack.spacing[0]) * float(stack.spacing[1]) * dz / 1000.0
    have = torch.nonzero(stack.mask.flatten(1).any(1)).flatten()
    extent = 0.0 if have.numel() == 0 else (int(have[-1]) - int(have[0]) + 1) * dz
    return ml, extent


def _nanmedian(v: Tensor) -> float:
    v = v[torch.isfinite(v)]
    return float(v.median()) if v.numel() else float("nan")


def _nanquantile(v: Tensor, q: float) -> float:
    v = v[torch.isfinite(v)]
    return float(torch.quantile(v.double(), q)) if v.numel() else float("nan")


@dataclass
class CrossStack:
    """Measures of each stack against the other stacks (``S`` values each, NaN where undefined).

    ``agreement``: median per-slice NCC against the others' prediction after stack registration;
    ``motion_mm``: 75th percentile over slices of how far slice registration to the others moves
    the slice's pixels (mm): the within-stack motion a rigid stack registration cannot remove;
    ``interleave_mm``: distance between the mean slice-registration displacement of the even and
    of the odd slices (mm): packages of a 2-package acquisition that moved apart."""

    agreement: list[float]
    motion_mm: list[float]
    interleave_mm: list[float]
    #: per stack, the per-slice values behind ``agreement`` and ``motion_mm`` (diagnostics)
    slice_ncc: list[list[float]] = field(default_factory=list)
    slice_motion_mm: list[list[float]] = field(default_factory=list)


def cross_stack_measures(stacks: Sequence[Stack], reference: int, grid_mm: float = GRID_MM,
                         device: torch.device | str = "cpu") -> CrossStack:
    """Register every stack to ``reference`` (the project's stack registration, coarse), predict
    each stack's slices from the PSF average of all *other* stacks on a ``grid_mm`` grid, and
    register its slices to that average (the project's registration core, one group per slice).

    Args:
        stacks: masked stacks (their ``mask`` is used), at least 2.
        reference: index of the stack the others are registered to.
        grid_mm: spacing of the PSF averages and of the stack registration's template volume.
    Returns:
        :class:`CrossStack`; a stack the others do not cover (no overlap) gets NaN.
    """
    S = len(stacks)
    nan = [float("nan")] * S
    if S < 2:
        return CrossStack(list(nan), list(nan), list(nan))
    normed, _ = normalise_intensities(stacks, reference)
    ss = SliceSet.from_stacks(normed, device=device)
    poses = register_stacks(ss, reference, resolution=grid_mm, sigmas=(4.0, 2.0), iterations=6, subsample=4)
    if not bool(torch.isfinite(poses).all()):
        return CrossStack(list(nan), list(nan), list(nan))
    # the grid: the reference stack's masked pixels plus a margin (a stack far outside simply has
    # no coverage, instead of stretching the grid across the scanner)
    pstack = ss.pixel_stack()
    pts = slice_to_world(poses, ss.coords, ss.slice_id)[pstack == reference]
    lo = pts.min(0).values.double().cpu().numpy() - 10.0
    hi = pts.max(0).values.double().cpu().numpy() + 10.0
    affine, shape = axis_aligned_grid(lo, hi, grid_mm)
    psf = acq.psf_kernel(ss.psf_pixel, ss.thickness, grid_mm)
    num, den = [], []
    for s in range(S):
        w = (pstack == s).to(ss.values.dtype)
        num.append(acq.adjoint(ss.values * w, shape, affine, poses, ss.coords, ss.slice_id, psf))
        den.append(acq.adjoint(w, shape, affine, poses, ss.coords, ss.slice_id, psf))
    num_all, den_all = sum(num), sum(den)
    thr = 0.05 * float(den_all.max().clamp_min(1e-12)) / S
    M = ss.n_slices
    n_pix = torch.zeros(M, device=ss.device).index_add_(0, ss.slice_id, torch.ones_like(ss.values))
    out = CrossStack([], [], [])
    for s in range(S):
        d_o = den_all - den[s]
        covered = d_o > thr
        v_o = torch.where(covered, (num_all - num[s]) / d_o.clamp_min(1e-12), torch.zeros_like(d_o))
        sel = pstack == s
        coords, sid, y = ss.coords[sel], ss.slice_id[sel], ss.values[sel]
        sim = acq.forward(v_o, affine, poses, coords, sid, psf)
        inside = acq.forward(covered.to(v_o.dtype), affine, poses, coords, sid, psf) > 0.5  # the others reach it
        n_in = torch.zeros(M, device=ss.device).index_add_(0, sid[inside], torch.ones_like(y[inside]))
        lo_s, hi_s = ss.stack_slices[s], ss.stack_slices[s + 1]
        # a slice counts when the others reach at least half of its pixels (and enough of them)
        use = ((n_in >= MIN_PIXELS) & (n_in >= 0.5 * n_pix))[lo_s:hi_s]
        ncc = per_slice_ncc(sim[inside], y[inside], sid[inside], M)[lo_s:hi_s]
        out.agreement.append(_nanmedian(ncc[use]))
        out.slice_ncc.append(ncc[use].tolist())
        if int(use.sum()) < 2:
            out.slice_motion_mm.append([])
            out.motion_mm.append(float("nan"))
            out.interleave_mm.append(float("nan"))
            continue
        # slice registration to the others' average, on every n-th pixel the others reach
        sub = inside & (torch.arange(y.numel(), device=y.device) % SLICE_SUBSAMPLE == 0)
        res = register(v_o, affine, poses, coords[sub], sid[sub], y[sub], psf, **SLICE_REGISTRATION)
        before = slice_to_world(poses, coords[sub], sid[sub])
        after = slice_to_world(res.poses, coords[sub], sid[sub])
        d = after - before  # (p, 3) mm
        cnt = torch.zeros(M, device=d.device, dtype=d.dtype).index_add_(0, sid[sub], torch.ones_like(d[:, 0]))
        dist = torch.zeros(M, device=d.device, dtype=d.dtype).index_add_(0, sid[sub], d.norm(dim=1))
        vec = torch.zeros(M, 3, device=d.device, dtype=d.dtype).index_add_(0, sid[sub], d)
        dist, vec, cnt = dist[lo_s:hi_s], vec[lo_s:hi_s], cnt[lo_s:hi_s]
        per_slice = (dist / cnt.clamp_min(1))[use]
        out.slice_motion_mm.append(per_slice.tolist())
        out.motion_mm.append(_nanquantile(per_slice, 0.75))
        mean_d = (vec / cnt.clamp_min(1)[:, None])
        k = torch.arange(hi_s - lo_s, device=d.device)
        even, odd = use & (k % 2 == 0), use & (k % 2 == 1)
        if bool(even.any()) and bool(odd.any()):
            out.interleave_mm.append(float((mean_d[even].mean(0) - mean_d[odd].mean(0)).norm()))
        else:
            out.interleave_mm.append(float("nan"))
    return out


# ------------------------------------------------------------------------------ decision


def _ratio(values: np.ndarray) -> np.ndarray:
    """``values / median`` over the finite positive values (NaN where undefined)."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size == 0:
        return np.full_like(values, np.nan)
    return values / float(np.median(v))


def ranking_score(agreement: Sequence[float], motion_mm: Sequence[float], coverage_ml: Sequence[float]) -> np.ndarray:
    """The combined score ``max_stacks`` ranks by (higher is better)::

        agreement - 0.2 * max(0, motion / median motion - 1) - 0.5 * max(0, 1 - coverage / median coverage)

    agreement counts most; moving more than the others and covering less of the brain cost. An
    undefined agreement (no overlap) scores -1, an undefined motion or coverage costs nothing."""
    A, D, C = (np.asarray(v, dtype=np.float64) for v in (agreement, motion_mm, coverage_ml))
    m = np.nan_to_num(np.maximum(0.0, _ratio(D) - 1.0), nan=0.0)
    c = np.nan_to_num(np.maximum(0.0, 1.0 - _ratio(C)), nan=0.0)
    return np.where(np.isfinite(A), A, -1.0) - 0.2 * m - 0.5 * c


def decide(agreement: Sequence[float], motion_mm: Sequence[float], coverage_ml: Sequence[float],
           drop_outliers: bool = True, max_stacks: int | None = None, protect: Sequence[int] = (),
           brain_masks: bool = True) -> tuple[list[bool], list[str], list[float]]:
    """The keep / drop decision from the per-stack measures (rules and guards: module docstring).

    Args:
        agreement, motion_mm, coverage_ml: ``S`` values each (NaN where undefined; an undefined
            agreement of a stack with masked pixels means it does not overlap the others).
        drop_outliers: apply the rules (``False``: ``--keep-all-stacks``; the reason then says
            what they would have dropped).
        max_stacks: afterwards keep only the best N by :func:`ranking_score`.
        protect: stack indices never dropped (``--template``).
        brain_masks: the coverage is that of per-stack brain masks (rule 4 applies).
    Returns:
        ``(keep, reason, score)``, one entry per stack; ``reason`` is empty for a plain keep.
    """
    A, D, C = (np.asarray(v, dtype=np.float64) for v in (agreement, motion_mm, coverage_ml))
    S = A.size
    if max_stacks is not None and max_stacks < 1:
        raise Slice2VolError(f"--max-stacks must be at least 1, got {max_stacks}")
    score = ranking_score(A, D, C)
    keep, reason = [True] * S, [""] * S
    if S >= MIN_STACKS_TO_DROP:
        a_med = AGREEMENT_RULE.margin(A)[0]
        d_ratio, c_ratio = _ratio(D), _ratio(C)
        d_med = float(np.median(D[np.isfinite(D)])) if np.isfinite(D).any() else float("nan")
        c_med = float(np.median(C[C > 0])) if np.any(C > 0) else float("nan")
        # rule 2's spread leaves the stack itself out: with 4 stacks the outlier's own distance
        # inflated the MAD (a pure-noise stack at agreement 0.01 against 0.45 / 0.47 / 0.60 fell
        # 0.449 below a margin of 0.450).  The median stays that of all stacks, so a 2 + 2 split
        # still has no consensus to leave
        a_margin = [AGREEMENT_RULE.margin(np.delete(A, s), centre=a_med)[1] for s in range(S)]
        why: dict[int, str] = {}
        badness = np.zeros(S)  # how far beyond a threshold (1 = at it), to drop the worst first
        for s in range(S):
            r = []
            if C[s] > 0 and not np.isfinite(A[s]) and np.isfinite(a_med):  # (others do overlap each other)
                r.append("does not overlap the other stacks")
                badness[s] = 100.0
            elif np.isfinite(A[s]) and a_med - A[s] > a_margin[s]:
                r.append(f"disagrees with the other stacks (agreement {A[s]:.2f}, median {a_med:.2f})")
                badness[s] = max(badness[s], (a_med - A[s]) / a_margin[s])
            elif (np.isfinite(A[s]) and np.isfinite(d_ratio[s]) and d_ratio[s] > MOTION_RATIO
                  and a_med - A[s] > MOTION_AGREEMENT_DEFICIT):
                r.append(f"moved much more than the other stacks (motion {D[s]:.1f} mm, median {d_med:.1f}) and "
                         f"agrees less with them (agreement {A[s]:.2f}, median {a_med:.2f})")
                badness[s] = max(badness[s], min(d_ratio[s] / MOTION_RATIO, (a_med - A[s]) / MOTION_AGREEMENT_DEFICIT))
            if brain_masks and np.isfinite(c_ratio[s]) and not COVERAGE_RATIO[0] <= c_ratio[s] <= COVERAGE_RATIO[1]:
                r.append(f"its brain mask is {c_ratio[s]:.1f} x the median volume ({C[s]:.0f} mL, median "
                         f"{c_med:.0f} mL: another subject, or a wrong or partial mask)")
                lo, hi = COVERAGE_RATIO
                badness[s] = max(badness[s], c_ratio[s] / hi if c_ratio[s] > hi else lo / max(c_ratio[s], 1e-12))
            if r and s in protect:
                reason[s] = "kept as the --template stack, else dropped: " + "; ".join(r)
            elif r:
                why[s] = "; ".join(r)
        # the kept stacks stay a strict majority, and at least 2
        allowed = max(0, min(math.ceil(S / 2) - 1, S - 2))
        worst = sorted(why, key=lambda s: -badness[s])
        for s in worst[:allowed]:
            if drop_outliers:
                keep[s], reason[s] = False, why[s]
            else:
                reason[s] = f"kept by --keep-all-stacks, else dropped: {why[s]}"
        for s in worst[allowed:]:
            reason[s] = f"kept: at most {allowed} of {S} stacks are dropped, else: {why[s]}"
    if max_stacks is not None:
        order = [s for s in np.argsort(-score, kind="stable").tolist() if keep[s]]
        ranked = [s for s in order if s in protect] + [s for s in order if s not in protect]
        for s in ranked[max_stacks:]:
            if s not in protect:
                keep[s], reason[s] = False, f"not among the best {max_stacks} (--max-stacks; score {score[s]:.2f})"
    return keep, reason, score.tolist()


# ------------------------------------------------------------------------------ entry point


def _otsu_masks(stacks: Sequence[Stack]) -> list[Stack]:
    """Each stack's own Otsu foreground (SimpleITK) within its usable pixels: the stand-in brain
    mask when none was given (``prepare`` also intersects the fields of view, which would hide a
    stack that does not overlap the others)."""
    import SimpleITK as sitk

    out = []
    for st in stacks:
        v = st.slices[st.mask].float().cpu().numpy()
        if v.size < 100:
            out.append(st)
            continue
        f = sitk.OtsuThresholdImageFilter()
        f.Execute(sitk.GetImageFromArray(v.reshape(1, 1, -1)))
        out.append(replace(st, mask=st.mask & (st.slices > f.GetThreshold())))
    return out


def _median_agreement(c: CrossStack) -> float:
    """Median agreement over the stacks that have one (-inf if none)."""
    a = np.asarray(c.agreement, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else -math.inf


def _reference(nbr: Sequence[float], protect: Sequence[int]) -> int:
    """The registration reference: a protected stack (the user's template) if any, else the one
    whose neighbouring slices agree best (as ``choose_template``)."""
    if protect:
        return int(protect[0])
    return int(np.argmax(np.nan_to_num(np.asarray(nbr, dtype=np.float64), nan=-np.inf)))


def assess_stacks(stacks: Sequence[Stack], mask: Volume | None = None, have_stack_masks: bool = True,
                  drop_outliers: bool = True, max_stacks: int | None = None, protect: Sequence[int] = (),
                  device: torch.device | str = "cpu") -> Selection:
    """Measure every stack and decide which to reconstruct from (module docstring).

    Args:
        stacks: the input stacks as loaded (their masks: usable pixels, or brain masks with
            ``have_stack_masks``).
        mask: an optional 3D brain mask (``--mask``); the stacks are restricted to it, dilated by
            10 mm (other stacks may have moved relative to the stack it was drawn on).
        have_stack_masks: the stacks' masks are brain masks; otherwise (and without ``mask``)
            each stack's own Otsu foreground stands in.
        drop_outliers: apply the rules (``False``: ``--keep-all-stacks``).
        max_stacks: keep only the best N (``--max-stacks``).
        protect: indices never dropped (a ``--template``).
    Returns:
        :class:`Selection`.  No side effect on the stacks or torch's random state.
    """
    t0 = time.perf_counter()
    stacks = list(stacks)
    if not stacks:
        raise Slice2VolError("no input stacks")
    if max_stacks is not None and max_stacks < 1:
        raise Slice2VolError(f"--max-stacks must be at least 1, got {max_stacks}")
    brain_masks = have_stack_masks and mask is None
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if mask is not None:
            masked = apply_volume_mask(stacks, mask, dilate_mm=10.0)
        elif not have_stack_masks:
            masked = _otsu_masks(stacks)
        else:
            masked = stacks
        nbr = [neighbour_ncc(st.slices, st.mask) for st in masked]
        nbr2 = [neighbour_ncc(st.slices, st.mask, step=2) for st in masked]
        cov = [coverage(st) for st in masked]
        cov_ml = [c[0] for c in cov]
        noise = [stack_noise(st) for st in masked]  # reported only: a noisy stack is still data
        usable = [i for i, st in enumerate(masked) if int(st.mask.sum()) >= MIN_PIXELS]
        nan = [float("nan")] * len(stacks)
        cross = CrossStack(list(nan), list(nan), list(nan))
        reference = None

        def measure(ref: int) -> CrossStack:
            c = cross_stack_measures([masked[i] for i in usable], usable.index(ref), device=device)
            out = CrossStack(list(nan), list(nan), list(nan))
            for j, i in enumerate(usable):
                out.agreement[i], out.motion_mm[i], out.interleave_mm[i] = \
                    c.agreement[j], c.motion_mm[j], c.interleave_mm[j]
            return out

        def rule(c: CrossStack):
            return decide(c.agreement, c.motion_mm, cov_ml, drop_outliers=True, protect=protect,
                          brain_masks=brain_masks)[0]

        def best_of(cand: list[int]) -> int:
            return cand[_reference([nbr[i] for i in cand], [cand.index(p) for p in protect if p in cand])]

        def second_reference(first: int, flagged: list[int]) -> int | None:
            cand = [i for i in usable if i != first and i not in flagged]
            return best_of(cand) if cand else None

        if len(usable) >= 2:
            reference = best_of(usable)
            cross = measure(reference)
            flagged = [i for i in usable if not rule(cross)[i]]
            alt = second_reference(reference, flagged) if flagged else None
            if alt is not None:
                # A stack would be dropped: ask a second reference.  A reference ruined by motion
                # registers the others badly (a good stack of its orientation can then look like
                # the outlier), so when the reference itself is flagged the second measurement is
                # used; otherwise the one with the higher median agreement, i.e. the better
                # registration of the exam as a whole.
                second = measure(alt)
                if reference in flagged or _median_agreement(second) > _median_agreement(cross):
                    cross, reference = second, alt
        keep, reason, score = decide(cross.agreement, cross.motion_mm, cov_ml, drop_outliers, max_stacks, protect,
                                     brain_masks)
    scores = [StackScore(index=i, name=st.name, n_slices=st.n_slices, neighbour_ncc=nbr[i],
                         interleave_ncc=nbr2[i] - nbr[i], motion_mm=cross.motion_mm[i],
                         interleave_mm=cross.interleave_mm[i], agreement=cross.agreement[i], coverage_ml=cov[i][0],
                         extent_mm=cov[i][1], score=score[i], noise=noise[i], keep=keep[i], reason=reason[i],
                         path=None if st.meta.get("path") is None else str(st.meta["path"]))
              for i, st in enumerate(stacks)]
    settings = {"drop_outliers": drop_outliers, "max_stacks": max_stacks, "protect": list(protect),
                "agreement_rule": asdict(AGREEMENT_RULE), "motion_ratio": MOTION_RATIO,
                "motion_agreement_deficit": MOTION_AGREEMENT_DEFICIT, "coverage_ratio": list(COVERAGE_RATIO),
                "coverage_rule": brain_masks, "min_stacks_to_drop": MIN_STACKS_TO_DROP, "grid_mm": GRID_MM}
    return Selection(scores, reference, settings, time.perf_counter() - t0)
