#!/usr/bin/env python
"""Block levels of the global pose search: runs of 8, then 4 neighbouring slices moved as one
(``SVRConfig.search_blocks``), against the search without them.

A sequential acquisition under severe motion bends each stack smoothly, and the three bent stacks
agree on a wrong volume (README "Slice timing").  Neighbouring slices of such a stack moved
together, so the search offers them one correction as a group before single slices.  Per atlas,
seed, package count ``p`` (1: sequential, 2: interleaved) and motion level, 3 orthogonal stacks,
1 x 3 mm slices, 2 % noise, reconstructed in memory (order not known to the search) with ``auto``
at 0.8 mm, one torch thread, with ``search_blocks=(8, 4)`` (the default) and ``()``.  PSNR:
``compare_volumes(recon, gt, align=True, scale=True)``.

    python benchmarks/bench_blocks.py | tee benchmarks/results/blocks_cpu.txt   # test atlases
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, add_atlas_arguments, machine, paired_change, setup  # noqa: E402

ARMS = {"blocks 8,4": (8, 4), "no blocks": ()}


def main(argv=None) -> int:
    from slice2vol.core.runtime import seed_everything
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.methods.run import crop_to_roi, run_reconstruction
    from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--cases", nargs="+", default=["severe:1", "severe:2", "moderate:2"],
                   help="motion:packages pairs (default: severe:1 severe:2 moderate:2)")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    print(f"Search blocks: atlases {', '.join(atlases)}, seeds {args.seeds}, cases {' '.join(args.cases)}; "
          f"3 orthogonal stacks, 1 x 3 mm, 2 % noise; auto, 0.8 mm, 1 torch thread; {machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'motion':<9} {'p':>2} " + " ".join(f"{a:>10}" for a in ARMS)
          + f" {'change':>7} {'s':>9}")
    diffs: dict[str, list[float]] = {}
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in args.seeds:
            for case in args.cases:
                motion, pk = case.split(":")
                cfg = SimulationConfig(n_stacks=3, spacing=1.0, thickness=3.0, motion=motion, noise=0.02,
                                       interleave=int(pk))
                stacks = simulate_stacks(vol, None, cfg, seed_everything(seed), progress=False).stacks
                psnr, wall = [], []
                for blocks in ARMS.values():
                    t0 = time.perf_counter()
                    prep, res, _ = run_reconstruction(stacks, method="auto", have_stack_masks=True, progress=False,
                                                      options={"svr": {"search_blocks": blocks}})
                    wall.append(time.perf_counter() - t0)
                    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
                    psnr.append(float(m["psnr"]))
                d = psnr[0] - psnr[1]
                diffs.setdefault(case, []).append(d)
                print(f"{atlas:<18} {seed:>4} {motion:<9} {pk:>2} " + " ".join(f"{v:>10.2f}" for v in psnr)
                      + f" {d:>+7.2f} {wall[0]:>4.0f}/{wall[1]:<4.0f}", flush=True)
    print("\nchange with the block levels, dB: mean [min, max], better / worse (> 0.05 dB) of n")
    for case, d in diffs.items():
        print(f"  {case:<12} {paired_change(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
