#!/usr/bin/env python
"""Repeatability: how far the default pipeline's result moves when the input moves by nothing.

The same stacks read from NIfTI (float32 header) and DICOM (decimal strings) differ in the 7th
digit of their geometry; before 2026-12-07 that flipped a rounding in the cSVR network's input size
and moved two of three test reconstructions by 0.13 and 0.62 dB (README, DICOM).  This benchmark
measures what is left of such sensitivity: per atlas, seed and motion level (3 orthogonal stacks,
1 x 3 mm, 2 % noise), the stacks are reconstructed as simulated and ``--copies`` more times, each
stack of a copy moved rigidly by a random ``--jitter`` mm and turned by ``--jitter`` / 100 mm rad
about its centre (default 1e-4 mm: a float32 rounding of a 100 mm coordinate; physically nothing),
then its header stored as a NIfTI stores it (float32) and its poses and pixel spacing derived from
that header as ``slice2vol.io.load_stack`` derives them.  A deterministic pipeline whose decisions do not sit on a
knife edge returns the same volume each time.  Reported: PSNR of every run
(``compare_volumes(..., align=True, scale=True)`` against the ground truth, as ``slice2vol demo``),
the spread (max - min) per case, and the largest voxel difference to the unjittered run over its
maximum.  Reconstruct: ``auto``, 0.8 mm, one torch thread, stack masks.

    python benchmarks/bench_repeatability.py --atlases validation | tee benchmarks/results/repeatability_validation_cpu.txt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, _simulate, add_atlas_arguments, machine, setup  # noqa: E402


def perturbed(st, rng: np.random.Generator, jitter_mm: float):
    """``st`` moved by ``jitter_mm`` and turned by ``jitter_mm / 100`` rad about its centre (random
    directions), header rounded to float32, poses and spacing re-derived from it."""
    from dataclasses import replace

    from scipy.spatial.transform import Rotation

    from slice2vol.core.geometry import stack_slice_poses

    N, H, W = st.slices.shape
    A = np.asarray(st.affine, dtype=np.float64)
    before, _, _ = stack_slice_poses(A, (H, W, N))
    if not np.allclose(before, st.poses, atol=1e-6):
        raise SystemExit("bench_repeatability: a simulated stack's poses are not its header's")
    centre = A @ np.array([(H - 1) / 2, (W - 1) / 2, (N - 1) / 2, 1.0])
    axis, shift = rng.normal(size=3), rng.normal(size=3)
    R = Rotation.from_rotvec(axis / np.linalg.norm(axis) * jitter_mm / 100).as_matrix()
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = centre[:3] - R @ centre[:3] + shift / np.linalg.norm(shift) * jitter_mm
    A2 = (M @ A).astype(np.float32).astype(np.float64)
    poses, spacing, _ = stack_slice_poses(A2, (H, W, N))
    return replace(st, affine=A2, poses=poses, spacing=spacing)


def main(argv=None) -> int:
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--motions", nargs="+", default=["moderate", "severe"])
    p.add_argument("--copies", type=int, default=3, help="jittered copies per case")
    p.add_argument("--jitter", type=float, default=1e-4,
                   help="shift of each stack of a copy, mm (it is also turned by jitter / 100 rad)")
    p.add_argument("--method", default="auto")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    print(f"Repeatability: atlases {', '.join(atlases)}, seeds {args.seeds}, motion {', '.join(args.motions)}; "
          f"{args.copies} copies with every stack moved {args.jitter:g} mm, turned {args.jitter / 100:g} rad, header "
          f"float32; 3 orthogonal stacks, 1 x 3 mm, 2 % noise; {args.method}, 0.8 mm, 1 torch thread; {machine()}",
          flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'motion':<9} {'PSNR as simulated, then each copy':<44} {'spread':>6} "
          f"{'max|diff|':>9} {'s':>5}")
    spreads = []
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in args.seeds:
            for motion in args.motions:
                stacks = _simulate(vol, motion, seed).stacks
                rng = np.random.default_rng(1000 + seed)
                psnrs, diffs, t0 = [], [], time.perf_counter()
                base = None
                for c in range(args.copies + 1):
                    if c == 0:
                        variant = stacks
                    else:
                        variant = [perturbed(st, rng, args.jitter) for st in stacks]
                    prep, res, _ = run_reconstruction(variant, method=args.method, have_stack_masks=True,
                                                      progress=False)
                    out = crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX)
                    psnrs.append(float(compare_volumes(out, gt, align=True, scale=True)["psnr"]))
                    v = out.data.detach().cpu().double().numpy()
                    if base is None:
                        base = v
                    else:
                        diffs.append(float(np.abs(v - base).max() / np.abs(base).max()) if v.shape == base.shape
                                     else float("inf"))
                wall = (time.perf_counter() - t0) / (args.copies + 1)
                spread = max(psnrs) - min(psnrs)
                spreads.append(spread)
                runs = " ".join(f"{x:6.2f}" for x in psnrs)
                print(f"{atlas:<18} {seed:>4} {motion:<9} {runs:<44} {spread:>6.2f} {max(diffs):>9.1e} {wall:>5.1f}",
                      flush=True)
    s = np.array(spreads)
    print(f"\n{len(s)} cases: PSNR spread median {np.median(s):.3f} dB, max {s.max():.3f} dB; "
          f"over 0.1 dB in {int((s > 0.1).sum())}, over 0.5 dB in {int((s > 0.5).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
