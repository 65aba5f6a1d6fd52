"""``--method csvr``: network poses, then model-based reconstruction (cSVR paper, Section 4.3).

::

    stack registration to the template                (preprocess.prepare: template, output grid)
    poses <- cSVR network on the stacks' header poses  (one forward pass, :func:`.infer.register_csvr`)
    poses <- one global rigid transform x poses        (into the template's frame, below)
    refine=False: V <- SR + robust EM with the poses fixed           (the paper's "cSVR")
    refine=True:  V, poses <- classical SVR started from those poses (the paper's "cSVR + Refine")

The network's poses are defined up to one global rigid transform (its frame is the brain
centred where the header poses put it), while the output grid of :func:`~slice2vol.preprocess.prepare`
lives in the template stack's frame.  Where the paper is silent we map the network's poses into
that frame with the one rigid transform that best carries every masked pixel from its network
position to its stack-registered position (weighted Kabsch over all pixels): stack registration
is a good *global* estimate even when it is a poor per-slice one, and with all slices the
transform averages out per-slice errors of either.  Both stages reuse the core pipeline:
``reconstruct_svr`` with slice registration off is the paper's SRR with fixed poses (eq. 3 with
robust EM weights); with it on, the paper's Refine stage.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ...errors import Slice2VolError
from ...geometry import slice_to_world
from ...preprocess import Prepared
from ...transforms import kabsch
from ..svr import SVRConfig, SVRResult, reconstruct_svr

__all__ = ["CSVRMethodConfig", "network_poses", "reconstruct_csvr"]

log = logging.getLogger(__name__)


@dataclass
class CSVRMethodConfig:
    """Parameters of :func:`reconstruct_csvr`.

    ``refine``: run classical SVR from the network's poses (else reconstruct with them fixed).
    ``weights``: a weights file (default: the packaged model).  ``iterations``: SR + EM rounds on
    the output grid with fixed poses, or SVR's fine iterations with ``refine``.
    """

    refine: bool = False
    weights: str | None = None
    iterations: int = 3
    progress: bool = True


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
    from .infer import load_model, register_csvr

    ss = prep.slices
    net = model if model is not None else load_model(weights, ss.device)
    # The network takes the header poses (it needs no stack registration); prep.stacks keep them.
    raw = register_csvr(prep.stacks, model=net).to(ss.device, ss.poses.dtype)
    if raw.shape[0] != ss.n_slices:
        raise Slice2VolError(f"cSVR returned {raw.shape[0]} poses for {ss.n_slices} slices")
    return align_to_frame(raw, ss.poses, ss.coords, ss.slice_id)


def reconstruct_csvr(prep: Prepared, config: CSVRMethodConfig | None = None) -> SVRResult:
    """Network poses, then reconstruction with them fixed or refined (module docstring).

    Returns the :class:`~slice2vol.methods.svr.SVRResult` of the reconstruction stage; its
    ``history`` starts with one entry holding the network's time.
    """
    cfg = config or CSVRMethodConfig()
    if cfg.iterations < 1:
        raise Slice2VolError(f"--iterations must be at least 1 for csvr, got {cfg.iterations}")
    t0 = time.perf_counter()
    poses = network_poses(prep, cfg.weights)
    t_net = time.perf_counter() - t0
    log.info("csvr: network poses for %d slices in %.2f s", prep.slices.n_slices, t_net)
    start = replace(prep, slices=prep.slices.with_poses(poses))
    if cfg.refine:
        svr_cfg = SVRConfig(iterations=cfg.iterations, progress=cfg.progress)
    else:
        svr_cfg = SVRConfig(iterations=cfg.iterations, register_slices=False, progress=cfg.progress)
    result = reconstruct_svr(start, svr_cfg)
    result.history.insert(0, {"stage": "network", "seconds": t_net, "refine": cfg.refine})
    return result
