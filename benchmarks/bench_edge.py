#!/usr/bin/env python
"""Edge threshold: what the noise-adaptive edge threshold of the super-resolution buys.

The edge-preserving prior's threshold ``delta`` was fixed at 0.1 x the slices' 99th percentile
(SVRTK's value); :func:`slice2vol.core.reconstruction.edge_threshold_for_noise` now sets the
output's from the stacks' estimated noise (twice the relative noise, at least 0.03; 0.1 where the
noise is not white, :func:`slice2vol.core.noise.coarse_ratio`) in two final solves, while the
volumes the registration works on keep 0.1.  Per atlas, seed, motion level and noise level: the
benchmark's 3 orthogonal 1 mm x 3 mm stacks (:func:`bench_selection._simulate`), reconstructed in
this process with the default pipeline (``auto``) twice -- as before 2026-12-07 (threshold 0.1,
one final solve: ``SVRConfig(edge=0.1, final_rounds=1)``) and as now -- one torch thread, 0.8 mm, stack masks.  PSNR / SSIM:
``compare_volumes(recon, gt, align=True, scale=True)`` as ``slice2vol demo``.  ``--upsample``
stores every stack 2x upsampled in-plane (bilinear, as a scanner's interpolation): the noise then
reads low and is not white, and the threshold stays at 0.1 (only the second final solve differs).

The rule was chosen on the training atlases STA24/30/36 and the validation atlases (seed 0) with
``--sweep``: the same cases reconstructed with each fixed threshold in every super-resolution (the
code before, with ``delta`` changed); the default here is the 6 test atlases of the large-motion table.

    python benchmarks/bench_edge.py | tee benchmarks/results/edge_cpu.txt                      # test atlases
    python benchmarks/bench_edge.py --atlases validation --seeds 1                             # tuning atlases
    python benchmarks/bench_edge.py --sweep 0.1 0.05 0.03 0.02 --atlases STA24 STA30 STA36 validation \
        --motions moderate --noises 0.01 0.02 0.04                                              # the tuning
    python benchmarks/bench_edge.py --upsample --noises 0.02 0.08 --motions moderate           # interpolated stacks
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import add_atlas_arguments, machine, paired_change, setup, simulated_cases  # noqa: E402


def upsampled(stack):
    """``stack`` stored at half its in-plane pixel size, bilinear (the scanner's interpolation)."""
    import torch.nn.functional as F

    x = F.interpolate(stack.slices[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    m = F.interpolate(stack.mask[:, None].float(), scale_factor=2, mode="nearest")[:, 0] > 0.5
    A = np.asarray(stack.affine, dtype=np.float64).copy()
    # pixel (i, j) of the fine grid sits at (i + 0.5) / 2 - 0.5 of the coarse one (align_corners=False)
    A[:3, 3] = A[:3, 3] + A[:3, :2] @ np.array([-0.25, -0.25])
    A[:3, :2] = A[:3, :2] / 2
    P = np.asarray(stack.poses, dtype=np.float64)
    spacing = tuple(s / 2 for s in stack.spacing)
    return replace(stack, slices=x, mask=m, affine=A, poses=P, spacing=spacing)


def run(stacks, gt, fixed: bool) -> dict:
    from slice2vol.core.reconstruction import EDGE_DELTA
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.evaluation.quality import assess_quality
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    # fixed: the code before 2026-12-07 (one final solve, the stages' threshold)
    options = {"svr": {"edge": EDGE_DELTA, "final_rounds": 1}} if fixed else {}
    t0 = time.perf_counter()
    prep, res, _ = run_reconstruction(stacks, method="auto", have_stack_masks=True, progress=False, options=options)
    wall = time.perf_counter() - t0
    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
    return {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]), "time_s": wall, "edge": float(res.edge_threshold),
            "noise": prep.noise["median"], "ratio": prep.noise["coarse_ratio"],
            "verdict": assess_quality(prep, res).verdict}


def run_fixed(stacks, gt, edge: float) -> float:
    """PSNR of ``auto`` with the relative threshold ``edge`` in every super-resolution (the start
    choice's quick one included) and one final solve: the code before 2026-12-07 with ``delta``
    changed, as the tuning ran it."""
    import functools

    import slice2vol.methods.csvr.reconstruct as csvr_reconstruct
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    real = csvr_reconstruct.super_resolve
    csvr_reconstruct.super_resolve = functools.partial(real, edge=edge)
    try:
        prep, res, _ = run_reconstruction(stacks, method="auto", have_stack_masks=True, progress=False,
                                          options={"svr": {"edge": edge, "edge_stages": edge, "final_rounds": 1}})
    finally:
        csvr_reconstruct.super_resolve = real
    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
    return float(m["psnr"])


def cases(atlases, args, data):
    """``(atlas, seed, motion, noise, stacks, ground truth)`` of every case the options ask for."""
    for atlas, seed, _, motion, noise, stacks, gt in simulated_cases(
            data, atlases, args.seeds, args.motions, args.noises, transform=upsampled if args.upsample else None):
        yield atlas, seed, motion, noise, stacks, gt


def sweep(atlases, args, data) -> None:
    print(f"edge threshold sweep: atlases {', '.join(atlases)}, seeds {args.seeds}, motion {', '.join(args.motions)}, "
          f"noise {', '.join(f'{n:g}' for n in args.noises)}; thresholds {args.sweep} x the slices' 99th percentile in "
          f"every SR; auto, 0.8 mm, 1 torch thread; {machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'motion':<9} {'noise':>5}   " + "  ".join(f"{e:>6g}" for e in args.sweep) + "   best")
    for atlas, seed, motion, noise, stacks, gt in cases(atlases, args, data):
        p = [run_fixed(stacks, gt, e) for e in args.sweep]
        print(f"{atlas:<18} {seed:>4} {motion:<9} {noise:>5.2f}   " + "  ".join(f"{v:>6.2f}" for v in p)
              + f"   {args.sweep[int(np.argmax(p))]:g}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--motions", nargs="+", default=["moderate", "severe"])
    p.add_argument("--noises", type=float, nargs="+", default=[0.01, 0.02, 0.04, 0.08])
    p.add_argument("--upsample", action="store_true", help="store the stacks 2x upsampled in-plane (bilinear)")
    p.add_argument("--sweep", type=float, nargs="+", default=None, metavar="EDGE",
                   help="the tuning: PSNR with each fixed relative threshold in every SR instead of the A/B")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    import torch

    torch.set_num_threads(1)
    if args.sweep:
        sweep(atlases, args, data)
        return 0
    print(f"edge threshold: atlases {', '.join(atlases)}, seeds {args.seeds}, motion {', '.join(args.motions)}, noise "
          f"{', '.join(f'{n:g}' for n in args.noises)}; 3 orthogonal 1 mm x 3 mm stacks{', stored 2x upsampled' if args.upsample else ''}, "
          f"auto, 0.8 mm, 1 torch thread; {machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'motion':<9} {'noise':>5}  {'est.':>6} {'ratio':>5} {'edge':>5}   "
          f"{'fixed 0.1 PSNR':>14} {'SSIM':>6} {'verdict':<8} {'s':>5}   {'rule PSNR':>9} {'SSIM':>6} {'verdict':<8} {'s':>5}   change dB")
    diffs, ssims = defaultdict(list), defaultdict(list)
    for atlas, seed, motion, noise, stacks, gt in cases(atlases, args, data):
        old, new = run(stacks, gt, True), run(stacks, gt, False)
        d = new["psnr"] - old["psnr"]
        diffs[(motion, noise)].append(d)
        ssims[(motion, noise)].append(new["ssim"] - old["ssim"])
        print(f"{atlas:<18} {seed:>4} {motion:<9} {noise:>5.2f}  {new['noise']:>6.4f} {new['ratio']:>5.2f} "
              f"{new['edge']:>5.3f}   {old['psnr']:>14.2f} {old['ssim']:>6.3f} {old['verdict']:<8} "
              f"{old['time_s']:>5.1f}   {new['psnr']:>9.2f} {new['ssim']:>6.3f} {new['verdict']:<8} "
              f"{new['time_s']:>5.1f}   {d:+.2f}", flush=True)
    print("\nrule - fixed 0.1, per motion and noise: PSNR dB mean [min, max], better / worse (|change| > 0.05 dB); SSIM mean")
    for key, d in diffs.items():
        print(f"  {key[0]:<9} {key[1]:>5.2f}: {paired_change(d)};  SSIM {np.mean(ssims[key]):+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
