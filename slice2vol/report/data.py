"""What the report shows (:class:`ReportData`), built from a run in memory, and its lossless
record on disk (``report_arrays.npz``)."""
from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from slice2vol import io
from slice2vol.core.image import SliceSet, Volume
from slice2vol.errors import Slice2VolError
from slice2vol.io import jsonable

log = logging.getLogger("slice2vol.report")
from slice2vol.evaluation.quality import REJECTED_BELOW as EXCLUDED_BELOW  # one threshold for CLI, JSON, verdict and page

REPORT_HTML = "index.html"
REPORT_DATA = "report_data.json"
REPORT_ARRAYS = "report_arrays.npz"  # every array the page shows, as the run computed them
N_EXAMPLE_SLICES = 6
EXCLUDED_COLOUR = "#d62728"


# ----------------------------------------------------------------------------- data for the page


@dataclass
class StackReport:
    """One stack as the report shows it (host numpy arrays).

    ``acquired``/``simulated`` ``(N, H, W)`` are 0 outside ``mask`` (the pixels the reconstruction
    used); ``header_poses``/``poses`` ``(N, 4, 4)`` are the slice poses from the stack header and
    the estimate; per-slice arrays ``(N,)`` are NaN for slices without pixels where undefined.
    """

    name: str
    spacing: tuple[float, float]
    thickness: float
    slice_spacing: float
    index: np.ndarray
    order: np.ndarray | None
    acquired: np.ndarray
    simulated: np.ndarray
    mask: np.ndarray
    header_poses: np.ndarray
    poses: np.ndarray
    weights: np.ndarray
    scales: np.ndarray
    ncc_after: np.ndarray
    ncc_before: np.ndarray | None = None
    pixel_weight: np.ndarray | None = None
    before: dict | None = None
    after: dict | None = None

    @property
    def has_pixels(self) -> np.ndarray:
        return self.mask.reshape(self.mask.shape[0], -1).any(1)

    @property
    def excluded(self) -> np.ndarray:
        return (self.weights < EXCLUDED_BELOW) & self.has_pixels


@dataclass
class ReportData:
    """Everything the page shows; built from memory (:func:`report_data`) or from disk."""

    title: str
    volume: np.ndarray
    affine: np.ndarray
    stacks: list[StackReport]
    before: dict | None = None
    after: dict | None = None
    template: int | None = None
    info: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # files the report must never overwrite


def slice_motion(header_poses: np.ndarray, poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Motion of each slice relative to its header pose: ``(angle_deg (N,), translation_mm (N, 3))``.

    ``D = header^-1 @ pose`` is the correction in the slice's own frame: its rotation angle, and
    its translation along the slice axes ``u``, ``v`` (in plane) and ``w`` (through plane), which
    is where the estimated slice centre lies relative to the header's.
    """
    H = np.asarray(header_poses, dtype=np.float64)
    P = np.asarray(poses, dtype=np.float64)
    Rh, th = H[:, :3, :3], H[:, :3, 3]
    R = np.swapaxes(Rh, 1, 2) @ P[:, :3, :3]
    t = np.einsum("nba,nb->na", Rh, P[:, :3, 3] - th)
    cos = (np.trace(R, axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))), t


def _nan_list(values) -> list:
    return [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]


def _split(values, offsets: Sequence[int]) -> list[list]:
    v = list(values)
    return [v[offsets[s]:offsets[s + 1]] for s in range(len(offsets) - 1)]


def _detail(c: dict | None, offsets: Sequence[int]) -> dict | None:
    """Per-stack summary and per-slice NCC of a :func:`~slice2vol.evaluation.metrics.slice_consistency` dict."""
    if c is None:
        return None
    out = {"per_stack": [{k: (_nan_list([v])[0] if k != "n_slices" else int(v)) for k, v in ps.items()}
                         for ps in c.get("per_stack", [])]}
    if "per_slice" in c:
        out["per_slice_ncc"] = [_nan_list(x) for x in _split(c["per_slice"]["ncc"], offsets)]
    return out


def report_record(args: argparse.Namespace, prep, before: dict | None, after: dict | None) -> dict:
    """Keys added to the transforms JSON so ``slice2vol report`` can rebuild the page later:
    absolute input/output paths, the intensity normalisation factors, and per-stack and per-slice
    consistency (strict JSON: NaN written as null)."""
    def ab(p):
        return None if p is None else os.path.abspath(p)

    offsets = prep.slices.stack_slices
    return {
        "inputs": {
            "stacks": [ab(p) for p in args.stacks],
            "stack_masks": None if not getattr(args, "stack_masks", None) else [ab(p) for p in args.stack_masks],
            "mask": ab(getattr(args, "mask", None)),
            "thickness": getattr(args, "thickness", None),
            "bias_field": bool(getattr(args, "bias_field", False)),
        },
        "output": ab(args.output),
        "output_simulated": ab(getattr(args, "output_simulated", None)),
        "intensity_factors": [float(f) for f in prep.factors],
        "slice_consistency_detail": {"before": _detail(before, offsets), "after": _detail(after, offsets)},
    }


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _summary(c: dict | None) -> dict | None:
    if not c:
        return None
    return {k: float(c[k]) for k in ("ssim", "psnr", "ncc") if c.get(k) is not None}


def report_data(prep, result, volume: Volume | None = None, consistency_before: dict | None = None,
                consistency_after: dict | None = None, title: str = "slice2vol reconstruction") -> ReportData:
    """:class:`ReportData` from a run in memory (``Prepared`` and ``SVRResult``-like objects).

    ``volume`` defaults to ``result.volume`` inside the region of interest; consistency dicts
    come from :func:`~slice2vol.evaluation.metrics.slice_consistency` (with ``per_slice=True`` for the
    per-slice plots; ``after`` is computed when not given).
    """
    from slice2vol.evaluation.metrics import slice_consistency

    ss: SliceSet = prep.slices
    sim = result.simulated.detach()
    if consistency_after is None or "per_slice" not in consistency_after:
        consistency_after = slice_consistency(ss, sim, per_slice=True)
    if volume is None:
        volume = Volume(result.volume.data * prep.roi, prep.affine)
    acq_imgs = ss.to_images(ss.values)
    sim_imgs = ss.to_images(sim.to(ss.values.dtype))
    mask_imgs = ss.to_images(torch.ones_like(ss.values))
    n_pix = ss.slice_sum(torch.ones_like(ss.values))
    pw = None
    if getattr(result, "pixel_weights", None) is not None:
        pw = _np(ss.slice_sum(result.pixel_weights.detach().to(ss.values.dtype)) / n_pix.clamp_min(1))
        pw = np.where(_np(n_pix) > 0, pw, np.nan)
    ncc_b = None
    if consistency_before is not None and "per_slice" in consistency_before:
        ncc_b = np.asarray(consistency_before["per_slice"]["ncc"], dtype=float)
    ncc_a = np.asarray(consistency_after["per_slice"]["ncc"], dtype=float)
    poses, weights, scales = _np(result.poses).astype(np.float64), _np(result.slice_weights), _np(result.scales)
    stacks = []
    for s, st in enumerate(prep.stacks):
        lo, hi = ss.stack_slices[s], ss.stack_slices[s + 1]
        stacks.append(StackReport(
            name=st.name, spacing=tuple(map(float, st.spacing)), thickness=float(st.thickness),
            slice_spacing=st.slice_spacing, index=np.asarray(st.index), order=None if st.order is None else np.asarray(st.order),
            acquired=_np(acq_imgs[s]), simulated=_np(sim_imgs[s]), mask=_np(mask_imgs[s]) > 0,
            header_poses=np.asarray(st.poses, dtype=np.float64), poses=poses[lo:hi],
            weights=weights[lo:hi].astype(float), scales=scales[lo:hi].astype(float),
            ncc_after=ncc_a[lo:hi], ncc_before=None if ncc_b is None else ncc_b[lo:hi],
            pixel_weight=None if pw is None else pw[lo:hi],
            before=(consistency_before or {}).get("per_stack", [None] * (s + 1))[s],
            after=consistency_after.get("per_stack", [None] * (s + 1))[s],
        ))
    return ReportData(title=title, volume=_np(volume.data).astype(np.float32), affine=np.asarray(volume.affine),
                      stacks=stacks, before=_summary(consistency_before), after=_summary(consistency_after),
                      template=getattr(prep, "template", None))


_STACK_ARRAYS = ("index", "acquired", "simulated", "mask", "header_poses", "poses", "weights", "scales",
                 "ncc_after")
_STACK_OPTIONAL = ("order", "ncc_before", "pixel_weight")


def save_report_arrays(data: ReportData, path, protect: Sequence = ()) -> Path:
    """Write every array of ``data`` (and its small metadata, as a JSON string) to one compressed
    ``.npz`` (no pickled objects), atomically; :func:`load_report_arrays` reads it back exactly."""
    arrays: dict[str, np.ndarray] = {"volume": np.asarray(data.volume, dtype=np.float32),
                                     "affine": np.asarray(data.affine, dtype=np.float64)}
    stacks_meta = []
    for s, st in enumerate(data.stacks):
        for k in _STACK_ARRAYS + _STACK_OPTIONAL:
            v = getattr(st, k)
            if v is not None:
                arrays[f"stack{s}_{k}"] = np.asarray(v)
        stacks_meta.append({"name": st.name, "spacing": list(st.spacing), "thickness": st.thickness,
                            "slice_spacing": st.slice_spacing, "before": st.before, "after": st.after})
    meta = {"title": data.title, "template": data.template, "before": data.before, "after": data.after,
            "info": [list(r) for r in data.info], "notes": list(data.notes), "stacks": stacks_meta}
    arrays["meta"] = np.array(json.dumps(jsonable(meta)))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return io.atomic_write(path, write, protect)


def load_report_arrays(path) -> ReportData:
    """:class:`ReportData` from :func:`save_report_arrays`'s file; a damaged or foreign file is one
    :class:`~slice2vol.errors.Slice2VolError` (pickled objects are never loaded)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
        stacks = []
        for s, m in enumerate(meta["stacks"]):
            get = {k: arrays.get(f"stack{s}_{k}") for k in _STACK_ARRAYS + _STACK_OPTIONAL}
            missing = [k for k in _STACK_ARRAYS if get[k] is None]
            if missing:
                raise ValueError(f"stack {s}: no {', '.join(missing)}")
            n = get["index"].shape[0]
            if get["acquired"].shape != get["simulated"].shape or get["acquired"].shape != get["mask"].shape \
                    or get["acquired"].shape[0] != n or get["poses"].shape != (n, 4, 4) \
                    or get["header_poses"].shape != (n, 4, 4) or any(get[k].shape != (n,) for k in ("weights", "scales", "ncc_after")):
                raise ValueError(f"stack {s}: arrays of inconsistent shapes")
            stacks.append(StackReport(name=str(m["name"]), spacing=tuple(float(v) for v in m["spacing"]),
                                      thickness=float(m["thickness"]), slice_spacing=float(m["slice_spacing"]),
                                      before=m.get("before"), after=m.get("after"),
                                      **{k: (v if k != "mask" else v.astype(bool)) for k, v in get.items()}))
        volume, affine = arrays["volume"], arrays["affine"]
        if volume.ndim != 3 or affine.shape != (4, 4) or not stacks:
            raise ValueError("no volume, affine or stacks")
        template = meta.get("template")
        return ReportData(title=str(meta["title"]), volume=volume, affine=affine, stacks=stacks,
                          before=meta.get("before"), after=meta.get("after"),
                          template=template if isinstance(template, int) and 0 <= template < len(stacks) else None,
                          info=[(str(a), str(b)) for a, b in meta.get("info", [])], notes=[str(n) for n in meta.get("notes", [])])
    except RecursionError:
        raise Slice2VolError(f"{path}: not a slice2vol report record (nested too deeply)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as exc:
        raise Slice2VolError(f"{path}: not a slice2vol report record ({' '.join(str(exc).split()) or type(exc).__name__})") from None

def _e(x) -> str:
    return html.escape(str(x))


def _record_info(record: dict, json_path: Path | None = None) -> list[tuple[str, str]]:
    rows = []
    if record.get("output"):
        rows.append(("output volume", _e(record["output"])))
    if record.get("method"):
        rows.append(("method", _e(record["method"])))
    if record.get("resolution_mm") is not None:
        rows.append(("resolution", f"{float(record['resolution_mm']):g} mm"))
    if record.get("output_space") == "atlas" and isinstance(record.get("atlas"), dict):
        a = record["atlas"]
        ncc = a.get("similarity_ncc")
        ncc = f"{ncc:.3f}" if isinstance(ncc, (int, float)) else "?"
        rows.append(("output space", f"atlas (CRL 2017, standard planes): estimated week {_e(a.get('week'))}, "
                                     f"NCC {ncc}"))
    elif record.get("output_space_requested") == "atlas" and isinstance(record.get("atlas"), dict):
        doubts = record["atlas"].get("doubts")
        why = "; ".join(str(d) for d in doubts) if isinstance(doubts, list) and doubts else "a reliability check failed"
        rows.append(("output space", _e(f"scanner: atlas space was refused ({why}; is the whole brain in the volume?)")))
    elif record.get("output_space"):
        rows.append(("output space", _e(record["output_space"])))
    t = record.get("timings_s") or {}
    if t:
        rows.append(("time", ", ".join(f"{_e(k.removesuffix('_s'))} {float(v):.1f} s" for k, v in t.items()
                                      if isinstance(v, (int, float)))))
    if json_path is not None:
        rows.append(("record", _e(json_path)))
    return rows
