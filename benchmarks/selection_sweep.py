#!/usr/bin/env python
"""Stack selection over many simulated exams, assessment only (the tuning sweep of
:mod:`slice2vol.methods.selection`; no reconstruction, nothing written but the optional JSON).

Per atlas and seed, the exams of ``bench_selection.py`` kept in memory: 3 orthogonal moderate
stacks (``good``), + a moderate axial re-scan (``rescan``), 3 stacks all at one level
(``all-mild``, ``all-severe``, ``all-extreme``), and with a bad 4th stack: ``extreme`` motion
axial (``extreme``) or coronal (``extreme-cor``, the orientation of one of the good stacks),
``severe`` motion axial (``severe4``; not a target: a stack that moved more than the others).
Prints how often the 4th stack (and only it) was dropped, and every stack dropped from a good exam
or instead of the 4th.  Use the training / validation atlases for tuning, never the test ones:

    python benchmarks/selection_sweep.py --atlases train validation --seeds 0,1,2,3 --json sweep.json

About 9 s per atlas and seed on one thread (the younger, smaller atlases faster).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selection as bs  # noqa: E402  (the benchmark's simulation settings, shared)

GOOD = ("good", "rescan", "all-mild", "all-severe", "all-extreme")
BAD = ("extreme", "extreme-cor", "severe4")


def exams(vol, seed: int) -> dict[str, list]:
    """The exams of one atlas and seed (module docstring); the 4th stack of a bad one is last."""
    sims = bs.simulated_exams(vol, seed)
    good = sims["good"]
    out = {"good": good, "extreme": good + sims["extreme"], "rescan": good + sims["rescan"]}
    out.update({k: v for k, v in sims.items() if k.startswith("all-")})
    out["extreme-cor"] = good + list(bs._simulate(vol, "extreme", seed + 7000, ("coronal",)).stacks)
    out["severe4"] = good + list(bs._simulate(vol, "severe", seed + 8000, ("axial",)).stacks)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atlases", nargs="+", default=["validation"], help="atlases or split names")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write every exam's assessment here")
    args = p.parse_args(argv)
    from slice2vol.io import shared_data_dir
    from slice2vol.methods.selection import assess_stacks
    from slice2vol.simulation.splits import TEST_ATLASES, expand_atlases

    torch.set_num_threads(1)
    data = args.data or shared_data_dir()
    atlases = expand_atlases(args.atlases)
    if any(a in TEST_ATLASES for a in atlases):
        print("selection_sweep: note: test atlases included (report only, never tune on them)", file=sys.stderr)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    t0 = time.perf_counter()
    for atlas in atlases:
        vol = bs._load_atlas(data, atlas)
        for seed in seeds:
            these = []
            for variant, stacks in exams(vol, seed).items():
                sel = assess_stacks(stacks)
                these.append({"atlas": atlas, "seed": seed, "variant": variant, "dropped": sel.dropped,
                              "reference": sel.reference, "time_s": sel.time_s,
                              "stacks": [s.to_dict() for s in sel.stacks]})
            rows += these
            print(f"{atlas} seed {seed}: " + ", ".join(f"{r['variant']} {r['dropped'] or '-'}" for r in these),
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows))
    n_ex = len(atlases) * len(seeds)
    print(f"\n{n_ex} atlas x seed combinations ({', '.join(atlases)}; seeds {args.seeds}), "
          f"{time.perf_counter() - t0:.0f} s")
    for v in BAD:
        rr = [r for r in rows if r["variant"] == v]
        print(f"  {v:<12} 4th stack dropped (and only it) {sum(r['dropped'] == [3] for r in rr):>4} of {len(rr)}")
    good = [r for r in rows if r["variant"] in GOOD]
    false = [r for r in good if r["dropped"]]
    wrong = [r for r in rows if r["variant"] in BAD and any(d != 3 for d in r["dropped"])]
    print(f"  good exams: {sum(len(r['dropped']) for r in good)} of {sum(len(r['stacks']) for r in good)} stacks dropped "
          f"({len(good)} exams)" + "".join(f"\n    {r['atlas']} seed {r['seed']} {r['variant']}: {r['dropped']}"
                                           for r in false))
    print(f"  a good stack dropped from a bad exam: {len(wrong)}"
          + "".join(f"\n    {r['atlas']} seed {r['seed']} {r['variant']}: {r['dropped']}" for r in wrong))
    t = sorted(r["time_s"] for r in rows)
    print(f"  assessment time (1 thread): median {t[len(t) // 2]:.2f} s, max {t[-1]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
