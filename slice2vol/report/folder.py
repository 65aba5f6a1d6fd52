"""``slice2vol report RECON_DIR``: the page rebuilt from what a run recorded."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from slice2vol import io
from slice2vol.core.image import SliceSet
from slice2vol.errors import Slice2VolError

log = logging.getLogger("slice2vol.report")
from slice2vol.report.data import (
    REPORT_ARRAYS,
    REPORT_DATA,
    ReportData,
    StackReport,
    _np,
    _record_info,
    _summary,
    load_report_arrays,
)
from slice2vol.report.page import render_report

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
            obj = json.loads(p.read_text(encoding="utf-8"))
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
    from slice2vol.evaluation.metrics import simulate_slices, slice_consistency
    from slice2vol.methods.svr import roi_weights

    folder = Path(recon_dir)
    if not folder.is_dir():
        raise Slice2VolError(f"{folder}: not a directory")
    json_path, default_out = _find_record(folder)
    base = json_path.parent
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
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
    # DICOM: a folder may hold several of the run's stacks; each entry records its series
    uids = [st.get("series_instance_uid") if isinstance(st.get("series_instance_uid"), str) else None for st in entries]
    if any(uids):
        paths = [st.get("file") or st.get("name") for st in entries]
    else:
        paths = inputs.get("stacks") or [st.get("file") or st.get("name") for st in entries]
    if len(paths) != len(entries):
        raise Slice2VolError(f"{json_path}: {len(paths)} input stacks recorded for {len(entries)} pose entries")
    stack_paths = [_need(p, base, "stack", json_path) for p in paths]
    masks = inputs.get("stack_masks")
    mask_paths = None if not masks else [_need(p, base, "stack mask", json_path) for p in masks]
    thick = [float(st["thickness"]) for st in entries]
    stacks = io.load_stacks(stack_paths, thick, mask_paths, series_uids=uids if any(uids) else None)
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
        P_world = np.concatenate(est)
        if record.get("output_space") == "atlas":  # poses are recorded in the scanner world, the volume is not
            try:
                T = np.asarray(record["atlas"]["transform_scanner_to_atlas"], dtype=np.float64).reshape(4, 4)
            except (KeyError, TypeError, ValueError):
                raise Slice2VolError(f"{json_path}: output in atlas space but no valid scanner -> atlas transform "
                                     f"recorded") from None
            P_world = T @ P_world
        P = torch.as_tensor(P_world, dtype=torch.float32, device=dev)
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


def report_from_dir(recon_dir, output=None, device: torch.device | str = "cpu", protect: Sequence = ()) -> Path:
    """Rebuild the report of a reconstruction folder; returns the page's path.

    ``recon_dir`` is a report folder (``report_data.json``), rewritten in place by default, or a
    folder with the ``--output-transforms`` JSON (``transforms.json``, or the one JSON with
    ``stacks`` and ``convention`` keys), reported into ``recon_dir/report`` by default.
    """
    data, record, default_out = report_data_from_dir(recon_dir, device)
    return render_report(data, Path(output) if output else default_out, record=record, protect=protect)


def report_command(args: argparse.Namespace) -> int:
    from slice2vol.core.runtime import resolve_device

    device = resolve_device(args.device)
    page = report_from_dir(args.recon_dir, args.output, device=device)
    print(f"slice2vol: wrote report {page}")
    return 0
