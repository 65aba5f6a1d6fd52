#!/usr/bin/env python
"""In-plane resolution: what modelling the acquired pixel of interpolated stacks buys, and that
stacks stored as acquired are left alone.

Scanners often store slices zero-filled to twice their acquired matrix; the PSF then has to model
the acquired pixel, not the stored one (:mod:`slice2vol.core.inplane`, ``--inplane-resolution``).
Per atlas, seed, motion level and noise level, 3 orthogonal stacks with 3 mm slices
(:func:`bench_selection._simulate`) in each storage:

* ``acquired``: 1 mm pixels stored as acquired (the control: ``auto`` must find nothing);
* ``zero-fill``: 1.4 mm pixels stored zero-filled at 0.7 mm (``SimulationConfig.zero_fill = 2``);
* ``bilinear`` (``--bilinear``): 1.4 mm pixels stored bilinearly upsampled at 0.7 mm, which ``auto``
  does not detect; its third arm gives ``--inplane-resolution 1.4``;

reconstructed with ``--method`` (default ``auto``) at 0.8 mm, one torch thread, stack masks, with
the in-plane resolution ``stored`` (SVRTK's and NeSVoR's convention, the code before) and ``auto``.
PSNR / SSIM: ``compare_volumes(recon, gt, align=True, scale=True)`` as ``slice2vol demo``.

Nothing was tuned on the atlases: the detector's threshold sits between the contrasts measured on
validation / training stacks (module doc of ``slice2vol.core.inplane``).

    python benchmarks/bench_inplane.py | tee benchmarks/results/inplane_cpu.txt      # test atlases
    python benchmarks/bench_inplane.py --atlases validation --bilinear
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, _simulate, add_atlas_arguments, machine, paired_change, setup  # noqa: E402

#: storage -> (acquired pixel mm, zero-fill factor, bilinear upsampling)
STORAGES = {"acquired": (1.0, 1, False), "zero-fill": (1.4, 2, False), "bilinear": (1.4, 1, True)}


def run(stacks, gt, method: str, inplane) -> dict:
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.evaluation.quality import assess_quality
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    t0 = time.perf_counter()
    prep, res, _ = run_reconstruction(stacks, method=method, have_stack_masks=True, progress=False, inplane=inplane)
    wall = time.perf_counter() - t0
    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
    psf = [s["psf_pixel_mm"] for s in prep.inplane["stacks"]]
    return {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]), "time_s": wall,
            "verdict": assess_quality(prep, res).verdict, "psf": float(np.mean(psf))}


def main(argv=None) -> int:
    from bench_edge import upsampled
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--motions", nargs="+", default=["moderate", "severe"])
    p.add_argument("--noises", type=float, nargs="+", default=[0.02])
    p.add_argument("--bilinear", action="store_true", help="also stacks upsampled bilinearly (auto does not detect them)")
    p.add_argument("--method", default="auto", help="reconstruction method (default: auto)")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    storages = [s for s in STORAGES if s != "bilinear" or args.bilinear]
    print(f"In-plane resolution: atlases {', '.join(atlases)}, seeds {args.seeds}, motion {', '.join(args.motions)}, "
          f"noise {', '.join(f'{n:g}' for n in args.noises)}; storages {', '.join(storages)}; 3 orthogonal stacks, 3 mm "
          f"slices, {args.method}, 0.8 mm, 1 torch thread; {machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'storage':<10} {'motion':<9} {'noise':>5}   {'stored PSNR':>11} {'SSIM':>6} "
          f"{'verdict':<8} {'s':>5}   {'auto PSNR':>9} {'SSIM':>6} {'verdict':<8} {'s':>5} {'PSF mm':>6}   change dB")
    diffs, given = defaultdict(list), defaultdict(list)
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in args.seeds:
            for storage in storages:
                spacing, zero_fill, bilinear = STORAGES[storage]
                for motion in args.motions:
                    for noise in args.noises:
                        stacks = _simulate(vol, motion, seed, noise=noise, spacing=spacing, zero_fill=zero_fill).stacks
                        if bilinear:
                            stacks = [upsampled(st) for st in stacks]
                        old, new = run(stacks, gt, args.method, "stored"), run(stacks, gt, args.method, "auto")
                        d = new["psnr"] - old["psnr"]
                        diffs[(storage, motion, noise)].append(d)
                        line = (f"{atlas:<18} {seed:>4} {storage:<10} {motion:<9} {noise:>5.2f}   {old['psnr']:>11.2f} "
                                f"{old['ssim']:>6.3f} {old['verdict']:<8} {old['time_s']:>5.1f}   {new['psnr']:>9.2f} "
                                f"{new['ssim']:>6.3f} {new['verdict']:<8} {new['time_s']:>5.1f} {new['psf']:>6.2f}   {d:+.2f}")
                        if bilinear:
                            g = run(stacks, gt, args.method, spacing)
                            given[(storage, motion, noise)].append(g["psnr"] - old["psnr"])
                            line += f"   given {spacing:g} mm: {g['psnr']:.2f} ({g['psnr'] - old['psnr']:+.2f})"
                        print(line, flush=True)
    print("\nauto - stored, per storage, motion and noise: PSNR dB mean [min, max], better / worse (|change| > 0.05 dB)")
    for key, d in diffs.items():
        print(f"  {key[0]:<10} {key[1]:<9} {key[2]:>5.2f}: {paired_change(d)}")
    for key, d in given.items():
        print(f"  {key[0]:<10} {key[1]:<9} {key[2]:>5.2f}, --inplane-resolution {STORAGES[key[0]][0]:g} - stored: {paired_change(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
