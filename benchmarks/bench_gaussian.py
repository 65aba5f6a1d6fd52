#!/usr/bin/env python
"""GaussianSVR benchmark (issue 4): quality beside classical SVR, both PSF modes, the paper's ablations.

Runs ``slice2vol benchmark`` on moderate-motion simulated cases (3 CRL atlases x 2 seeds by
default; 3 orthogonal stacks, 1 mm in-plane, 3 mm thick, 0.8 mm output) with the method variants
of ``slice2vol.methods.run.METHOD_VARIANTS``:

* ``svr`` -- classical SVR;
* ``gaussian-sampled`` -- GaussianSVR with the paper's sampled PSF (start from SVR, joint poses, one stage);
* ``gaussian-analytic`` -- the same with the analytic-PSF renderer (Dannecker et al.; the default
  of ``--method gaussian``);
* ``gaussian-frozen`` -- sampled PSF, poses frozen (paper ablation "w/o transformation optimisation");
* ``gaussian-twostage`` -- sampled PSF, coarse stage first (paper ablation "multi-resolution");
* ``gaussian-stack`` (only with ``--with-stack``) -- start from stack registration, 200 iterations.

then prints mean +- sd of PSNR / SSIM / NRMSE / TRE / time / peak memory per variant, the gain of
each variant over ``svr`` on the same cases (paired), and the ablation gaps next to the paper's
(5.3 dB for joint pose optimisation, 1.1 dB for two-stage training).  ``--seed-from DIR`` copies the
finished moderate cases of an earlier ``slice2vol benchmark`` folder first, so their ``svr`` job
(and, where the folder has it, ``gaussian-analytic`` under that name) is not recomputed.

    python benchmarks/bench_gaussian.py --output bench_out/gaussian --seed-from bench_out/grid
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

PAPER_GAPS = {"gaussian-frozen": 5.3, "gaussian-twostage": 1.1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=Path("bench_out/gaussian"))
    ap.add_argument("--seed-from", type=Path, help="an earlier benchmark folder whose moderate cases are reused")
    ap.add_argument("--atlases", default="STA23,STA29,STA35")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--with-stack", action="store_true", help="also run the stack-registration start (slow)")
    args = ap.parse_args()
    methods = ["svr", "gaussian-sampled", "gaussian-analytic", "gaussian-frozen", "gaussian-twostage"]
    if args.with_stack:
        methods.append("gaussian-stack")
    if args.seed_from:
        args.output.mkdir(parents=True, exist_ok=True)
        for f in ("benchmark.json",):
            if (args.seed_from / f).exists() and not (args.output / f).exists():
                shutil.copy2(args.seed_from / f, args.output / f)
        for case in sorted((args.seed_from / "cases").glob("*_moderate_seed*")):
            dst = args.output / "cases" / case.name
            if not dst.exists():
                shutil.copytree(case, dst)
    cmd = [sys.executable, "-m", "slice2vol.cli.parser", "benchmark", "--atlases", args.atlases, "--motion", "moderate",
           "--seeds", args.seeds, "--methods", ",".join(methods), "--device", args.device, "--output", str(args.output),
           "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    rows = list(csv.DictReader(open(args.output / "results.csv")))
    ok = [r for r in rows if r.get("status") == "ok"]
    by = {}
    for r in ok:
        by.setdefault(r["method"], {})[r["case"]] = r

    def col(method, key):
        return {c: float(r[key]) for c, r in by.get(method, {}).items() if r.get(key) not in (None, "")}

    print(f"\nGaussianSVR benchmark: {args.output}, moderate motion, atlases {args.atlases}, seeds {args.seeds}")
    print(f"{'method':20s} {'n':>2s} {'PSNR dB':>14s} {'SSIM':>14s} {'NRMSE':>14s} {'TRE mm':>12s} {'time s':>12s} "
          f"{'RSS MB':>8s} {'vs svr dB':>14s}")
    svr = col("svr", "psnr")
    for m in ["naive"] + methods:
        if m not in by:
            continue
        vals = {k: np.array(list(col(m, k).values())) for k in ("psnr", "ssim", "nrmse", "tre_median_mm", "time_s",
                                                                 "peak_rss_mb")}
        p = col(m, "psnr")
        gain = np.array([p[c] - svr[c] for c in p if c in svr])
        f = lambda a, d=2: f"{a.mean():.{d}f} +- {a.std(ddof=1) if a.size > 1 else 0:.{d}f}" if a.size else "-"  # noqa: E731
        print(f"{m:20s} {len(p):2d} {f(vals['psnr']):>14s} {f(vals['ssim'], 3):>14s} {f(vals['nrmse'], 3):>14s} "
              f"{f(vals['tre_median_mm']):>12s} {f(vals['time_s'], 1):>12s} {vals['peak_rss_mb'].max() if vals['peak_rss_mb'].size else 0:8.0f} "
              f"{f(gain):>14s}")
    full = col("gaussian-sampled", "psnr")  # the ablations change one thing of this variant
    for m, paper in PAPER_GAPS.items():
        other = col(m, "psnr")
        d = np.array([full[c] - other[c] for c in full if c in other])
        if d.size:
            print(f"ablation {m}: gaussian-sampled - {m} = {d.mean():+.2f} +- {d.std(ddof=1) if d.size > 1 else 0:.2f} dB "
                  f"(n={d.size}); paper: +{paper} dB")
    return rc


if __name__ == "__main__":
    sys.exit(main())
