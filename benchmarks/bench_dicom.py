#!/usr/bin/env python
"""DICOM input (issue 14): ``reconstruct`` on DICOM series gives the volume it gives on the NIfTI stacks.

Per TEST atlas (``slice2vol.simulation.splits``; the first three by default): three stacks, axial,
coronal and sagittal planes each tilted once more by up to 20 deg about a random in-plane axis
(oblique, no gantry tilt), 1 mm x 3 mm, moderate motion, 2% noise.  Each stack is written as a
DICOM MR series (uint16 + RescaleSlope, :func:`slice2vol.io.dicom.write_series` with the voxel order
kept), all three into ONE folder with shuffled random file names, and read back through
``--series-description 'T2*'``.  Three reconstructions, same seed, default method, one torch thread:

* ``nifti``: the simulated float32 NIfTI stacks;
* ``dicom``: the DICOM folder;
* ``nifti-q``: NIfTI stacks holding exactly the DICOM's rescaled values (read with pydicom
  alone, by InstanceNumber, on the NIfTI's own affine): it isolates the geometry from the 16-bit
  quantisation, so ``dicom`` and ``nifti-q`` should agree voxel for voxel (``nifti-q`` is given
  ``--thickness 3``, the series' SliceThickness; the NIfTI's float32 slice spacing is 3 +- 1e-7).

PSNR against the ground truth is ``slice2vol evaluate --reference GT --mask M --align``.

``--writer simpleitk`` writes the series with SimpleITK's GDCM writer instead, the way SimpleITK's
DICOM-series example does (one 2D int16 slice per file, position and orientation as metadata, no
SliceThickness, so the thickness comes from the slice positions; GDCM adds a SpacingBetweenSlices
of 1), an independent writer; the int16 values are the stack times one factor per stack.

    python benchmarks/bench_dicom.py --output bench_out/dicom
    python benchmarks/bench_dicom.py --output bench_out/dicom --writer simpleitk --save benchmarks/results/dicom_simpleitk_cpu.txt
"""
from __future__ import annotations

import argparse
import json
import locale
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from slice2vol.io import dicom, load_volume, shared_data_dir
from slice2vol.simulation.simulate import SimulationConfig, save_simulation, simulate_stacks
from slice2vol.simulation.splits import split_atlases

CLI = [sys.executable, "-m", "slice2vol.cli.parser"]
STUDY = {"PatientName": "Bench^Dicom", "PatientID": "BENCH1", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1",
         "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.2", "StudyDate": "20260101"}


def write_simpleitk(stack: Path, series: Path, number: int) -> None:
    """One int16 2D image per file through SimpleITK's GDCM writer (its DICOM-series example's recipe)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(stack), sitk.sitkFloat32)
    factor = 30000.0 / float(np.abs(sitk.GetArrayViewFromImage(img)).max())
    img = sitk.Cast(sitk.Round(img * factor), sitk.sitkInt16)
    d = img.GetDirection()
    tags = {"0010|0010": STUDY["PatientName"], "0010|0020": STUDY["PatientID"],
            "0020|000d": STUDY["StudyInstanceUID"], "0020|000e": f"{STUDY['StudyInstanceUID']}.{number}",
            "0008|0020": STUDY["StudyDate"], "0008|0060": "MR", "0008|103e": f"T2 stack {number - 1}",
            "0020|0011": str(number), "0020|0037": "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))}
    series.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves LC_CTYPE at "C"
    try:
        for k in range(img.GetDepth()):
            s = img[:, :, k]
            for tag, value in tags.items():
                s.SetMetaData(tag, value)
            s.SetMetaData("0020|0013", str(k + 1))
            s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
            writer.SetFileName(str(series / f"{k:04d}.dcm"))
            writer.Execute(s)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def make_case(atlas: str, out: Path, data: Path, seed: int, writer: str = "slice2vol") -> Path:
    case = out / (atlas if writer == "slice2vol" else f"{atlas}_{writer}")
    if (case / "nifti" / "gt_poses.json").is_file():
        return case
    folder = data / "fetal_atlases" / "spina_bifida2021" / atlas
    gt = load_volume(folder / "t2.nii.gz", mask=folder / "mask.nii.gz")
    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), stack_tilt_max=20.0,
                           motion="moderate", noise=0.02)
    save_simulation(simulate_stacks(gt, gt.mask, cfg, seed), case / "nifti")
    exam = case / "exam"
    rng = random.Random(seed)
    for k in range(3):
        img = nib.load(case / "nifti" / f"stack_{k:02d}.nii.gz")
        series = case / f"series_{k}"
        if writer == "simpleitk":
            write_simpleitk(case / "nifti" / f"stack_{k:02d}.nii.gz", series, k + 1)
        else:
            dicom.write_series(img.get_fdata(), img.affine, series, description=f"T2 stack {k}",
                               series_number=k + 1, source=STUDY, derived=False, reorient=False, thickness=3.0)
        exam.mkdir(exist_ok=True)
        for f in sorted(series.iterdir()):  # one folder for the three series, random names in no order
            f.rename(exam / f"{rng.getrandbits(48):012x}")
        series.rmdir()
        # the same values as a NIfTI on the simulation's own affine: pydicom alone, by InstanceNumber
        import pydicom
        from pydicom.pixels import apply_modality_lut

        values = np.zeros(img.shape, np.float32)
        for f in exam.iterdir():
            ds = pydicom.dcmread(f)
            if int(ds.SeriesNumber) == k + 1:
                values[:, :, int(ds.InstanceNumber) - 1] = apply_modality_lut(ds.pixel_array, ds).T
        nib.save(nib.Nifti1Image(values, img.affine), case / "nifti" / f"q_{k:02d}.nii.gz")
    return case


def reconstruct(case: Path, kind: str, stacks: list[str], extra: list[str]) -> dict:
    out = case / kind
    vol = out / "recon.nii.gz"
    if not vol.is_file():
        out.mkdir(exist_ok=True)
        masks = [str(case / "nifti" / f"mask_{k:02d}.nii.gz") for k in range(3)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.perf_counter()
        p = subprocess.run([*CLI, "reconstruct", *stacks, "--stack-masks", *masks, "-o", str(vol), "--device", "cpu",
                            "--seed", "0", "--no-progress", *extra], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit(f"reconstruct {kind} failed:\n{p.stdout}\n{p.stderr}")
        (out / "time_s.txt").write_text(f"{time.perf_counter() - t0:.1f}")
    return {"path": vol, "time_s": float((out / "time_s.txt").read_text())}


def psnr(vol: Path, atlas_dir: Path) -> float:
    js = vol.with_name("eval.json")
    if not js.is_file():
        subprocess.run([*CLI, "evaluate", str(vol), "--reference", str(atlas_dir / "t2.nii.gz"), "--mask",
                        str(atlas_dir / "mask.nii.gz"), "--align", "--device", "cpu", "--json", str(js)],
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(json.loads(js.read_text())["image"]["psnr"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="work folder (reused: finished runs are not redone)")
    ap.add_argument("--atlases", nargs="+", default=list(split_atlases("test")[:3]))
    ap.add_argument("--data", default=str(shared_data_dir()))
    ap.add_argument("--save", default=str(Path(__file__).parent / "results" / "dicom_cpu.txt"),
                    help="also write the printout here ('' not to)")
    ap.add_argument("--writer", choices=("slice2vol", "simpleitk"), default="slice2vol",
                    help="who writes the DICOM series (module docstring)")
    ap.add_argument("--note", default="", help="conditions to record in the header (e.g. other load)")
    ap.add_argument("extra", nargs="*", help="reconstruct options after --")
    args = ap.parse_args()
    out, data = Path(args.output), Path(args.data)
    torch.set_num_threads(1)
    print(f"$ python benchmarks/bench_dicom.py {' '.join(sys.argv[1:])}")
    lines = [f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"load average at start {os.getloadavg()[0]:.2f}; series written by {args.writer}; reconstruct: default method, seed 0, 1 torch thread"
             f"{', ' + ' '.join(args.extra) if args.extra else ''}{'; ' + args.note if args.note else ''})",
             "", f"{'atlas':18s} {'nifti dB':>9s} {'dicom dB':>9s} {'diff dB':>8s} {'max|dicom-nifti|':>17s} "
                 f"{'max|dicom-nifti_q|':>19s} {'time nifti/dicom s':>19s}"]
    print("\n".join(lines), flush=True)
    diffs = []
    for i, atlas in enumerate(args.atlases):
        case = make_case(atlas, out, data, seed=100 + i, writer=args.writer)
        r = {"nifti": reconstruct(case, "nifti_run", [str(case / "nifti" / f"stack_{k:02d}.nii.gz") for k in range(3)],
                                  args.extra),
             # the DICOM's SliceThickness is 3 where the NIfTI's float32 slice spacing is 3 +- 1e-7
             "nifti_q": reconstruct(case, "nifti_q_run", [str(case / "nifti" / f"q_{k:02d}.nii.gz") for k in range(3)]
                                    + ["--thickness", "3"], args.extra),
             "dicom": reconstruct(case, "dicom_run", [str(case / "exam"), "--series-description", "T2*"], args.extra)}
        vols = {k: nib.load(v["path"]) for k, v in r.items()}
        same_grid = {k: bool(v.shape == vols["dicom"].shape and np.allclose(v.affine, vols["dicom"].affine, atol=1e-4))
                     for k, v in vols.items()}

        def maxdiff(k):
            if not same_grid[k]:
                return "grid differs"
            d, v = vols["dicom"].get_fdata(), vols[k].get_fdata()
            if args.writer == "simpleitk" and k == "nifti":  # the int16 series hold the stacks times a factor
                d, v = d / np.abs(d).max(), v / np.abs(v).max()
            return f"{np.abs(v - d).max() / np.abs(d).max():.2e}"
        atlas_dir = data / "fetal_atlases" / "spina_bifida2021" / atlas
        p_n, p_d = psnr(r["nifti"]["path"], atlas_dir), psnr(r["dicom"]["path"], atlas_dir)
        diffs.append(p_d - p_n)
        line = (f"{atlas:18s} {p_n:9.2f} {p_d:9.2f} {p_d - p_n:+8.3f} {maxdiff('nifti'):>17s} {maxdiff('nifti_q'):>19s} "
                f"{r['nifti']['time_s']:9.1f}/{r['dicom']['time_s']:.1f}")
        lines.append(line)
        print(line, flush=True)
    lines += ["", f"PSNR dicom - nifti over {len(diffs)} cases: mean {np.mean(diffs):+.3f} dB, max |diff| "
                  f"{np.max(np.abs(diffs)):.3f} dB (target: within 0.1 dB); max|...|: largest voxel difference of "
                  f"the volumes over the DICOM volume's maximum"
                  f"{' (simpleitk: nifti and dicom volumes each divided by its maximum first)' if args.writer == 'simpleitk' else ''}"]
    print(lines[-1])
    if args.save:
        Path(args.save).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
