#!/usr/bin/env python
"""SVR benchmark on simulated cases with ground truth: image quality, pose error, time, memory.

For every atlas x seed the parent process

1. simulates 3 orthogonal stacks (axial, coronal, sagittal; 1 mm in-plane, 3 mm thick, ``--motion``,
   Rician noise 0.02) from a CRL 2017 atlas with :func:`slice2vol.simulate.simulate_stacks` and
   writes them (float32 NIfTI, masks, true poses) with :func:`slice2vol.simulate.save_simulation`;
2. runs one *worker subprocess* per case (fresh process, so its peak RSS belongs to that case
   alone) which reads the stacks as the CLI would and

   * reconstructs with SVR: ``commands.run_reconstruction(..., method="svr", have_stack_masks=True)``
     -- timed (wall clock, preparation + method, excluding I/O, simulation and evaluation), peak
     RSS of the process (``VmHWM``, reset just before the reconstruction where Linux allows it,
     else ``ru_maxrss``) and on CUDA ``torch.cuda.max_memory_allocated``;
   * builds the naive motion-blind baseline: the PSF-weighted average (``reconstruction.psf_average``)
     of the intensity-normalised slices at their *header* poses on the same grid, exactly as
     ``commands.naive_consistency`` does (timed separately);
   * evaluates both against the ground truth with ``metrics.compare_volumes(..., align=True,
     scale=True)`` inside the atlas brain mask (PSNR, SSIM, NRMSE, NCC), the slice TRE
     (``metrics.slice_tre`` / ``tre_summary``, global rigid motion removed, on the masked pixels)
     of the header poses, the stack-registered poses and the SVR poses against the simulator's
     true poses (matched by stack order and slice index), and the slice consistency before
     (``naive_consistency``) and after SVR.

The parent prints a per-case table and a summary (mean +- sd) with the targets
(PSNR gain of SVR over naive >= 6 dB, time <= 60 s, memory <= 4 GB) and writes ``results.csv``,
``results.json`` and ``results.md`` into ``--output``.

    python benchmarks/bench_svr.py                                   # STA23, STA29, STA35 x seeds 0, 1
    python benchmarks/bench_svr.py --atlases STA30 --seeds 0 --output bench_out/svr_quick
    python benchmarks/bench_svr.py --motion severe --device cuda --iterations 3
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _memory import peak_rss_mb, reset_peak_rss, status_mb

DEFAULT_DATA = Path(os.environ.get("SLICE2VOL_SHARED") or Path(__file__).resolve().parents[2] / "shared" / "data")
TARGETS = {"psnr_gain_db": 6.0, "time_s": 60.0, "memory_gb": 4.0}
GT_MARGIN_VOX = 5  # ground truth cropped to the brain + 4 mm (registration for --align is then faster)


# ----------------------------------------------------------------------------------- memory


# ----------------------------------------------------------------------------------- worker


def worker(case_dir: Path, args) -> dict:
    """Reconstruct one simulated case (in its own process) and evaluate it; returns a JSON-ready dict."""
    import torch

    from slice2vol import io
    from slice2vol import acquisition as acq
    from slice2vol.commands import crop_to_roi, naive_consistency, run_reconstruction
    from slice2vol.image import SliceSet, Volume
    from slice2vol.metrics import compare_volumes, match_poses, slice_consistency, slice_tre, tre_summary
    from slice2vol.reconstruction import psf_average
    from slice2vol.runtime import resolve_device, seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    seed_everything(0)
    meta = json.loads((case_dir / "case.json").read_text())
    stacks = io.load_stacks([case_dir / f for f in meta["stacks"]], meta["thickness"],
                            [case_dir / f for f in meta["stack_masks"]])

    # ---- SVR (timed, memory)
    rss_before = (status_mb("VmRSS") or 0)  # after imports and reading the stacks
    hwm_reset = reset_peak_rss()  # if False, the peak below is the whole process's
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    prep, result, timings = run_reconstruction(stacks, resolution=args.resolution, method="svr", have_stack_masks=True,
                                               iterations=args.iterations, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    svr_s = time.perf_counter() - t0
    peak_rss = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    # ---- naive motion-blind baseline: as commands.naive_consistency builds it (timed separately)
    t1 = time.perf_counter()
    header = SliceSet.from_stacks(prep.stacks, device=prep.slices.device)
    res = float(np.linalg.norm(prep.affine[:3, :3], axis=0).mean())
    psf = acq.psf_kernel(header.spacing, header.thickness, res)
    V0 = psf_average(header.values, torch.ones_like(header.values), prep.shape, prep.affine, header.poses,
                     header.coords, header.slice_id, psf)
    if device.type == "cuda":
        torch.cuda.synchronize()
    naive_s = time.perf_counter() - t1

    # ---- outputs on the ROI grid, as the CLI writes them
    def roi_volume(data):
        v = crop_to_roi(Volume(data * prep.roi, prep.affine, prep.roi), prep.roi)
        return Volume(v.data.detach().float().cpu(), v.affine)

    vol_svr, vol_naive = roi_volume(result.volume.data), roi_volume(V0)
    if args.save_volumes:
        io.save_volume(vol_svr, case_dir / "svr.nii.gz")
        io.save_volume(vol_naive, case_dir / "naive.nii.gz")

    # ---- image metrics against the ground truth (on the CPU)
    gt = io.load_volume(case_dir / meta["ground_truth"], case_dir / meta["ground_truth_mask"])
    m_svr = compare_volumes(vol_svr, gt, align=True, scale=True)
    m_naive = compare_volumes(vol_naive, gt, align=True, scale=True)

    # ---- slice TRE against the simulator's true poses (stack order + slice index)
    gt_poses = io.load_poses_json(case_dir / "gt_poses.json")
    ss = prep.slices  # masked pixels; slices in (stack, ascending index) order, as match_poses orders them
    assert all(np.array_equal(np.sort(st.index), st.index) for st in prep.stacks)

    def tre(poses):
        P = poses.detach().double().cpu().numpy()
        est = [{"index": st.index, "poses": P[ss.stack_slices[s]:ss.stack_slices[s + 1]]}
               for s, st in enumerate(prep.stacks)]
        match = match_poses(est, gt_poses)
        assert match.est.shape[0] == ss.n_slices
        per_slice = slice_tre(match.est, match.gt, ss.coords.double().cpu(), ss.slice_id.cpu(), align=True)
        return tre_summary(per_slice, match.stack_id)

    tre_header = tre(header.poses)
    tre_stack = tre(ss.poses)
    tre_svr = tre(result.poses)

    # ---- slice consistency before / after
    before = naive_consistency(prep)
    after = slice_consistency(ss, result.simulated.detach())

    has_pixels = torch.zeros(ss.n_slices, dtype=torch.bool, device=ss.device)
    has_pixels[ss.slice_id] = True
    keys = ("psnr", "ssim", "nrmse", "ncc", "fov_coverage")
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "svr_time_s": svr_s, "prepare_s": timings["prepare_s"], "method_s": timings["method_s"],
        "naive_time_s": naive_s,
        "peak_rss_mb": peak_rss, "rss_before_mb": rss_before, "peak_rss_reset": hwm_reset,
        "gpu_peak_mb": gpu_peak,
        "grid": list(prep.shape), "pixels": ss.n_pixels, "slices": ss.n_slices, "template": prep.template,
        "excluded_slices": int(((result.slice_weights < 0.5) & has_pixels).sum()),  # as the CLI counts them
        "naive": {k: m_naive[k] for k in keys},
        "svr": {k: m_svr[k] for k in keys},
        "tre_header": tre_header, "tre_stackreg": tre_stack, "tre_svr": tre_svr,
        "consistency_before": {k: before[k] for k in ("ssim", "psnr", "ncc")},
        "consistency_after": {k: after[k] for k in ("ssim", "psnr", "ncc")},
    }


# ----------------------------------------------------------------------------------- parent


def simulate_case(atlas: str, seed: int, args, case_dir: Path) -> dict:
    """Simulate one case into ``case_dir`` (stacks, masks, true poses, cropped ground truth)."""
    from slice2vol import io
    from slice2vol.commands import crop_to_roi
    from slice2vol.runtime import seed_everything
    from slice2vol.simulate import SimulationConfig, save_simulation, simulate_stacks

    adir = args.data / "fetal_atlases" / "crl2017" / atlas
    volume = io.load_volume(adir / "t2.nii.gz", adir / "mask.nii.gz")
    config = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=1.0,
                              thickness=args.thickness, motion=args.motion, noise=args.noise)
    t0 = time.perf_counter()
    sim = simulate_stacks(volume, None, config, seed_everything(seed), progress=False)
    sim_s = time.perf_counter() - t0
    save_simulation(sim, case_dir)
    gt = crop_to_roi(volume, volume.mask, GT_MARGIN_VOX)
    io.save_volume(gt, case_dir / "gt.nii.gz")
    io.save_volume(gt.mask.numpy().astype(np.uint8), case_dir / "gt_mask.nii.gz", gt.affine, dtype=np.uint8)
    meta = {"atlas": atlas, "seed": seed, "stacks": [st.name for st in sim.stacks],
            "stack_masks": [f"mask_{s:02d}.nii.gz" for s in range(len(sim.stacks))],
            "thickness": [args.thickness] * len(sim.stacks), "ground_truth": "gt.nii.gz",
            "ground_truth_mask": "gt_mask.nii.gz", "simulation_s": sim_s, "config": config.to_dict(),
            "stack_shapes": [list(st.slices.shape) for st in sim.stacks]}
    (case_dir / "case.json").write_text(json.dumps(meta, indent=1))
    return meta


def run_case(atlas: str, seed: int, args) -> dict:
    case_dir = args.output / "cases" / f"{atlas}_seed{seed}"
    case_dir.mkdir(parents=True, exist_ok=True)
    meta = simulate_case(atlas, seed, args, case_dir)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(case_dir), "--device", args.device,
           "--resolution", str(args.resolution)]
    if args.iterations is not None:
        cmd += ["--iterations", str(args.iterations)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.save_volumes:
        cmd += ["--save-volumes"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"atlas": atlas, "seed": seed, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                f"worker exit {proc.returncode}"}
    out = json.loads((case_dir / "worker.json").read_text())
    out.update(atlas=atlas, seed=seed, simulation_s=meta["simulation_s"], worker_wall_s=wall,
               stack_shapes=meta["stack_shapes"])
    return out


def flat_row(r: dict) -> dict:
    """One CSV row per case."""
    if "error" in r:
        return {"atlas": r["atlas"], "seed": r["seed"], "error": r["error"]}
    row = {"atlas": r["atlas"], "seed": r["seed"], "device": r["device"], "threads": r["threads"]}
    for m in ("naive", "svr"):
        for k in ("psnr", "ssim", "nrmse", "ncc"):
            row[f"{m}_{k}"] = r[m][k]
    row["psnr_gain_db"] = r["svr"]["psnr"] - r["naive"]["psnr"]
    for t in ("tre_header", "tre_stackreg", "tre_svr"):
        row[f"{t}_median_mm"] = r[t]["median"]
        row[f"{t}_mean_mm"] = r[t]["mean"]
    row["tre_svr_p90_mm"] = r["tre_svr"]["p90"]
    for k in ("ssim", "psnr", "ncc"):
        row[f"consistency_before_{k}"] = r["consistency_before"][k]
        row[f"consistency_after_{k}"] = r["consistency_after"][k]
    row.update(svr_time_s=r["svr_time_s"], prepare_s=r["prepare_s"], method_s=r["method_s"],
               naive_time_s=r["naive_time_s"], peak_rss_mb=r["peak_rss_mb"], rss_before_mb=r["rss_before_mb"],
               gpu_peak_mb=r["gpu_peak_mb"], excluded_slices=r["excluded_slices"], slices=r["slices"],
               pixels=r["pixels"], grid="x".join(map(str, r["grid"])), simulation_s=r["simulation_s"])
    return row


COLUMNS = [  # (header, key, format)
    ("case", None, None),
    ("PSNR naive", "naive_psnr", ".2f"), ("PSNR SVR", "svr_psnr", ".2f"), ("gain dB", "psnr_gain_db", "+.2f"),
    ("SSIM naive", "naive_ssim", ".3f"), ("SSIM SVR", "svr_ssim", ".3f"),
    ("NRMSE naive", "naive_nrmse", ".3f"), ("NRMSE SVR", "svr_nrmse", ".3f"),
    ("TRE hdr mm", "tre_header_median_mm", ".2f"), ("TRE stk mm", "tre_stackreg_median_mm", ".2f"),
    ("TRE SVR mm", "tre_svr_median_mm", ".2f"),
    ("time s", "svr_time_s", ".1f"), ("peak RSS MB", "peak_rss_mb", ".0f"), ("excl", "excluded_slices", "d"),
]


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def table(rows: list[dict], markdown: bool = False) -> str:
    heads = [h for h, _, _ in COLUMNS]
    body = []
    for r in rows:
        if "error" in r:
            body.append([f"{r['atlas']}/s{r['seed']}", f"ERROR: {r['error']}"] + [""] * (len(COLUMNS) - 2))
            continue
        body.append([f"{r['atlas']}/s{r['seed']}"] + [_fmt(r[k], f) for _, k, f in COLUMNS[1:]])
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def summary(rows: list[dict]) -> tuple[dict, str]:
    ok = [r for r in rows if "error" not in r]
    stats = {}
    keys = ["naive_psnr", "svr_psnr", "psnr_gain_db", "naive_ssim", "svr_ssim", "naive_nrmse", "svr_nrmse",
            "tre_header_median_mm", "tre_stackreg_median_mm", "tre_svr_median_mm", "consistency_before_ssim",
            "consistency_after_ssim", "svr_time_s", "naive_time_s", "peak_rss_mb"]
    if any(r.get("gpu_peak_mb") is not None for r in ok):
        keys.append("gpu_peak_mb")
    for k in keys:
        v = np.array([r[k] for r in ok if r.get(k) is not None], dtype=float)
        if v.size:
            stats[k] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                        "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
    lines = [f"Summary over {len(ok)} case(s) ({len(rows) - len(ok)} failed): mean +- sd [min, max]"]
    names = {"naive_psnr": "PSNR naive (dB)", "svr_psnr": "PSNR SVR (dB)", "psnr_gain_db": "PSNR gain SVR - naive (dB)",
             "naive_ssim": "SSIM naive", "svr_ssim": "SSIM SVR", "naive_nrmse": "NRMSE naive", "svr_nrmse": "NRMSE SVR",
             "tre_header_median_mm": "TRE header poses (mm, median)",
             "tre_stackreg_median_mm": "TRE after stack registration (mm)", "tre_svr_median_mm": "TRE SVR (mm, median)",
             "consistency_before_ssim": "slice consistency SSIM before", "consistency_after_ssim": "slice consistency SSIM after",
             "svr_time_s": "SVR wall time (s)", "naive_time_s": "naive baseline time (s)",
             "peak_rss_mb": "peak RSS (MB)", "gpu_peak_mb": "peak CUDA memory (MB)"}
    for k, s in stats.items():
        lines.append(f"  {names[k]:<36} {s['mean']:9.3f} +- {s['sd']:7.3f}  [{s['min']:.3f}, {s['max']:.3f}]")
    if ok:
        gain_ok = all(r["psnr_gain_db"] >= TARGETS["psnr_gain_db"] for r in ok)
        time_ok = all(r["svr_time_s"] <= TARGETS["time_s"] for r in ok)
        mem = [r["gpu_peak_mb"] if r.get("gpu_peak_mb") is not None else r["peak_rss_mb"] for r in ok]
        mem_ok = all(m / 1024 <= TARGETS["memory_gb"] for m in mem)
        lines.append("Targets (every case): "
                     f"PSNR gain >= {TARGETS['psnr_gain_db']:g} dB: {'PASS' if gain_ok else 'FAIL'} "
                     f"(min {min(r['psnr_gain_db'] for r in ok):+.2f}); "
                     f"time <= {TARGETS['time_s']:g} s: {'PASS' if time_ok else 'FAIL'} "
                     f"(max {max(r['svr_time_s'] for r in ok):.1f}); "
                     f"memory <= {TARGETS['memory_gb']:g} GB: {'PASS' if mem_ok else 'FAIL'} "
                     f"(max {max(mem) / 1024:.2f} GB)")
        stats["targets"] = {"psnr_gain": gain_ok, "time": time_ok, "memory": mem_ok}
    return stats, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SVR vs naive baseline on simulated atlas cases (quality, TRE, time, memory).")
    ap.add_argument("--atlases", nargs="+", default=["STA23", "STA29", "STA35"], help="CRL 2017 weeks (default: %(default)s)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="simulation seeds (default: 0 1)")
    ap.add_argument("--motion", default="moderate", help="simulated motion level (default: moderate)")
    ap.add_argument("--noise", type=float, default=0.02, help="Rician noise, relative (default: 0.02)")
    ap.add_argument("--thickness", type=float, default=3.0, help="slice thickness mm (default: 3)")
    ap.add_argument("--resolution", type=float, default=0.8, help="reconstruction voxel size mm (default: 0.8)")
    ap.add_argument("--iterations", type=int, default=None, help="SVR outer iterations (default: the method's)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="(default: cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in the worker (default: torch's)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default: %(default)s)")
    ap.add_argument("--output", type=Path, default=Path("bench_out/svr"), help="output folder (default: %(default)s)")
    ap.add_argument("--save-volumes", action="store_true", help="keep svr.nii.gz / naive.nii.gz in each case folder")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        res = worker(args.worker, args)
        (args.worker / "worker.json").write_text(json.dumps(res, indent=1, default=float))
        return 0

    args.output.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"slice2vol SVR benchmark: {len(args.atlases)} atlas(es) x {len(args.seeds)} seed(s), motion {args.motion}, "
          f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results, rows = [], []
    for atlas in args.atlases:
        for seed in args.seeds:
            print(f"-- {atlas} seed {seed}: simulating + reconstructing ...", flush=True)
            r = run_case(atlas, seed, args)
            results.append(r)
            row = flat_row(r)
            rows.append(row)
            if "error" in r:
                print(f"   FAILED: {r['error']}", flush=True)
            else:
                print(f"   naive PSNR {row['naive_psnr']:.2f} dB -> SVR {row['svr_psnr']:.2f} dB "
                      f"({row['psnr_gain_db']:+.2f}), SSIM {row['naive_ssim']:.3f} -> {row['svr_ssim']:.3f}, "
                      f"TRE {row['tre_header_median_mm']:.2f} -> {row['tre_svr_median_mm']:.2f} mm, "
                      f"{row['svr_time_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    print()
    print(table(rows))
    stats, text = summary(rows)
    print()
    print(text)

    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(args.output / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (args.output / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "environment": env, "targets": TARGETS,
         "cases": results, "summary": stats}, indent=1, default=float))
    (args.output / "results.md").write_text(
        f"# SVR benchmark ({args.motion} motion, device {args.device})\n\n{table(rows, markdown=True)}\n\n```\n{text}\n```\n")
    print(f"\nwrote {args.output / 'results.csv'}, results.json, results.md")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
