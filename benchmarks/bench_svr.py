#!/usr/bin/env python
"""SVR vs the naive baseline on simulated atlas cases: a thin wrapper around ``slice2vol benchmark``.

The per-case logic (simulation, one worker process per reconstruction, evaluation against ground
truth, resumable results) lives in :mod:`slice2vol.evaluation.benchmark`; this script keeps the old
interface (one motion level, ``--methods svr``, device cpu by default) and adds what issue 3
asked of SVR: the PSNR gain over the naive baseline per case and the targets checked on every
case (gain >= 6 dB, time <= 60 s, memory <= 4 GB).

    python benchmarks/bench_svr.py                                   # STA23, STA29, STA35 x seeds 0, 1, moderate
    python benchmarks/bench_svr.py --atlases STA30 --seeds 0 --output bench_out/svr_quick
    python benchmarks/bench_svr.py --motion severe --device cuda --iterations 3
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from slice2vol.cli.parser import main as cli_main
from slice2vol.evaluation.benchmark import NAIVE, RESULTS_CSV
from slice2vol.io import shared_data_dir

TARGETS = {"psnr_gain_db": 6.0, "time_s": 60.0, "memory_gb": 4.0}


def targets_report(results_csv: Path, method: str = "svr") -> tuple[str, bool]:
    """Per-case PSNR gain of ``method`` over naive and the issue-3 targets; returns (text, all passed)."""
    with open(results_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    naive = {r["case"]: r for r in rows if r["method"] == NAIVE}
    lines = [f"{'case':<24} {'PSNR naive':>10} {'PSNR ' + method:>10} {'gain dB':>8} {'time s':>7} {'peak MB':>8}"]
    passed = True
    for r in (r for r in rows if r["method"] == method and r["case"] in naive):
        gain = float(r["psnr"]) - float(naive[r["case"]]["psnr"])
        mem = float(r["gpu_peak_mb"] or r["peak_rss_mb"])
        ok = gain >= TARGETS["psnr_gain_db"] and float(r["time_s"]) <= TARGETS["time_s"] and \
            mem / 1024 <= TARGETS["memory_gb"]
        passed &= ok
        lines.append(f"{r['case']:<24} {float(naive[r['case']]['psnr']):10.2f} {float(r['psnr']):10.2f} "
                     f"{gain:+8.2f} {float(r['time_s']):7.1f} {mem:8.0f}  {'PASS' if ok else 'FAIL'}")
    lines.append(f"Targets (every case): PSNR gain >= {TARGETS['psnr_gain_db']:g} dB, time <= {TARGETS['time_s']:g} s, "
                 f"memory <= {TARGETS['memory_gb']:g} GB: {'PASS' if passed else 'FAIL'}")
    return "\n".join(lines), passed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SVR vs naive baseline on simulated atlas cases (slice2vol benchmark).")
    ap.add_argument("--atlases", nargs="+", default=["STA23", "STA29", "STA35"], help="CRL 2017 weeks (default: %(default)s)")
    ap.add_argument("--seeds", nargs="+", default=["0", "1"], help="simulation seeds (default: 0 1)")
    ap.add_argument("--motion", default="moderate", help="simulated motion level (default: moderate)")
    ap.add_argument("--methods", default="svr", help="method variant names (default: svr)")
    ap.add_argument("--noise", default="0.02", help="Rician noise, relative (default: 0.02)")
    ap.add_argument("--thickness", default="3", help="slice thickness mm (default: 3)")
    ap.add_argument("--resolution", default="0.8", help="reconstruction voxel size mm (default: 0.8)")
    ap.add_argument("--iterations", default=None, help="outer iterations (default: the method's)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="(default: cpu)")
    ap.add_argument("--threads", default=None, help="torch CPU threads per process (default: torch's)")
    ap.add_argument("--data", type=Path, default=None, help=f"shared data folder (default: {shared_data_dir()})")
    ap.add_argument("--output", type=Path, default=Path("bench_out/svr"), help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)

    cmd = ["benchmark", "--atlases", *args.atlases, "--seeds", *args.seeds, "--motion", args.motion,
           "--methods", args.methods, "--noise", args.noise, "--thickness", args.thickness,
           "--resolution", args.resolution, "--device", args.device, "--output", str(args.output)]
    for opt in ("iterations", "threads", "data"):
        if getattr(args, opt) is not None:
            cmd += [f"--{opt}", str(getattr(args, opt))]
    rc = cli_main(cmd)
    if rc == 2 or not (args.output / RESULTS_CSV).is_file():
        return rc
    print()
    print((args.output / "results.md").read_text())
    for method in args.methods.split(","):
        text, _ = targets_report(args.output / RESULTS_CSV, method)
        print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
