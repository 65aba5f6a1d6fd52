"""``--method csvr``: network poses, then model-based reconstruction (cSVR paper, Section 4.3).

::

    stack registration to the template                (preprocess.prepare: template, output grid)
    poses <- cSVR network on the stacks' header poses  (one forward pass, :func:`.infer.register_csvr`)
    poses <- one global rigid transform x poses        (into the template's frame, below)
    refine=False: V <- SR + robust EM with the poses fixed           (the paper's "cSVR")
    refine=True:  V, poses <- classical SVR started from those poses (the paper's "cSVR + Refine"),
                  or from the stack-registered poses when those explain the slices better
                  (start="auto", the default; start="network" always takes the network's)

The network's poses are defined up to one global rigid transform (its frame is the brain
centred where the header poses put it), while the output grid of :func:`~slice2vol.core.preprocess.prepare`
lives in the template stack's frame.  Where the paper is silent we map the network's poses into
that frame with the one rigid transform that best carries every masked pixel from its network
position to its stack-registered position (weighted Kabsch over all pixels): stack registration
is a good *global* estimate even when it is a poor per-slice one, and with all slices the
transform averages out per-slice errors of either.  Both stages reuse the core pipeline:
``reconstruct_svr`` with slice registration off is the paper's SRR with fixed poses (eq. 3 with
robust EM weights); with it on, the paper's Refine stage.

Choosing the start of the Refine stage (``start="auto"``; neither paper has it).  SVR converges to
the nearest consistent solution, so it should start from whichever pose set is closer to the
truth.  A network that is worse than the header poses at small motion (the shipped one: 2.0 vs
1.7 mm TRE at mild motion, see the model card) would otherwise drag Refine below plain SVR there,
while at large motion it is the better start.  The data can tell which: :func:`start_scores` reconstructs a
quick volume on SVR's coarse grid from each pose set and measures how well it predicts the
acquired slices (mean per-slice NCC of acquired vs simulated slices).  Poses that disagree
between slices cannot all be explained by one volume, so the closer set usually scores higher.
On the 18 validation cases of ``benchmarks/bench_csvr.py`` it picked the start whose final
reconstruction was better in 13: 6 of 6 at severe motion (gaps of 4-8 dB), 5 of 6 at mild, 2 of 6
at moderate, where the two starts ended within 0.7 dB of each other.  It costs two coarse
reconstructions, about 1-3 s on 2 CPU cores.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from slice2vol.core import acquisition as acq
from slice2vol.core.geometry import slice_to_world
from slice2vol.core.preprocess import Prepared
from slice2vol.core.reconstruction import psf_average, super_resolve
from slice2vol.core.similarity import per_slice_ncc
from slice2vol.core.transforms import kabsch
from slice2vol.errors import Slice2VolError
from slice2vol.methods.svr import (SVRConfig, SVRResult, _subset, coarse_grid, dilated_roi, reconstruct_svr,
                                   roi_weights)

__all__ = ["CSVRMethodConfig", "START_CHOICES", "network_poses", "start_scores", "reconstruct_csvr"]

START_CHOICES = ("auto", "network")

log = logging.getLogger(__name__)


@dataclass
class CSVRMethodConfig:
    """Parameters of :func:`reconstruct_csvr`.

    ``refine``: run classical SVR from the network's poses (else reconstruct with them fixed).
    ``start``: where Refine starts: ``"auto"`` (the network's or the stack-registered poses,
    whichever :func:`start_scores` rates higher) or ``"network"`` (always the network's, as in the
    paper).  Ignored without ``refine``: fixed-pose cSVR always uses the network's poses.
    ``weights``: a weights file (default: the packaged model).  ``iterations``: SR + EM rounds on
    the output grid with fixed poses, or SVR's fine iterations with ``refine``.  ``lam``: the
    super-resolution's relative regularisation (``None``: from the stacks' noise, as SVR).
    ``svr``: further :class:`~slice2vol.methods.svr.SVRConfig` settings for the reconstruction stage
    (e.g. ``{"turn_step_deg": None}`` turns the turn search off); an unknown name is refused.
    """

    refine: bool = False
    start: str = "auto"
    weights: str | None = None
    iterations: int = 3
    packages: tuple[int, ...] | None = (2,)  # interleave packages per stack for the Refine's search (SVRConfig)
    packages_from_order: bool = True  # packages from the files' slice timing where known (SVRConfig)
    lam: float | None = None
    progress: bool = True
    svr: dict = field(default_factory=dict)


def align_to_frame(poses: Tensor, reference: Tensor, coords: Tensor, slice_id: Tensor,
                   max_points: int = 200_000) -> Tensor:
    """``T @ poses`` with the rigid ``T`` that best maps the pixels placed by ``poses`` onto the
    same pixels placed by ``reference`` (least squares over up to ``max_points`` pixels).

    Args:
        poses, reference: ``(M, 4, 4)`` slice-to-world poses (mm).
        coords: ``(P, 3)`` pixel positions in their slice frames (mm); ``slice_id``: ``(P,)``.
    Returns:
        ``(M, 4, 4)`` poses in the reference's frame, dtype and device of ``poses``.
    """
    step = max(1, coords.shape[0] // max_points)
    c, s = coords[::step].double(), slice_id[::step]
    src = slice_to_world(poses.double(), c, s)
    dst = slice_to_world(reference.double(), c, s)
    T = kabsch(src, dst)
    return (T @ poses.double()).to(poses.dtype)


def network_poses(prep: Prepared, weights: str | Path | None = None, model=None) -> Tensor:
    """cSVR network poses of ``prep``'s slices in ``prep``'s (template) frame.

    Returns:
        ``(M, 4, 4)`` rigid slice-to-world poses on ``prep.slices``'s device and dtype.
    """
    from slice2vol.methods.csvr.infer import load_model, register_csvr

    ss = prep.slices
    net = model if model is not None else load_model(weights, ss.device)
    # The network takes the header poses (it needs no stack registration); prep.stacks keep them.
    raw = register_csvr(prep.stacks, model=net).to(ss.device, ss.poses.dtype)
    if raw.shape[0] != ss.n_slices:
        raise Slice2VolError(f"cSVR returned {raw.shape[0]} poses for {ss.n_slices} slices")
    return align_to_frame(raw, ss.poses, ss.coords, ss.slice_id)


@torch.no_grad()
def start_scores(prep: Prepared, candidates: dict[str, Tensor], factor: float = 2.0, cg_iterations: int = 4,
                 lam: float | None = None, sr_subsample: int = 2, precondition: bool = True) -> dict[str, float]:
    """How well each pose set explains the slices: mean over slices of the NCC between the acquired
    slice and the slice simulated from a quick reconstruction made with that pose set.

    Each reconstruction is a PSF-weighted average refined by ``cg_iterations`` of (by default
    preconditioned) CG super-resolution on SVR's coarse grid (``factor`` x the output voxel) from
    every ``sr_subsample``-th pixel, the same step SVR starts with; every pixel is scored.  Slices
    without pixel variance are left out of the mean.  ``lam``: regularisation (default: SVR's,
    from the stacks' noise, ``prep.regularisation``).

    Args:
        prep: prepared data (its slices' values, coordinates and output grid are used).
        candidates: name -> ``(M, 4, 4)`` slice-to-world poses (mm) in ``prep``'s frame.
    Returns:
        name -> score in [-1, 1] (higher: the poses agree better with each other and the data).
    """
    ss = prep.slices
    lam = prep.regularisation if lam is None else lam
    affine, shape, roi = coarse_grid(prep, factor)
    vres = float(np.linalg.norm(affine[:3, :3], axis=0).mean())
    psf = acq.psf_kernel(ss.psf_pixel, ss.thickness, vres)
    y, c, sid = ss.values, ss.coords, ss.slice_id
    srs = _subset(ss.n_pixels, sr_subsample, y.device)
    out = {}
    roi_d = dilated_roi(roi)
    for name, P in candidates.items():
        w = roi_weights(roi_d, affine, ss, P, dilate_vox=0)
        V = psf_average(y, w, shape, affine, P, c, sid, psf) * roi.to(y.dtype)
        V = super_resolve(V, affine, P, c[srs], sid[srs], y[srs], psf, weights=w[srs], mask=roi, lam=lam,
                          iterations=cg_iterations, precondition=precondition)
        r = per_slice_ncc(acq.forward(V, affine, P, c, sid, psf), y, sid, ss.n_slices)
        out[name] = float(r[~torch.isnan(r)].mean()) if bool((~torch.isnan(r)).any()) else float("nan")
    return out


def reconstruct_csvr(prep: Prepared, config: CSVRMethodConfig | None = None) -> SVRResult:
    """Network poses, then reconstruction with them fixed or refined (module docstring).

    Returns the :class:`~slice2vol.methods.svr.SVRResult` of the reconstruction stage; its
    ``history`` starts with one entry holding the network's time.
    """
    cfg = config or CSVRMethodConfig()
    if cfg.start not in START_CHOICES:
        raise Slice2VolError(f"csvr start must be one of {', '.join(START_CHOICES)}, got {cfg.start!r}")
    if cfg.iterations < 1:
        raise Slice2VolError(f"--iterations must be at least 1 for csvr, got {cfg.iterations}")
    unknown = sorted(set(cfg.svr) - {f.name for f in fields(SVRConfig)})
    if unknown:
        raise Slice2VolError(f"csvr: unknown SVR setting(s) {', '.join(map(repr, unknown))}")
    t0 = time.perf_counter()
    poses = network_poses(prep, cfg.weights)
    t_net = time.perf_counter() - t0
    log.info("csvr: network poses for %d slices in %.2f s", prep.slices.n_slices, t_net)
    chosen, scores = "network", {}
    if cfg.refine and cfg.start == "auto":
        scores = start_scores(prep, {"network": poses, "stack": prep.slices.poses}, lam=cfg.lam)
        if scores["stack"] > scores["network"]:
            chosen, poses = "stack", prep.slices.poses
        log.info("csvr: refine starts from the %s poses (slice NCC network %.3f, stack %.3f)", chosen,
                 scores["network"], scores["stack"])
    start = replace(prep, slices=prep.slices.with_poses(poses))
    if cfg.refine:
        svr_cfg = SVRConfig(iterations=cfg.iterations, packages=cfg.packages,
                            packages_from_order=cfg.packages_from_order, lam=cfg.lam, progress=cfg.progress)
    else:
        svr_cfg = SVRConfig(iterations=cfg.iterations, register_slices=False, lam=cfg.lam, progress=cfg.progress)
    result = reconstruct_svr(start, replace(svr_cfg, **cfg.svr))
    result.history.insert(0, {"stage": "network", "seconds": t_net, "refine": cfg.refine, "start": chosen,
                              "start_scores": scores})
    return result
