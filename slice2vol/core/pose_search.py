"""Global pose search for slices that local registration cannot bring home.

Levenberg-Marquardt slice-to-volume registration (:mod:`slice2vol.core.registration`) has a capture
range of a few degrees and millimetres around its start.  At severe fetal motion single slices
are 15-35 deg and 10-15 mm away from their stack's pose, and a local method started there locks
onto the wrong structure.  SVRTK and NeSVoR have no remedy beyond rejecting such slices as
outliers (which leaves holes); here every slice is instead scored at a lattice of candidate poses
around its current one, through the same acquisition model, on a smoothed low-resolution volume,
and the best few candidates are then refined locally (the usual LM), keeping whichever explains
the slice best.  This is the classic "exhaustive coarse search, then local refinement" of
image registration (e.g. FSL FLIRT's initial search), applied per slice.

Candidates are rotations about a pivot (``pivot``: SVR passes the brain centre, about which the
fetal head turns; by default each group's pixel centroid) on a cubic lattice of rotation vectors (``step_deg`` apart, inside a ball of ``max_deg``), each
combined with shifts along the slice normal (the direction in which a slice's content is least
determined by its own pixels; in-plane shifts are within the local method's reach after
smoothing).  The score is the per-slice normalised cross-correlation of simulated and acquired
pixels, which ignores the unknown per-slice intensity scale.  The current pose is always a
candidate, so a slice only moves when another pose explains it better.

Shapes: ``M`` slices, ``P`` pixels, ``C`` candidates; world coordinates in mm (RAS).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from slice2vol.core import acquisition as acq
from slice2vol.core.acquisition import PSF
from slice2vol.core.registration import register, slice_centres, smooth
from slice2vol.core.similarity import per_slice_ncc
from slice2vol.core.stages import timed
from slice2vol.core.transforms import rotation_about

__all__ = ["package_groups", "packages_from_order", "block_groups", "rotation_grid", "candidate_transforms", "neighbour_candidates", "score_candidates", "SearchResult",
           "search_poses", "slice_centres"]

log = logging.getLogger(__name__)


def packages_from_order(index: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``(N,)`` package of every slice of one stack whose acquisition order is known.

    A package is a run of slices acquired one after another while their file index keeps moving
    in one direction (the stack's usual direction: the sign most steps between consecutive
    acquisitions take); a step back starts the next package.  So an interleaved acquisition with
    ``p`` packages, ascending or descending, gives exactly its ``p`` packages, a sequential one a
    single package, and an order of another kind (e.g. centre-out) its monotone runs.

    Args:
        index: ``(N,)`` file index ``k`` of each slice.
        order: ``(N,)`` acquisition time rank of each slice (any increasing measure of time).
    Returns:
        ``(N,)`` int64 packages ``0..P-1`` numbered in acquisition order.

    >>> packages_from_order(np.arange(7), np.array([0, 4, 1, 5, 2, 6, 3])).tolist()  # interleaved, 2
    [0, 1, 0, 1, 0, 1, 0]
    >>> packages_from_order(np.arange(6), np.array([5, 2, 4, 1, 3, 0])).tolist()  # descending, 2 packages
    [1, 0, 1, 0, 1, 0]
    >>> packages_from_order(np.arange(4), np.arange(4)).tolist()  # sequential
    [0, 0, 0, 0]
    """
    k = np.asarray(index, dtype=np.int64)
    t = np.argsort(np.asarray(order), kind="stable")  # slices in acquisition order
    steps = np.diff(k[t])
    direction = 1 if (steps > 0).sum() >= (steps < 0).sum() else -1
    pkg_in_time = np.concatenate([[0], np.cumsum(steps * direction < 0)])
    out = np.empty_like(k)
    out[t] = pkg_in_time
    return out


def package_groups(indices: list[np.ndarray], packages: list[int], halves: bool = False,
                   orders: Sequence[np.ndarray | None] | None = None) -> Tensor:
    """Group of every slice for hierarchical registration by acquisition package (SVRTK ``-packages``).

    With ``p`` interleave packages, slice ``k`` of a stack (its index in the file) belongs to
    package ``k % p``, and the packages are acquired one after another, each in increasing ``k``
    (:func:`slice2vol.simulation.simulate.interleaved_order` follows the same convention).  Where a
    stack's acquisition order is known (``orders``, from the files' slice timing) its packages come
    from that order instead (:func:`packages_from_order`; ``p`` is then not used).  The slices of a
    package are acquired consecutively, so they share most of their motion and can be registered
    as one rigid group before single slices are; with ``halves`` each package is further split into
    its first and second half in acquisition time (SVRTK's next level).

    Args:
        indices: per stack, ``(N_s,)`` the file index ``k`` of each of its slices, in slice-set order.
        packages: per stack, its number of packages ``p >= 1``.
        halves: split every package in two halves in time.
        orders: optional, per stack ``(N_s,)`` acquisition time ranks of its slices or ``None``
            (unknown: the ``k % p`` convention).
    Returns:
        ``(M,)`` int64 group ids ``0..G-1``, numbered stack by stack, package by package, in time order.

    >>> package_groups([np.arange(6)], [2]).tolist()
    [0, 1, 0, 1, 0, 1]
    >>> package_groups([np.arange(6)], [2], halves=True).tolist()
    [0, 2, 0, 2, 1, 3]
    >>> package_groups([np.arange(6)], [2], orders=[np.arange(6)]).tolist()  # known: sequential
    [0, 0, 0, 0, 0, 0]
    """
    if len(indices) != len(packages):
        raise ValueError(f"{len(packages)} package counts for {len(indices)} stacks")
    orders = list(orders) if orders is not None else [None] * len(indices)
    if len(orders) != len(indices):
        raise ValueError(f"{len(orders)} acquisition orders for {len(indices)} stacks")
    out, base = [], 0
    for k, p, o in zip(indices, packages, orders):
        k = np.asarray(k, dtype=np.int64)
        if o is not None:
            if len(o) != len(k):
                raise ValueError(f"an acquisition order of {len(o)} slices for a stack of {len(k)}")
            pkg, time = packages_from_order(k, o), np.asarray(o)
            p = int(pkg.max()) + 1 if len(k) else 1
        else:
            p = int(p)
            if p < 1:
                raise ValueError(f"a stack needs at least 1 package, got {p}")
            pkg, time = k % p, k
        if not halves:
            g = pkg
            n = p
        else:
            g = np.empty_like(k)
            for j in range(p):
                sel = np.nonzero(pkg == j)[0]
                order = sel[np.argsort(time[sel], kind="stable")]  # acquisition order within the package
                first = order[: (len(order) + 1) // 2]
                g[order] = 2 * j + 1
                g[first] = 2 * j
            n = 2 * p
        out.append(torch.as_tensor(g + base, dtype=torch.long))
        base += n
    g = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    # renumber densely (empty groups of tiny stacks would leave gaps)
    return torch.unique(g, return_inverse=True)[1]


def block_groups(indices: list[np.ndarray], size: int) -> Tensor:
    """``(M,)`` group of every slice: runs of ``size`` neighbouring slices of a stack (by file index
    ``k``, ``(k - min k) // size``), numbered stack by stack.

    >>> block_groups([np.arange(5), np.arange(2, 5)], 2).tolist()
    [0, 0, 1, 1, 2, 3, 3, 4]
    """
    if size < 1:
        raise ValueError(f"a block needs at least 1 slice, got {size}")
    out, base = [], 0
    for k in indices:
        k = np.asarray(k, dtype=np.int64)
        g = (k - k.min()) // size if k.size else k
        out.append(torch.as_tensor(g + base, dtype=torch.long))
        base += int(g.max()) + 1 if k.size else 0
    g = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    return torch.unique(g, return_inverse=True)[1]


def rotation_grid(max_deg: float = 30.0, step_deg: float = 10.0) -> Tensor:
    """Rotation vectors (rad) of a cubic lattice ``step_deg`` apart inside a ball of ``max_deg``.

    Returns ``(C, 3)`` float64 with the zero rotation first.

    >>> rotation_grid(10.0, 10.0).shape
    torch.Size([7, 3])
    >>> bool((rotation_grid(30.0, 10.0)[0] == 0).all())
    True
    """
    n = int(math.floor(max_deg / step_deg + 1e-9))
    ax = torch.arange(-n, n + 1, dtype=torch.float64) * step_deg
    g = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    g = g[g.norm(dim=-1) <= max_deg + 1e-9]
    g = g[torch.argsort(g.norm(dim=-1), stable=True)]  # zero first
    return torch.deg2rad(g)


def candidate_transforms(poses: Tensor, centres: Tensor, rotations: Tensor, shifts: tuple[float, ...]) -> Tensor:
    """World corrections ``(C, M, 4, 4)`` of every candidate for every slice.

    Candidate ``c = (r, d)`` rotates slice ``n`` by ``rotations[r]`` about ``centres[n]`` and
    shifts it by ``d`` mm along its normal (the pose's third column).  ``C = R x len(shifts)``,
    rotation-major; candidate 0 is the identity when ``rotations[0] = 0`` and ``0`` is in ``shifts``
    first.
    """
    dt, dev = poses.dtype, poses.device
    M = poses.shape[0]
    normal = poses[:, :3, 2] / poses[:, :3, 2].norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (M, 3)
    rot = rotations.to(dev, dt)
    R = rot.shape[0]
    d = torch.as_tensor(shifts, dtype=dt, device=dev)
    p = torch.zeros(R, len(shifts), M, 6, dtype=dt, device=dev)
    p[..., :3] = rot[:, None, None, :]
    p[..., 3:] = d[None, :, None, None] * normal[None, None]
    p = p.reshape(-1, M, 6)
    return rotation_about(p.reshape(-1, 6), centres.repeat(p.shape[0], 1)).reshape(-1, M, 4, 4)


def neighbour_candidates(poses: Tensor, reference: Tensor, stack_id: Tensor, reach: int = 4) -> Tensor:
    """Candidate poses that give each slice the motion of a nearby slice of its stack.

    Fetal motion is continuous over acquisition time between occasional jumps, and with ``p``
    interleave packages the slice acquired just before or after slice ``k`` is ``k - p`` or
    ``k + p``.  The order is rarely known from a NIfTI file, so every offset ``1..reach`` (both
    signs) is offered: the world correction ``D_j = poses_j @ reference_j^-1`` of slice ``j``
    is applied to slice ``n``'s reference pose, ``D_j @ reference_n``.  A slice whose own
    registration failed then gets the motion of its temporal neighbours, which succeeded,
    as a start (no package count needed; the lattice search covers what this misses).

    Args:
        poses: ``(M, 4, 4)`` current poses; reference: ``(M, 4, 4)`` the stack-registered poses.
        stack_id: ``(M,)`` stack of each slice (slices of a stack contiguous, in index order).
        reach: largest slice offset.
    Returns:
        ``(2 * reach, M, 4, 4)`` world corrections (``candidate @ poses^-1``) for one group per
        slice; the identity where the neighbour does not exist.
    """
    M = poses.shape[0]
    D = poses @ torch.linalg.inv(reference)
    to_current = torch.linalg.inv(poses)
    stack = stack_id.to(poses.device)
    n = torch.arange(M, device=poses.device)
    eye = torch.eye(4, dtype=poses.dtype, device=poses.device)
    out = []
    for off in [o for r in range(1, reach + 1) for o in (-r, r)]:
        j = (n + off).clamp(0, M - 1)
        ok = (stack[j] == stack) & (n + off >= 0) & (n + off < M)
        out.append(torch.where(ok[:, None, None], D[j] @ reference @ to_current, eye))
    return torch.stack(out)


def score_candidates(volume: Tensor, affine, poses: Tensor, corrections: Tensor, group: Tensor, coords: Tensor,
                     slice_id: Tensor, values: Tensor, psf: PSF, chunk_points: int = 1 << 21) -> Tensor:
    """NCC ``(C, G)`` of acquired vs simulated pixels of each group at the poses ``corrections[:, group] @ poses``.

    ``poses`` is ``(M, 4, 4)``, ``corrections`` ``(C, G, 4, 4)`` (one world correction per candidate
    and group), ``group`` ``(M,)`` the group of each slice; the NCC is taken over all pixels of a
    group.  Candidates are evaluated in chunks so that at most about ``chunk_points`` PSF nodes are
    in memory at once.  Groups without pixels score NaN.
    """
    C, G = corrections.shape[:2]
    M = poses.shape[0]
    dev = poses.device
    pgrp = group[slice_id]
    per = max(1, int(chunk_points // max(1, coords.shape[0] * psf.n_samples)))
    out = []
    for c0 in range(0, C, per):
        cs = corrections[c0:c0 + per]
        k = cs.shape[0]
        cand = (cs[:, group] @ poses[None]).reshape(k * M, 4, 4)
        off = torch.arange(k, device=dev)[:, None]
        sid_k = (slice_id[None] + M * off).reshape(-1)
        rep = psf.repeat(k)
        sim = acq.forward(volume, affine, cand, coords.repeat(k, 1), sid_k, rep)
        out.append(per_slice_ncc(sim, values.repeat(k), (pgrp[None] + G * off).reshape(-1), k * G).reshape(k, G))
    return torch.cat(out, 0)


@dataclass
class SearchResult:
    """``poses (M, 4, 4)`` after the search; ``ncc_before (G,)`` / ``ncc_after (G,)`` per group on
    the unsmoothed volume (NaN for groups not searched); ``moved (G,)`` bool, whether a group
    took another candidate than its current pose; ``angle_deg (G,)`` how far it turned."""

    poses: Tensor
    ncc_before: Tensor
    ncc_after: Tensor
    moved: Tensor
    angle_deg: Tensor


def _group_normals(poses: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """``(G, 3)`` unit mean slice normal of each group (a stack's or a package's normal)."""
    nrm = poses[:, :3, 2] / poses[:, :3, 2].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = torch.zeros(n_groups, 3, dtype=poses.dtype, device=poses.device).index_add_(0, group, nrm)
    return s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@timed("pose search")
def search_poses(
    volume: Tensor,
    affine,
    poses: Tensor,
    coords: Tensor,
    slice_id: Tensor,
    values: Tensor,
    psf: PSF,
    *,
    group: Tensor | None = None,
    weights: Tensor | None = None,
    searched: Tensor | None = None,
    extra: Tensor | None = None,
    pivot: Tensor | None = None,
    max_deg: float = 30.0,
    step_deg: float = 15.0,
    shifts: tuple[float, ...] = (0.0, -4.0, 4.0),
    sigma_mm: float = 2.0,
    top_k: int = 3,
    refine_iterations: int = 5,
    min_gain: float = 0.02,
    min_pixels: int = 20,
) -> SearchResult:
    """Coarse lattice search of rigid corrections per group of slices, then LM refinement.

    A group is one slice (the default), an interleave package, or a whole stack: all slices of
    a group take the same world correction, scored by the NCC over all the group's pixels, as in
    hierarchical registration (SVRTK ``-packages``: stacks, then packages, then slices).

    Args:
        volume, affine: the current reconstruction ``(Ni, Nj, Nk)`` and its voxel-to-world.
        poses: ``(M, 4, 4)`` current slice-to-world poses.
        coords, slice_id, values: ``(P, 3)``, ``(P,)``, ``(P,)`` the pixels to score with (a
            subsample is enough: a few hundred per slice).
        psf: quadrature of the ``M`` slices (``quality="thin"`` is enough on a coarse grid).
        group: optional ``(M,)`` group of each slice, ``0..G-1`` (default: one group per slice).
        weights: optional ``(P,)`` pixel weights for the refinement (masks).
        searched: optional ``(G,)`` bool, the groups to search (default all with ``min_pixels``).
        extra: optional ``(E, G, 4, 4)`` further candidate world corrections, e.g. the motion of
            a slice's neighbours (:func:`neighbour_candidates`, for one group per slice).
        pivot: optional ``(3,)`` world point the lattice rotations turn about (the brain centre,
            about which the fetal head turns); default each group's own centre.
        max_deg, step_deg: the rotation lattice (see :func:`rotation_grid`).
        shifts: shifts along the group's mean slice normal, mm (the first should be 0).
        sigma_mm: smoothing of the volume for the lattice scores (widens each candidate's basin).
        top_k: candidates per group refined by LM (the current pose is always one of them).
        refine_iterations: LM iterations per smoothing level of the refinement.
        min_gain: NCC by which a new pose must beat the refined current pose to be taken (guards
            against trading one wrong pose for another on a blurred volume).
        min_pixels: groups with fewer pixels keep their pose.
    Returns:
        :class:`SearchResult`.
    """
    from slice2vol.core.transforms import rotation_angle

    dev, dt = poses.device, poses.dtype
    M = poses.shape[0]
    group = torch.arange(M, device=dev) if group is None else group.to(dev)
    G = int(group.max()) + 1 if M else 0
    pix_group = group[slice_id]
    counts = torch.zeros(G, device=dev, dtype=dt).index_add_(0, pix_group, torch.ones_like(values, dtype=dt))
    active = counts >= min_pixels
    if searched is not None:
        active = active & searched.to(dev)
    gidx = torch.nonzero(active).flatten()
    nan = torch.full((G,), float("nan"), dtype=torch.float64, device=dev)
    if gidx.numel() == 0:
        return SearchResult(poses, nan, nan.clone(), torch.zeros(G, dtype=torch.bool, device=dev),
                            torch.zeros(G, dtype=dt, device=dev))
    g = gidx.numel()
    gmap = torch.full((G,), -1, dtype=torch.long, device=dev)
    gmap[gidx] = torch.arange(g, device=dev)
    # restrict to the searched groups' slices and pixels, renumbered
    sl_idx = torch.nonzero(active[group]).flatten()
    smap = torch.full((M,), -1, dtype=torch.long, device=dev)
    smap[sl_idx] = torch.arange(sl_idx.numel(), device=dev)
    m = sl_idx.numel()
    pix = active[pix_group]
    c, v = coords[pix], values[pix]
    sid = smap[slice_id[pix]]
    grp = gmap[group[sl_idx]]  # (m,) group of each kept slice, 0..g-1
    w = None if weights is None else weights[pix]
    sub_psf = psf.select(sl_idx)
    P0 = poses[sl_idx]
    centres = slice_centres(P0, c, sid, w, grp, g)

    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    Vs = smooth(volume, sigma_mm, spacing)
    normals = _group_normals(P0, grp, g)
    pivots = centres if pivot is None else pivot.to(dev, dt).expand(g, 3)
    frames = torch.eye(4, dtype=dt, device=dev).repeat(g, 1, 1)
    frames[:, :3, 2] = normals
    D = candidate_transforms(frames, pivots, rotation_grid(max_deg, step_deg), shifts)  # (C, g, 4, 4)
    if extra is not None and extra.shape[0] > 0:
        D = torch.cat([D, extra[:, gidx].to(dev, dt)], 0)

    def ncc_of(corr: Tensor, vol: Tensor) -> Tensor:  # corr (n, g, 4, 4) -> (n, g)
        return score_candidates(vol, affine, P0, corr, grp, c, sid, v, sub_psf)

    scores = torch.nan_to_num(ncc_of(D, Vs), nan=-2.0)  # (C, g)
    ncc0 = ncc_of(torch.eye(4, dtype=dt, device=dev).expand(1, g, 4, 4), volume)[0]
    k = max(1, min(top_k, scores.shape[0]))
    scores[0] = float("inf")  # the current pose is always refined
    best = torch.topk(scores, k, dim=0).indices  # (k, g)
    starts = torch.gather(D, 0, best[:, :, None, None].expand(k, g, 4, 4))  # (k, g, 4, 4) corrections

    # refine all k x g starts at once: k copies of the pixels, one registration group per (candidate, group)
    off = torch.arange(k, device=dev)[:, None]
    sid_k = (sid[None] + m * off).reshape(-1)
    psf_k = sub_psf.repeat(k)
    start_poses = (starts[:, grp] @ P0[None]).reshape(k * m, 4, 4)
    reg = register(volume, affine, start_poses, c.repeat(k, 1), sid_k, v.repeat(k), psf_k,
                   group=(grp[None] + g * off).reshape(-1), weights=None if w is None else w.repeat(k),
                   centres=centres.repeat(k, 1), sigmas=(sigma_mm, sigma_mm / 2, 0.0), iterations=refine_iterations)
    total = (reg.corrections.reshape(k, g, 4, 4) @ starts)  # world corrections from P0
    ncc = torch.nan_to_num(ncc_of(total, volume), nan=-2.0)  # (k, g)
    gain = ncc - ncc[:1]
    pick = torch.where(gain >= min_gain, ncc, torch.full_like(ncc, -3.0))
    pick[0] = ncc[0]  # the refined current pose needs no margin
    choice = pick.argmax(0)  # (g,)
    chosen = total[choice, torch.arange(g, device=dev)]  # (g, 4, 4)
    new = poses.clone()
    new[sl_idx] = chosen[grp] @ P0
    moved = torch.zeros(G, dtype=torch.bool, device=dev)
    moved[gidx] = choice != 0
    ang = torch.zeros(G, dtype=dt, device=dev)
    ang[gidx] = torch.rad2deg(rotation_angle(chosen[:, :3, :3]))
    before, after = nan.clone(), nan.clone()
    before[gidx] = ncc0.double()
    after[gidx] = ncc[choice, torch.arange(g, device=dev)].double()
    log.info("pose search: %d/%d groups searched (%d candidates), %d took a new pose (median turn %.1f deg)",
             g, G, D.shape[0], int(moved.sum()), float(ang[moved].median()) if bool(moved.any()) else 0.0)
    return SearchResult(new, before, after, moved, ang)
