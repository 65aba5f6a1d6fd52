#!/usr/bin/env python
"""Noise estimated on the acquired pixel grid: what it changes for stacks a scanner stored
zero-filled, and that stacks stored as acquired are left alone.

A stack acquired with 1.4 mm pixels and stored zero-filled at 0.7 mm has noise correlated between
neighbouring stored pixels, and the noise estimate (:mod:`slice2vol.core.noise`) read it about 7x
low and not white, so the regularisation and the edge threshold fell back to their defaults
whatever the noise.  With the in-plane pixel known (detected, :mod:`slice2vol.core.inplane`, or
``--inplane-resolution``) the estimate is now taken on the acquired grid
(:func:`slice2vol.core.noise.acquired_grid`).  Per atlas, seed, motion and noise level: 3
orthogonal stacks of 3 mm slices (:func:`bench_selection._simulate`) acquired at 1.4 mm and stored
zero-filled at 0.7 mm, and (``--control``) acquired at 1 mm and stored as acquired; reconstructed
with ``--method`` (default ``auto``, in-plane resolution ``auto``) at 0.8 mm, one torch thread,
stack masks, with the estimate on the stored grid (``noise.ACQUIRED_GRID = False``, before) and on
the acquired grid (now).  PSNR / SSIM: ``compare_volumes(recon, gt, align=True, scale=True)``.

    python benchmarks/bench_noise_grid.py --atlases validation             # what the change was checked on
    python benchmarks/bench_noise_grid.py | tee benchmarks/results/noise_grid_cpu.txt      # test atlases
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, _simulate, add_atlas_arguments, machine, paired_change, run_switched, setup  # noqa: E402

#: storage -> (acquired pixel mm, zero-fill factor)
STORAGES = {"zero-fill": (1.4, 2), "acquired": (1.0, 1)}


def run(stacks, gt, method: str, acquired_grid: bool) -> dict:
    from slice2vol.core import noise

    row, prep, _ = run_switched(stacks, gt, method, noise, "ACQUIRED_GRID", acquired_grid)
    return {**row, "noise": float(prep.noise["median"] or float("nan")), "white": bool(prep.noise.get("white")),
            "lam": float(prep.regularisation), "edge": float(prep.edge_threshold)}


def main(argv=None) -> int:
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--motions", nargs="+", default=["moderate", "severe"])
    p.add_argument("--noises", type=float, nargs="+", default=[0.02, 0.08])
    p.add_argument("--control", action="store_true", help="also 1 mm stacks stored as acquired (must not change)")
    p.add_argument("--method", default="auto", help="reconstruction method (default: auto)")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    storages = ["zero-fill"] + (["acquired"] if args.control else [])
    print(f"Noise on the acquired grid: atlases {', '.join(atlases)}, seeds {args.seeds}, motion {', '.join(args.motions)}, "
          f"noise {', '.join(f'{n:g}' for n in args.noises)}; storages {', '.join(storages)}; 3 orthogonal stacks, 3 mm "
          f"slices, {args.method}, 0.8 mm, 1 torch thread; {machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'storage':<10} {'motion':<9} {'noise':>5}   "
          f"{'before est':>10} {'white':>5} {'lam':>6} {'edge':>5} {'PSNR':>6} {'SSIM':>6} {'verdict':<8} {'s':>5}   "
          f"{'now est':>8} {'white':>5} {'lam':>6} {'edge':>5} {'PSNR':>6} {'SSIM':>6} {'verdict':<8} {'s':>5}   change dB")
    diffs = defaultdict(list)
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in args.seeds:
            for storage in storages:
                spacing, zero_fill = STORAGES[storage]
                for motion in args.motions:
                    for level in args.noises:
                        stacks = _simulate(vol, motion, seed, noise=level, spacing=spacing, zero_fill=zero_fill).stacks
                        old, new = run(stacks, gt, args.method, False), run(stacks, gt, args.method, True)
                        d = new["psnr"] - old["psnr"]
                        diffs[(storage, motion, level)].append(d)
                        cols = [f"{r['noise']:>{w}.4f} {str(r['white']):>5} {r['lam']:>6.3f} {r['edge']:>5.3f} "
                                f"{r['psnr']:>6.2f} {r['ssim']:>6.3f} {r['verdict']:<8} {r['time_s']:>5.1f}"
                                for r, w in ((old, 10), (new, 8))]
                        print(f"{atlas:<18} {seed:>4} {storage:<10} {motion:<9} {level:>5.2f}   {cols[0]}   {cols[1]}   "
                              f"{d:+.2f}", flush=True)
    print("\nnow - before, per storage, motion and noise: PSNR dB mean [min, max], better / worse (|change| > 0.05 dB)")
    for key, d in diffs.items():
        print(f"  {key[0]:<10} {key[1]:<9} {key[2]:>5.2f}: {paired_change(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
