"""Slice poses from the trained cSVR network: :func:`register_csvr`.

The shipped weights live in ``slice2vol/data/csvr/`` (see ``MODEL_CARD.md`` there for what they
were trained on and how well they do); nothing is downloaded.  Inputs are normalised by
:func:`.inputs.prepare_inputs` (crop to the mask, resample to the model's working spacing,
median intensity scaling, centring on the masked pixels' centroid).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from slice2vol.core.image import SliceSet, Stack
from slice2vol.errors import Slice2VolError
from slice2vol.methods.csvr.inputs import prepare_inputs, to_original_poses
from slice2vol.methods.csvr.network import CSVRConfig, CSVRNet

__all__ = ["DEFAULT_WEIGHTS", "safe_load", "load_model", "register_csvr", "stacks_from_slice_set"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "data" / "csvr" / "csvr_cpu_small.pt"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def safe_load(path: str | Path, what: str = "cSVR weights", kind: str = "cSVR weights file") -> dict:
    """``torch.load(path, weights_only=True)`` of a dict: only tensors and plain data are
    unpickled, so a crafted file cannot run code.  Anything else is one :class:`Slice2VolError`."""
    path = Path(path)
    if not path.is_file():
        raise Slice2VolError(f"{what} not found at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only refuses (classes, functions, __reduce__ calls)
        text = " ".join(str(exc).split())
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        detail = detail.split(" Please use")[0].split(" Check the documentation")[0].strip()[:200]
        raise Slice2VolError(f"{what} {path}: not a slice2vol {kind} (refused: only tensors and plain "
                             f"data are loaded{'; ' + detail if detail else ''})") from None
    except Exception as exc:  # not a torch file at all: zip/pickle/EOF errors of many types
        raise Slice2VolError(f"{what} {path}: not a readable torch file ({type(exc).__name__}: "
                             f"{_one_line(exc)})") from None
    if not isinstance(ck, dict):
        raise Slice2VolError(f"{what} {path}: not a slice2vol {kind} (holds a {type(ck).__name__}, "
                             f"not a dict)")
    return ck


def load_model(weights_path: str | Path | None = None, device: torch.device | str = "cpu") -> CSVRNet:
    """The network with weights from ``weights_path`` (default: the packaged ones), in eval mode,
    float32 on ``device``.

    The file is a dict with ``config`` (:meth:`CSVRConfig.to_dict`) and ``state_dict`` (or a
    training checkpoint's ``model``), read by :func:`safe_load`; a wrong structure or shapes are
    one :class:`Slice2VolError` line."""
    path = Path(weights_path) if weights_path else DEFAULT_WEIGHTS
    ck = safe_load(path, "cSVR weights")
    state = ck.get("state_dict", ck.get("model"))
    if not isinstance(ck.get("config"), dict) or not isinstance(state, dict):
        raise Slice2VolError(f"cSVR weights {path}: not a slice2vol cSVR weights file (needs a 'config' dict and a "
                             f"'state_dict'; has {sorted(map(str, ck))[:8]})")
    try:
        net = CSVRNet(CSVRConfig.from_dict(ck["config"]))
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise Slice2VolError(f"cSVR weights {path}: does not fit the cSVR network ({type(exc).__name__}: "
                             f"{_one_line(exc)})") from None
    return net.to(device).eval()


def stacks_from_slice_set(ss: SliceSet) -> list[Stack]:
    """Rebuild per-stack ``(N, H, W)`` images and masks (pixels outside the set are 0 / masked out)
    with the set's current poses, so a method holding a :class:`SliceSet` can call the network."""
    values = ss.to_images(ss.values)
    masks = ss.to_images(torch.ones_like(ss.values))
    out = []
    for s in range(ss.n_stacks):
        sl = slice(ss.stack_slices[s], ss.stack_slices[s + 1])
        n = sl.stop - sl.start
        sp = ss.spacing[sl.start].tolist()
        # The affine is only used to write stacks back to disk, which never happens here.
        out.append(Stack(slices=values[s].cpu(), mask=masks[s].cpu() > 0, poses=ss.poses[sl].double().cpu().numpy(),
                         spacing=(float(sp[0]), float(sp[1])), thickness=float(ss.thickness[sl.start]),
                         affine=np.eye(4), index=np.arange(n), name=f"stack_{s:02d}"))
    return out


@torch.no_grad()
def register_csvr(slices: SliceSet | Sequence[Stack], weights_path: str | Path | None = None,
                  device: torch.device | str = "cpu", model: CSVRNet | None = None) -> Tensor:
    """Slice-to-world poses predicted by the cSVR network in one forward pass.

    Args:
        slices: a :class:`SliceSet` (its ``poses`` are taken as the header poses) or the stacks
            (header poses in ``Stack.poses``, masks in ``Stack.mask``).  Stacks should be brain-
            masked and the world frame roughly anatomical (see :mod:`.inputs`).
        weights_path: weights file (default: the packaged model); ignored when ``model`` is given.
        device: where the network runs.
        model: an already loaded network (saves reloading when called repeatedly).
    Returns:
        ``(n_slices, 4, 4)`` float64 CPU tensor of rigid slice-to-world poses (mm, RAS), in the order
        of the slice set (stack by stack, slice by slice).  The poses are in the network's
        canonical frame (the brain centred where the header poses put it); like any SVR
        result they are defined up to one global rigid transform.
    """
    stacks = stacks_from_slice_set(slices) if isinstance(slices, SliceSet) else list(slices)
    net = model if model is not None else load_model(weights_path, device)
    dev = next(net.parameters()).device
    inp = prepare_inputs(stacks, net.config.spacing)
    poses, _ = net(inp.to(dev))
    return torch.from_numpy(to_original_poses(poses, inp))
