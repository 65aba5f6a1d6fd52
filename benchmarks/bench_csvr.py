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
poses, fixed-pose SR), ``csvr-refine`` (classical SVR from the network's or the stack-registered
poses, whichever explains the slices better) and ``csvr-refine-network`` (SVR always from the
network's poses, the paper's Refine); prints TRE (cSVR eq. 10: median over stacks of the
per-slice maximum pixel error, global rigid motion removed), PSNR and SSIM side by side per
motion level, how often Refine started from the network, and the paired gaps to svr.

Part 3, sweeps (``--sweep``): the same for ``svr``, ``csvr`` and ``csvr-refine`` over the motion
magnitude sweeps of the cSVR paper's Fig. 4 (``rot<deg>``: rotation only, ``trans<mm>``:
translation only; see :mod:`slice2vol.simulation.motion`).

Part 4, the network alone (``--network``): header poses vs network poses, TRE on all 15
spina-bifida atlases (one simulation each, seed 2000) per motion level; the model card's table.

    python benchmarks/bench_csvr.py                         # all four parts
    python benchmarks/bench_csvr.py --timing --threads 2
    python benchmarks/bench_csvr.py --quality --atlases GA22_notoperated,GA27_operated --seeds 0
    python benchmarks/bench_csvr.py --sweep --sweep-motion rot10,rot30 --seeds 0
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

from slice2vol.simulation.splits import VALIDATION_ATLASES as _VALIDATION  # the fixed atlas split; imports no torch

VALIDATION_ATLASES = ",".join(_VALIDATION)
# the cSVR paper's Fig. 4 varies rotation and translation ranges separately (slice2vol.simulation.motion)
SWEEP_LEVELS = "rot5,rot10,rot20,rot30,trans2,trans5,trans10,trans15"


def timing(args) -> None:
    import torch

    from slice2vol import io
    from slice2vol.evaluation.benchmark import atlas_dir
    from slice2vol.io import shared_data_dir
    from slice2vol.methods.csvr.infer import load_model, register_csvr
    from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else shared_data_dir()
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


def network_tre(args) -> None:
    """Network alone vs header poses: TRE (eq. 10, median over stacks) on every spina-bifida atlas."""
    import torch

    from slice2vol.io import shared_data_dir
    from slice2vol.methods.csvr.infer import load_model
    from slice2vol.training.csvr import evaluate_tre
    from slice2vol.training.csvr_data import atlas_folders, load_atlas, validation_case

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else shared_data_dir()
    net = load_model()
    folders = atlas_folders(data, "spina_bifida2021")
    print(f"\ncSVR network alone, {len(folders)} spina-bifida atlases, 3 orthogonal 1 mm x 3 mm stacks, "
          f"noise 0.02, simulation seed 2000; TRE = median over stacks of the per-slice max error (mm)")
    print(f"{'motion':9s} {'header':>14s} {'network':>14s} {'better':>7s}   per case header/network")
    atlases = [(f.name, load_atlas(f, 1.0, 6.0)) for f in folders]
    for level in args.network_motion.split(","):
        r = evaluate_tre(net, [validation_case(atlas, 2000, level) for _, atlas in atlases])
        h, n = np.array(r["header"]), np.array(r["network"])
        per = [f"{name.replace('_notoperated', 'n').replace('_operated', 'o')} {th:.1f}/{tn:.1f}"
               for (name, _), th, tn in zip(atlases, h, n)]
        print(f"{level:9s} {h.mean():6.2f} +- {h.std(ddof=1):4.2f} {n.mean():6.2f} +- {n.std(ddof=1):4.2f} "
              f"{int((n < h).sum()):3d}/{len(n):<3d}  {', '.join(per)}", flush=True)


def quality(args, motion: str, methods: list[str], output: Path, title: str) -> int:
    """Run ``slice2vol benchmark`` (resumable) and print the methods side by side per motion level."""
    cmd = [sys.executable, "-m", "slice2vol.cli.parser", "benchmark", "--atlases", args.atlases, "--motion", motion,
           "--seeds", args.seeds, "--methods", ",".join(methods), "--device", args.device, "--output", str(output),
           "--no-progress"]
    if args.data:
        cmd += ["--data", args.data]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    rows = [r for r in csv.DictReader(open(output / "results.csv")) if r.get("status") == "ok"]
    by: dict = {}
    for r in rows:
        by.setdefault((r["motion"], r["method"]), {})[r["case"]] = r
    print(f"\n{title}: spina-bifida atlases {args.atlases}, seeds {args.seeds} (mean +- sd over cases)")
    print(f"{'motion':9s} {'method':20s} {'n':>2s} {'TRE mm':>14s} {'PSNR dB':>14s} {'SSIM':>14s} {'time s':>12s}"
          f"  start")

    def f(a, d=2):
        return f"{a.mean():.{d}f} +- {a.std(ddof=1) if a.size > 1 else 0:.{d}f}" if a.size else "-"

    for level in motion.split(","):
        for m in ["naive"] + methods:
            cell = by.get((level, m), {})
            if not cell:
                continue
            v = {k: np.array([float(r[k]) for r in cell.values() if r.get(k) not in (None, "")])
                 for k in ("tre_median_mm", "psnr", "ssim", "time_s")}
            starts = [r.get("start") for r in cell.values() if r.get("start")]
            start = f"network {starts.count('network')}/{len(starts)}" if starts else ""
            print(f"{level:9s} {m:20s} {len(cell):2d} {f(v['tre_median_mm']):>14s} {f(v['psnr']):>14s} "
                  f"{f(v['ssim'], 3):>14s} {f(v['time_s'], 1):>12s}  {start}")
        for m in [x for x in methods if x.startswith("csvr-refine")]:
            a, b = by.get((level, m), {}), by.get((level, "svr"), {})
            d = np.array([float(a[c]["psnr"]) - float(b[c]["psnr"]) for c in a if c in b])
            t = np.array([float(a[c]["tre_median_mm"]) - float(b[c]["tre_median_mm"]) for c in a if c in b])
            if d.size:
                print(f"{level:9s} {m} - svr (paired): PSNR {f(d)} dB ({int((d > 0).sum())}/{d.size} better), "
                      f"TRE {f(t)} mm")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timing", action="store_true", help="only part 1 (registration time)")
    ap.add_argument("--quality", action="store_true", help="only part 2 (quality beside SVR)")
    ap.add_argument("--sweep", action="store_true", help="only part 3 (rotation / translation magnitude sweeps)")
    ap.add_argument("--network", action="store_true", help="only part 4 (network alone on all spina-bifida atlases)")
    ap.add_argument("--network-motion", default="none,mild,moderate,severe,csvr")
    ap.add_argument("--data", help="shared data folder (default: ../shared/data)")
    ap.add_argument("--timing-atlas", default="GA27_operated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--atlases", default=VALIDATION_ATLASES)
    ap.add_argument("--motion", default="mild,moderate,severe")
    ap.add_argument("--sweep-motion", default=SWEEP_LEVELS)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output", type=Path, default=Path("bench_out/csvr"))
    ap.add_argument("--sweep-output", type=Path, default=Path("bench_out/csvr_sweep"))
    args = ap.parse_args()
    every = not (args.timing or args.quality or args.sweep or args.network)
    rc = 0
    if args.timing or every:
        timing(args)
    if args.network or every:
        network_tre(args)
    if args.quality or every:
        rc |= quality(args, args.motion, ["svr", "csvr", "csvr-refine", "csvr-refine-network"], args.output,
                      "cSVR vs SVR by motion level")
    if args.sweep or every:
        rc |= quality(args, args.sweep_motion, ["svr", "csvr", "csvr-refine"], args.sweep_output,
                      "cSVR vs SVR over motion magnitude (rot<deg>: rotation only, trans<mm>: translation only)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
