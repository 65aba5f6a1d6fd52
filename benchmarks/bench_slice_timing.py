#!/usr/bin/env python
"""Slice timing read from the files: what knowing the acquisition order gains.

The global pose search registers the slices of one interleave package as a group.  Without
slice timing it assumes 2 packages (slice ``k`` in package ``k % 2``); with a JSON sidecar's
``SliceTiming`` (or DICOM acquisition times, :mod:`slice2vol.io.timing`) it groups the packages
actually acquired.  Per atlas, seed and package count ``p`` (1: sequential; 3, 4: other
interleaves; 2, where the assumption is right, gives the same groups either way and is not run),
3 orthogonal stacks, 1 x 3 mm slices, 2 % noise, ``--motion`` (default severe), the stacks and
their masks are written as NIfTI and read back through :func:`slice2vol.io.load_stacks` twice:
without a sidecar (as today's NIfTI inputs) and with a BIDS sidecar holding ``SliceTiming``
(0.8 s per slice, the simulated order); each reconstructed with ``auto`` at 0.8 mm, one torch
thread.  PSNR: ``compare_volumes(recon, gt, align=True, scale=True)``.

    python benchmarks/bench_slice_timing.py | tee benchmarks/results/slice_timing_cpu.txt   # test atlases
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, add_atlas_arguments, machine, setup  # noqa: E402

SLICE_SECONDS = 0.8


def main(argv=None) -> int:
    from slice2vol import io
    from slice2vol.core.runtime import seed_everything
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.methods.run import crop_to_roi, run_reconstruction
    from slice2vol.simulation.simulate import SimulationConfig, save_simulation, simulate_stacks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--packages", type=int, nargs="+", default=[1, 3, 4])
    p.add_argument("--motion", default="severe")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    print(f"Slice timing: atlases {', '.join(atlases)}, seeds {args.seeds}, packages {args.packages}, motion "
          f"{args.motion}; 3 orthogonal stacks, 1 x 3 mm, 2 % noise; auto, 0.8 mm, 1 torch thread; {machine()}",
          flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'p':>2} {'PSNR no timing':>14} {'with timing':>11} {'change':>7} "
          f"{'packages found':>14} {'s':>5}")
    rows = []
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in args.seeds:
            for pk in args.packages:
                cfg = SimulationConfig(n_stacks=3, spacing=1.0, thickness=3.0, motion=args.motion, noise=0.02,
                                       interleave=pk)
                sim = simulate_stacks(vol, None, cfg, seed_everything(seed), progress=False)
                psnr, found, wall = {}, "", 0.0
                with tempfile.TemporaryDirectory() as tmp:
                    save_simulation(sim, tmp)
                    paths = [Path(tmp) / st.name for st in sim.stacks]
                    masks = [Path(tmp) / f"mask_{s:02d}.nii.gz" for s in range(len(paths))]
                    for variant in ("none", "timing"):
                        if variant == "timing":
                            for path, st in zip(paths, sim.stacks):
                                times = (np.asarray(st.order, dtype=float) * SLICE_SECONDS).tolist()
                                path.with_name(path.name.replace(".nii.gz", ".json")).write_text(
                                    json.dumps({"SliceTiming": times}), encoding="utf-8")
                        stacks = io.load_stacks(paths, None, masks)
                        if variant == "timing":
                            from slice2vol.core.pose_search import packages_from_order

                            found = "/".join(str(int(packages_from_order(st.index, st.order).max()) + 1)
                                             for st in stacks)
                        t0 = time.perf_counter()
                        prep, res, _ = run_reconstruction(stacks, method="auto", have_stack_masks=True, progress=False)
                        wall = max(wall, time.perf_counter() - t0)
                        m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True,
                                            scale=True)
                        psnr[variant] = float(m["psnr"])
                d = psnr["timing"] - psnr["none"]
                rows.append((pk, d))
                print(f"{atlas:<18} {seed:>4} {pk:>2} {psnr['none']:>14.2f} {psnr['timing']:>11.2f} {d:>+7.2f} "
                      f"{found:>14} {wall:>5.0f}", flush=True)
    print("\nchange with slice timing, dB: mean [min, max] per package count")
    for pk in args.packages:
        d = np.array([x for q, x in rows if q == pk])
        if d.size:
            print(f"  p = {pk}: {d.mean():+.2f} [{d.min():+.2f}, {d.max():+.2f}] over {d.size}; better by > 0.1 dB in "
                  f"{int((d > 0.1).sum())}, worse by > 0.1 dB in {int((d < -0.1).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
