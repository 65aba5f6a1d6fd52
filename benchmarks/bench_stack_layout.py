#!/usr/bin/env python
"""Stack layouts other than three orthogonal stacks: what they reconstruct to, and whether the
quality verdict tells a failure from a success.

Every other benchmark simulates one stack per orthogonal plane.  Clinical exams are often not
like that: a plane re-scanned after motion gives two near-parallel stacks, and stacks planned on
a moving fetus are oblique.  Per atlas, seed and motion level, 1 mm x 3 mm slices, 2 % noise
(:func:`slice2vol.simulation.simulate.realism_for` for ``extreme``), these layouts:

* ``orthogonal``: axial, coronal, sagittal (the control: the verdict must not change);
* ``2sag+cor``: two sagittal stacks and one coronal (a re-scanned plane, the axial lost);
* ``oblique3``: three ``oblique`` stacks (each a random plane tilted by 15 deg) tilted by up to
  30 deg more: near-parallel pairs occur by chance;
* ``2ax+cor+sag``: a re-scanned axial beside the three planes;

reconstructed with ``--method`` (default ``auto``) at 0.8 mm, one torch thread, stack masks.  PSNR:
``compare_volumes(recon, gt, align=True, scale=True)`` as ``slice2vol demo``.  Two verdicts of
the same reconstruction: ``all others`` (a stack's held-out prediction from every other stack, over
every pixel: the rule before 2026-12-07) and ``crossing`` (only from the stacks whose normal makes
at least :data:`slice2vol.evaluation.quality.CROSS_ANGLE` degrees with its own, with the pixels
whose prediction lacks data only because those stacks' slices were rejected left out: the rule
now); with the held-out NCC (``ho``) each reads.  The verdict's goal (``bench_quality.py``): nothing under 20 dB
``ok``, what reaches 24 dB ``ok``.

    python benchmarks/bench_stack_layout.py | tee benchmarks/results/stack_layout_cpu.txt   # test atlases
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, add_atlas_arguments, machine, setup  # noqa: E402

#: layout -> (orientations, extra SimulationConfig settings)
LAYOUTS = {
    "orthogonal": (("axial", "coronal", "sagittal"), {}),
    "2sag+cor": (("sagittal", "sagittal", "coronal"), {}),
    "oblique3": (("oblique", "oblique", "oblique"), {"stack_tilt_max": 30.0}),
    "2ax+cor+sag": (("axial", "axial", "coronal", "sagittal"), {}),
}


def simulate(vol, layout: str, motion: str, seed: int):
    from slice2vol.core.runtime import seed_everything
    from slice2vol.simulation.simulate import SimulationConfig, realism_for, simulate_stacks

    orientations, extra = LAYOUTS[layout]
    kw = {"n_stacks": len(orientations), "orientations": orientations, "spacing": 1.0, "thickness": 3.0,
          "motion": motion, "noise": 0.02, **realism_for(motion)}
    kw.update(extra)
    return simulate_stacks(vol, None, SimulationConfig(**kw), seed_everything(seed), progress=False).stacks


def both_verdicts(prep, res):
    """``(Quality now, Quality before)`` of one reconstruction: the held-out prediction from the
    crossing stacks with rejection gaps left out (the default), and from all others with every
    pixel (the rule before 2026-12-07)."""
    from slice2vol.evaluation import quality

    agree = quality.stack_agreement
    out = []
    try:  # assess_quality looks stack_agreement up at call time: hand it each rule
        for rule in ({}, {"cross_angle": 0.0, "rejection_gaps": False}):
            quality.stack_agreement = lambda *a, _rule=rule, **k: agree(*a, **{**k, **_rule})
            out.append(quality.assess_quality(prep, res))
    finally:
        quality.stack_agreement = agree
    return tuple(out)


def main(argv=None) -> int:
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--motions", nargs="+", default=["moderate", "severe"])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--method", default="auto", help="reconstruction method (default: auto)")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    print(f"Stack layouts: atlases {', '.join(atlases)}, seeds {args.seeds}, motion {', '.join(args.motions)}, "
          f"layouts {', '.join(args.layouts)}; 1 x 3 mm slices, 2 % noise, {args.method}, 0.8 mm, 1 torch thread; "
          f"{machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'layout':<12} {'motion':<9} {'PSNR':>6} {'SSIM':>6} {'s':>5}   "
          f"{'all others':<10} {'ho':>5}   {'crossing':<10} {'ho':>5}")
    rows = []
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in args.seeds:
            for layout in args.layouts:
                for motion in args.motions:
                    stacks = simulate(vol, layout, motion, seed)
                    t0 = time.perf_counter()
                    prep, res, _ = run_reconstruction(stacks, method=args.method, have_stack_masks=True, progress=False)
                    wall = time.perf_counter() - t0
                    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
                    new, old = both_verdicts(prep, res)
                    rows.append((layout, float(m["psnr"]), old.verdict, new.verdict))
                    print(f"{atlas:<18} {seed:>4} {layout:<12} {motion:<9} {m['psnr']:>6.2f} {m['ssim']:>6.3f} "
                          f"{wall:>5.1f}   {old.verdict:<10} {old.measures['heldout_ncc_min']:>5.2f}   "
                          f"{new.verdict:<10} {new.measures['heldout_ncc_min']:>5.2f}", flush=True)
    print("\nverdicts per layout and PSNR band (all others -> crossing: count)")
    for layout in args.layouts:
        for band, lo, hi in (("< 20 dB", -1e9, 20.0), ("20-24 dB", 20.0, 24.0), (">= 24 dB", 24.0, 1e9)):
            c = Counter(f"{o}->{n}" for lay, ps, o, n in rows if lay == layout and lo <= ps < hi)
            if c:
                print(f"  {layout:<12} {band:<9} " + ", ".join(f"{k}: {v}" for k, v in sorted(c.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
