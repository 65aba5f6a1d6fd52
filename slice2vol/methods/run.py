"""Running a method: the one library entry point (:func:`run_reconstruction`) the CLI, the
benchmark and the scripts share, the named method variants of the benchmark and ablations
(:data:`METHOD_VARIANTS`), and :func:`crop_to_roi` for writing results."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from slice2vol.core.image import Stack, Volume
from slice2vol.core.preprocess import prepare
from slice2vol.core.runtime import synchronize
from slice2vol.core.stages import stage
from slice2vol.errors import Slice2VolError

__all__ = ["run_reconstruction", "METHOD_VARIANTS", "method_variant", "crop_to_roi"]


def crop_to_roi(volume: Volume, roi: torch.Tensor, margin_vox: int = 2) -> Volume:
    """Crop a volume to the bounding box of its region of interest (plus a margin), keeping world geometry."""
    nz = torch.nonzero(roi)
    if nz.numel() == 0:
        return volume
    lo = (nz.min(0).values - margin_vox).clamp_min(0).tolist()
    hi = [min(int(h) + margin_vox + 1, n) for h, n in zip(nz.max(0).values.tolist(), roi.shape)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    A = volume.affine.copy()
    A[:3, 3] = volume.affine[:3, :3] @ np.asarray(lo, dtype=float) + volume.affine[:3, 3]
    return Volume(volume.data[sl].contiguous(), A, roi[sl].contiguous())


#: Named method variants for the benchmark and the ablations: name -> (method, options).  The
#: options are passed to :func:`run_reconstruction`; a plain method name is its own variant.
METHOD_VARIANTS: dict[str, tuple[str, dict]] = {
    "auto": ("auto", {}),
    "svr": ("svr", {}),
    # classical SVR without the global pose search (slice2vol's svr before the search existed)
    "svr-local": ("svr", {"search_rounds": 0}),
    "gaussian": ("gaussian", {}),
    "gaussian-analytic": ("gaussian", {"psf": "analytic"}),
    "gaussian-sampled": ("gaussian", {"psf": "sampled"}),
    # the paper's ablations, measured with the paper's (sampled) PSF: compare with gaussian-sampled
    "gaussian-frozen": ("gaussian", {"psf": "sampled", "optimise_poses": False}),
    "gaussian-twostage": ("gaussian", {"psf": "sampled", "two_stage": True}),
    "gaussian-stack": ("gaussian", {"init": "stack", "two_stage": True, "iterations": 200, "batch_fraction": 0.125,
                                    "lr_pose_rotation": 2e-3, "lr_pose_translation": 0.05, "pose_warmup": (20, 40)}),
    "gaussian-csvr": ("gaussian", {"init": "csvr", "two_stage": True, "iterations": 200, "batch_fraction": 0.125,
                                   "lr_pose_rotation": 2e-3, "lr_pose_translation": 0.05, "pose_warmup": (20, 40)}),
    "csvr": ("csvr", {}),
    "csvr-refine": ("csvr", {"refine": True}),
    # the paper's Refine: always from the network's poses (csvr-refine may start from stack registration)
    "csvr-refine-network": ("csvr", {"refine": True, "start": "network"}),
}


def method_variant(name: str) -> tuple[str, dict]:
    """``(method, options)`` of a method or variant name (see :data:`METHOD_VARIANTS`)."""
    if name not in METHOD_VARIANTS:
        raise Slice2VolError(f"unknown method {name!r}; choose from {', '.join(METHOD_VARIANTS)}")
    method, options = METHOD_VARIANTS[name]
    return method, dict(options)


def run_reconstruction(stacks: Sequence[Stack], *, resolution: float = 0.8, method: str = "svr",
                       mask: Volume | None = None, have_stack_masks: bool = False, template: int | None = None,
                       bias_field: bool = False, iterations: int | None = None, device: torch.device | str = "cpu",
                       detect_signal_loss: bool = True, inplane: str | float = "auto",
                       progress: bool = True, options: dict | None = None):
    """Library entry point used by the CLI and the benchmarks.

    ``options`` are method-specific settings (e.g. ``{"psf": "analytic"}`` for ``gaussian``).
    Returns ``(prepared, result, timings)``; ``result.volume`` is on the full ROI grid.
    """
    options = dict(options or {})
    if method == "auto":
        # the default pipeline: cSVR + Refine with the data-chosen start (stack registration or the
        # network) and classical SVR's global pose search; see README "Large motion"
        method, options = "csvr", {"refine": True, **options}
    if method == "svr":
        from slice2vol.methods.svr import SVRConfig as Config
        from slice2vol.methods.svr import reconstruct_svr as run
    elif method == "gaussian":
        from slice2vol.methods.gaussian.optimise import GaussianConfig as Config
        from slice2vol.methods.gaussian.optimise import reconstruct_gaussian as run
    elif method == "csvr":
        from slice2vol.methods.csvr.reconstruct import CSVRMethodConfig as Config
        from slice2vol.methods.csvr.reconstruct import reconstruct_csvr as run
    else:
        raise Slice2VolError(f"unknown method {method!r}")
    cfg = Config(progress=progress)
    if iterations is not None:
        cfg.iterations = iterations
    for k, v in options.items():
        if not hasattr(cfg, k):
            raise Slice2VolError(f"{method}: unknown option {k!r}")
        setattr(cfg, k, v)
    t0 = time.perf_counter()
    with stage("prepare"):  # core.stages: exclusive of the registrations etc. inside
        prep = prepare(stacks, resolution, mask=mask, have_stack_masks=have_stack_masks, template=template,
                       bias_field=bias_field, device=device, detect_signal_loss=detect_signal_loss,
                       inplane=inplane)
    synchronize(prep.slices.device)
    t1 = time.perf_counter()
    with stage("method, other"):
        result = run(prep, cfg)
    synchronize(prep.slices.device)
    t2 = time.perf_counter()
    return prep, result, {"prepare_s": t1 - t0, "method_s": t2 - t1, "total_s": t2 - t0}
