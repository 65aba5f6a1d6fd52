#!/usr/bin/env python
"""Issue 13, item 3: every method end to end with ``--device cuda`` on 3 stacks, timed, in one call.

A lent GPU machine has no ``../shared`` and no package registry, so the work is split in two:

1. here (any machine with the shared data): ``--make-cases DIR`` simulates the benchmark's cases
   (:func:`slice2vol.evaluation.benchmark.cases.simulate_case`: 3 orthogonal stacks, 1 mm x 3 mm,
   moderate motion by default) into ``DIR``, a few MB each, to travel with the working tree;
2. there: ``--cases DIR --device cuda`` runs every method on every case, each job in a fresh
   process (the benchmark's worker, :func:`slice2vol.evaluation.benchmark.runner.run_worker`), so
   a job's time includes what a user's first call pays (CUDA context, kernel compiles), and
   prints time, PSNR / SSIM against the ground truth, slice TRE and peak GPU memory.  With
   ``--compare-cpu CASE`` one case is also run on the CPU (torch threads of that machine): the
   PSNR of the two devices must agree (the GPU path is the PyTorch operators; CPU timings there
   are not those of a 2-core laptop and are printed only for orientation).

``benchmarks/gpu_check.sh`` wraps it with the CUDA tests and the operator benchmark, for the lent
machine (see benchmarks/README.md).

    python benchmarks/bench_gpu.py --make-cases .gpu_cases                          # here
    python benchmarks/bench_gpu.py --cases .gpu_cases --device cuda --compare-cpu STA29_moderate_seed0
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from slice2vol.evaluation.benchmark.cases import case_name, ensure_case
from slice2vol.evaluation.benchmark.runner import Job, link_case, run_worker
from slice2vol.evaluation.benchmark.settings import CASE_JSON, BenchmarkConfig

METHODS = "svr,gaussian,csvr,csvr-refine,auto"  # as gpu_check.sh runs them


def make_cases(out: Path, atlases: list[str], motion: str, seeds: list[int], data: Path | None) -> list[Path]:
    from slice2vol.io import shared_data_dir

    cfg = BenchmarkConfig(output=out, data=data or shared_data_dir())
    done = []
    for atlas in atlases:
        for seed in seeds:
            case = ensure_case(cfg, atlas, motion, seed, out / case_name(atlas, motion, seed))
            done.append(case)
            print(f"case {case.name}: {sum(f.stat().st_size for f in case.iterdir()) / 2**20:.1f} MB", flush=True)
    return done


def run_case(work: Path, case: Path, method: str, device: str, resolution: float, threads: int | None) -> dict:
    """One job in a fresh worker process; the case's files are linked into ``work``."""
    meta = json.loads((case / CASE_JSON).read_text())
    cfg = BenchmarkConfig(output=work / device, device=device, resolution=resolution, threads=threads)
    link_case(cfg, case)
    return run_worker(cfg, Job(meta["atlas"], meta["motion"], meta["seed"], method), device)


def line(case: str, r: dict) -> str:
    if r.get("status") != "ok":
        return f"{case:26s} {r['method']:9s} {r.get('device', '?'):6s} FAILED: {r.get('error')}"
    gpu = f"{r['gpu_peak_mb']:8.0f}" if r.get("gpu_peak_mb") is not None else f"{'-':>8s}"
    return (f"{case:26s} {r['method']:9s} {r['device']:6s} {r['time_s']:7.2f} {r['prepare_s']:6.2f} {r['method_s']:7.2f} "
            f"{r['psnr']:7.2f} {r['ssim']:6.4f} {r['tre_median_mm']:6.2f} {gpu} {r['peak_rss_mb']:8.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-cases", type=Path, metavar="DIR", help="simulate the cases into DIR and stop")
    ap.add_argument("--cases", type=Path, metavar="DIR", help="run every case folder in DIR")
    ap.add_argument("--atlases", nargs="+", default=["STA23", "STA29", "STA35"], help="(default: %(default)s)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="(default: 0)")
    ap.add_argument("--motion", default="moderate", help="(default: moderate)")
    ap.add_argument("--methods", default=METHODS, help=f"comma-separated method variants (default: {METHODS})")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="(default: cuda)")
    ap.add_argument("--compare-cpu", nargs="*", default=[], metavar="CASE",
                    help="also run these cases on the CPU, for the PSNR agreement of the two devices")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the CPU jobs (default: torch's)")
    ap.add_argument("--resolution", type=float, default=0.8)
    ap.add_argument("--data", type=Path, default=None, help="shared data, for --make-cases")
    ap.add_argument("--output", type=Path, default=Path("bench_out/gpu"), help="work folder (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write every job's figures here")
    args = ap.parse_args(argv)

    if args.make_cases:
        make_cases(args.make_cases, args.atlases, args.motion, args.seeds, args.data)
        return 0
    if not args.cases:
        ap.error("give --cases DIR (made by --make-cases) or --make-cases DIR")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: --device cuda but torch sees no CUDA device")
    cases = sorted(p for p in args.cases.iterdir() if (p / CASE_JSON).exists())
    if not cases:
        sys.exit(f"bench_gpu: no case folders (with {CASE_JSON}) in {args.cases}")
    unknown = set(args.compare_cpu) - {c.name for c in cases}
    if unknown:
        sys.exit(f"bench_gpu: --compare-cpu names unknown cases {sorted(unknown)}")
    methods = [m for m in args.methods.split(",") if m]
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"slice2vol on {args.device} ({dev_name}); torch {torch.__version__}, {len(cases)} case(s) x "
          f"{len(methods)} method(s), {args.resolution:g} mm; each job a fresh process", flush=True)
    print(f"{'case':26s} {'method':9s} {'device':6s} {'time s':>7s} {'prep':>6s} {'method':>7s} {'PSNR':>7s} "
          f"{'SSIM':>6s} {'TRE mm':>6s} {'GPU MB':>8s} {'RSS MB':>8s}", flush=True)
    rows = []
    t_start = time.perf_counter()
    for case in cases:
        for method in methods:
            devices = [args.device] + (["cpu"] if case.name in args.compare_cpu and args.device != "cpu" else [])
            for dev in devices:
                r = run_case(args.output, case, method, dev, args.resolution, args.threads if dev == "cpu" else None)
                r["case"] = case.name
                rows.append(r)
                print(line(case.name, r), flush=True)

    print(f"\n{len(rows)} jobs in {time.perf_counter() - t_start:.0f} s")
    for method in methods:
        ok = [r for r in rows if r["method"] == method and r["device"].startswith(args.device) and r.get("status") == "ok"]
        bad = [r for r in rows if r["method"] == method and r.get("status") != "ok"]
        if ok:
            print(f"  {method:9s} on {args.device}: median {statistics.median(r['time_s'] for r in ok):.2f} s, "
                  f"PSNR {statistics.mean(r['psnr'] for r in ok):.2f} dB mean over {len(ok)} case(s)"
                  + (f"; {len(bad)} FAILED" if bad else ""))
        elif bad:
            print(f"  {method:9s}: every job FAILED ({bad[0].get('error')})")
        for case in (args.compare_cpu if args.device != "cpu" else []):
            pair = {r["device"].split(":")[0]: r for r in rows if r["case"] == case and r["method"] == method
                    and r.get("status") == "ok"}
            if "cpu" in pair and args.device in pair:
                print(f"    {case}: PSNR {args.device} - cpu {pair[args.device]['psnr'] - pair['cpu']['psnr']:+.3f} dB, "
                      f"time {pair[args.device]['time_s']:.2f} vs {pair['cpu']['time_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any(r.get("status") != "ok" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
