#!/usr/bin/env python
"""cSVR benchmark (issue 5): registration time for 3 / 6 / 9 stacks, and quality beside SVR.

Part 1, time (``--timing``): 9 stacks (axial, coronal, sagittal, repeated) are simulated once
from a spina-bifida atlas (never seen in training; 1 mm in-plane, 3 mm thick, moderate motion);
the network then registers the first 3, 6 and 9 of them.  The time is that of
:func:`slice2vol.methods.csvr.infer.register_csvr` with the model already loaded: input
normalisation (crop, resample to the model's spacing) + one forward pass, best and median of
``--repeats`` calls, on every available device.  Linear growth with the slice count shows as a
constant time per slice.

Part 2, quality (``--quality``): ``slice2vol benchmark`` on spina-bifida atlases (validation
data of the shipped model) at mild / moderate / severe motion with ``svr``, ``csvr`` (network
poses, fixed-pose SR) and ``csvr-refine`` (network poses, then classical SVR); prints TRE (cSVR
eq. 10: median over stacks of the per-slice maximum pixel error, global rigid motion removed),
PSNR and SSIM side by side per motion level, and the paired gap csvr-refine - svr.

    python benchmarks/bench_csvr.py                         # both parts
    python benchmarks/bench_csvr.py --timing --threads 2
    python benchmarks/bench_csvr.py --quality --atlases GA22_notoperated,GA27_operated --seeds 0
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VALIDATION_ATLASES = "GA22_notoperated,GA27_operated,GA32_operated"


def timing(args) -> None:
    import torch

    from slice2vol import io
    from slice2vol.benchmark import atlas_dir, default_data_dir
    from slice2vol.methods.csvr.infer import load_model, register_csvr
    from slice2vol.simulate import SimulationConfig, simulate_stacks

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else default_data_dir()
    adir = atlas_dir(data, args.timing_atlas)
    if adir is None:
        raise SystemExit(f"atlas {args.timing_atlas} not found under {data}")
    vol = io.load_volume(adir / "t2.nii.gz", adir / "mask.nii.gz")
    cfg = SimulationConfig(n_stacks=9, orientations=("axial", "coronal", "sagittal") * 3, spacing=1.0, thickness=3.0,
                           motion="moderate", noise=0.02)
    sim = simulate_stacks(vol, None, cfg, 0, progress=False)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"cSVR registration time: atlas {args.timing_atlas}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{'device':6s} {'stacks':>6s} {'slices':>6s} {'pixels':>9s} {'best s':>8s} {'median s':>9s} {'ms/slice':>9s}")
    for dev in devices:
        net = load_model(device=dev)
        for n in (3, 6, 9):
            stacks = sim.stacks[:n]
            n_slices = sum(st.n_slices for st in stacks)
            n_pix = sum(int(st.mask.sum()) for st in stacks)
            register_csvr(stacks, model=net)  # warm-up (allocations, kernels)
            times = []
            for _ in range(args.repeats):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                register_csvr(stacks, model=net)
                if dev == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            best = min(times)
            print(f"{dev:6s} {n:6d} {n_slices:6d} {n_pix:9,d} {best:8.3f} {statistics.median(times):9.3f} "
                  f"{1000 * best / n_slices:9.2f}", flush=True)


def quality(args) -> int:
    methods = ["svr", "csvr", "csvr-refine"]
    cmd = [sys.executable, "-m", "slice2vol.cli", "benchmark", "--atlases", args.atlases, "--motion", args.motion,
           "--seeds", args.seeds, "--methods", ",".join(methods), "--device", args.device, "--output", str(args.output),
           "--no-progress"]
    if args.data:
        cmd += ["--data", args.data]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    rows = [r for r in csv.DictReader(open(args.output / "results.csv")) if r.get("status") == "ok"]
    by: dict = {}
    for r in rows:
        by.setdefault((r["motion"], r["method"]), {})[r["case"]] = r
    print(f"\ncSVR vs SVR on spina-bifida atlases {args.atlases}, seeds {args.seeds} (mean +- sd over cases)")
    print(f"{'motion':9s} {'method':12s} {'n':>2s} {'TRE mm':>14s} {'PSNR dB':>14s} {'SSIM':>14s} {'time s':>12s}")

    def f(a, d=2):
        return f"{a.mean():.{d}f} +- {a.std(ddof=1) if a.size > 1 else 0:.{d}f}" if a.size else "-"

    for motion in args.motion.split(","):
        for m in ["naive"] + methods:
            cell = by.get((motion, m), {})
            if not cell:
                continue
            v = {k: np.array([float(r[k]) for r in cell.values() if r.get(k) not in (None, "")])
                 for k in ("tre_median_mm", "psnr", "ssim", "time_s")}
            print(f"{motion:9s} {m:12s} {len(cell):2d} {f(v['tre_median_mm']):>14s} {f(v['psnr']):>14s} "
                  f"{f(v['ssim'], 3):>14s} {f(v['time_s'], 1):>12s}")
        a, b = by.get((motion, "csvr-refine"), {}), by.get((motion, "svr"), {})
        d = np.array([float(a[c]["psnr"]) - float(b[c]["psnr"]) for c in a if c in b])
        t = np.array([float(a[c]["tre_median_mm"]) - float(b[c]["tre_median_mm"]) for c in a if c in b])
        if d.size:
            print(f"{motion:9s} csvr-refine - svr (paired): PSNR {f(d)} dB, TRE {f(t)} mm")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timing", action="store_true", help="only part 1 (registration time)")
    ap.add_argument("--quality", action="store_true", help="only part 2 (quality beside SVR)")
    ap.add_argument("--data", help="shared data folder (default: ../shared/data)")
    ap.add_argument("--timing-atlas", default="GA27_operated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--atlases", default=VALIDATION_ATLASES)
    ap.add_argument("--motion", default="mild,moderate,severe")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output", type=Path, default=Path("bench_out/csvr"))
    args = ap.parse_args()
    both = not (args.timing or args.quality)
    rc = 0
    if args.timing or both:
        timing(args)
    if args.quality or both:
        rc = quality(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
