"""Simulated cases, each written once and shared by the methods."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from slice2vol.evaluation.benchmark.settings import CASE_JSON, GT_MARGIN_VOX, BenchmarkConfig, atlas_dir

log = logging.getLogger("slice2vol")


# ------------------------------------------------------------------------------------ cases


def case_name(atlas: str, motion: str, seed: int) -> str:
    """Folder name of a case under ``OUTPUT/cases``."""
    return f"{atlas}_{motion}_seed{seed}"


def ensure_case(cfg: BenchmarkConfig, atlas: str, motion: str, seed: int, folder: Path | None = None) -> Path:
    """The case's folder (``folder``, default ``cfg.output/cases/<name>``), simulated unless its
    ``case.json`` exists (a finished case is never simulated again)."""
    case_dir = folder if folder is not None else cfg.output / "cases" / case_name(atlas, motion, seed)
    if not (case_dir / CASE_JSON).is_file():
        case_dir.mkdir(parents=True, exist_ok=True)
        simulate_case(cfg, atlas, motion, seed, case_dir)
    return case_dir


def simulate_case(cfg: BenchmarkConfig, atlas: str, motion: str, seed: int, case_dir: Path) -> dict:
    """Simulate one case into ``case_dir``: stacks, masks, true poses, ground truth cropped to the
    brain; ``case.json`` is written last, so its presence means the case is complete."""
    import torch

    from slice2vol import io
    from slice2vol.core.runtime import seed_everything
    from slice2vol.methods.run import crop_to_roi
    from slice2vol.simulation.simulate import SimulationConfig, realism_for, save_simulation, simulate_stacks

    adir = atlas_dir(cfg.data, atlas)
    volume = io.load_volume(adir / "t2.nii.gz", adir / "mask.nii.gz")
    config = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=1.0,
                              thickness=cfg.thickness, motion=motion, noise=cfg.noise,
                              **realism_for(motion))  # extreme: random interleave, tilted stacks
    t0 = time.perf_counter()
    sim = simulate_stacks(volume, None, config, seed_everything(seed), progress=False)
    sim_s = time.perf_counter() - t0
    save_simulation(sim, case_dir)
    gt = crop_to_roi(volume, volume.mask, GT_MARGIN_VOX)
    io.save_volume(gt, case_dir / "gt.nii.gz")
    io.save_volume(gt.mask.numpy().astype(np.uint8), case_dir / "gt_mask.nii.gz", gt.affine, dtype=np.uint8)
    meta = {"atlas": atlas, "motion": motion, "seed": seed, "stacks": [st.name for st in sim.stacks],
            "stack_masks": [f"mask_{s:02d}.nii.gz" for s in range(len(sim.stacks))],
            "thickness": [cfg.thickness] * len(sim.stacks), "ground_truth": "gt.nii.gz",
            "ground_truth_mask": "gt_mask.nii.gz", "simulation_s": sim_s, "config": config.to_dict(),
            "stack_shapes": [list(st.slices.shape) for st in sim.stacks], "torch_threads": torch.get_num_threads()}
    io.write_json(meta, case_dir / CASE_JSON)
    return meta
