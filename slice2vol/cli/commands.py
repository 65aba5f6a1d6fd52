"""``reconstruct`` and ``demo`` commands: load, check, run a method, write outputs atomically.

Every output path is checked before any work (a bad path fails in seconds, not after a run), and
no output may replace an input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from slice2vol import io
from slice2vol.core import stages
from slice2vol.core.image import Volume
from slice2vol.core.preprocess import Prepared
from slice2vol.core.runtime import resolve_device, seed_everything
from slice2vol.errors import Slice2VolError
from slice2vol.evaluation.metrics import naive_consistency
from slice2vol.methods.run import crop_to_roi, run_reconstruction

log = logging.getLogger("slice2vol")

__all__ = ["reconstruct_command", "demo_command", "render_command"]


def _method_options(args: argparse.Namespace) -> dict:
    """Method-specific CLI options; giving one that the chosen method ignores is an error."""
    method = getattr(args, "method", "svr")
    gauss = {"psf": getattr(args, "psf", None), "init": getattr(args, "init", None),
             "max_gaussians": getattr(args, "max_gaussians", None)}
    gauss = {k: v for k, v in gauss.items() if v is not None}
    csvr = {"refine": True if getattr(args, "refine", False) else None, "weights": getattr(args, "weights", None),
            "start": getattr(args, "csvr_start", None)}
    csvr = {k: v for k, v in csvr.items() if v is not None}
    if getattr(args, "output_gaussians", None) and method != "gaussian":
        raise Slice2VolError("--output-gaussians needs --method gaussian")
    if gauss and method != "gaussian":
        flags = ", ".join("--" + k.replace("_", "-") for k in gauss)
        raise Slice2VolError(f"{flags} only apply to --method gaussian")
    if "refine" in csvr and method != "csvr":
        raise Slice2VolError("--refine only applies to --method csvr (--method auto, the default, always refines)")
    if "start" in csvr and not (csvr.get("refine") or method == "auto"):
        raise Slice2VolError("--csvr-start only applies to --method auto or --method csvr --refine")
    weights = csvr.get("weights")
    if weights is not None:
        if not (method in ("csvr", "auto") or (method == "gaussian" and gauss.get("init", "auto") in ("csvr", "auto"))):
            raise Slice2VolError("--weights only applies to --method auto, csvr, or gaussian with --init auto or csvr")
        if not Path(weights).is_file():
            raise Slice2VolError(f"--weights {weights}: file not found")
        if method == "gaussian":
            gauss["csvr_weights"] = weights
    shared = {}  # options of SVR's stages, which svr, auto and csvr all run
    lam = getattr(args, "regularisation", None)
    if lam is not None:
        if not (math.isfinite(lam) and lam > 0):
            raise Slice2VolError(f"--regularisation must be a positive number, got {lam}")
        if method not in ("svr", "auto", "csvr"):
            raise Slice2VolError("--regularisation only applies to --method auto, svr or csvr")
        shared["lam"] = lam
    packages = getattr(args, "packages", None)
    if packages:
        if method not in ("svr", "auto") and not (method == "csvr" and csvr.get("refine")):
            raise Slice2VolError("--packages only applies to --method auto, svr or csvr --refine")
        n = len(getattr(args, "stacks", []) or [])
        if min(packages) < 1:
            raise Slice2VolError(f"--packages must be at least 1 per stack, got {' '.join(map(str, packages))}")
        if len(packages) not in (1, n):
            raise Slice2VolError(f"--packages: give one value for all stacks or one per stack ({n}), got {len(packages)}")
        shared["packages"] = tuple(packages)
        shared["packages_from_order"] = False  # the user's packages win over the files' slice timing
    if method == "svr":
        return shared
    return gauss if method == "gaussian" else {**csvr, **shared}


def render_command(args: argparse.Namespace) -> int:
    """Voxelise saved Gaussians (``slice2vol render``)."""
    from slice2vol.core.geometry import axis_aligned_grid
    from slice2vol.methods.gaussian.model import load_gaussians
    from slice2vol.methods.gaussian.render import voxelise

    io.check_output_path(args.output, [args.gaussians] + ([args.like] if args.like else []))
    device = resolve_device(args.device)
    model, meta = load_gaussians(args.gaussians, device)
    if args.like:
        ref, affine = io.load_nifti(args.like, "reference")
        shape = tuple(int(n) for n in ref.shape[:3])
    else:
        if "affine" not in meta:
            raise Slice2VolError(f"{args.gaussians}: no grid recorded; give --like REF.nii.gz")
        A, shp = np.asarray(meta["affine"]), meta["shape"]
        res = args.resolution or float(np.linalg.norm(A[:3, :3], axis=0).mean())
        lo = A[:3, 3]
        hi = A[:3, :3] @ (np.asarray(shp, dtype=float) - 1) + A[:3, 3]
        affine, shape = axis_aligned_grid(np.minimum(lo, hi), np.maximum(lo, hi), res)
    with torch.no_grad():
        V = voxelise(model, affine, shape).clamp_min(0)
    io.save_volume(Volume(V.cpu(), affine), args.output, protect=[args.gaussians])
    print(f"slice2vol: wrote {args.output} ({'x'.join(map(str, shape))}) from {len(model)} Gaussians")
    return 0


def _check_writable_folder(folder, what: str) -> None:
    """Raise unless ``folder`` is a writable folder or can be created: its nearest existing
    ancestor is a folder we may write to."""
    want = Path(os.path.abspath(folder))
    have = want
    while not os.path.lexists(have) and have != have.parent:
        have = have.parent
    if not have.is_dir():
        why = f"{have} is not a directory"
        raise Slice2VolError(f"{what}: {why}" if have == want else f"{what}: cannot create folder {want}: {why}")
    if not os.access(have, os.W_OK | os.X_OK):
        to = "" if have == want else f" (to create {want})"
        raise Slice2VolError(f"{what}: folder {have} is not writable{to}")


def _outputs(args: argparse.Namespace, inputs: list[str]) -> None:
    """Check every output location before any work: a valid name, never an input, and a folder
    that exists or can be created and is writable."""
    for p in [args.output, getattr(args, "output_transforms", None), getattr(args, "output_gaussians", None)]:
        if p:
            io.check_output_path(p, inputs)
    if not str(args.output).endswith((".nii", ".nii.gz")):
        raise Slice2VolError(f"output {args.output}: expected a .nii or .nii.gz file name")
    sim = getattr(args, "output_simulated", None)
    if sim and Path(sim).exists() and not Path(sim).is_dir():
        raise Slice2VolError(f"--output-simulated {sim} exists and is not a directory")
    rep = getattr(args, "report", None)
    if rep and Path(rep).exists() and not Path(rep).is_dir():
        raise Slice2VolError(f"--report {rep} exists and is not a directory")
    for p in [args.output, getattr(args, "output_transforms", None), getattr(args, "output_gaussians", None)]:
        if p:
            _check_writable_folder(Path(p).parent, f"output {p}")
    for option, folder in (("--output-simulated", sim), ("--report", rep)):
        if folder:
            _check_writable_folder(folder, f"{option} {folder}")
    dcm = getattr(args, "output_dicom", None)
    if dcm:
        from slice2vol.io.dicom import check_output_folder

        check_output_folder(dcm, inputs)  # absent or empty, never in or around an input
        _check_writable_folder(Path(dcm).parent, f"--output-dicom {dcm}")


class _RunOutputs:
    """The files and folders one run has written so far, to remove should the run not finish (a
    later output failing, an error, Ctrl-C or SIGTERM): never a volume without its poses or the
    other way round."""

    def __init__(self):
        self.files: list[Path] = []
        self.folders: list[Path] = []

    def file(self, path) -> None:
        self.files.append(Path(path))

    def folder(self, path) -> Path:
        """``path`` as a folder of this run's outputs; created here (and so removed whole on failure)
        unless it exists."""
        folder = Path(path)
        if not folder.exists():
            folder.mkdir(parents=True)
            self.folders.append(folder)
        return folder

    def remove(self) -> None:
        for f in reversed(self.files):
            with contextlib.suppress(OSError):
                f.unlink()
        for d in reversed(self.folders):
            shutil.rmtree(d, ignore_errors=True)
        self.files, self.folders = [], []


def _transforms_record(prep: Prepared, result, extra: dict) -> dict:
    ss = prep.slices
    poses = result.poses.detach().double().cpu().numpy()
    per_stack = [poses[ss.stack_slices[s]:ss.stack_slices[s + 1]] for s in range(ss.n_stacks)]
    return io.poses_to_json(prep.stacks, per_stack, extra={
        "template": prep.template,
        "slice_weights": [result.slice_weights[ss.stack_slices[s]:ss.stack_slices[s + 1]].cpu().tolist() for s in range(ss.n_stacks)],
        "slice_scales": [result.scales[ss.stack_slices[s]:ss.stack_slices[s + 1]].cpu().tolist() for s in range(ss.n_stacks)],
        **extra,
    })


def _write_results(args, prep: Prepared, result, inputs: list[str], extra: dict,
                   outputs: _RunOutputs | None = None) -> Volume:
    """Write the volume, then the poses JSON and the simulated slices; should any fail (or the
    run be interrupted) every output of the run so far (``outputs``) is removed."""
    vol = crop_to_roi(Volume(result.volume.data * prep.roi, prep.affine, prep.roi), prep.roi)
    vol_cpu = Volume(vol.data.cpu(), vol.affine)
    finite = torch.isfinite(vol_cpu.data)
    if not bool(finite.all()):  # e.g. a grid too coarse for the slices: never write a NaN volume
        n_bad = int(finite.numel() - finite.sum())
        raise Slice2VolError(f"reconstruction produced non-finite values ({n_bad} of {finite.numel()} voxels are "
                             f"NaN or Inf); nothing was written")
    vol_cpu = _to_output_space(args, vol_cpu, vol.mask.cpu() if vol.mask is not None else None, extra)
    outputs = _RunOutputs() if outputs is None else outputs
    try:
        outputs.file(io.save_volume(vol_cpu, args.output, protect=inputs))
        if getattr(args, "output_dicom", None):
            outputs.folders.append(_write_dicom(args, prep, vol_cpu, inputs))
        if getattr(args, "output_transforms", None):
            outputs.file(io.write_json(_transforms_record(prep, result, extra), args.output_transforms,
                                       protect=inputs))
        if getattr(args, "output_simulated", None):
            out_dir = outputs.folder(args.output_simulated)
            images = prep.slices.to_images(result.simulated.detach())
            for st, img in zip(prep.stacks, images):
                name = st.name.split(".nii")[0]
                outputs.file(io.save_stack(st, out_dir / f"simulated_{name}.nii.gz", data=img.cpu(), protect=inputs))
    except BaseException:
        outputs.remove()
        raise
    return vol_cpu


def _to_output_space(args, vol: Volume, roi, extra: dict) -> Volume:
    """``--output-space atlas``: the volume registered to the shipped fetal atlas and resampled on its
    axes (slice2vol.methods.atlas); records the space, week, NCC and the scanner -> atlas transform in
    ``extra`` (the poses in the transforms JSON stay in the scanner world).  Where the registration's
    reliability check fails (:attr:`~slice2vol.methods.atlas.AtlasRegistration.reliable`) the volume
    stays in the scanner frame, with a warning, ``output_space`` "scanner" and
    ``output_space_requested`` "atlas"."""
    space = getattr(args, "output_space", "scanner")
    extra["output_space"] = space
    if space != "atlas":
        return vol
    from slice2vol.methods.atlas import register_to_atlas, to_atlas_space

    t0 = time.perf_counter()
    reg = register_to_atlas(vol, roi)
    extra["atlas"] = {**reg.to_dict(), "atlas": "CRL 2017 fetal brain atlas (Gholipour et al. 2017), symmetrised",
                      "poses_frame": "scanner (map them with transform_scanner_to_atlas)"}
    if not reg.reliable:
        # a failed reliability check (a brain cut by the field of view is the usual cause): a volume
        # on the wrong "standard" planes reads as a plausible brain; the scanner frame is at least
        # what was acquired
        extra["output_space"] = "scanner"
        extra["output_space_requested"] = "atlas"
        extra.setdefault("timings_s", {})["atlas_s"] = time.perf_counter() - t0
        log.warning("atlas space refused: %s, so the placement cannot be trusted (is the whole brain inside the "
                    "volume?); the volume is written in the scanner frame (the attempted transform is under 'atlas' "
                    "in --output-transforms)", "; ".join(reg.doubts()))
        return vol
    out = to_atlas_space(vol, reg.transform, args.resolution, mask=roi)
    extra.setdefault("timings_s", {})["atlas_s"] = time.perf_counter() - t0
    print(f"slice2vol: atlas space: estimated gestational week {reg.week} (NCC {reg.score:.3f}), "
          f"registered and resampled in {time.perf_counter() - t0:.1f} s")
    return Volume(out.data, out.affine)


def _write_dicom(args, prep: Prepared, vol: Volume, inputs: list[str]) -> Path:
    """``--output-dicom``: the volume just saved as NIfTI (same data, same grid) as a derived MR
    series, carrying the patient/study/frame of reference of the template stack's series (or of
    the first DICOM stack; anonymous with new UIDs when no stack was DICOM)."""
    from slice2vol.io.dicom import write_series

    dicom_stacks = [st for st in prep.stacks if "dicom" in st.meta]
    template = prep.stacks[prep.template] if prep.template is not None else None
    source = template if template is not None and "dicom" in template.meta else (dicom_stacks or [None])[0]
    meta = source.meta["dicom"] if source is not None else None
    numbers = [st.meta["dicom"].get("SeriesNumber") for st in dicom_stacks]
    numbers = [n for n in numbers if isinstance(n, int)]
    method = getattr(args, "method", "auto")
    return write_series(vol.data.numpy(), vol.affine, args.output_dicom, source=meta,
                        series_number=(max(numbers) if numbers else 0) + 1000,
                        description=f"slice2vol {method} {args.resolution:g}mm",
                        comment=f"slice-to-volume reconstruction of {len(prep.stacks)} stacks (slice2vol, method "
                                f"{method}, {args.resolution:g} mm)", protect=inputs)


def read_stack_inputs(args: argparse.Namespace) -> tuple[list, Volume | None]:
    """The stacks (``STACK... --thickness --stack-masks --series-description``) and the world-space
    ``--mask`` of ``reconstruct`` / ``assess``, the stack set checked (a stack given twice; a stack
    far from the others)."""
    stacks = io.load_stacks(args.stacks, args.thickness, args.stack_masks,
                            series_description=getattr(args, "series_description", None))
    mask = io.load_world_mask(args.mask) if args.mask else None
    io.check_stack_set(stacks)
    return stacks, mask


def reconstruct_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    seed_everything(args.seed)
    inputs = list(args.stacks) + list(args.stack_masks or []) + ([args.mask] if args.mask else [])
    _outputs(args, inputs)
    stacks, mask = read_stack_inputs(args)
    t0 = time.perf_counter()
    stages.reset(sync=device.type == "cuda" and getattr(args, "profile", False))  # --profile's stage timer
    # stacks that clearly disagree with the rest are left out (args narrowed to the kept ones)
    from slice2vol.cli.assess import select_stacks
    _method_options(args)  # refuse bad options (e.g. --packages per stack) before the assessment's work
    with stages.stage("selection"):
        stacks, selection = select_stacks(args, stacks, mask, device)
    prep, result, timings = run_reconstruction(
        stacks, resolution=args.resolution, method=args.method, mask=mask, have_stack_masks=bool(args.stack_masks),
        template=args.template, bias_field=args.bias_field, iterations=args.iterations, device=device,
        detect_signal_loss=not getattr(args, "keep_dark_pixels", False),
        inplane=getattr(args, "inplane_resolution", "auto"),
        progress=not args.no_progress, options=_method_options(args))
    timings["selection_s"] = selection["time_s"]
    timings["total_s"] += selection["time_s"]
    from slice2vol.evaluation.metrics import slice_consistency
    from slice2vol.report import report_record

    before = naive_consistency(prep, per_slice=True)
    after = slice_consistency(prep.slices, result.simulated.detach(), per_slice=True)
    import sys

    from slice2vol.evaluation.quality import assess_quality, slice_counts

    quality = assess_quality(prep, result, before_ncc=before["per_slice"]["ncc"])
    counts = slice_counts(prep.slices, result.slice_weights)
    # the time the JSON records is the time the CLI prints: preparation + method + these checks
    timings["checks_s"] = time.perf_counter() - t0 - timings.pop("total_s")
    timings["total_s"] = time.perf_counter() - t0
    timings["stages_s"] = _stage_times(timings["total_s"])
    extra = {"slice_consistency": {"before": _summary(before), "after": _summary(after)},
             "timings_s": timings, "method": args.method, "resolution_mm": args.resolution,
             "slices": counts, "quality": quality.to_dict(), "stack_selection": selection,
             "signal_loss": prep.signal_loss, "inplane_resolution": prep.inplane, "layout": prep.layout,
             "noise": {**(prep.noise or {}), "regularisation": getattr(result, "regularisation", None),
                       "edge_threshold": getattr(result, "edge_threshold", None)},
             "turns": turns_record(prep, result)}
    extra.update(report_record(args, prep, before, after))
    # Every output is written last; should one fail (or Ctrl-C / SIGTERM come) the others of this
    # run are removed, so no poses JSON or report is left pointing at a volume that is not there.
    outputs = _RunOutputs()
    try:
        if getattr(args, "output_gaussians", None):
            from slice2vol.methods.gaussian.model import save_gaussians

            save_gaussians(result.gaussians, args.output_gaussians, protect=inputs,
                           meta={"affine": prep.affine.tolist(), "shape": list(prep.shape),
                                 "resolution": args.resolution})
            outputs.file(args.output_gaussians)
        vol = _write_results(args, prep, result, inputs, extra, outputs)
        if getattr(args, "report", None):
            from slice2vol.report import write_report

            outputs.folder(args.report)
            page = write_report(args.report, prep, result, vol, before, after,
                                title=f"slice2vol reconstruction: {Path(args.output).name}",
                                record=_transforms_record(prep, result, extra), protect=inputs)
            print(f"slice2vol: wrote report {page}")
    except BaseException:
        outputs.remove()
        raise
    print(f"slice2vol: wrote {args.output} ({'x'.join(map(str, vol.shape))} at {args.resolution} mm); "
          f"reconstructed in {timings['total_s']:.1f} s on {device.type} (outputs written in "
          f"{time.perf_counter() - t0 - timings['total_s']:.1f} s); {counts['excluded']} of {counts['with_pixels']} "
          f"slices with pixels excluded as outliers ({counts['total']} slices in the stacks)")
    print(f"slice consistency (acquired vs simulated slices), before -> after: "
          f"SSIM {before['ssim']:.3f} -> {after['ssim']:.3f}, PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, "
          f"NCC {before['ncc']:.3f} -> {after['ncc']:.3f}")
    # the verdict (slice2vol.evaluation.quality): ok on stdout, doubtful / failed as a warning on stderr;
    # --strict turns a failed verdict into exit status 3, after every output is written
    if quality.verdict == "ok":
        print(quality.line())
    else:
        print(quality.line(), file=sys.stderr)
    if getattr(args, "profile", False):
        print(_profile_table(timings, device))
    if getattr(args, "strict", False) and quality.verdict == "failed":
        return 3
    return 0


def _stage_times(total_s: float) -> dict:
    """Exclusive seconds per stage (slice2vol.core.stages) of this run; the rest (the CLI's
    consistency and quality checks, glue) is ``checks and other``."""
    snap = {k: round(v["seconds"], 3) for k, v in stages.snapshot().items()}
    snap["checks and other"] = round(max(0.0, total_s - sum(snap.values())), 3)
    return snap


def _profile_table(timings: dict, device: torch.device) -> str:
    """``--profile``: where the run's time went, by stage, largest first."""
    from slice2vol.core.acquisition import backend

    st = timings.get("stages_s", {})
    total = timings["total_s"]
    rows = [f"slice2vol: profile: {total:.1f} s on {device.type} ({torch.get_num_threads()} threads; acquisition "
            f"operators: {backend(device)}), exclusive time per stage:"]
    for name, sec in sorted(st.items(), key=lambda kv: -kv[1]):
        rows.append(f"  {name:<18} {sec:8.2f} s  {100 * sec / max(total, 1e-9):5.1f} %")
    return "\n".join(rows)


def _summary(c: dict) -> dict:
    return {k: float(c[k]) for k in ("ssim", "psnr", "ncc")}


def turns_record(prep: Prepared, result) -> list[dict]:
    """The turns of the fetus SVR's turn search found (:func:`slice2vol.methods.svr._turn_round`),
    for the ``--output-transforms`` JSON: ``[{"stack", "name", "angle_deg"}]``, empty when none
    (or when the method kept no search history)."""
    out = []
    for h in getattr(result, "history", None) or []:
        if h.get("stage") == "search-turn":
            out += [{"stack": int(s), "name": prep.stacks[s].name, "angle_deg": float(a)}
                    for s, a in zip(h.get("stacks", []), h.get("angles_deg", []))]
    return out


DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


def demo_command(args: argparse.Namespace) -> int:
    """Reconstruct the bundled demo case into ``args.output`` and compare with its ground truth."""
    from slice2vol.evaluation.metrics import compare_volumes

    meta_path = DEMO_DIR / "demo.json"
    if not meta_path.exists():
        raise Slice2VolError(f"demo data missing from the installation ({DEMO_DIR})")
    meta = json.loads(meta_path.read_text())
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise Slice2VolError(f"--output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(**vars(args))
    ns.stacks = [str(DEMO_DIR / f) for f in meta["stacks"]]
    ns.stack_masks = [str(DEMO_DIR / f) for f in meta["stack_masks"]]
    ns.mask = None
    ns.thickness = meta.get("thickness")
    ns.template = None
    ns.output = str(out_dir / "recon.nii.gz")
    ns.output_transforms = ns.output_transforms or str(out_dir / "transforms.json")
    ns.report = ns.report or str(out_dir / "report")
    reconstruct_command(ns)
    gt = io.load_volume(DEMO_DIR / meta["ground_truth"], DEMO_DIR / meta["ground_truth_mask"])
    recon = io.load_volume(ns.output)
    m = compare_volumes(recon, gt, align=True, scale=True)
    io.write_json({k: v for k, v in m.items() if k != "transform"} | {"transform": np.asarray(m["transform"]).tolist()},
                  out_dir / "metrics.json")
    print(f"demo: against the ground truth (rigidly aligned, linear intensity fit, brain mask): "
          f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, NRMSE {m['nrmse']:.3f}; outputs in {out_dir}")
    return 0
