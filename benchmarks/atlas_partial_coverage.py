#!/usr/bin/env python
"""The atlas step (:func:`slice2vol.methods.atlas.register_to_atlas`) on brains cut by the field of
view: a known limit, measured.

Each atlas's ground truth (skull-stripped, brain mask applied) is placed in the scanner by the same
random head pose as ``bench_atlas_space.py`` (any rotation, up to 20 mm shift; ``seed``), and its
region of interest (the brain mask dilated by 3 mm, as a reconstruction's) is cut by a plane
normal to one atlas axis at a quantile of the brain's extent along it: ``top`` / ``bottom``
(superior / inferior), ``front`` / ``back`` (anterior / posterior), ``:F`` the fraction removed
(default 0.25).  Printed: the angle and brain-centre shift of the output frame against the truth
(as ``bench_atlas_space.py``'s "GT itself"), the week and NCC, the fraction of the registered
atlas brain inside the region of interest (``cover``, :func:`slice2vol.methods.atlas.brain_coverage`),
the rotation between the forward and the reverse registration (``apart``), the NCC of the volume
with its mirror image across the placed mid-sagittal plane (``mirror``) and how much it exceeds
that across the placed coronal and axial planes (``margin``), and the reliability check
they feed (``ok``: :attr:`slice2vol.methods.atlas.AtlasRegistration.reliable`; ``--output-space
atlas`` falls back to the scanner frame otherwise).  No reconstruction: what the atlas step does when the
brain itself is incomplete.

    python benchmarks/atlas_partial_coverage.py --atlases validation STA22 STA26 STA30 STA34 --seeds 0,1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_atlas_space as bas  # noqa: E402  (head poses and frame errors, shared)

AXES = {"top": (2, +1), "bottom": (2, -1), "front": (1, +1), "back": (1, -1)}


def keep_region(world: torch.Tensor, brain_pts: np.ndarray, cut: str) -> torch.Tensor:
    """``(Ni, Nj, Nk)`` bool: the voxels (world positions ``world (..., 3)``, atlas frame) on the
    kept side of the cut ``side[:fraction]``; all of them for ``none``."""
    if cut == "none":
        return torch.ones(world.shape[:-1], dtype=torch.bool)
    side, _, frac = cut.partition(":")
    ax, sign = AXES[side]
    f = float(frac or 0.25)
    v = brain_pts[:, ax]
    return world[..., ax] <= np.quantile(v, 1 - f) if sign > 0 else world[..., ax] >= np.quantile(v, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atlases", nargs="+", default=["validation"], help="atlases or split names")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--cuts", default="none,top,bottom,front,back", help="comma-separated cuts (module docstring)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=None)
    args = p.parse_args(argv)
    from slice2vol.core.image import Volume
    from slice2vol.core.resample import max_filter
    from slice2vol.io import shared_data_dir
    from slice2vol.methods.atlas import MAX_DISAGREEMENT_DEG, MIN_SYMMETRY_MARGIN, register_to_atlas
    from slice2vol.simulation.splits import expand_atlases

    torch.set_num_threads(args.threads)
    data = args.data or shared_data_dir()
    pose_args = argparse.Namespace(max_rotation=180.0, max_offset=20.0)
    cuts = args.cuts.split(",")
    print(f"{'atlas':<18} {'seed':>4} {'cut':<10} {'rot deg':>7} {'shift mm':>8} {'week':>4} {'NCC':>6} {'cover':>6} "
          f"{'apart':>6} {'mirror':>6} {'margin':>6} {'ok':>3} {'s':>5}")
    rows = []
    for atlas in expand_atlases(args.atlases):
        for seed in (int(s) for s in args.seeds.split(",")):
            gt, brain, centre, M = bas.case_pose(data, atlas, seed, pose_args)
            roi = max_filter(gt.mask.float(), max(1, round(3.0 / float(gt.resolution.mean())))) > 0
            idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in gt.data.shape], indexing="ij"), -1).double()
            world = idx @ torch.as_tensor(gt.affine[:3, :3]).T + torch.as_tensor(gt.affine[:3, 3])
            for cut in cuts:
                keep = keep_region(world, brain, cut)
                placed = Volume(gt.data * gt.mask * keep, M @ gt.affine)
                t0 = time.perf_counter()
                reg = register_to_atlas(placed, roi & keep)
                dt = time.perf_counter() - t0
                rot, shift, _ = bas.frame_error(reg.transform @ M, centre, brain)
                rows.append((cut, rot, reg.reliable))
                print(f"{atlas:<18} {seed:>4} {cut:<10} {rot:>7.2f} {shift:>8.2f} {reg.week:>4} {reg.score:>6.3f} "
                      f"{reg.coverage:>6.3f} {reg.disagreement_deg:>6.1f} {reg.symmetry_ncc[0]:>6.2f} {reg.symmetry_margin:>6.2f} {'yes' if reg.reliable else 'NO':>3} "
                      f"{dt:>5.1f}", flush=True)
    print(f"\nreliable: directions at most {MAX_DISAGREEMENT_DEG:g} deg apart and mirror NCC margin at least {MIN_SYMMETRY_MARGIN:g}")
    print("cut        cases  within 3 deg  off by more than 20 deg  reliable  of them off by more than 20 deg")
    for cut in cuts:
        r = np.array([x for c, x, _ in rows if c == cut])
        ok = np.array([k for c, _, k in rows if c == cut])
        print(f"{cut:<10} {r.size:>5} {int((r <= 3).sum()):>13} {int((r > 20).sum()):>24} {int(ok.sum()):>9} "
              f"{int((ok & (r > 20)).sum()):>32}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
