#!/usr/bin/env python
"""Issue 13's end-to-end figure: the same reconstructions on the PyTorch operators and on the fused
numba operators, from one run of this script.

Each case is the benchmark's simulation (:func:`slice2vol.evaluation.benchmark.cases.simulate_case`:
3 orthogonal stacks, 1 mm in-plane, 3 mm thick, 0.8 mm output); every reconstruction runs in a
fresh Python process (the benchmark's worker, so time and peak RSS are its own) with
``SLICE2VOL_NO_NUMBA=1`` (``torch``) or without it (``numba``), the two paths of a case one after
the other so they share the machine's load.  Before the timed jobs one untimed numba job fills
numba's on-disk kernel cache (a user pays the ~20 s compile once, at the first run after install).

Prints per job: reconstruction time (the worker's ``time_s``: preparation + method, what the CLI
reports as "reconstructed in"), PSNR / SSIM against the ground truth (aligned, as the benchmark),
median slice TRE and peak RSS; then per path the median time, and the paired PSNR difference.

    python benchmarks/bench_fused_reconstruct.py                           # STA23/29/35 x seeds 0, 1, moderate, auto
    python benchmarks/bench_fused_reconstruct.py --methods gaussian --atlases STA29 --seeds 0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from slice2vol.evaluation.benchmark.cases import ensure_case
from slice2vol.evaluation.benchmark.runner import Job, link_case, run_worker
from slice2vol.evaluation.benchmark.settings import CASE_JSON, BenchmarkConfig
from slice2vol.io import shared_data_dir

PATHS = {"torch": {"SLICE2VOL_NO_NUMBA": "1"}, "numba": {"SLICE2VOL_NO_NUMBA": "0"}}


def job(out: Path, case: Path, path: str, method: str, threads: int, resolution: float) -> dict:
    """One reconstruction on ``path`` in a fresh worker process (the benchmark's own
    :func:`~slice2vol.evaluation.benchmark.runner.run_worker`); its result dict (``status`` ok/failed).
    Each path has its own output folder, whose case folder links the simulated case's files."""
    meta = json.loads((case / CASE_JSON).read_text())
    cfg = BenchmarkConfig(output=out / path, device="cpu", resolution=resolution, threads=threads)
    link_case(cfg, case)
    saved = {k: os.environ.get(k) for k in PATHS[path]}
    os.environ.update(PATHS[path])  # the worker inherits it
    try:
        return run_worker(cfg, Job(meta["atlas"], meta["motion"], meta["seed"], method), "cpu")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Reconstruction time and PSNR on the PyTorch vs the fused numba operators.")
    ap.add_argument("--atlases", nargs="+", default=["STA23", "STA29", "STA35"], help="(default: %(default)s)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="(default: 0 1)")
    ap.add_argument("--motion", default="moderate", help="(default: moderate)")
    ap.add_argument("--methods", default="auto", help="comma-separated method variants (default: auto, the default method)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per job, both paths (default: 2)")
    ap.add_argument("--resolution", type=float, default=0.8)
    ap.add_argument("--data", type=Path, default=None, help=f"shared data (default: {shared_data_dir()})")
    ap.add_argument("--output", type=Path, default=Path("bench_out/fused_reconstruct"))
    ap.add_argument("--json", type=Path, help="also write every job's figures here")
    ap.add_argument("--paths", default="torch,numba",
                    help="operator paths to time, comma-separated (default: both; the paired summary needs both)")
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if not paths or any(p not in PATHS for p in paths):
        ap.error(f"--paths: choose from {','.join(PATHS)}")

    out = args.output.resolve()
    cfg = BenchmarkConfig(output=out, data=args.data or shared_data_dir(), atlases=args.atlases, motion=[args.motion],
                          seeds=args.seeds, device="cpu", resolution=args.resolution)
    methods = [m for m in args.methods.split(",") if m]
    print(f"slice2vol fused vs PyTorch operators, end to end: {len(args.atlases)} atlas(es) x {len(args.seeds)} seed(s), "
          f"motion {args.motion}, methods {','.join(methods)}, {args.threads} thread(s) per job; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    cases = []
    for atlas in args.atlases:
        for seed in args.seeds:
            cases.append(ensure_case(cfg, atlas, args.motion, seed))
    warm = job(out, cases[0], "numba", methods[0], args.threads, args.resolution)  # fills numba's kernel cache; not counted
    print(f"warm-up (numba kernel cache): {warm['status']}, {warm['worker_wall_s']:.1f} s wall", flush=True)

    rows = []
    hdr = f"{'case':<26} {'method':<9} {'path':<6} {'time s':>7} {'wall s':>7} {'PSNR':>7} {'SSIM':>6} {'TRE mm':>7} {'peak MB':>8} {'load':>5}"
    print(hdr + "\n" + "-" * len(hdr), flush=True)
    for cdir in cases:
        for method in methods:
            for path in paths:
                r = job(out, cdir, path, method, args.threads, args.resolution)
                r.update(case=cdir.name, method_name=method, path=path, load=os.getloadavg()[0])
                rows.append(r)
                if r["status"] != "ok":
                    print(f"{cdir.name:<26} {method:<9} {path:<6} FAILED: {r['error']}", flush=True)
                    continue
                print(f"{cdir.name:<26} {method:<9} {path:<6} {r['time_s']:7.1f} {r['worker_wall_s']:7.1f} {r['psnr']:7.3f} "
                      f"{r['ssim']:6.4f} {r['tre_median_mm']:7.3f} {r['peak_rss_mb']:8.0f} {r['load']:5.2f}", flush=True)
    print()
    for method in methods:
        ok = {p: {r["case"]: r for r in rows if r["status"] == "ok" and r["method_name"] == method and r["path"] == p}
              for p in PATHS}
        common = sorted(set(ok["torch"]) & set(ok["numba"]))
        if not common:
            for p in paths:
                if ok[p]:
                    print(f"{method} ({p}): {len(ok[p])} case(s); median reconstruction time "
                          f"{statistics.median(r['time_s'] for r in ok[p].values()):.1f} s")
            continue
        med = {p: statistics.median(ok[p][c]["time_s"] for c in common) for p in PATHS}
        dpsnr = [ok["numba"][c]["psnr"] - ok["torch"][c]["psnr"] for c in common]
        peak = {p: max(ok[p][c]["peak_rss_mb"] for c in common) for p in PATHS}
        print(f"{method}: {len(common)} paired case(s); median reconstruction time torch {med['torch']:.1f} s, numba "
              f"{med['numba']:.1f} s (x{med['torch'] / med['numba']:.2f}); PSNR numba - torch mean {statistics.mean(dpsnr):+.4f} dB, "
              f"max |diff| {max(map(abs, dpsnr)):.4f} dB; peak RSS (max over cases) torch {peak['torch']:.0f} MB, "
              f"numba {peak['numba']:.0f} MB")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
