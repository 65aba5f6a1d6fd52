"""Classical slice-to-volume reconstruction (``--method svr``), as SVRTK / NeSVoR ``svr`` do it.

Written from Kuklisova-Murgasova et al. 2012, Kainz et al. 2015 and the cSVR paper's eqs. 1-4,
on the shared acquisition model, registration core and robust statistics::

    stack registration to the template                      (preprocess.prepare)
    global pose search on a coarse grid                     (robust_start, slice2vol.core.pose_search):
        whole stacks, packages and their halves, runs of 8 then 4 neighbouring slices (search_groups),
        then single slices, until few slices move,
        then the turn search for slices beyond its reach     (_turn_round)
    V <- PSF-weighted average of the slices                 (eq. 2)
    for each stage (coarse grid, then the output grid):
        repeat:
            V <- super-resolution by CG                     (eq. 3)
            poses <- slice-to-volume registration           (eq. 4), all slices at once
            scales (and, on the output grid, robust pixel & slice weights) <- EM
    V <- final super-resolution with the robust weights     (eq. 3)

Alternating registration and reconstruction converges slowly: each registration can only move
slices as far as the current (motion-blurred) volume lets it.  Where the papers are silent we
spend most iterations on a coarse grid (``coarse_resolution``, default twice the output voxel)
with every ``coarse_subsample``-th pixel registered, where an iteration costs a fraction of a
full one, and finish with a few iterations on the output grid.  Robust statistics start only
on the output grid: before that, slices are misregistered rather than corrupted, and excluding
them would freeze them where they are (measured 2026-12-07, validation atlases, 3 moderate
stacks, seeds 0-1, default pipeline: robust weights from the first coarse iteration cost
0.12-0.41 dB on all 6 undamaged cases and changed those with 15-30 % of the slices darkened by
signal loss by -0.75..+2.14 dB; dark slices are instead left out before any registration,
:func:`slice2vol.core.preprocess.signal_loss_pixels`).  Registration itself uses pixel weights
and masks but not slice weights, so an excluded slice is still re-registered and may come back (as in SVRTK).
Slices with fewer than ``min_slice_pixels`` masked pixels follow their stack instead of being
registered alone, and a slice update that moves a slice more than ``max_deviation`` (45 deg /
40 mm) from its stack-registered pose is refused (tighter bounds also refused genuine motion
of some slices in our tests); both guard the weakly determined slices at
the brain's edges.

Which strategy handles which motion.  Stack registration removes each stack's mean motion (the
whole of it for a still fetus between scans).  The local loop (LM registration, coarse to fine)
recovers slices within a few degrees and millimetres of their stack's pose: mild and moderate
motion.  At severe motion single slices are 10-30 deg and 10-15 mm away, beyond LM's reach: the
global search (``robust_start``; neither SVRTK nor NeSVoR has it) scores every slice at a lattice
of rotations about the brain centre (15 deg apart, up to 30 deg) combined with shifts along the
slice normal (0, +-4, +-8 mm), and at the motion of its neighbours in the stack (offsets 1-4, which
cover interleaving with up to 4 packages without knowing the order: a temporal prior that needs
no acquisition order), on a smoothed 2 mm volume, then refines the best 3 locally.  Each round
rebuilds the volume from the slices that fit (NCC at least half the median), so a slice that was
put in the wrong place stops blurring the volume instead of being excluded for good: robust
outlier rejection proper starts only on the output grid, so it does not remove most of a badly
moving stack.  At mild motion one round moves almost nothing and the search stops (about +25% of
the run time there).  What the search cannot fix is a volume that is wrong everywhere because
the start was wrong everywhere; the default pipeline (``--method auto``,
:mod:`slice2vol.methods.csvr.reconstruct`) therefore also offers the cSVR network's poses as a
start and keeps whichever the data explain better.  Measured: README "Large motion".
A fetus that turns by 90-180 deg during a stack (none of the simulator's levels does) leaves the
slices acquired afterwards out of the slice search's reach and beyond ``max_deviation``; the turn
search (:func:`_turn_round`, after the slice rounds) searches the badly fitting slices over all
rotations, takes the correction several of them agree on as the stack's turn, and from then on
measures each slice of that stack from whichever side of the turn it lies nearer
(:func:`nearest_reference`).  Settings chosen on the validation atlases (moderate motion plus
one stack turned by 90/135/180 deg, seeds 0-1: 16 of 18 turns found, +0.19..+2.50 dB, none
worse, 18 of 18 with the simulator's later ``--turn``; 0 of 12 ordinary mild..extreme cases
changed); measured on test atlases:
``benchmarks/bench_turn.py``, README "Large turns".  It needs the other stacks: when every
stack turns, the volume the slices are searched against is wrong too (validation GA27, all
three stacks turned by 60-150 deg: 17-21 dB, verdict ``failed``).

Defaults (research choices tuned on simulated atlas cases, not on held-out data): up to 12 coarse
iterations (stopping early once the median slice moves less than 0.1 mm per iteration; half the
pixels enter the coarse reconstructions) and 3 fine iterations; registration smoothing 2 -> 1 -> 0 mm (first iteration), else 1 -> 0 mm;
4 iterations of diagonal-preconditioned CG per reconstruction, 8 for each of the final ones (plain CG
needed 8 and 20: on the 12 moderate / severe validation cases the preconditioned 4 / 8 gave
+0.06 dB mean PSNR, -0.13..+0.72 dB per case, on the 6 extreme ones +0.05 dB, -0.09..+0.36 dB,
with the search's pixel subsampling below; 0.76x the run time on STA29); relative
regularisation 0.02 up to 4 % noise and half the relative noise above
(:func:`slice2vol.core.reconstruction.regularisation_for_noise`); edge threshold 0.1 x the 99th
intensity percentile for the volumes the registration works on, and for the output two final
solves (each re-deriving the edge weights) with the threshold from the stacks' noise
(:func:`slice2vol.core.reconstruction.edge_threshold_for_noise`, twice the relative noise, at
least 0.03; ``SVRConfig.edge``).  The search's
reconstructions on their 2 mm grid use every second pixel (four pixels per voxel in-plane:
half suffice, as on the coarse grid).  Search: up to 3 slice rounds after one stack round,
stopping when fewer than 2% of the slices move; lattice step 15 deg (on 5 severe/extreme cases of
the validation atlases GA22_notoperated, GA27_operated, GA32_operated, :mod:`slice2vol.simulation.splits`:
a 10 deg lattice gave -0.4 dB and +30% time, a 45 deg ball with 6 rounds -0.5 dB).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from slice2vol.core import acquisition as acq
from slice2vol.core.geometry import axis_aligned_grid, slice_to_world
from slice2vol.core.image import Volume
from slice2vol.core.preprocess import Prepared
from slice2vol.core.reconstruction import EDGE_DELTA, psf_average, super_resolve
from slice2vol.core.registration import register
from slice2vol.core.resample import max_filter, resample, sample_at
from slice2vol.core.runtime import NOTICE
from slice2vol.core.robust import RobustState, em_weights, fit_scales

__all__ = ["SVRConfig", "SVRResult", "reconstruct_svr", "roi_weights", "dilated_roi", "coarse_grid",
           "search_groups"]

log = logging.getLogger(__name__)


@dataclass
class SVRConfig:
    """Parameters of :func:`reconstruct_svr` (see the module docstring for the defaults' rationale)."""

    iterations: int = 3
    coarse_iterations: int = 12
    coarse_tolerance: float = 0.1
    coarse_factor: float = 2.0
    coarse_subsample: int = 4
    coarse_sr_subsample: int = 2
    cg_iterations: int = 4
    final_cg_iterations: int = 8
    cg_precondition: bool = True
    lam: float | None = None  # None: from the stacks' noise (Prepared.regularisation)
    delta: float | None = None  # absolute edge threshold of every SR; None: relative (edge, edge_stages)
    # relative edge threshold (x the slices' 99th percentile) of the output's final SR solves, None:
    # from the stacks' noise (Prepared.edge_threshold); the volumes the registration works on keep
    # edge_stages (validation GA22 at severe motion, 1-2 % noise, seeds 0-1: the noise's threshold
    # everywhere lost 0.14-0.47 dB in 3 of 4 cases; in the final solves only it gained 0.06-0.40 in all)
    edge: float | None = None
    edge_stages: float = EDGE_DELTA
    final_rounds: int = 2  # final SR solves, each re-deriving the edge weights from the last
    register_slices: bool = True
    robust: bool = True
    reg_iterations: int = 6
    reg_subsample: int = 2
    min_slice_pixels: int = 50
    max_deviation: tuple[float, float] = (45.0, 40.0)
    search_rounds: int = 3
    # interleave packages per stack (SVRTK -packages); None: no package levels.  Where the files do
    # not record the order, 2 (interleaved, the usual fetal single-shot protocol) is assumed: on validation
    # severe cases with 2 packages it gained +0.4..+5.5 dB, on extreme cases with 1-4 packages per
    # stack (mostly not 2) it changed -0.2..+0.2 dB
    packages: tuple[int, ...] | None = (2,)
    # where a stack's files give its acquisition order (slice timing), its packages come from
    # that order instead (search_groups); the CLI turns this off when --packages is given.  On 36
    # severe test cases acquired with 1, 3 or 4 packages: -2.0..+3.8 dB, +0.14 mean (README
    # "Slice timing"): kept because it is what was acquired, not for a measured gain
    packages_from_order: bool = True
    # then runs of this many neighbouring slices of a stack (by file index), each moved as one
    # before single slices are: a sequential acquisition's neighbours moved together, and an
    # interleaved stack's slow drift is shared by its neighbours too.  Validation severe motion
    # (GA22/GA27/GA32, seeds 0-1): sequential stacks +0.75 dB mean (-0.35..+1.76), 2 packages
    # +0.24 (-0.21..+0.90); ():  off.  Measured on test: README "Slice timing"
    search_blocks: tuple[int, ...] = (8, 4)
    search_stacks: bool = True
    search_factor: float = 2.5
    search_step_deg: float = 15.0
    search_max_deg: float = 30.0
    search_shifts: tuple[float, ...] = (0.0, -4.0, 4.0, -8.0, 8.0)
    search_reach: int = 4
    search_subsample: int = 4
    search_sr_subsample: int = 2
    search_min_moved: float = 0.02
    # the turn search (_turn_round, None: off): slices under turn_below x the median NCC after the
    # slice rounds, searched over all rotations; a turn needs turn_min_slices agreeing slices and
    # a fit of turn_min_fit x the median (validation turns of 90/135/180 deg: a group search of the
    # bad slices alone found 12 of 18 with turn_below 0.8 or 0.9, the per-slice consensus 15 at
    # 0.9, both together 16)
    turn_step_deg: float | None = 22.5
    turn_below: float = 0.9
    turn_min_slices: int = 3
    turn_min_fit: float = 0.5
    progress: bool = True


@dataclass
class SVRResult:
    """The reconstruction and what a researcher needs to check it.

    ``volume`` (on the ROI grid, template intensity units), ``poses (M, 4, 4)``, ``scales (M,)``,
    ``slice_weights (M,)``, ``pixel_weights (P,)``, ``simulated (P,)`` slices from the result
    (with the slice scales applied), ``history`` per outer iteration.
    """

    volume: Volume
    poses: Tensor
    scales: Tensor
    slice_weights: Tensor
    pixel_weights: Tensor
    simulated: Tensor
    history: list[dict] = field(default_factory=list)
    regularisation: float | None = None
    edge_threshold: float | None = None


ROI_DILATE_VOX = 2


def dilated_roi(roi: Tensor, dilate_vox: int = ROI_DILATE_VOX) -> Tensor:
    """``roi`` as float, dilated by ``dilate_vox`` voxels: what :func:`roi_weights` tests pixels against
    (computed once per grid by the loops that call it for every new pose set)."""
    m = roi.float()
    return max_filter(m, dilate_vox) if dilate_vox else m


def roi_weights(roi: Tensor, affine: np.ndarray, ss, poses: Tensor, dilate_vox: int = ROI_DILATE_VOX) -> Tensor:
    """``(P,)`` 1 for pixels whose centre lies inside the (dilated) region of interest, else 0.

    ``roi`` may already be dilated (:func:`dilated_roi`; pass ``dilate_vox=0``)."""
    m = dilated_roi(roi, dilate_vox)
    v = sample_at(m, affine, slice_to_world(poses, ss.coords, ss.slice_id), mode="nearest")
    return (v > 0.5).to(ss.values.dtype)


def coarse_grid(prep: Prepared, factor: float) -> tuple[np.ndarray, tuple[int, int, int], Tensor]:
    """The output grid's box at ``factor`` times its voxel size, with the ROI carried over."""
    A, shape = prep.affine, prep.shape
    res = float(np.linalg.norm(A[:3, :3], axis=0).mean())
    lo = A[:3, 3]
    hi = A[:3, :3] @ (np.asarray(shape, dtype=float) - 1) + A[:3, 3]
    affine, cshape = axis_aligned_grid(lo, hi, res * factor)
    roi = resample(prep.roi.float(), A, affine, cshape, mode="linear") > 0.25
    return affine, cshape, roi.to(prep.roi.device)


def _plausible(new: Tensor, old: Tensor, reference: Tensor, max_deviation: tuple[float, float]) -> Tensor:
    """Keep ``old`` where ``new`` strays further than ``max_deviation`` (deg, mm at the slice centre)
    from ``reference`` (the stack-registered poses): a registration that turns a slice by tens of
    degrees away from its stack has locked onto the wrong structure, not found the fetus."""
    from slice2vol.core.transforms import rotation_angle

    ang = torch.rad2deg(rotation_angle(new[:, :3, :3] @ reference[:, :3, :3].transpose(-1, -2)))
    shift = (new[:, :3, 3] - reference[:, :3, 3]).norm(dim=-1)
    bad = (ang > max_deviation[0]) | (shift > max_deviation[1])
    if bool(bad.any()):
        log.info("svr: %d slice updates reverted (beyond %.0f deg / %.0f mm of their stack)", int(bad.sum()), *max_deviation)
    return torch.where(bad[:, None, None], old, new)


def _median_motion(old: Tensor, new: Tensor, ss, sub: Tensor) -> float:
    """Median over slices of the mean displacement (mm) of their pixels between two pose sets."""
    c, sid = ss.coords[sub], ss.slice_id[sub]
    d = ((new[sid, :3, :3] - old[sid, :3, :3]) @ c[..., None])[..., 0] + new[sid, :3, 3] - old[sid, :3, 3]
    per = torch.zeros(ss.n_slices, dtype=d.dtype, device=d.device).index_add_(0, sid, d.norm(dim=-1))
    cnt = torch.zeros(ss.n_slices, dtype=d.dtype, device=d.device).index_add_(0, sid, torch.ones_like(sid, dtype=d.dtype))
    has = cnt > 0
    return float((per[has] / cnt[has]).median()) if bool(has.any()) else 0.0


def _subset(n: int, step: int, device) -> Tensor:
    return torch.arange(n, device=device) % max(1, step) == 0


def _turned_side(stack_poses: Tensor, turns: Tensor, stack_id: Tensor) -> Tensor:
    """``(M, 4, 4)`` each slice's stack-registered pose moved by its stack's turn (``turns (S, 4, 4)``)."""
    return turns[stack_id.to(turns.device)] @ stack_poses


def nearest_reference(poses: Tensor, stack_poses: Tensor, turns: Tensor | None, stack_id: Tensor) -> Tensor:
    """Per slice, the pose its motion is measured from: the stack-registered pose, or for a stack
    with a turn (``turns (S, 4, 4)`` world corrections, identity where none) the turned one,
    whichever is nearer in rotation to ``poses (M, 4, 4)``.  Returns ``(M, 4, 4)``."""
    if turns is None:
        return stack_poses
    from slice2vol.core.transforms import rotation_angle

    alt = _turned_side(stack_poses, turns, stack_id)
    a0 = rotation_angle(poses[:, :3, :3] @ stack_poses[:, :3, :3].transpose(-1, -2))
    a1 = rotation_angle(poses[:, :3, :3] @ alt[:, :3, :3].transpose(-1, -2))
    return torch.where((a1 < a0)[:, None, None], alt, stack_poses)


def _branch_candidates(poses: Tensor, stack_poses: Tensor, turns: Tensor, stack_id: Tensor) -> Tensor:
    """``(2, M, 4, 4)`` world corrections (``candidate @ poses^-1``) that put each slice at its
    stack-registered pose and at its stack's turned one: a slice of a stack with a turn may lie
    on either side of it (the turn's time is unknown without the acquisition order)."""
    inv = torch.linalg.inv(poses)
    return torch.stack([stack_poses @ inv, _turned_side(stack_poses, turns, stack_id) @ inv])


def _consensus(corrections: Tensor, pivot: Tensor, max_deg: float, max_mm: float) -> tuple[int, Tensor]:
    """The correction most of ``corrections (K, 4, 4)`` agree with: index of the one with the most
    others within ``max_deg`` of rotation and ``max_mm`` at ``pivot (3,)``, and its supporters
    ``(K,)`` bool (itself included)."""
    from slice2vol.core.transforms import rotation_angle

    R = corrections[:, :3, :3]
    ang = torch.rad2deg(rotation_angle(R[:, None] @ R[None].transpose(-1, -2)))  # (K, K)
    at = (R @ pivot.to(R.dtype)) + corrections[:, :3, 3]  # where each correction puts the pivot
    close = (ang <= max_deg) & ((at[:, None] - at[None]).norm(dim=-1) <= max_mm)
    best = int(close.sum(1).argmax())
    return best, close[best]


def _turn_round(V: Tensor, affine, poses: Tensor, stack_poses: Tensor, ncc: Tensor, registrable: Tensor, ss,
                sub: Tensor, thin, inside: Tensor, pivot: Tensor, median_ncc: float,
                cfg: SVRConfig) -> tuple[Tensor, Tensor | None, dict]:
    """The turn search: a lasting turn of the fetus by more than the slice search reaches.

    A fetus that turns by more than the slice search's 30 deg during a stack leaves the slices
    acquired afterwards far from the stack's pose, beyond any local method and beyond
    ``max_deviation``, but they share one large lasting correction of their stack-registered
    poses.  The slices that still fit badly (NCC under ``cfg.turn_below`` times the median) are
    each searched from their stack-registered pose over every rotation (a ball of 180 deg,
    ``cfg.turn_step_deg`` apart) about the brain centre, keeping a new pose only where it gains
    0.1 NCC (the slice search asks 0.02, against a far smaller lattice).  One slice is too weakly
    determined to trust such a search, so a stack's turn is the correction at least
    ``cfg.turn_min_slices`` of its slices agree on (within 15 deg and 10 mm at the brain centre,
    :func:`_consensus`), and whose slices then fit at least ``cfg.turn_min_fit`` times the
    median.  Where single slices agree on nothing, the stack's badly fitting slices are searched as
    one rigid group, whose correction is taken when at least ``cfg.turn_min_slices`` of them fit
    it better than their current pose and the group fits at least ``cfg.turn_min_fit`` times the
    median (with one such slice enough, SVRTK's phantom stacks got a 161 deg "turn" of one slice;
    with three, none, and the 18 validation results did not change).  The slices that agree take
    the turn, and the following slice rounds offer it to every slice of the stack
    (:func:`_branch_candidates`).  One turn per stack.

    Returns ``(poses, turns (S, 4, 4) or None when no stack turned, history record)``.
    """
    from slice2vol.core.pose_search import search_poses
    from slice2vol.core.similarity import per_slice_ncc

    S = ss.n_stacks
    sid_all = ss.stack_id.to(poses.device)
    bad = (ncc < cfg.turn_below * median_ncc) & (registrable > 0)
    counts = torch.bincount(sid_all[bad], minlength=S)
    bad = bad & (counts >= cfg.turn_min_slices)[sid_all]
    record = {"stage": "search-turn", "searched_slices": int(bad.sum()), "turned_stacks": 0}
    if not bool(bad.any()):
        return poses, None, record
    y, coords, sid = ss.values, ss.coords, ss.slice_id
    start = torch.where(bad[:, None, None], stack_poses, poses)
    # every rotation (a 180 deg ball) about the brain centre, from the stack-registered poses
    search = dict(weights=inside[sub], pivot=pivot, max_deg=180.0, step_deg=cfg.turn_step_deg, shifts=(0.0,), top_k=5,
                  min_gain=0.1)
    res = search_poses(V, affine, start, coords[sub], sid[sub], y[sub], thin, searched=bad, **search)
    turns = torch.eye(4, dtype=poses.dtype, device=poses.device).repeat(S, 1, 1)
    turned = torch.zeros_like(bad)
    res_poses = res.poses
    angles, which = [], []
    for s in range(S):
        idx = torch.nonzero(bad & res.moved & (sid_all == s)).flatten()
        if idx.numel() < cfg.turn_min_slices:
            continue
        corr = res.poses[idx] @ torch.linalg.inv(stack_poses[idx])
        best, support = _consensus(corr, pivot, 15.0, 10.0)
        fit = torch.nan_to_num(res.ncc_after[idx[support]], nan=-1.0)
        if int(support.sum()) < cfg.turn_min_slices or float(fit.median()) < cfg.turn_min_fit * median_ncc:
            continue
        turns[s] = corr[best]
        turned[idx[support]] = True
        angles.append(round(float(res.angle_deg[idx[best]]), 1))
        which.append(s)
    # where the single slices agree on nothing, the stack's badly fitting slices as one rigid group
    # (more pixels, but any slice among them that did not turn pulls the group's score down)
    left = bad & ~torch.isin(sid_all, torch.tensor(which, dtype=sid_all.dtype, device=sid_all.device))
    if bool(left.any()):
        group = torch.where(left, sid_all, torch.full_like(sid_all, S))
        searched = torch.cat([torch.bincount(sid_all[left], minlength=S) > 0, left.new_zeros(1)])
        grp = search_poses(V, affine, start, coords[sub], sid[sub], y[sub], thin, group=group, searched=searched,
                           **search)
        pix = sub & left[sid]
        c, i, v = coords[pix], sid[pix], y[pix]
        now = torch.nan_to_num(per_slice_ncc(acq.forward(V, affine, poses, c, i, thin), v, i, ss.n_slices), nan=-1.0)
        then = torch.nan_to_num(per_slice_ncc(acq.forward(V, affine, grp.poses, c, i, thin), v, i, ss.n_slices), nan=-1.0)
        for s in torch.nonzero(searched[:S]).flatten().tolist():
            takers = left & (sid_all == s) & (then > now)
            if not bool(grp.moved[s]) or int(takers.sum()) < cfg.turn_min_slices or \
                    float(torch.nan_to_num(grp.ncc_after[s], nan=-1.0)) < cfg.turn_min_fit * median_ncc:
                continue
            n = int(torch.nonzero(left & (sid_all == s)).flatten()[0])
            turns[s] = grp.poses[n] @ torch.linalg.inv(stack_poses[n])
            turned |= takers
            res_poses = torch.where(takers[:, None, None], grp.poses, res_poses)
            angles.append(round(float(grp.angle_deg[s]), 1))
            which.append(s)
    record.update(turned_stacks=len(angles), turned_slices=int(turned.sum()), stacks=which, angles_deg=angles)
    log.info("svr turn search: %d slices searched, %d stacks turned (%s deg, %d slices)", record["searched_slices"],
             len(angles), ", ".join(f"{a:.0f}" for a in angles) or "-", record["turned_slices"])
    if not angles:
        return poses, None, record
    return torch.where(turned[:, None, None], res_poses, poses), turns, record


def acquisition_orders(prep: Prepared, cfg: SVRConfig) -> list[np.ndarray | None]:
    """Per stack, the acquisition order the package search may use, else ``None``.

    Only an order read from the stack's files counts (``Stack.meta["order_source"]``: DICOM
    acquisition times, a JSON sidecar's ``SliceTiming``, the NIfTI header's slice timing;
    :mod:`slice2vol.io`), and only while ``cfg.packages_from_order`` (the CLI turns it off when
    ``--packages`` is given).  A simulated stack in memory also records its true order
    (``Stack.order``, which the quality verdict and the report use), but a NIfTI written without
    slice timing loses it, so the benchmarks that reconstruct simulated stacks in memory measure
    what a user without slice timing gets."""
    if not cfg.packages_from_order:
        return [None] * len(prep.stacks)
    return [np.asarray(st.order) if st.order is not None and st.meta.get("order_source") else None
            for st in prep.stacks]


def search_groups(prep: Prepared, cfg: SVRConfig) -> dict[str, Tensor]:
    """The slice groups the global pose search moves as one, in the order it searches them:
    ``stack`` always; ``package`` and ``half`` (SVRTK's package levels,
    :func:`slice2vol.core.pose_search.package_groups`) unless ``cfg.packages`` is ``None``, from
    the acquisition order where the files give it (:func:`acquisition_orders`), else from
    ``cfg.packages`` (slice ``k`` in package ``k % p``); then ``block<b>`` for each size in
    ``cfg.search_blocks`` (:func:`slice2vol.core.pose_search.block_groups`).

    Returns:
        level name -> ``(M,)`` int64 group of every slice of ``prep.slices``, on its device.
    """
    from slice2vol.core.pose_search import block_groups, package_groups

    ss = prep.slices
    dev = ss.stack_id.device
    idx = [np.asarray(st.index) for st in prep.stacks]
    groups: dict[str, Tensor] = {"stack": ss.stack_id}
    if cfg.packages is not None:
        pk = list(cfg.packages) * (ss.n_stacks if len(cfg.packages) == 1 else 1)
        orders = acquisition_orders(prep, cfg)
        groups["package"] = package_groups(idx, pk, orders=orders).to(dev)
        groups["half"] = package_groups(idx, pk, halves=True, orders=orders).to(dev)
        for s, (st, o) in enumerate(zip(prep.stacks, orders)):
            if o is not None:
                n = int(torch.unique(groups["package"][ss.stack_id == s]).numel())
                log.info("%s: %d package%s from its acquisition order (%s)", st.name, n, "" if n == 1 else "s",
                         st.meta["order_source"])
    for b in cfg.search_blocks:
        groups[f"block{b}"] = block_groups(idx, b).to(dev)
    return groups


def robust_start(prep: Prepared, poses: Tensor, registrable: Tensor,
                 cfg: SVRConfig) -> tuple[Tensor, Tensor | None, list[dict]]:
    """Global pose search before the local SVR loop (:mod:`slice2vol.core.pose_search`).

    On a coarse grid (``search_factor`` x the output voxel), each round reconstructs a volume from
    the slices that currently fit (per-slice NCC at least half the median; the others would only
    blur it), then searches every registrable slice over a rotation lattice about the brain
    centre, shifts along the slice normal and the motion of its neighbours in the stack, and
    refines the best candidates locally.  Rounds stop once fewer than ``search_min_moved`` of
    the slices take a new pose (at mild motion after the first).  Then, unless
    ``cfg.turn_step_deg`` is None, the slices that still fit badly are searched over all
    rotations for a turn of their stack (:func:`_turn_round`); if a stack turned, up to ``search_rounds``
    more slice rounds follow, offering every slice of it both sides of the turn.  Returns the
    poses, the stacks' turns (``(S, 4, 4)``, or None when none turned; see
    :func:`nearest_reference`) and one history record per round.  ``cfg.lam`` must be set
    (:func:`reconstruct_svr` resolves it from the noise first).
    """
    from slice2vol.core.geometry import slice_to_world
    from slice2vol.core.pose_search import neighbour_candidates, search_poses

    ss = prep.slices
    y, coords, sid, M = ss.values, ss.coords, ss.slice_id, ss.n_slices
    affine, shape, roi = coarse_grid(prep, cfg.search_factor)
    vres = float(np.linalg.norm(affine[:3, :3], axis=0).mean())
    psf = acq.psf_kernel(ss.psf_pixel, ss.thickness, vres)
    thin = acq.psf_kernel(ss.psf_pixel, ss.thickness, vres, quality="thin")
    sub = _subset(ss.n_pixels, cfg.search_subsample, y.device)
    srs = _subset(ss.n_pixels, cfg.search_sr_subsample, y.device)
    pivot = slice_to_world(ss.poses, coords[sub], sid[sub]).mean(0)
    roi_f = roi.to(y.dtype)
    trust = torch.ones(M, device=y.device, dtype=y.dtype)
    turns: Tensor | None = None
    history = []
    t0 = time.perf_counter()
    n_reg = max(1, int((registrable > 0).sum()))
    # level 0: whole stacks (a stack that stack registration turned the wrong way), then slices
    levels = (["stack"] if ss.n_stacks > 1 and cfg.search_stacks else [])
    groups = search_groups(prep, cfg)
    levels += [g for g in groups if g != "stack"]  # packages, halves, blocks: in that order
    levels += ["slice"] * cfg.search_rounds + (["turn"] if cfg.turn_step_deg is not None else [])
    med, ncc = 0.0, torch.ones(M, device=y.device, dtype=y.dtype)
    roi_d = dilated_roi(roi)
    r = 0
    while r < len(levels):
        level = levels[r]
        inside = roi_weights(roi_d, affine, ss, poses, dilate_vox=0)
        w = inside * trust[sid]
        V = psf_average(y, w, shape, affine, poses, coords, sid, psf) * roi_f
        V = super_resolve(V, affine, poses, coords[srs], sid[srs], y[srs], psf, weights=w[srs], mask=roi, lam=cfg.lam,
                          delta=cfg.delta, edge=cfg.edge_stages, iterations=cfg.cg_iterations,
                          precondition=cfg.cg_precondition)
        if level == "turn":
            poses, turns, record = _turn_round(V, affine, poses, ss.poses, ncc, registrable, ss, sub, thin, inside, pivot,
                                               med, cfg)
            history.append({"iteration": r, "seconds": time.perf_counter() - t0, **record})
            for s, angle in zip(record.get("stacks", []), record.get("angles_deg", [])):
                log.log(NOTICE, "%s: the fetus turned by about %.0f deg during this stack; its slices are searched on "
                        "both sides of the turn", prep.stacks[s].name, angle)
            if turns is not None:
                trust = torch.ones_like(trust)  # rebuilt from the next round's fit
                levels += ["slice"] * cfg.search_rounds
            r += 1
            continue
        if level in groups:  # one rigid correction per stack / package / half-package
            kw = {"group": groups[level]}
        else:  # single slices, also offered their stack neighbours' motion (and both sides of a turn)
            extra = [neighbour_candidates(poses, ss.poses, ss.stack_id, cfg.search_reach)] if cfg.search_reach else []
            if turns is not None:
                extra.append(_branch_candidates(poses, ss.poses, turns, ss.stack_id))
            kw = {"searched": registrable > 0, "extra": torch.cat(extra) if extra else None}
        res = search_poses(V, affine, poses, coords[sub], sid[sub], y[sub], thin, weights=inside[sub], pivot=pivot,
                           max_deg=cfg.search_max_deg, step_deg=cfg.search_step_deg, shifts=cfg.search_shifts, **kw)
        poses = _plausible(res.poses, poses, nearest_reference(res.poses, ss.poses, turns, ss.stack_id),
                           cfg.max_deviation)
        moved = int(res.moved.sum())
        seconds = time.perf_counter() - t0
        if level in groups:
            history.append({"iteration": r, "stage": f"search-{level}", "seconds": seconds, "moved_groups": moved,
                            "groups": int(res.moved.numel())})
            log.info("svr search (%s groups): %d of %d took a new pose, %.1f s", level, moved, res.moved.numel(), seconds)
            r += 1
            continue
        # the next volume is built from the slices that fit (NCC at least half the median)
        ncc = torch.nan_to_num(res.ncc_after, nan=0.0).to(y.dtype)
        med = float(ncc[registrable > 0].median()) if bool((registrable > 0).any()) else 0.0
        trust = (ncc >= 0.5 * med).to(y.dtype)
        trust[registrable == 0] = 1.0
        history.append({"iteration": r, "stage": "search", "seconds": seconds, "moved_slices": moved,
                        "median_ncc": med, "distrusted_slices": int((trust == 0).sum())})
        log.info("svr search round %d: %d slices took a new pose, median NCC %.3f, %.1f s", r + 1, moved, med, seconds)
        if moved < cfg.search_min_moved * n_reg:
            # the remaining slice rounds would move as little; a turn search still to come stays
            levels[r + 1:] = [lv for lv in levels[r + 1:] if lv != "slice"]
        r += 1
    return poses, turns, history


def reconstruct_svr(prep: Prepared, config: SVRConfig | None = None) -> SVRResult:
    """Run classical SVR on prepared data (see module docstring)."""
    cfg = config or SVRConfig()
    if cfg.lam is None:
        cfg = replace(cfg, lam=prep.regularisation)
    if cfg.edge is None:
        cfg = replace(cfg, edge=prep.edge_threshold)
    ss = prep.slices
    dev = ss.device
    y, coords, sid = ss.values, ss.coords, ss.slice_id
    M = ss.n_slices
    poses = ss.poses
    stack_poses = ss.poses
    rng = float(y.max() - y.min())
    # Slices with few pixels (brain edges) are too weakly determined to register on their own;
    # they keep following their stack, as SVRTK leaves small slices out of slice registration.
    counts = torch.zeros(M, device=dev, dtype=y.dtype).index_add_(0, sid, torch.ones_like(y))
    registrable_slice = (counts >= cfg.min_slice_pixels).to(y.dtype)
    registrable = registrable_slice[sid]
    history: list[dict] = []
    turns = None
    if cfg.search_rounds > 0 and cfg.register_slices:
        poses, turns, hist = robust_start(prep, poses, registrable_slice, cfg)
        history.extend(hist)
    res = float(np.linalg.norm(prep.affine[:3, :3], axis=0).mean())

    stages = []
    if cfg.coarse_iterations > 0 and cfg.register_slices:
        stages.append(("coarse",) + coarse_grid(prep, cfg.coarse_factor)
                      + (cfg.coarse_iterations, cfg.coarse_subsample, cfg.coarse_sr_subsample))
    stages.append(("fine", prep.affine, prep.shape, prep.roi, cfg.iterations, cfg.reg_subsample, 1))

    scales = torch.ones(M, device=dev, dtype=y.dtype)
    state: RobustState | None = None
    t0 = time.perf_counter()
    V = None
    prev_affine = None
    total = sum(s[4] for s in stages)
    bar = tqdm(total=total, desc="svr", disable=not cfg.progress, leave=False)
    it = 0
    for name, affine, shape, roi, n_iter, subsample, sr_subsample in stages:
        vres = float(np.linalg.norm(affine[:3, :3], axis=0).mean())
        psf = acq.psf_kernel(ss.psf_pixel, ss.thickness, vres)
        # Registration needs fewer samples than reconstruction: a coarser through-plane quadrature
        # on a subset of pixels (SVRTK likewise registers on a subsampled grid).
        psf_reg = acq.psf_kernel(ss.psf_pixel, ss.thickness, 2 * vres)
        sub = _subset(ss.n_pixels, subsample, dev)
        # On the coarse grid there are several pixels per voxel in-plane; half of them suffice.
        srs = _subset(ss.n_pixels, sr_subsample, dev)
        roi_f = roi.to(y.dtype)
        roi_d = dilated_roi(roi)
        inside = roi_weights(roi_d, affine, ss, poses, dilate_vox=0)
        w = inside if state is None else inside * state.combined(sid)
        if V is None:
            V = psf_average(y, w, shape, affine, poses, coords, sid, psf) * roi_f
        else:
            V = resample(V, prev_affine, affine, shape) * roi_f
        for _ in range(n_iter):
            V = super_resolve(V, affine, poses, coords[srs], sid[srs], y[srs], psf, weights=w[srs], scales=scales,
                              mask=roi, lam=cfg.lam, delta=cfg.delta, edge=cfg.edge_stages,
                              iterations=cfg.cg_iterations, precondition=cfg.cg_precondition)
            moved = 0.0
            if cfg.register_slices:
                sigmas = (2.0, 1.0, 0.0) if it == 0 else (1.0, 0.0)
                reg_w = registrable * (inside if state is None else inside * state.pixel)
                r = register(V, affine, poses, coords[sub], sid[sub], y[sub], psf_reg, weights=reg_w[sub],
                             sigmas=tuple(s * vres / res for s in sigmas), iterations=cfg.reg_iterations)
                new = _plausible(r.poses, poses, nearest_reference(r.poses, stack_poses, turns, ss.stack_id),
                                 cfg.max_deviation)
                moved = _median_motion(poses, new, ss, sub)
                poses = new
                inside = roi_weights(roi_d, affine, ss, poses, dilate_vox=0)
            s = acq.forward(V, affine, poses, coords, sid, psf)
            scales = fit_scales(s, y, sid, M, inside if state is None else inside * state.combined(sid))
            if cfg.robust and name == "fine":
                state = em_weights(y - scales[sid] * s, sid, M, rng, state)
            w = inside if state is None else inside * state.combined(sid)
            excluded = int(state.excluded().sum()) if state is not None else 0
            history.append({"iteration": it, "stage": name, "seconds": time.perf_counter() - t0,
                            "excluded_slices": excluded, "median_motion_mm": moved})
            log.info("svr %s iteration %d: %.1f s, %d slices excluded", name, it + 1, time.perf_counter() - t0, excluded)
            bar.update(1)
            bar.set_postfix(stage=name, excluded=excluded)
            it += 1
            if name == "coarse" and moved < cfg.coarse_tolerance:
                bar.update(n_iter - 1 - _)
                break
        prev_affine = affine
    bar.close()
    psf = acq.psf_kernel(ss.psf_pixel, ss.thickness, res)
    for _ in range(max(1, cfg.final_rounds)):
        V = super_resolve(V, prep.affine, poses, coords, sid, y, psf, weights=w, scales=scales, mask=prep.roi,
                          lam=cfg.lam, delta=cfg.delta, edge=cfg.edge, iterations=cfg.final_cg_iterations,
                          precondition=cfg.cg_precondition)
    simulated = acq.forward(V, prep.affine, poses, coords, sid, psf) * scales[sid]
    slice_w = state.slice if state is not None else torch.ones(M, device=dev)
    pix_w = state.pixel if state is not None else torch.ones_like(y)
    return SVRResult(Volume(V, prep.affine, prep.roi), poses, scales, slice_w, pix_w * inside, simulated, history,
                     regularisation=cfg.lam, edge_threshold=cfg.edge)
