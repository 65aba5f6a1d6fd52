#!/usr/bin/env python
"""Large turns: the fetus turns by 90-180 deg in the middle of one stack (a lasting jump).

None of the simulator's motion levels contains such a turn (``extreme``'s jumps have 6 deg sd per
component), yet an active fetus makes them, and the slices acquired afterwards are far beyond the
slice search's 30 deg and SVR's 45 deg plausibility bound.  :func:`slice2vol.methods.svr._turn_round`
searches them over all rotations and takes the turn the slices agree on.  Per atlas and seed: the
benchmark's 3 orthogonal 1 mm x 3 mm stacks at ``moderate`` motion (:func:`bench_selection._simulate`'s
settings, 2 % noise) with a turn of each angle (``SimulationConfig.turn``, ``slice2vol simulate --turn``:
one random stack turned about a random axis through the brain centre at a random time in the middle
40 % of its acquisition); reconstructed in this process
with the default pipeline (``auto``), with the turn search and without it (the same run with
``SVRConfig.turn_step_deg=None``), one torch thread, 0.8 mm, stack masks.  PSNR: as ``slice2vol
demo`` (rigid alignment, linear intensity fit, brain mask); verdict: the reference-free quality
verdict.  Angle 0: no turn (the turn search must then change nothing).

The turn search's settings were chosen on the validation atlases (GA22_notoperated, GA27_operated,
GA32_operated, seeds 0-1, angles 90/135/180); the default here is the test atlases.

    python benchmarks/bench_turn.py | tee benchmarks/results/turn_cpu.txt                 # test atlases
    python benchmarks/bench_turn.py --atlases validation --seeds 0 1 --angles 90 135 180   # tuning cases
    python benchmarks/bench_turn.py --atlases validation --motion severe --angles 0 120     # under other motion
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, add_atlas_arguments, machine, paired_change, setup  # noqa: E402


def turned_simulation(vol, seed: int, angle_deg: float, motion: str = "moderate"):
    """The benchmark's 3 stacks with one stack turned by ``angle_deg`` mid-acquisition
    (``SimulationConfig.turn``; 0: none).  Returns ``(SimulationResult, turned stack or None,
    turned slice indices)``."""
    from slice2vol.core.runtime import seed_everything
    from slice2vol.simulation.simulate import SimulationConfig, realism_for, simulate_stacks

    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=1.0, thickness=3.0,
                           motion=motion, noise=0.02, turn=angle_deg, **realism_for(motion))
    sim = simulate_stacks(vol, None, cfg, seed_everything(seed), progress=False)
    turn = sim.params.motion.turn
    if not turn:
        return sim, None, np.array([], dtype=int)
    s = turn["stack"]
    return sim, s, np.flatnonzero(np.asarray(sim.params.geometry[s].times) >= turn["time"])


def run(stacks, gt, turn_search: bool) -> dict:
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.evaluation.quality import assess_quality
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    options = {} if turn_search else {"svr": {"turn_step_deg": None}}
    t0 = time.perf_counter()
    prep, res, _ = run_reconstruction(stacks, method="auto", have_stack_masks=True, progress=False, options=options)
    wall = time.perf_counter() - t0
    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
    rec = [h for h in res.history if h.get("stage") == "search-turn"]
    return {"psnr": float(m["psnr"]), "time_s": wall, "verdict": assess_quality(prep, res).verdict,
            "turned": rec[0].get("turned_stacks", 0) if rec else 0,
            "angles": rec[0].get("angles_deg", []) if rec else []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--angles", type=float, nargs="+", default=[0.0, 90.0, 135.0, 180.0])
    p.add_argument("--motion", default="moderate", help="motion level under the turn (default: moderate)")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi

    print(f"turn: atlases {', '.join(atlases)}, seeds {args.seeds}, angles {args.angles}; {args.motion} motion + one stack "
          f"turned, 3 orthogonal 1 mm x 3 mm stacks, 2 % noise, auto, 0.8 mm, 1 torch thread; {machine()}", flush=True)
    print(f"{'atlas':<18} {'seed':>4} {'angle':>5} {'stack':>5} {'turned slices':>13}   "
          f"{'off PSNR':>8} {'verdict':<8} {'time s':>6}   {'on PSNR':>7} {'verdict':<8} {'time s':>6} found    change dB")
    diffs = defaultdict(list)
    verdicts = defaultdict(lambda: defaultdict(int))
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in args.seeds:
            for angle in args.angles:
                sim, s, turned = turned_simulation(vol, seed, angle, args.motion)
                off, on = run(sim.stacks, gt, False), run(sim.stacks, gt, True)
                d = on["psnr"] - off["psnr"]
                diffs[angle].append(d)
                verdicts[angle][f"off {off['verdict']}"] += 1
                verdicts[angle][f"on {on['verdict']}"] += 1
                found = ",".join(f"{a:.0f}" for a in on["angles"]) or "-"
                n = f"{len(turned):>6} of {len(sim.stacks[s].slices):<4}" if s is not None else f"{'-':>13}"
                print(f"{atlas:<18} {seed:>4} {angle:>5.0f} {'-' if s is None else s:>5} {n}   "
                      f"{off['psnr']:>8.2f} {off['verdict']:<8} {off['time_s']:>6.1f}   {on['psnr']:>7.2f} {on['verdict']:<8} "
                      f"{on['time_s']:>6.1f} {found:<8} {d:+.2f}", flush=True)
    print("\nwith - without the turn search, PSNR dB per angle: mean [min, max], better / worse (|change| > 0.05 dB); verdicts")
    for angle, d in diffs.items():
        v = verdicts[angle]
        print(f"  {angle:>5.0f}: {paired_change(d)};  " + ", ".join(f"{k} {n}" for k, n in sorted(v.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
