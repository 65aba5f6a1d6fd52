#!/usr/bin/env python
"""Large-motion robustness (issue 11) on the TEST atlases: the default pipeline against today's SVR.

Runs ``slice2vol benchmark`` (resumable: finished jobs are reused) on spina-bifida atlases of the
test split (:mod:`slice2vol.simulation.splits`; nothing was tuned on them) at mild, moderate, severe and
extreme motion, then prints from its ``results.csv``:

* per method x motion level: mean PSNR, median TRE, mean time and peak RSS;
* paired differences against ``svr-local`` (classical SVR without the global pose search, i.e.
  slice2vol's ``svr`` before this change) on the same cases;
* the quality verdict against the ground-truth PSNR (confusion table over every reconstruction):
  the issue's targets are "no reconstruction under 20 dB is ok" and ">= 90% of those over 24 dB
  are ok".

    python benchmarks/bench_large_motion.py --output bench_out/large_motion            # runs + prints
    python benchmarks/bench_large_motion.py --output bench_out/large_motion --methods svr-local,auto,gaussian
    python benchmarks/bench_large_motion.py --output DIR --print-only                  # tables of a finished run
    python benchmarks/bench_large_motion.py --output DIR --print-only --csv A.csv B.csv  # several runs, one table

Output of the run reported in the README: ``benchmarks/results/large_motion_cpu.txt``.
"""
from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from slice2vol.simulation.splits import split_atlases

#: six of the twelve test atlases, every other one by gestational age (GA 21-33)
DEFAULT_ATLASES = tuple(split_atlases("test")[::2])
LEVELS = ("mild", "moderate", "severe", "extreme")
BASELINE = "svr-local"


def run(args) -> None:
    cmd = ["slice2vol", "benchmark", "--atlases", ",".join(args.atlases), "--motion", ",".join(args.motion),
           "--seeds", args.seeds, "--methods", ",".join(args.methods), "--device", args.device,
           "--output", str(args.output), "--no-progress"]
    if args.data:
        cmd += ["--data", str(args.data)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def load(output: Path, extra_csv=()) -> list[dict]:
    """Rows of ``output/results.csv`` plus any saved ``results.csv`` copies (``--csv``), one row per
    (case, method): a later file replaces an earlier one's row, and ``naive`` rows (the same
    simulation in every run) are kept once."""
    rows: dict = {}
    for path in [output / "results.csv", *extra_csv]:
        if not Path(path).is_file():
            continue
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("status") == "ok":
                    rows[(r["case"], r["method"])] = r
    rows = list(rows.values())
    for r in rows:
        for k in ("psnr", "tre_median_mm", "time_s", "peak_rss_mb"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
    return rows


def tables(rows: list[dict], levels, methods) -> str:
    out = []
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["motion"])].append(r)
    out.append("method               motion    n   PSNR dB (mean+-sd)   TRE mm (median)   time s (mean)   peak RSS MB")
    for m in ["naive"] + [m for m in methods if m != "naive"]:
        for lv in levels:
            rs = by.get((m, lv), [])
            if not rs:
                continue
            p = np.array([r["psnr"] for r in rs])
            t = np.array([r["tre_median_mm"] for r in rs])
            out.append(f"{m:20s} {lv:9s} {len(rs):2d}   {p.mean():6.2f} +- {p.std():4.2f}      {np.nanmedian(t):6.2f}"
                       f"            {np.mean([r['time_s'] for r in rs]):6.1f}         "
                       f"{np.mean([r['peak_rss_mb'] for r in rs]):6.0f}")
    out.append("")
    out.append(f"paired against {BASELINE} (same cases): PSNR difference mean +- sd [min, max], time ratio mean")
    base = {(r["case"]): r for r in rows if r["method"] == BASELINE}
    for m in methods:
        if m in (BASELINE, "naive"):
            continue
        for lv in levels:
            d, tr = [], []
            for r in rows:
                if r["method"] == m and r["motion"] == lv and r["case"] in base:
                    d.append(r["psnr"] - base[r["case"]]["psnr"])
                    tr.append(r["time_s"] / base[r["case"]]["time_s"])
            if d:
                d = np.array(d)
                out.append(f"  {m:20s} {lv:9s} n={len(d)}: {d.mean():+6.2f} +- {d.std():4.2f} dB "
                           f"[{d.min():+6.2f}, {d.max():+6.2f}], time x{np.mean(tr):.2f}")
    out.append("")
    out.append("quality verdict vs ground-truth PSNR, every reconstruction (not naive):")
    bands = (("< 20 dB", -math.inf, 20.0), ("20-24 dB", 20.0, 24.0), (">= 24 dB", 24.0, math.inf))
    counts = {v: [0, 0, 0] for v in ("ok", "doubtful", "failed")}
    for r in rows:
        if r["method"] == "naive" or not r.get("quality_verdict"):
            continue
        for i, (_, lo, hi) in enumerate(bands):
            if lo <= r["psnr"] < hi:
                counts[r["quality_verdict"]][i] += 1
    out.append("  verdict    " + "  ".join(f"{b:>9s}" for b, _, _ in bands))
    for v, c in counts.items():
        out.append(f"  {v:9s}  " + "  ".join(f"{x:9d}" for x in c))
    low_ok = counts["ok"][0]
    high = sum(counts[v][2] for v in counts)
    out.append(f"  under 20 dB and ok: {low_ok}; over 24 dB and ok: {counts['ok'][2]}/{high}"
               f" ({100 * counts['ok'][2] / max(1, high):.0f}%)")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--atlases", default=",".join(DEFAULT_ATLASES))
    ap.add_argument("--motion", default=",".join(LEVELS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", default="svr-local,auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--print-only", action="store_true")
    ap.add_argument("--csv", type=Path, nargs="*", default=(),
                    help="more results.csv files of earlier runs on the same cases (e.g. benchmarks/results/*.csv)")
    args = ap.parse_args(argv)
    args.atlases = args.atlases.split(",")
    args.motion = args.motion.split(",")
    args.methods = args.methods.split(",")
    test = set(split_atlases("test"))
    if not set(args.atlases) <= test:
        sys.exit(f"not test atlases: {sorted(set(args.atlases) - test)} (figures are reported on the test split)")
    if not args.print_only:
        run(args)
    print(tables(load(args.output, args.csv), args.motion, args.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
