#!/usr/bin/env python
"""``slice2vol batch`` scaling (issue 15): one simulated cohort, 1 and 2 LocalCluster workers, and
the same run against a separately started ``dask scheduler`` + 2 ``dask worker`` processes.

The cohort: one subject per TEST atlas (``slice2vol.simulation.splits``; six by default), three
orthogonal 1 mm x 3 mm stacks with mild motion made by ``slice2vol simulate``, written as BIDS
(``sub-NN/anat/sub-NN_acq-{ax,cor,sag}_T2w.nii.gz`` with ``SliceThickness`` sidecars and a
``desc-brain_mask`` derivative).  Every run starts from an empty derivatives folder and uses one
torch thread per worker; wall time is that of the whole ``slice2vol batch`` command (cluster start
included).

    python benchmarks/bench_batch.py --output bench_out/batch
    python benchmarks/bench_batch.py --output bench_out/batch --subjects 4 -- --method auto --resolution 0.8
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from slice2vol.io import shared_data_dir
from slice2vol.simulation.splits import split_atlases

CLI = [sys.executable, "-m", "slice2vol.cli.parser"]


def make_cohort(out: Path, data: Path, n: int, seed: int = 0) -> Path:
    bids, masks = out / "bids", out / "bids" / "derivatives" / "masks"
    if (bids / "dataset_description.json").is_file():
        return bids
    bids.mkdir(parents=True, exist_ok=True)
    for i, atlas in enumerate(split_atlases("test")[:n], 1):
        folder = data / "fetal_atlases" / "spina_bifida2021" / atlas
        tmp = out / "sim" / atlas
        subprocess.run([*CLI, "simulate", str(folder / "t2.nii.gz"), "--mask", str(folder / "mask.nii.gz"), "-o", str(tmp),
                        "--stacks", "3", "--motion", "mild", "--seed", str(seed + i)], check=True, stdout=subprocess.DEVNULL)
        label = f"{i:02d}"
        (bids / f"sub-{label}" / "anat").mkdir(parents=True, exist_ok=True)
        (masks / f"sub-{label}" / "anat").mkdir(parents=True, exist_ok=True)
        for k, ori in enumerate(("ax", "cor", "sag")):
            stem = f"sub-{label}_acq-{ori}"
            shutil.copy(tmp / f"stack_{k:02d}.nii.gz", bids / f"sub-{label}" / "anat" / f"{stem}_T2w.nii.gz")
            (bids / f"sub-{label}" / "anat" / f"{stem}_T2w.json").write_text(json.dumps({"SliceThickness": 3.0}))
            shutil.copy(tmp / f"mask_{k:02d}.nii.gz", masks / f"sub-{label}" / "anat" / f"{stem}_desc-brain_mask.nii.gz")
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "slice2vol batch benchmark", "BIDSVersion": "1.9.0"}))
    return bids


def run_batch(bids: Path, deriv: Path, extra: list[str], options: list[str]) -> tuple[float, list[dict]]:
    shutil.rmtree(deriv, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, "batch", str(bids), "-o", str(deriv), "--masks", str(bids / "derivatives" / "masks"),
                           "--no-progress", *extra, *options], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"batch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with open(deriv / "batch_summary.tsv", newline="") as f:
        return wall, list(csv.DictReader(f, delimiter="\t"))


def external_cluster(tmp: Path, n_workers: int):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sf = tmp / "scheduler.json"
    sf.unlink(missing_ok=True)
    log = open(tmp / "cluster.log", "w")
    procs = [subprocess.Popen(["dask", "scheduler", "--scheduler-file", str(sf), "--no-dashboard", "--port", "0"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)]
    for _ in range(300):
        if sf.is_file():
            break
        time.sleep(0.1)
    for _ in range(n_workers):
        procs.append(subprocess.Popen(["dask", "worker", "--scheduler-file", str(sf), "--nthreads", "1",
                                       "--no-dashboard"], stdout=log, stderr=subprocess.STDOUT, env=env))
    from dask.distributed import Client

    with Client(scheduler_file=str(sf), timeout="60s") as c:
        c.wait_for_workers(n_workers, timeout=120)
        address = c.scheduler.address
    return procs, address


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[argv.index("--") + 1:] if "--" in argv else ["--method", "svr", "--resolution", "1.2"]
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    bids = make_cohort(args.output, args.data or shared_data_dir(), args.subjects)
    print(f"slice2vol batch scaling: {args.subjects} subjects (test atlases, 3 stacks 1 x 1 x 3 mm, mild motion), "
          f"reconstruct options: {' '.join(options)}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for name, extra in (("LocalCluster, 1 worker", ["--workers", "1"]), ("LocalCluster, 2 workers", ["--workers", "2"])):
        wall, rows = run_batch(bids, args.output / "deriv", extra, options)
        results.append((name, wall, rows))
        print(f"  {name:38s} {wall:7.1f} s", flush=True)
    procs, address = external_cluster(args.output, 2)
    try:
        wall, rows = run_batch(bids, args.output / "deriv", ["--scheduler", address], options)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    results.append(("dask scheduler + 2 dask workers", wall, rows))
    print(f"  {'dask scheduler + 2 dask workers':38s} {wall:7.1f} s")
    one = results[0][1]
    for name, wall, rows in results[1:]:
        print(f"  speed-up of {name}: x{one / wall:.2f}")
    per = [float(r["time_s"]) for r in results[0][2] if r["time_s"]]
    print(f"  per-subject reconstruct time (1 worker): mean {sum(per) / len(per):.1f} s, "
          f"min {min(per):.1f}, max {max(per):.1f}; all subjects ok: "
          f"{all(r['status'] == 'ok' for _, _, rows in results for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
