"""Visual report of a reconstruction: one self-contained HTML page with PNG figures.

What a researcher checks after a slice-to-volume reconstruction, on one page that opens offline
(relative image paths, no scripts, no external style sheets or fonts):

* the result in three orthogonal planes;
* slice consistency: acquired slices against the same slices simulated from the result, before
  (motion-blind PSF average at the header poses) and after, overall, per stack and per slice;
* for every stack, a few representative slices, acquired / simulated / difference, and a
  through-plane cut of the stack in its own voxel grid (motion shows as jagged edges there);
* the estimated motion of every slice relative to the pose its stack's header gives it:
  rotation angle (deg) and translation (mm) along the slice's own axes u, v (in plane) and
  w (through plane), against acquisition order (where known) or slice index;
* robust outlier weights per slice, excluded slices (weight < 0.5) and their per-slice NCC.

Two entry points share one renderer (:func:`render_report`) through :class:`ReportData`:

* :func:`write_report` from the objects of a run in memory (``reconstruct --report DIR``);
* :func:`report_from_dir` from a folder on disk (``slice2vol report RECON_DIR``).  A report folder
  holds ``report_arrays.npz``: every array the page shows (preprocessed acquired slices, simulated
  slices, pixel masks, poses, weights, the volume) exactly as the run computed them, so the page
  is rebuilt from what the run recorded and nothing is recomputed (no bias-field correction, no
  normalisation, no simulation).  A folder with only the ``--output-transforms`` JSON (no report
  written by the run) is rebuilt by reloading the stacks with the recorded intensity factors and
  simulating them from the output volume at the recorded poses and scales (or reading the
  ``--output-simulated`` files); that is refused when the run corrected the bias field or did not
  record its factors, since the run's slices could then only be recomputed differently.

Figures are drawn with matplotlib's object API (no pyplot state, Agg canvas) and written
atomically; the HTML page is written last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import io
from .errors import Slice2VolError
from .image import SliceSet, Volume

__all__ = [
    "REPORT_HTML",
    "REPORT_DATA",
    "StackReport",
    "ReportData",
    "slice_motion",
    "report_record",
    "report_data",
    "render_report",
    "write_report",
    "report_from_dir",
    "report_command",
]

log = logging.getLogger(__name__)

REPORT_HTML = "index.html"
REPORT_DATA = "report_data.json"
REPORT_ARRAYS = "report_arrays.npz"  # every array the page shows, as the run computed them
from .quality import REJECTED_BELOW as EXCLUDED_BELOW  # noqa: E402  one threshold for CLI, JSON, verdict and page
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
    """Per-stack summary and per-slice NCC of a :func:`~slice2vol.metrics.slice_consistency` dict."""
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
    come from :func:`~slice2vol.metrics.slice_consistency` (with ``per_slice=True`` for the
    per-slice plots; ``after`` is computed when not given).
    """
    from .metrics import slice_consistency

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


def write_report(out_dir, prep, result, volume: Volume | None = None, consistency_before: dict | None = None,
                 consistency_after: dict | None = None, title: str = "slice2vol reconstruction", *,
                 record: dict | None = None, protect: Sequence = ()) -> Path:
    """Write the report of a run in memory into ``out_dir``; returns the HTML page's path.

    ``record`` (the transforms JSON of the run, with :func:`report_record`'s keys) is saved beside
    the page as ``report_data.json`` so that ``slice2vol report out_dir`` can rebuild it.
    """
    data = report_data(prep, result, volume, consistency_before, consistency_after, title)
    data.info = _record_info(record) if record else []
    return render_report(data, out_dir, record=record, protect=protect)


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
    arrays["meta"] = np.array(json.dumps(_jsonable(meta)))

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


# ----------------------------------------------------------------------------- figures


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _window(values: np.ndarray) -> tuple[float, float]:
    """Grey-level window: 1st to 99th percentile of ``values`` (the masked intensities)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def _axis_labels(affine: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """World-axis names, voxel sizes and origin of a grid whose axes follow +x, +y, +z; else None."""
    A = np.asarray(affine, dtype=float)
    vs = np.linalg.norm(A[:3, :3], axis=0)
    if np.allclose(A[:3, :3], np.diag(vs), atol=1e-3 * vs.max()):
        return ["x (mm, to R)", "y (mm, to A)", "z (mm, to S)"], vs, A[:3, 3]
    return None


def fig_views(data: ReportData):
    """Three orthogonal planes through the centre of the reconstructed region."""
    v = data.volume
    inside = v != 0
    idx = np.argwhere(inside)
    centre = np.round(idx.mean(0)).astype(int) if idx.size else np.array(v.shape) // 2
    lo, hi = _window(v[inside] if idx.size else v)
    lab = _axis_labels(data.affine)
    vs = np.linalg.norm(np.asarray(data.affine)[:3, :3], axis=0)
    names = lab[0] if lab else ["i (mm)", "j (mm)", "k (mm)"]
    origin = lab[2] if lab else np.zeros(3)
    fig = _figure(12, 4.6)
    axes = fig.subplots(1, 3)
    planes = [("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2))]
    im = None
    for ax, (name, fixed, (a, b)) in zip(axes, planes):
        img = np.take(v, centre[fixed], axis=fixed)  # axes (a, b) remain, in that order
        ext = [origin[a] - vs[a] / 2, origin[a] + (v.shape[a] - 0.5) * vs[a],
               origin[b] - vs[b] / 2, origin[b] + (v.shape[b] - 0.5) * vs[b]]
        im = ax.imshow(img.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
        pos = origin[fixed] + centre[fixed] * vs[fixed]
        ax.set_title(f"{name} ({names[fixed].split(' ')[0]} = {pos:.1f} mm)")
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="intensity (template stack units)")
    return fig


def _example_slices(st: StackReport, n: int = N_EXAMPLE_SLICES) -> list[int]:
    """Positions of representative slices, sorted by slice index: evenly spread over the slices
    with a fair share of pixels, plus the largest excluded slice and the worst-NCC slice."""
    ok = np.flatnonzero(st.has_pixels)
    if ok.size == 0:
        return []
    # prefer slices with a fair share of pixels: edge slices with a few pixels say little
    counts = st.mask.reshape(st.mask.shape[0], -1).sum(1)
    big = ok[counts[ok] >= 0.25 * counts[ok].max()]
    base = big if big.size >= 2 else ok
    extra = []
    ex = np.flatnonzero(st.excluded)
    if ex.size:  # the excluded slice with the most pixels
        extra.append(int(ex[np.argmax(counts[ex])]))
    ncc = np.full(st.weights.shape, np.inf)
    ncc[base] = np.where(np.isfinite(st.ncc_after[base]), st.ncc_after[base], np.inf)
    if np.isfinite(ncc).any():
        extra.append(int(np.argmin(ncc)))
    n_even = max(1, n - len(set(extra)))
    picks = set(base[np.unique(np.round(np.linspace(0, base.size - 1, n_even)).astype(int))].tolist())
    picks.update(extra)
    return sorted(picks, key=lambda i: st.index[i])


def _bbox(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice]:
    """Bounding box of a stack's ``(N, H, W)`` mask over all slices, as ``(H, W)`` slices."""
    m = mask.any(0)
    if not m.any():
        return slice(None), slice(None)
    ii, jj = np.nonzero(m)
    return (slice(max(ii.min() - margin, 0), ii.max() + margin + 1),
            slice(max(jj.min() - margin, 0), jj.max() + margin + 1))


def _slice_label(st: StackReport, i: int) -> str:
    ncc = st.ncc_after[i]
    return f"k={int(st.index[i])}" + (f", NCC {ncc:.2f}" if np.isfinite(ncc) else "") + f", w {st.weights[i]:.2f}"


def fig_stack_slices(st: StackReport):
    """Representative slices: acquired / simulated from the result / acquired minus simulated."""
    picks = _example_slices(st)
    n = max(1, len(picks))
    bi, bj = _bbox(st.mask)
    lo, hi = _window(st.acquired[st.mask])
    d = (st.acquired - st.simulated)[st.mask]
    dl = float(np.percentile(np.abs(d), 99)) if d.size else 1.0
    dl = dl if dl > 0 else 1.0
    hgt = st.acquired[:, bi, bj].shape[2] * st.spacing[1]
    wid = st.acquired[:, bi, bj].shape[1] * st.spacing[0]
    aspect = hgt / max(wid, 1e-6)
    fig = _figure(min(2.0 * n + 1.6, 14), min(3 * 2.0 * aspect + 0.9, 10))
    axes = np.asarray(fig.subplots(3, n, squeeze=False))
    rows = [("acquired", st.acquired, "gray", lo, hi), ("simulated", st.simulated, "gray", lo, hi),
            ("acquired - simulated", st.acquired - st.simulated, "RdBu_r", -dl, dl)]
    ims = [None, None, None]
    ext = [0, wid, 0, hgt]
    for r, (name, arr, cmap, a, b) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picks):
                ax.axis("off")
                continue
            i = picks[c]
            img = np.where(st.mask[i], arr[i], np.nan)[bi, bj]
            ims[r] = ax.imshow(img.T, origin="lower", cmap=cmap, vmin=a, vmax=b, extent=ext,
                               interpolation="nearest")
            ax.set_facecolor("black" if r < 2 else "white")
            if r == 0:
                bad = st.excluded[i]
                ax.set_title(_slice_label(st, i) + (" (excluded)" if bad else ""), fontsize=8,
                             color=EXCLUDED_COLOUR if bad else "black")
            if c == 0:
                ax.set_ylabel(name)
    fig.colorbar(ims[0], ax=list(axes[:2].ravel()), shrink=0.8, label="intensity")
    if ims[2] is not None:
        fig.colorbar(ims[2], ax=list(axes[2]), shrink=0.8, label="difference")
    fig.suptitle(f"{st.name}: acquired and simulated slices (stack voxel axes i to the right, j up; "
                 f"{st.spacing[0]:g} x {st.spacing[1]:g} mm pixels)", fontsize=10)
    return fig


def fig_stack_reslice(st: StackReport):
    """Through-plane cuts of the stack in its own voxel grid, acquired against simulated."""
    bi, bj = _bbox(st.mask)
    order = np.argsort(st.index)
    lo, hi = _window(st.acquired[st.mask])
    counts_j = st.mask.sum((0, 1))
    counts_i = st.mask.sum((0, 2))
    jc = int(np.argmax(counts_j)) if counts_j.any() else st.mask.shape[2] // 2
    ic = int(np.argmax(counts_i)) if counts_i.any() else st.mask.shape[1] // 2
    cuts = [(f"cut at j = {jc}", lambda a: a[order][:, bi, jc], st.spacing[0], "i"),
            (f"cut at i = {ic}", lambda a: a[order][:, ic, bj], st.spacing[1], "j")]
    zs = st.slice_spacing
    kmin, kmax = int(st.index.min()), int(st.index.max())
    fig = _figure(13, 4.2)
    axes = np.asarray(fig.subplots(1, 4, squeeze=False))
    im = None
    for c, (label, take, sp, ax_name) in enumerate(cuts):
        m = take(st.mask)
        for r, (name, arr) in enumerate((("acquired", st.acquired), ("simulated", st.simulated))):
            ax = axes[0, 2 * c + r]
            img = np.where(m, take(arr), np.nan)
            ext = [0, img.shape[1] * sp, (kmin - 0.5) * zs, (kmax + 0.5) * zs]
            im = ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi, extent=ext, aspect="equal",
                           interpolation="nearest")
            ax.set_facecolor("black")
            ax.set_title(f"{name}, {label}", fontsize=9)
            ax.set_xlabel(f"{ax_name} (mm)")
            ax.set_ylabel("k x slice spacing (mm)")
    fig.colorbar(im, ax=list(axes.ravel()), shrink=0.8, label="intensity")
    fig.suptitle(f"{st.name}: through-plane view in the stack's voxel grid (motion shows as jagged edges; "
                 f"simulated at the estimated poses)", fontsize=10)
    return fig


def _x_axis(st: StackReport) -> tuple[np.ndarray, str]:
    if st.order is not None:
        return np.asarray(st.order, dtype=float), "acquisition order (time index in the stack)"
    return np.asarray(st.index, dtype=float), "slice index k in the file (acquisition order unknown)"


def _mark_excluded(ax, x: np.ndarray, st: StackReport) -> None:
    for xi in x[st.excluded]:
        ax.axvspan(xi - 0.5, xi + 0.5, color=EXCLUDED_COLOUR, alpha=0.15, lw=0)


def fig_stack_motion(st: StackReport):
    """Rotation angle and translation (slice axes u, v, w) relative to the header pose."""
    x, xlabel = _x_axis(st)
    ang, t = slice_motion(st.header_poses, st.poses)
    ok = st.has_pixels
    srt = np.argsort(x)
    fig = _figure(11, 5.2)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(x[srt], np.where(ok, ang, np.nan)[srt], "o-", ms=3, color="#1f77b4")
    ax1.set_ylabel("rotation angle (deg)")
    ax1.set_ylim(bottom=0)
    for c, (name, col) in enumerate((("u (in plane, along i)", "#2ca02c"), ("v (in plane, along j)", "#9467bd"),
                                     ("w (through plane)", "#ff7f0e"))):
        ax2.plot(x[srt], np.where(ok, t[:, c], np.nan)[srt], "o-", ms=3, label=name, color=col)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set_ylabel("translation (mm)")
    ax2.set_xlabel(xlabel)
    ax2.legend(fontsize=8, ncol=3, loc="best")
    for ax in (ax1, ax2):
        _mark_excluded(ax, x, st)
        ax.grid(alpha=0.3)
    n_ex = int(st.excluded.sum())
    fig.suptitle(f"{st.name}: estimated slice motion relative to the header pose"
                 + (f" (red bands: {n_ex} excluded slices)" if n_ex else ""), fontsize=10)
    return fig


def fig_outliers(data: ReportData):
    """Per stack: slice weights (excluded in red) and per-slice NCC before/after."""
    S = len(data.stacks)
    fig = _figure(12, 2.3 * S + 0.6)
    axes = np.asarray(fig.subplots(S, 2, squeeze=False))
    for s, st in enumerate(data.stacks):
        x, xlabel = _x_axis(st)
        ok = st.has_pixels
        ax = axes[s, 0]
        kept = ok & ~st.excluded
        ax.bar(x[kept], st.weights[kept], width=0.8, color="#1f77b4", label="slice weight")
        if st.excluded.any():
            ax.bar(x[st.excluded], st.weights[st.excluded], width=0.8, color=EXCLUDED_COLOUR, label="excluded")
            ax.plot(x[st.excluded], st.weights[st.excluded], "x", color=EXCLUDED_COLOUR, ms=7)
        if st.pixel_weight is not None:
            ax.plot(x[ok], st.pixel_weight[ok], "k.", ms=4, label="mean pixel weight")
        ax.axhline(EXCLUDED_BELOW, color=EXCLUDED_COLOUR, ls="--", lw=0.8)
        ax.set_ylim(0, 1.35)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel("weight")
        ax.set_title(f"{st.name}: robust weights ({int(st.excluded.sum())} of {int(ok.sum())} slices excluded)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=3)
        ax = axes[s, 1]
        srt = np.argsort(x)
        if st.ncc_before is not None:
            ax.plot(x[srt], np.where(ok, st.ncc_before, np.nan)[srt], "o-", ms=3, color="grey", label="before")
        ax.plot(x[srt], np.where(ok, st.ncc_after, np.nan)[srt], "o-", ms=3, color="#1f77b4", label="after")
        if st.excluded.any():
            ax.scatter(x[st.excluded], st.ncc_after[st.excluded], s=40, facecolors="none",
                       edgecolors=EXCLUDED_COLOUR, label="excluded", zorder=3)
        ax.set_ylabel("per-slice NCC")
        ax.set_title(f"{st.name}: acquired vs simulated, per slice", fontsize=9)
        ax.legend(fontsize=7, loc="best", ncol=3)
        for a in axes[s]:
            a.grid(alpha=0.3)
            a.set_xlabel(xlabel, fontsize=8)
    return fig


def fig_consistency(data: ReportData):
    """NCC and SSIM per stack before/after, and per-slice NCC before against after."""
    names = [f"{s}: {st.name}" if len(st.name) <= 18 else f"{s}: {st.name[:16]}..." for s, st in enumerate(data.stacks)]
    fig = _figure(13, 4.4)
    axes = fig.subplots(1, 3)
    xs = np.arange(len(names) + 1)
    labels = ["all"] + names
    for ax, key in zip(axes[:2], ("ncc", "ssim")):
        for off, which, col in ((-0.2, "before", "grey"), (0.2, "after", "#1f77b4")):
            overall = getattr(data, which)
            vals = [overall.get(key, np.nan) if overall else np.nan]
            vals += [(getattr(st, which) or {}).get(key, np.nan) for st in data.stacks]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(xs + off, vals, width=0.4, color=col, label=which)
        ax.set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(key.upper())
        ax.set_ylim(0, 1.15)
        ax.set_title(f"{key.upper()}, acquired vs simulated slices", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    have_before = any(st.ncc_before is not None for st in data.stacks)
    for s, st in enumerate(data.stacks):
        ok = st.has_pixels & np.isfinite(st.ncc_after)
        if have_before and st.ncc_before is not None:
            ax.scatter(st.ncc_before[ok], st.ncc_after[ok], s=10, label=names[s])
            ex = st.excluded & ok
            ax.scatter(st.ncc_before[ex], st.ncc_after[ex], s=40, facecolors="none", edgecolors=EXCLUDED_COLOUR)
        else:
            ax.hist(st.ncc_after[ok], bins=20, alpha=0.5, label=names[s])
    if have_before:
        lo = np.nanmin([np.nanmin(np.r_[st.ncc_before, st.ncc_after]) for st in data.stacks if st.ncc_before is not None])
        lo = min(lo, 0.9) if np.isfinite(lo) else 0.0
        ax.plot([lo, 1], [lo, 1], color="grey", lw=0.8)
        ax.set_xlabel("per-slice NCC before (header poses, PSF average)")
        ax.set_ylabel("per-slice NCC after")
        ax.set_title("per slice (red rings: excluded)", fontsize=9)
    else:
        ax.set_xlabel("per-slice NCC after")
        ax.set_ylabel("slices")
        ax.set_title("per-slice NCC (no 'before' values recorded)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- page


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1300px; padding: 0 1.2em 3em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
h3 { margin-bottom: 0.3em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f2f2f2; }
img { max-width: 100%; height: auto; display: block; margin: 0.4em 0; border: 1px solid #eee; }
nav a { margin-right: 1em; } .bad { color: #d62728; } .note { color: #555; font-size: 0.9em; }
figcaption { color: #555; font-size: 0.9em; margin-bottom: 1em; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence]) -> str:
    """An HTML table; header cells are escaped, row cells are HTML already."""
    h = "" if header is None else "<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{h}<tbody>{body}</tbody></table>"


def _img(name: str, alt: str, caption: str, size: tuple[int, int]) -> str:
    return (f'<figure><img src="{_e(name)}" alt="{_e(alt)}" width="{size[0]}" height="{size[1]}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _consistency_rows(data: ReportData) -> list[list[str]]:
    def cells(b, a):
        b, a = b or {}, a or {}
        out = []
        for k, spec in (("ssim", ".3f"), ("psnr", ".2f"), ("ncc", ".3f")):
            out.append(f"{_fmt(b.get(k), spec)} &rarr; {_fmt(a.get(k), spec)}")
        return out

    rows = [["<b>all slices</b>"] + cells(data.before, data.after)]
    for s, st in enumerate(data.stacks):
        rows.append([f"{s}: {_e(st.name)}"] + cells(st.before, st.after))
    return rows


def _stack_rows(data: ReportData) -> list[list[str]]:
    rows = []
    for s, st in enumerate(data.stacks):
        ang, t = slice_motion(st.header_poses, st.poses)
        ok = st.has_pixels
        tn = np.linalg.norm(t, axis=1)
        ex = [int(k) for k in st.index[st.excluded]]
        ex_txt = f"{len(ex)} (k = {', '.join(map(str, ex))})" if ex else "0"
        ncc = st.ncc_after[ok & np.isfinite(st.ncc_after)]
        rows.append([
            f"{s}: {_e(st.name)}" + (" (template)" if data.template == s else ""),
            f"{st.mask.shape[1]} x {st.mask.shape[2]} x {st.mask.shape[0]}",
            f"{st.spacing[0]:g} x {st.spacing[1]:g} / {st.thickness:g}",
            str(int(ok.sum())),
            f'<span class="{"bad" if ex else ""}">{_e(ex_txt)}</span>',
            _fmt(float(np.median(ang[ok])) if ok.any() else None, ".1f") + " / " + _fmt(float(ang[ok].max()) if ok.any() else None, ".1f"),
            _fmt(float(np.median(tn[ok])) if ok.any() else None, ".1f") + " / " + _fmt(float(tn[ok].max()) if ok.any() else None, ".1f"),
            _fmt(float(np.median(ncc)) if ncc.size else None),
        ])
    return rows


def _save(fig, path: Path, protect) -> tuple[int, int]:
    """Save a figure as PNG atomically; returns its size in pixels."""
    w, h = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="white")

    io.atomic_write(path, write, protect)
    try:  # the constrained layout may adjust the canvas; read back the real size
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # pragma: no cover - PIL is a matplotlib dependency
        pass
    return w, h


def render_report(data: ReportData, out_dir, record: dict | None = None, protect: Sequence = ()) -> Path:
    """Draw every figure of ``data`` into ``out_dir`` and write the HTML page last.

    Returns the page's path (``out_dir/index.html``).  ``record`` is saved as ``report_data.json``.
    """
    out = Path(out_dir)
    protect = list(protect) + list(data.inputs)
    if out.exists() and not out.is_dir():
        raise Slice2VolError(f"report folder {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Slice2VolError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    if record is not None:
        io.write_json(_jsonable(record), out / REPORT_DATA, protect=protect)
    save_report_arrays(data, out / REPORT_ARRAYS, protect)
    sizes: dict[str, tuple[int, int]] = {}

    def save(fig, name):
        sizes[name] = _save(fig, out / name, protect)

    save(fig_views(data), "views.png")
    save(fig_consistency(data), "consistency.png")
    save(fig_outliers(data), "outliers.png")
    for s, st in enumerate(data.stacks):
        save(fig_stack_slices(st), f"stack{s}_slices.png")
        save(fig_stack_reslice(st), f"stack{s}_reslice.png")
        save(fig_stack_motion(st), f"stack{s}_motion.png")
    page = _html(data, sizes, record is not None, quality=(record or {}).get("quality"))
    path = out / REPORT_HTML
    io.atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"), protect)
    return path


QUALITY_COLOURS = {"ok": "#2ca02c", "doubtful": "#ff7f0e", "failed": "#d62728"}


def _quality_banner(quality: dict | None) -> str:
    """The verdict of :mod:`slice2vol.quality` (the record's ``quality`` object), coloured, with its
    reasons; empty for records written before it existed."""
    if not isinstance(quality, dict) or quality.get("verdict") not in QUALITY_COLOURS:
        return ""
    v = quality["verdict"]
    score = quality.get("score")
    s = f" (score {float(score):.2f})" if isinstance(score, (int, float)) else ""
    reasons = "".join(f"<li>{_e(r)}</li>" for r in quality.get("reasons") or [])
    return (f'<div id="quality" class="quality" style="border-left: 0.5em solid {QUALITY_COLOURS[v]}">'
            f'<b>Quality: <span style="color: {QUALITY_COLOURS[v]}">{_e(v)}</span></b>{_e(s)} '
            f'<span class="note">reference-free verdict from slice consistency, rejected slices, agreement '
            f'between stacks and slice motion</span>' + (f"<ul>{reasons}</ul>" if reasons else "") + "</div>")


def _html(data: ReportData, sizes: dict, with_record: bool, quality: dict | None = None) -> str:
    n_sl = sum(int(st.has_pixels.sum()) for st in data.stacks)
    n_ex = sum(int(st.excluded.sum()) for st in data.stacks)
    vs = np.linalg.norm(np.asarray(data.affine)[:3, :3], axis=0)
    n_all = sum(len(st.index) for st in data.stacks)
    info = [("stacks", str(len(data.stacks))), ("slices with pixels", f"{n_sl} (of {n_all} in the stacks)"),
            ("excluded slices (weight &lt; 0.5)", f'<span class="{"bad" if n_ex else ""}">{n_ex}</span>'),
            ("output grid", f"{' x '.join(map(str, data.volume.shape))} voxels of "
                            f"{' x '.join(f'{v:.2f}' for v in vs)} mm")]
    if data.template is not None:
        info.append(("template stack", f"{data.template}: {_e(data.stacks[data.template].name)}"))
    info += [(_e(k), v) for k, v in data.info]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    P = []
    P.append(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{_e(data.title)}</title><style>{_CSS}</style></head><body>")
    P.append(f"<h1>{_e(data.title)}</h1><p class=\"sub\">slice2vol report, written {when}</p>")
    P.append(_quality_banner(quality))
    P.append('<nav><a href="#summary">Summary</a><a href="#volume">Reconstruction</a>'
             '<a href="#consistency">Slice consistency</a><a href="#slices">Acquired vs simulated</a>'
             '<a href="#motion">Motion</a><a href="#outliers">Outliers</a></nav>')
    P.append('<section id="summary"><h2>Summary</h2>')
    P.append(_table(None, [[k, v] for k, v in info]))
    P.append(_table(["stack", "size (H x W x slices)", "pixel / thickness (mm)", "slices with pixels",
                     "excluded slices", "rotation median / max (deg)", "translation median / max (mm)",
                     "median NCC after"], _stack_rows(data)))
    for note in data.notes:
        P.append(f'<p class="note">{_e(note)}</p>')
    if with_record:
        P.append(f'<p class="note">Poses, weights and paths of this run: <a href="{REPORT_DATA}">{REPORT_DATA}</a>; '
                 f"rebuild this page with <code>slice2vol report &lt;this folder&gt;</code>.</p>")
    P.append("</section>")
    P.append('<section id="volume"><h2>Reconstruction</h2>')
    P.append(_img("views.png", "three orthogonal views of the reconstruction",
                  "Axial, coronal and sagittal planes through the centre of the reconstructed region, world "
                  "coordinates (RAS, mm); grey levels: 1st to 99th percentile inside the region.", sizes["views.png"]))
    P.append("</section>")
    P.append('<section id="consistency"><h2>Slice consistency</h2>')
    P.append("<p>Acquired slices against the same slices simulated from a volume through the acquisition model "
             "(slice scales applied). <b>Before</b>: motion-blind PSF average of the slices at their header poses; "
             "<b>after</b>: the reconstruction at the estimated poses. Higher is better.</p>")
    P.append(_table(["", "SSIM before \u2192 after", "PSNR (dB) before \u2192 after", "NCC before \u2192 after"],
                    _consistency_rows(data)))
    P.append(_img("consistency.png", "slice consistency before and after", "Per stack (left, middle) and per "
                  "slice (right).", sizes["consistency.png"]))
    P.append("</section>")
    P.append('<section id="slices"><h2>Acquired vs simulated slices</h2>')
    P.append("<p>For each stack, representative slices (spread over the stack, plus the largest excluded and the "
             "worst-NCC slice): acquired, simulated from the result at the estimated pose, and their difference; "
             "only the pixels used by the reconstruction are shown. Grey levels: 1st to 99th percentile of the "
             "stack's acquired pixels, the same for both rows.</p>")
    for s, st in enumerate(data.stacks):
        P.append(f'<h3 id="stack{s}">Stack {s}: {_e(st.name)}</h3>')
        P.append(_img(f"stack{s}_slices.png", f"acquired and simulated slices of {st.name}",
                      "Titles: slice index k, per-slice NCC after, slice weight w (red: excluded).",
                      sizes[f"stack{s}_slices.png"]))
        P.append(_img(f"stack{s}_reslice.png", f"through-plane view of {st.name}",
                      "Through-plane cuts across all slices, in slice-index order.", sizes[f"stack{s}_reslice.png"]))
    P.append("</section>")
    P.append('<section id="motion"><h2>Estimated motion</h2>')
    P.append("<p>Each slice's estimated pose relative to the pose its stack header gives it: rotation angle (deg) "
             "and translation of the slice centre along the slice's own axes u, v (in plane) and w (through plane), "
             "in mm. The stack-to-template alignment appears as a common offset of all slices of a stack.</p>")
    for s, st in enumerate(data.stacks):
        P.append(_img(f"stack{s}_motion.png", f"estimated motion of {st.name}", f"Stack {s}: {_e(st.name)}.",
                      sizes[f"stack{s}_motion.png"]))
    P.append("</section>")
    P.append('<section id="outliers"><h2>Outlier weights and excluded slices</h2>')
    P.append(f"<p>Robust slice weights (slices with weight below {EXCLUDED_BELOW} are excluded, in red) with the mean "
             "robust pixel weight where known, and the per-slice NCC of acquired against simulated slices.</p>")
    P.append(_img("outliers.png", "slice weights and per-slice NCC", "One row per stack.", sizes["outliers.png"]))
    P.append("</section></body></html>\n")
    return "\n".join(P)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


# ----------------------------------------------------------------------------- from a folder


def _find_record(folder: Path) -> tuple[Path, Path]:
    """The JSON describing a reconstruction in ``folder`` and the default report folder."""
    if (folder / REPORT_DATA).is_file():
        return folder / REPORT_DATA, folder
    if (folder / "transforms.json").is_file():
        return folder / "transforms.json", folder / "report"
    cands = []
    for p in sorted(folder.glob("*.json")):
        try:
            obj = json.loads(p.read_text())
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(obj, dict) and "stacks" in obj and "convention" in obj:
            cands.append(p)
    if len(cands) == 1:
        return cands[0], folder / "report"
    if not cands:
        raise Slice2VolError(f"{folder}: no reconstruction found (expected {REPORT_DATA} from reconstruct --report, "
                             f"or the JSON of --output-transforms)")
    raise Slice2VolError(f"{folder}: several transforms JSON files ({', '.join(p.name for p in cands)}); "
                         f"keep one per folder")


def _resolve(p, base: Path) -> Path | None:
    """A recorded path: as written (absolute, or relative to the working folder), else relative to
    the record's folder, else its file name in the record's folder."""
    if not p:
        return None
    q = Path(p)
    for c in (q, base / q, base / q.name):
        if c.exists():
            return c
    return None


def _need(p, base: Path, what: str, record: Path) -> Path:
    r = _resolve(p, base)
    if r is None:
        raise Slice2VolError(f"{what} {p} (recorded in {record}) not found")
    return r


def _find_volume(record: dict, base: Path, json_path: Path) -> Path:
    if record.get("output"):
        return _need(record["output"], base, "output volume", json_path)
    stack_names = {Path(st.get("file", "")).name for st in record["stacks"]}
    cands = [p for p in sorted(base.iterdir()) if p.name.endswith((".nii", ".nii.gz"))
             and p.name not in stack_names and not p.name.startswith("simulated_")]
    if len(cands) == 1:
        return cands[0]
    raise Slice2VolError(f"{json_path}: no output volume recorded and {len(cands)} candidate NIfTI files in {base}")


def report_data_from_dir(recon_dir, device: torch.device | str = "cpu") -> tuple[ReportData, dict, Path]:
    """Rebuild :class:`ReportData` from a reconstruction folder: ``(data, record, default_output)``."""
    from .methods.svr import roi_weights
    from .metrics import simulate_slices, slice_consistency

    folder = Path(recon_dir)
    if not folder.is_dir():
        raise Slice2VolError(f"{folder}: not a directory")
    json_path, default_out = _find_record(folder)
    base = json_path.parent
    try:
        record = json.loads(json_path.read_text())
        entries = record["stacks"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("no stacks")
    except RecursionError:
        raise Slice2VolError(f"{json_path}: not a reconstruction record (nested too deeply)") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise Slice2VolError(f"{json_path}: not a reconstruction record ({' '.join(str(exc).split())})") from None
    arrays = folder / REPORT_ARRAYS
    if json_path.name == REPORT_DATA and arrays.is_file():
        # the run's own arrays: the page is rebuilt from them alone
        data = load_report_arrays(arrays)
        recorded = record.get("inputs") or {}
        data.inputs = [str(p) for p in [record.get("output"), *(recorded.get("stacks") or []),
                                        *(recorded.get("stack_masks") or []), recorded.get("mask")]
                       if isinstance(p, str)]
        return data, record, default_out
    poses = io.load_poses_json(json_path)  # the poses are checked first: a hostile record fails on them
    inputs = record.get("inputs") or {}
    if inputs.get("bias_field"):
        raise Slice2VolError(f"{json_path}: the run corrected the bias field and recorded no report arrays; "
                             f"its slices cannot be rebuilt without recomputing them differently. Use the report "
                             f"folder of `reconstruct --report` (it holds {REPORT_ARRAYS})")
    factors = record.get("intensity_factors")
    if not isinstance(factors, list) or len(factors) != len(entries):
        raise Slice2VolError(f"{json_path}: no intensity factors recorded for its {len(entries)} stacks; the run's "
                             f"normalisation cannot be reproduced. Use the report folder of `reconstruct --report`")
    volume_path = _find_volume(record, base, json_path)
    volume = io.load_volume(volume_path)
    paths = inputs.get("stacks") or [st.get("file") or st.get("name") for st in entries]
    if len(paths) != len(entries):
        raise Slice2VolError(f"{json_path}: {len(paths)} input stacks recorded for {len(entries)} pose entries")
    stack_paths = [_need(p, base, "stack", json_path) for p in paths]
    masks = inputs.get("stack_masks")
    mask_paths = None if not masks else [_need(p, base, "stack mask", json_path) for p in masks]
    thick = [float(st["thickness"]) for st in entries]
    stacks = io.load_stacks(stack_paths, thick, mask_paths)
    for st, e, p in zip(stacks, poses, stack_paths):
        if len(e["index"]) != st.n_slices or not np.array_equal(np.sort(e["index"]), st.index):
            raise Slice2VolError(f"stack {p}: {st.n_slices} slices but {len(e['index'])} poses recorded in "
                                 f"{json_path}; the stack changed since the reconstruction")
    template = record.get("template")
    try:
        stacks = [replace(st, slices=st.slices * float(f)) for st, f in zip(stacks, factors)]
    except (TypeError, ValueError):
        raise Slice2VolError(f"{json_path}: intensity factors are not numbers") from None
    est = [e["poses"][np.argsort(e["index"])] for e in poses]
    offsets = np.cumsum([0] + [st.n_slices for st in stacks]).tolist()

    def per_stack(key, default):
        v = record.get(key)
        if isinstance(v, list) and len(v) == len(stacks) and all(len(x) == st.n_slices for x, st in zip(v, stacks)):
            return [np.asarray([default if y is None else y for y in x], dtype=float) for x in v]
        return [np.full(st.n_slices, default, dtype=float) for st in stacks]

    weights, scales = per_stack("slice_weights", 1.0), per_stack("slice_scales", 1.0)
    notes = []
    sim_dir = _resolve(record.get("output_simulated"), base)
    sim_files = None
    if sim_dir is not None:
        sim_files = [sim_dir / f"simulated_{st.name.split('.nii')[0]}.nii.gz" for st in stacks]
        if not all(f.is_file() for f in sim_files):
            sim_files = None
    dev = torch.device(device)
    if sim_files is not None:
        sims = []
        for st, f in zip(stacks, sim_files):
            # written by save_stack in the stack's right-handed voxel layout and affine
            d, _ = io.load_nifti(f, "simulated stack")
            if d.shape != (st.slices.shape[1], st.slices.shape[2], st.n_slices):
                raise Slice2VolError(f"simulated stack {f}: shape {d.shape} does not match its stack")
            sims.append(torch.from_numpy(np.ascontiguousarray(np.moveaxis(d, 2, 0))))
        # pixels: where a simulated value was written (the pixels the reconstruction used)
        stacks = [replace(st, mask=st.mask & (s != 0)) for st, s in zip(stacks, sims)]
        ss = SliceSet.from_stacks(stacks, device=dev)
        ss = ss.with_poses(torch.as_tensor(np.concatenate(est), dtype=torch.float32, device=dev))
        pst = ss.pixel_stack()
        sim = torch.cat([s.reshape(-1).to(dev)[ss.flat_index[pst == i]] for i, s in enumerate(sims)])
        notes.append(f"Simulated slices read from {sim_dir}.")
    else:
        ss0 = SliceSet.from_stacks(stacks, device=dev)
        P = torch.as_tensor(np.concatenate(est), dtype=torch.float32, device=dev)
        inside = roi_weights((volume.data != 0).to(dev), volume.affine, ss0, P)
        keep = ss0.to_images(inside)
        stacks = [replace(st, mask=st.mask & (k.cpu() > 0.5)) for st, k in zip(stacks, keep)]
        ss = SliceSet.from_stacks(stacks, device=dev).with_poses(P)
        res = record.get("resolution_mm")
        sc = torch.as_tensor(np.concatenate(scales), dtype=torch.float32, device=dev)
        sim = simulate_slices(volume, ss, resolution=res) * sc[ss.slice_id]
        notes.append("Slices simulated again from the output volume at the recorded poses and slice scales; "
                     "pixels: the stack masks inside the reconstructed region.")
    if not torch.isfinite(sim).all():
        raise Slice2VolError(f"{folder}: simulated slices are not finite")
    after = slice_consistency(ss, sim.to(ss.values.dtype), per_slice=True)
    acq_imgs = ss.to_images(ss.values)
    sim_imgs = ss.to_images(sim.to(ss.values.dtype))
    mask_imgs = ss.to_images(torch.ones_like(ss.values))
    sc_rec = record.get("slice_consistency") or {}
    detail = record.get("slice_consistency_detail") or {}

    def stored_ncc(which, s, n):
        d = (detail.get(which) or {}).get("per_slice_ncc")
        if isinstance(d, list) and len(d) == len(stacks) and len(d[s]) == n:
            return np.asarray([np.nan if v is None else v for v in d[s]], dtype=float)
        return None

    def stored_stack(which, s):
        d = (detail.get(which) or {}).get("per_stack")
        return d[s] if isinstance(d, list) and len(d) == len(stacks) else None

    reports = []
    for s, st in enumerate(stacks):
        lo, hi = offsets[s], offsets[s + 1]
        n = st.n_slices
        ncc_a = stored_ncc("after", s, n)
        reports.append(StackReport(
            name=st.name, spacing=tuple(map(float, st.spacing)), thickness=float(st.thickness),
            slice_spacing=st.slice_spacing, index=np.asarray(st.index), order=poses[s]["order"][np.argsort(poses[s]["index"])]
            if poses[s]["order"] is not None else None,
            acquired=_np(acq_imgs[s]), simulated=_np(sim_imgs[s]), mask=_np(mask_imgs[s]) > 0,
            header_poses=np.asarray(st.poses, dtype=np.float64), poses=est[s],
            weights=weights[s], scales=scales[s],
            ncc_after=ncc_a if ncc_a is not None else np.asarray(after["per_slice"]["ncc"][lo:hi], dtype=float),
            ncc_before=stored_ncc("before", s, n),
            before=stored_stack("before", s), after=stored_stack("after", s) or after["per_stack"][s],
        ))
    info = _record_info(record, json_path)
    title = f"slice2vol reconstruction: {Path(record['output']).name}" if record.get("output") else \
        f"slice2vol reconstruction: {folder.name}"
    data = ReportData(title=title, volume=volume.data.numpy(), affine=volume.affine, stacks=reports,
                      before=sc_rec.get("before"), after=sc_rec.get("after") or _summary(after),
                      template=template if isinstance(template, int) else None, info=info, notes=notes,
                      inputs=[str(p) for p in [volume_path, *stack_paths, *(mask_paths or [])]])
    return data, record, default_out


def _record_info(record: dict, json_path: Path | None = None) -> list[tuple[str, str]]:
    rows = []
    if record.get("output"):
        rows.append(("output volume", _e(record["output"])))
    if record.get("method"):
        rows.append(("method", _e(record["method"])))
    if record.get("resolution_mm") is not None:
        rows.append(("resolution", f"{float(record['resolution_mm']):g} mm"))
    t = record.get("timings_s") or {}
    if t:
        rows.append(("time", ", ".join(f"{_e(k.removesuffix('_s'))} {float(v):.1f} s" for k, v in t.items()
                                      if isinstance(v, (int, float)))))
    if json_path is not None:
        rows.append(("record", _e(json_path)))
    return rows


def report_from_dir(recon_dir, output=None, device: torch.device | str = "cpu", protect: Sequence = ()) -> Path:
    """Rebuild the report of a reconstruction folder; returns the page's path.

    ``recon_dir`` is a report folder (``report_data.json``), rewritten in place by default, or a
    folder with the ``--output-transforms`` JSON (``transforms.json``, or the one JSON with
    ``stacks`` and ``convention`` keys), reported into ``recon_dir/report`` by default.
    """
    data, record, default_out = report_data_from_dir(recon_dir, device)
    return render_report(data, Path(output) if output else default_out, record=record, protect=protect)


def report_command(args: argparse.Namespace) -> int:
    from .runtime import resolve_device

    device = resolve_device(args.device)
    page = report_from_dir(args.recon_dir, args.output, device=device)
    print(f"slice2vol: wrote report {page}")
    return 0

