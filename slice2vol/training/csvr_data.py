"""Training and validation cases for cSVR: atlases, anatomical augmentation, on-the-fly simulation.

A few dozen atlases have to stand in for many subjects, so every training case is a fresh
random draw of (atlas, random anatomical scaling, random smooth elastic warp, stack
orientations, slice thickness, motion from the paper's distribution, noise, bias fields, gamma),
simulated by the core simulator (:func:`slice2vol.simulation.simulate.simulate_stacks`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from slice2vol.core.geometry import axis_aligned_grid
from slice2vol.core.image import Volume
from slice2vol.core.resample import gaussian_blur, resample
from slice2vol.errors import Slice2VolError
from slice2vol.simulation.simulate import SimulationConfig, SimulationResult, simulate_stacks

__all__ = ["atlas_folders", "load_atlas", "augment_volume", "AugmentConfig",
           "sample_training_case", "validation_case"]



def atlas_folders(data_dir: Path, group: str) -> list[Path]:
    """Atlas folders (each with ``t2.nii.gz`` and ``mask.nii.gz``) of ``crl2017`` or ``spina_bifida2021``."""
    root = Path(data_dir) / "fetal_atlases" / group
    out = sorted(p for p in root.glob("*") if (p / "t2.nii.gz").is_file() and (p / "mask.nii.gz").is_file())
    if not out:
        raise Slice2VolError(f"no atlases found in {root}")
    return out


def load_atlas(folder: Path, resolution: float, margin: float = 15.0) -> Volume:
    """Atlas T2 and mask resampled (Gaussian anti-aliasing first) to ``resolution`` mm on a world-
    axis-aligned grid cropped to the mask plus ``margin`` mm (room for scaling up and warps)."""
    img, msk = nib.load(folder / "t2.nii.gz"), nib.load(folder / "mask.nii.gz")
    data = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))
    mask = torch.from_numpy(np.asarray(msk.dataobj) > 0)
    A = img.affine
    src_res = float(np.linalg.norm(A[:3, :3], axis=0).mean())
    idx = np.argwhere(mask.numpy()).astype(np.float64)
    lo, hi = idx.min(0) @ A[:3, :3].T + A[:3, 3], idx.max(0) @ A[:3, :3].T + A[:3, 3]
    B, shape = axis_aligned_grid(np.minimum(lo, hi) - margin, np.maximum(lo, hi) + margin, resolution)
    sigma = math.sqrt(max(resolution**2 - src_res**2, 0.0)) / 2.3548
    smooth = gaussian_blur(data * mask, sigma, [src_res] * 3) if sigma > 0 else data * mask
    vol = resample(smooth, A, B, shape).clamp_min(0)
    m = resample(mask.float(), A, B, shape) > 0.5
    return Volume((vol * m).contiguous(), B, m)


@dataclass
class AugmentConfig:
    """Anatomical augmentation: ``scale`` isotropic factor range ``1 +- scale``, ``aniso`` extra
    per-axis range, ``elastic_mm`` sd of the control displacements of a smooth warp on a
    ``elastic_grid``^3 control grid (trilinearly interpolated)."""

    scale: float = 0.15
    aniso: float = 0.05
    elastic_mm: float = 2.0
    elastic_grid: int = 5


def augment_volume(vol: Volume, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> Volume:
    """Randomly scaled and elastically warped copy of ``vol`` on the same grid.

    The output voxel at world ``x`` reads the input at ``c + (x - c) / s + d(x)`` (``c`` the
    mask centroid, ``s`` per-axis scale factors, ``d`` the smooth random displacement, mm).
    """
    shape = vol.shape
    A = torch.as_tensor(vol.affine, dtype=torch.float32)
    res = A.diagonal()[:3]
    idx = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"), -1)
    world = idx * res + A[:3, 3]
    c = world[vol.mask].mean(0)
    s = float(rng.uniform(1 - cfg.scale, 1 + cfg.scale)) * rng.uniform(1 - cfg.aniso, 1 + cfg.aniso, 3)
    src = c + (world - c) / torch.as_tensor(s, dtype=torch.float32)
    if cfg.elastic_mm > 0:
        g = cfg.elastic_grid
        ctrl = torch.as_tensor(rng.normal(0, cfg.elastic_mm, (1, 3, g, g, g)), dtype=torch.float32)
        d = F.interpolate(ctrl, size=shape, mode="trilinear", align_corners=True)[0].permute(1, 2, 3, 0)
        src = src + d
    # source world (x, y, z) on an axis-aligned grid -> grid_sample coordinates (k, j, i)
    n = torch.tensor(shape, dtype=torch.float32)
    gidx = (src - A[:3, 3]) / res / (n - 1) * 2 - 1
    grid = gidx.flip(-1)[None]
    both = torch.stack([vol.data, vol.mask.float()])[None]
    out = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    m = out[1] > 0.5
    return Volume((out[0] * m).contiguous(), vol.affine, m)


def _orientations(n: int, rng: np.random.Generator, p_oblique: float) -> list[str]:
    """``n`` stack orientations: the three orthogonal planes in random order (repeated as needed),
    each replaced by an oblique one with probability ``p_oblique``."""
    base = []
    while len(base) < n:
        base += list(rng.permutation(["axial", "coronal", "sagittal"]))
    return [("oblique" if rng.random() < p_oblique else b) for b in base[:n]]


def sample_training_case(atlases: Sequence[Volume], rng: np.random.Generator, spacing: float = 2.0,
                         motion: str = "csvr", n_stacks: tuple[int, int] = (3, 3),
                         augment: AugmentConfig = AugmentConfig()) -> SimulationResult:
    """One random training case (see the module doc), simulated directly at the network's
    working in-plane spacing so no resampling is needed before the network.

    Intensity artefacts follow the paper (noise, slice-wise bias, gamma) plus a smooth per-stack
    bias field: Rician noise sd U[0, 0.08] of the mean brain intensity, per-stack bias up to
    +-0.2 in log, slice bias up to +-0.15 in log, gamma sd 0.15 in log.
    """
    vol = augment_volume(atlases[int(rng.integers(len(atlases)))], rng, augment)
    n = int(rng.integers(n_stacks[0], n_stacks[1] + 1))
    cfg = SimulationConfig(
        n_stacks=n, orientations=_orientations(n, rng, 0.2), spacing=spacing,
        thickness=float(rng.uniform(2.5, 4.0)), margin=6.0, tilt=float(rng.uniform(5, 20)),
        motion=motion, noise=float(rng.uniform(0, 0.08)), bias=0.2, slice_bias=0.15, gamma=0.15,
    )
    return simulate_stacks(vol, vol.mask, cfg, rng)


def validation_case(atlas: Volume, seed: int, motion: str = "csvr", spacing: float = 1.0) -> SimulationResult:
    """A fixed validation case: 3 orthogonal stacks at ``spacing`` mm in-plane (1 mm: what the
    network meets at inference, resampled by :func:`.inputs.prepare_inputs`), 3 mm thick, noise 0.02."""
    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=spacing,
                           thickness=3.0, margin=6.0, motion=motion, noise=0.02)
    return simulate_stacks(atlas, atlas.mask, cfg, np.random.default_rng(seed))
