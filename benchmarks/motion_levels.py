#!/usr/bin/env python
"""Motion statistics of the simulated motion levels (issue 11): geometry only, no rendering.

For every level, 3 orthogonal stacks (axial, coronal, sagittal; 1 mm in-plane, 3 mm thick) are
sampled on each atlas x seed with :func:`slice2vol.simulation.simulate.sample_simulation_params` (plus the
level's :func:`slice2vol.simulation.simulate.realism_for` settings, as ``slice2vol benchmark`` uses) and
the true poses made with :func:`slice2vol.simulation.motion.apply_motion`; the table gives percentiles
over all slices of :func:`slice2vol.simulation.motion.motion_statistics`.  The atlases are training atlases
(:mod:`slice2vol.simulation.splits`): the levels are calibrated here, so never on test data.

    python benchmarks/motion_levels.py                       # -> benchmarks/results/motion_levels.txt
    python benchmarks/motion_levels.py --levels extreme --seeds 0,1,2,3,4,5,6,7 --no-save
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from slice2vol import io
from slice2vol.simulation.motion import apply_motion, motion_values, percentiles
from slice2vol.simulation.simulate import SimulationConfig, realism_for, sample_simulation_params

LEVELS = ("mild", "moderate", "severe", "extreme", "csvr")
ATLASES = ("STA23", "STA29", "STA35")
COLUMNS = (("rotation_deg", "rot deg"), ("displacement_mm", "slice-centre shift mm"),
           ("translation_mm", "transl. at centre mm"), ("step_rotation_deg", "step rot deg"),
           ("step_displacement_mm", "step shift mm"), ("within_stack_rotation_deg", "within-stack rot deg"))
RESULT = Path(__file__).resolve().parent / "results" / "motion_levels.txt"


def data_dir() -> Path:
    from slice2vol.io import shared_data_dir

    return shared_data_dir()


def level_poses(volume, level: str, seed: int):
    """``(true, nominal, centre, times)`` of one sampled case (no rendering)."""
    config = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=1.0,
                              thickness=3.0, motion=level, noise=0.0, **realism_for(level))
    params = sample_simulation_params(volume, None, config, np.random.default_rng(seed))
    nominal = [g.nominal_poses()[0] for g in params.geometry]
    times = [g.times for g in params.geometry]
    return apply_motion(params.motion, nominal, times), nominal, params.centre, times


def level_statistics(volumes: dict, level: str, seeds) -> dict:
    """Percentiles of :func:`motion_values` pooled over every atlas x seed of ``level``."""
    raw: dict[str, list] = {key: [] for key, _ in COLUMNS}
    for vol in volumes.values():
        for seed in seeds:
            values = motion_values(*level_poses(vol, level, seed))
            for key in raw:
                raw[key].append(values[key])
    return {key: percentiles(np.concatenate(v)) for key, v in raw.items()}


def level_table(volumes: dict, levels, seeds) -> str:
    head = "level     " + " | ".join(f"{name:^27s}" for _, name in COLUMNS)
    sub = "          " + " | ".join(f"{'p10':>6s}{'p50':>7s}{'p90':>7s}{'max':>7s}" for _ in COLUMNS)
    lines = [head, sub, "-" * len(sub)]
    for level in levels:
        stats = level_statistics(volumes, level, seeds)
        cells = [" ".join(f"{stats[key][q]:6.1f}" for q in ("p10", "p50", "p90", "max")) for key, _ in COLUMNS]
        lines.append(f"{level:9s} " + " | ".join(f"{c:27s}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--atlases", default=",".join(ATLASES))
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--no-save", action="store_true", help=f"print only; do not write {RESULT.name}")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = args.data or data_dir()
    from slice2vol.evaluation.benchmark import atlas_dir

    volumes = {}
    for a in args.atlases.split(","):
        d = atlas_dir(data, a)
        if d is None:
            sys.exit(f"atlas {a} not found under {data}/fetal_atlases")
        volumes[a] = io.load_volume(d / "t2.nii.gz", d / "mask.nii.gz")
    seeds = [int(s) for s in args.seeds.split(",")]
    levels = args.levels.split(",")
    text = (f"$ python benchmarks/motion_levels.py --levels {','.join(levels)} --atlases {args.atlases} "
            f"--seeds {args.seeds}\n"
            f"{len(volumes)} atlases x {len(seeds)} seeds x 3 stacks (axial, coronal, sagittal; 1 mm x 3 mm),"
            " percentiles over all slices\n\n" + level_table(volumes, levels, seeds))
    print(text)
    if not args.no_save:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
