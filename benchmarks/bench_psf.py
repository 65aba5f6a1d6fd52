#!/usr/bin/env python
"""PSF model: what modelling the in-plane blur of the slices buys, on our profile and on one we do not model.

Until 2026-12-07 the reconstructions' PSF (``psf_kernel(..., quality="normal")``) left the in-plane
blur out wherever it was below the voxel size (1 mm pixels, FWHM 1.2 mm, on a 0.8 mm grid: always),
so the reconstructed volume had to carry that blur itself.  Now its isotropic part goes to the
volume as a separable prefilter (:func:`slice2vol.core.acquisition.prefilter`) and the nodes keep
the rest.  Per atlas, seed, slice profile, motion level and noise level: 3 orthogonal 1 mm x 3 mm
stacks (:func:`bench_selection._simulate`) rendered with the simulator's Gaussian profile (the
model's shape, finer quadrature) or a ``box`` profile (a rectangular slab and pixel: a sharper,
differently shaped PSF than the model assumes), reconstructed in this process twice with
``--method`` (default ``auto``) -- the model before (``acquisition.PREFILTER = False``) and now --
one torch thread, 0.8 mm, stack masks.  PSNR / SSIM: ``compare_volumes(recon, gt, align=True,
scale=True)`` as ``slice2vol demo``.

Nothing was tuned: the prefilter is the Gaussian PSF's own decomposition (no parameter).  The
default atlases are the 6 test atlases of the large-motion table.

    python benchmarks/bench_psf.py | tee benchmarks/results/psf_cpu.txt                       # test atlases
    python benchmarks/bench_psf.py --motions extreme mild --noises 0.02 --profiles gaussian box
    python benchmarks/bench_psf.py --method gaussian --motions moderate --noises 0.02
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import add_atlas_arguments, machine, paired_change, run_switched, setup, simulated_cases  # noqa: E402


def run(stacks, gt, method: str, prefilter: bool) -> dict:
    from slice2vol.core import acquisition

    return run_switched(stacks, gt, method, acquisition, "PREFILTER", prefilter)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--motions", nargs="+", default=["moderate", "severe"])
    p.add_argument("--noises", type=float, nargs="+", default=[0.01, 0.02, 0.08])
    p.add_argument("--profiles", nargs="+", default=["gaussian", "box"], choices=["gaussian", "box"])
    p.add_argument("--method", default="auto", help="reconstruction method (default: auto)")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    print(f"PSF model (in-plane prefilter): atlases {', '.join(atlases)}, seeds {args.seeds}, profiles "
          f"{', '.join(args.profiles)}, motion {', '.join(args.motions)}, noise {', '.join(f'{n:g}' for n in args.noises)}; "
          f"3 orthogonal 1 mm x 3 mm stacks, {args.method}, 0.8 mm, 1 torch thread; {machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'profile':<8} {'motion':<9} {'noise':>5}   {'before PSNR':>11} {'SSIM':>6} "
          f"{'verdict':<8} {'s':>5}   {'now PSNR':>8} {'SSIM':>6} {'verdict':<8} {'s':>5}   change dB")
    diffs, ssims, times = defaultdict(list), defaultdict(list), defaultdict(list)
    for atlas, seed, profile, motion, noise, stacks, gt in simulated_cases(data, atlases, args.seeds, args.motions,
                                                                           args.noises, args.profiles):
        old, new = run(stacks, gt, args.method, False), run(stacks, gt, args.method, True)
        d = new["psnr"] - old["psnr"]
        key = (profile, motion, noise)
        diffs[key].append(d)
        ssims[key].append(new["ssim"] - old["ssim"])
        times[key].append(new["time_s"] - old["time_s"])
        print(f"{atlas:<18} {seed:>4} {profile:<8} {motion:<9} {noise:>5.2f}   {old['psnr']:>11.2f} "
              f"{old['ssim']:>6.3f} {old['verdict']:<8} {old['time_s']:>5.1f}   {new['psnr']:>8.2f} "
              f"{new['ssim']:>6.3f} {new['verdict']:<8} {new['time_s']:>5.1f}   {d:+.2f}", flush=True)
    print("\nnow - before, per profile, motion and noise: PSNR dB mean [min, max], better / worse (|change| > 0.05 dB); "
          "SSIM mean; time s mean")
    for key, d in diffs.items():
        print(f"  {key[0]:<8} {key[1]:<9} {key[2]:>5.2f}: {paired_change(d)};  SSIM {np.mean(ssims[key]):+.4f};  "
              f"time {np.mean(times[key]):+.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
