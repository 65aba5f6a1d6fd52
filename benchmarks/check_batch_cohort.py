#!/usr/bin/env python
"""``slice2vol batch`` on a 6-subject cohort with two bad subjects (issue 15, "Done when").

The cohort is that of ``bench_batch.py`` (one subject per TEST atlas, three orthogonal
1 mm x 3 mm stacks with mild motion, BIDS layout with ``SliceThickness`` sidecars and a
``desc-brain_mask`` derivative), except that subject 05's coronal stack is a truncated gzip file
(a corrupt transfer) and subject 06's sagittal stack has no mask.  The script checks and prints:

1. the batch on a LocalCluster of 2 workers (1 torch thread each) finishes, exit status 1;
2. the two bad subjects fail alone, with their one-line reasons; the others are ``ok``;
3. every good subject's volume has the same voxels as a single ``slice2vol reconstruct`` run with
   the same inputs and options;
4. a rerun recomputes nothing (every good output keeps its modification time, status
   ``ok (unchanged, not recomputed)``) and no private work folder remains.

    python benchmarks/check_batch_cohort.py --output bench_out/cohort
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import CLI, make_cohort  # noqa: E402  (the same simulated cohort)

from slice2vol.io import shared_data_dir  # noqa: E402

OPTIONS = ["--method", "svr", "--resolution", "1.2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def batch(bids: Path, deriv: Path) -> tuple[int, float, list[dict], str]:
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, "batch", str(bids), "-o", str(deriv), "--masks", str(bids / "derivatives" / "masks"),
                           "--workers", "2", "--threads-per-worker", "1", "--no-progress", *OPTIONS],
                          capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    with open(deriv / "batch_summary.tsv", newline="") as f:
        return proc.returncode, wall, list(csv.DictReader(f, delimiter="\t")), proc.stdout + proc.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    bids = make_cohort(args.output, args.data or shared_data_dir(), 6)
    masks = bids / "derivatives" / "masks"
    corrupt = bids / "sub-05" / "anat" / "sub-05_acq-cor_T2w.nii.gz"
    data = corrupt.read_bytes()
    if len(data) > 4096:
        corrupt.write_bytes(data[: len(data) // 2])  # a transfer cut half-way
    (masks / "sub-06" / "anat" / "sub-06_acq-sag_desc-brain_mask.nii.gz").unlink(missing_ok=True)
    deriv = args.output / "deriv"
    shutil.rmtree(deriv, ignore_errors=True)
    print(f"slice2vol batch cohort check: 6 subjects (05: corrupt stack, 06: missing mask), LocalCluster of 2 "
          f"workers x 1 torch thread, options {' '.join(OPTIONS)}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    rc, wall, rows, log = batch(bids, deriv)
    print(f"1. batch: exit status {rc} in {wall:.1f} s")
    ok = True
    for r in rows:
        print(f"   sub-{r['subject']}: {r['status']:<8} {r['reason'] or ''} {r['time_s'] and r['time_s'] + ' s'}")
    bad = {r["subject"] for r in rows if not r["status"].startswith("ok")}
    ok &= rc == 1 and bad == {"05", "06"}
    print(f"2. the bad subjects fail alone: {bad == {'05', '06'}}")
    same = []
    for r in rows:
        if r["subject"] in bad:
            continue
        label = r["subject"]
        anat, manat = bids / f"sub-{label}" / "anat", masks / f"sub-{label}" / "anat"
        single = args.output / "single" / f"sub-{label}.nii.gz"
        single.parent.mkdir(exist_ok=True)
        single.unlink(missing_ok=True)
        subprocess.run([*CLI, "reconstruct", *[str(anat / f"sub-{label}_acq-{o}_T2w.nii.gz") for o in ("ax", "cor", "sag")],
                        "--stack-masks", *[str(manat / f"sub-{label}_acq-{o}_desc-brain_mask.nii.gz")
                                           for o in ("ax", "cor", "sag")],
                        "-o", str(single), "--no-progress", "--seed", "0", *OPTIONS],
                       check=True, capture_output=True, env=ENV)
        mine = nib.load(deriv / f"sub-{label}" / "anat" / f"sub-{label}_rec-svr_T2w.nii.gz")
        theirs = nib.load(single)
        equal = (np.array_equal(np.asanyarray(mine.dataobj), np.asanyarray(theirs.dataobj))
                 and np.array_equal(mine.affine, theirs.affine))
        same.append(equal)
        print(f"   sub-{label}: batch volume == single reconstruct volume (voxels and affine): {equal}")
    ok &= all(same)
    print(f"3. good subjects identical to single runs: {sum(same)} of {len(same)}")
    outputs = sorted(p for p in deriv.rglob("*") if p.is_file() and p.name not in ("batch_summary.tsv", "index.html",
                                                                                    "dataset_description.json"))
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    rc2, wall2, rows2, _ = batch(bids, deriv)
    unchanged = all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    skipped = [r["subject"] for r in rows2 if r["status"] == "ok (unchanged, not recomputed)"]
    leftovers = (deriv / ".work").exists()
    print(f"4. rerun: exit status {rc2} in {wall2:.1f} s; not recomputed: {', '.join(skipped)}; "
          f"{len(stamps)} output files untouched: {unchanged}; private work folder left: {leftovers}")
    ok &= rc2 == 1 and unchanged and len(skipped) == len(same) and not leftovers
    print(f"all checks passed: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
