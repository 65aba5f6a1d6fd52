#!/usr/bin/env python
"""Noise: how well it is estimated, and what the noise-adaptive regularisation buys.

The super-resolution's regularisation weight ``lam`` was tuned at our simulator's 2 % noise; real
stacks range widely.  :mod:`slice2vol.core.noise` estimates each stack's noise and
:func:`slice2vol.core.reconstruction.regularisation_for_noise` sets ``lam`` from it.  Per atlas:
the benchmark's 3 orthogonal stacks (1 mm x 3 mm, :func:`bench_selection._simulate`) at several
noise levels (sd relative to the mean brain intensity), reconstructed in this process, one torch
thread, 0.8 mm, stack masks.  PSNR / SSIM: ``compare_volumes(recon, gt, align=True, scale=True)``
as ``slice2vol demo``.  Three modes:

* default -- the test atlases: ``auto`` (the default pipeline, adaptive ``lam``) against ``auto``
  with ``lam`` fixed at 0.02 (before 2026-12-07);
* ``--sweep`` -- the tuning: classical ``svr`` over a grid of ``lam`` (training and validation
  atlases by default), the best ``lam`` per noise level;
* ``--estimate`` -- the estimator alone: estimated against simulated noise, no reconstruction.

    python benchmarks/bench_noise.py --estimate --atlases STA30 GA22_notoperated
    python benchmarks/bench_noise.py --sweep --atlases STA24 STA30 STA36 validation   # tuning
    python benchmarks/bench_noise.py | tee benchmarks/results/noise_cpu.txt          # test atlases
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, _simulate, add_atlas_arguments, machine, paired_change, setup  # noqa: E402

SWEEP_LAMS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)


def run(stacks, gt, method: str, lam: float | None) -> dict:
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    options = {} if lam is None else {"lam": lam}
    t0 = time.perf_counter()
    prep, res, _ = run_reconstruction(stacks, method=method, have_stack_masks=True, progress=False, options=options)
    wall = time.perf_counter() - t0
    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
    return {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]), "time_s": wall, "lam": float(res.regularisation),
            "noise": prep.noise["median"]}


def header(what: str, atlases, args) -> None:
    print(f"noise {what}: atlases {', '.join(atlases)}, seed {args.seed}, {args.motion} motion, noise "
          f"{', '.join(f'{n:g}' for n in args.noises)}; 3 orthogonal 1 mm x 3 mm stacks, 0.8 mm, 1 torch thread; "
          f"{machine()}", flush=True)


def estimate(atlases, args, data) -> None:
    from slice2vol.core.noise import stack_noise

    header("estimate", atlases, args)
    print(f"{'atlas':<18} {'noise':>6}  estimated per stack")
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        for noise in args.noises:
            sim = _simulate(vol, args.motion, args.seed, noise=noise)
            print(f"{atlas:<18} {noise:>6.3f}  " + "  ".join(f"{stack_noise(st):.4f}" for st in sim.stacks), flush=True)


def sweep(atlases, args, data) -> None:
    from slice2vol.core.reconstruction import regularisation_for_noise
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi

    header("sweep (svr over lam)", atlases, args)
    print(f"{'atlas':<18} {'noise':>6} " + " ".join(f"{lam:>6g}" for lam in SWEEP_LAMS) + "   best  rule (lam)")
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for noise in args.noises:
            sim = _simulate(vol, args.motion, args.seed, noise=noise)
            ps = {lam: run(sim.stacks, gt, "svr", lam)["psnr"] for lam in SWEEP_LAMS}
            rule = run(sim.stacks, gt, "svr", None)
            best = max(ps, key=ps.get)
            print(f"{atlas:<18} {noise:>6.3f} " + " ".join(f"{ps[lam]:6.2f}" for lam in SWEEP_LAMS)
                  + f" {best:>6g}  {rule['psnr']:6.2f} ({rule['lam']:.3f}; estimated noise {rule['noise']:.4f}, "
                    f"rule at the true noise {regularisation_for_noise(noise):.3f})", flush=True)


def compare(atlases, args, data) -> None:
    from slice2vol.core.reconstruction import DEFAULT_LAM
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi

    header("(auto, adaptive regularisation against fixed)", atlases, args)
    print(f"{'atlas':<18} {'noise':>6} {'estimated':>9} {'lam':>6} {'PSNR':>6} {'SSIM':>6} {'time s':>6}   "
          f"{'fixed lam':>9} {'PSNR':>6} {'SSIM':>6} {'time s':>6}   change dB", flush=True)
    diffs = defaultdict(list)
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for noise in args.noises:
            sim = _simulate(vol, args.motion, args.seed, noise=noise)
            a = run(sim.stacks, gt, "auto", None)
            b = run(sim.stacks, gt, "auto", DEFAULT_LAM)
            diffs[noise].append(a["psnr"] - b["psnr"])
            print(f"{atlas:<18} {noise:>6.3f} {a['noise']:>9.4f} {a['lam']:>6.3f} {a['psnr']:>6.2f} {a['ssim']:>6.3f} "
                  f"{a['time_s']:>6.0f}   {b['lam']:>9.3f} {b['psnr']:>6.2f} {b['ssim']:>6.3f} {b['time_s']:>6.0f}   "
                  f"{a['psnr'] - b['psnr']:+.2f}", flush=True)
    print("\nadaptive - fixed, PSNR dB per noise level: mean [min, max], better / worse (|change| > 0.05 dB)")
    for noise, d in diffs.items():
        print(f"  {noise:>6.3f}: {paired_change(d)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--noises", type=float, nargs="+", default=[0.02, 0.05, 0.08, 0.12])
    p.add_argument("--motion", default="moderate")
    p.add_argument("--seed", type=int, default=0)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="svr over a grid of lam (tuning)")
    mode.add_argument("--estimate", action="store_true", help="the noise estimate only")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    (sweep if args.sweep else estimate if args.estimate else compare)(atlases, args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
