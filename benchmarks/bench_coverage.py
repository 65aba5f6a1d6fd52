#!/usr/bin/env python
"""Region of interest for coarse pixels: the output grid's coverage rule before and after 2026-12-07.

Without a 3D mask the reconstruction's region of interest is where the masked slices of most
stacks reach (:func:`slice2vol.core.preprocess.output_grid`).  A voxel counted as reached by a
stack where the adjoint of its pixels exceeded an absolute 0.1; the adjoint's level is the stack's
sample density (voxel volume over the space per pixel), 0.171 for 1 x 1 x 3 mm pixels on a 0.8 mm
grid but 0.087 for 1.4 x 1.4 x 3 mm, so the brain of such stacks read uncovered.  Now the threshold
is the same fraction (0.586) of each stack's own density.  Per atlas, seed and stack geometry
(pixel x thickness [+ gap] mm), 3 orthogonal stacks at ``--motion`` (2 % noise) reconstructed with
``auto`` at 0.8 mm, one torch thread, stack masks, with the rule ``before`` (emulated: the density
replaced by the constant that gives 0.1) and ``now``; PSNR as ``slice2vol demo``; ROI in voxels.

    python benchmarks/bench_coverage.py | tee benchmarks/results/coverage_cpu.txt     # test atlases
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, add_atlas_arguments, machine, paired_change, setup  # noqa: E402

#: (pixel mm, thickness mm, gap mm): the default, clinical pixels (1.4 mm: the cSVR paper's clinical
#: data were 1.3-1.4 mm), thick slices with coarse pixels, fine pixels, overlapping slices
GEOMETRIES = ((1.0, 3.0, 0.0), (1.4, 3.0, 0.0), (1.5, 5.0, 0.0), (0.5, 3.0, 0.0), (1.0, 3.0, -1.5))


def run(stacks, gt, before: bool) -> dict:
    from slice2vol.core import preprocess
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.evaluation.quality import assess_quality
    from slice2vol.methods.run import crop_to_roi, run_reconstruction
    from slice2vol.errors import Slice2VolError

    density = preprocess._sample_density
    if before:
        preprocess._sample_density = lambda *a: 0.1 / preprocess.COVERAGE_FRACTION
    try:
        t0 = time.perf_counter()
        prep, res, _ = run_reconstruction(stacks, method="auto", have_stack_masks=True, progress=False)
        wall = time.perf_counter() - t0
    except Slice2VolError as e:
        return {"psnr": float("nan"), "text": f"error: {str(e)[:40]}"}
    finally:
        preprocess._sample_density = density
    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
    v = assess_quality(prep, res).verdict
    return {"psnr": float(m["psnr"]),
            "text": f"{float(m['psnr']):6.2f} {v:<8} {int(prep.roi.sum()):>7} {wall:5.1f}"}


def main(argv=None) -> int:
    from slice2vol.core.runtime import seed_everything
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi
    from slice2vol.simulation.simulate import SimulationConfig, realism_for, simulate_stacks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--motion", default="moderate")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    print(f"Coverage rule: atlases {', '.join(atlases)}, seeds {args.seeds}, motion {args.motion}, 2 % noise; 3 orthogonal "
          f"stacks, auto, 0.8 mm, 1 torch thread; {machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'px':>4} {'thick':>5} {'gap':>4}   {'before PSNR':>11} {'verdict':<8} {'ROI vox':>7} "
          f"{'s':>5}   {'now PSNR':>8} {'verdict':<8} {'ROI vox':>7} {'s':>5}   change dB")
    diffs = {}
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in args.seeds:
            for px, th, gap in GEOMETRIES:
                cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=px, thickness=th,
                                       gap=gap, motion=args.motion, noise=0.02, **realism_for(args.motion))
                stacks = simulate_stacks(vol, None, cfg, seed_everything(seed), progress=False).stacks
                old, new = run(stacks, gt, True), run(stacks, gt, False)
                d = new["psnr"] - old["psnr"]
                diffs.setdefault((px, th, gap), []).append(d)
                print(f"{atlas:<18} {seed:>4} {px:>4.1f} {th:>5.1f} {gap:>+4.1f}   {old['text']:<35}   {new['text']:<35}   "
                      f"{d:+.2f}", flush=True)
    print("\nnow - before per geometry: PSNR dB mean [min, max], better / worse (|change| > 0.05 dB), over the cases both "
          "rules reconstructed; refused: cases one rule refused")
    for (px, th, gap), d in diffs.items():
        ok = [x for x in d if x == x]
        summary = paired_change(ok) if ok else "none reconstructed by both"
        print(f"  {px:.1f} x {px:.1f} x {th:.1f} mm, gap {gap:+.1f}: {summary}; refused {len(d) - len(ok)} of {len(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
