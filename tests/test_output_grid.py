"""The output grid's region of interest (slice2vol.core.preprocess.output_grid) for any pixel size.

Without a 3D mask the region is where the masked slices of most stacks reach.  A voxel counts as
reached where the adjoint of a stack's pixels puts a fixed fraction of that stack's mean density
on it; the density (voxels per pixel) falls with coarser pixels, so an absolute threshold, as
used before 2026-12-07, lost the whole brain for 1.4 mm pixels on a 0.8 mm grid.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.core import acquisition as acq
from slice2vol.core.image import SliceSet
from slice2vol.core.preprocess import COVERAGE_FRACTION, _sample_density, output_grid, prepare
from slice2vol.core.runtime import seed_everything
from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks


def _stacks(atlas, spacing: float, thickness: float, gap: float = 0.0, interleave: int = 2):
    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=spacing,
                           thickness=thickness, gap=gap, motion="none", noise=0.02, margin=4.0, interleave=interleave)
    return simulate_stacks(atlas, None, cfg, seed_everything(0), progress=False).stacks


@pytest.mark.parametrize("spacing,thickness,gap", [(2.0, 4.0, 0.0), (3.6, 4.0, 0.0), (2.0, 4.0, 1.0), (2.0, 4.0, -2.0)])
def test_sample_density_is_voxels_per_pixel(atlas_lowres, spacing, thickness, gap):
    """Interleaved slices (centres out of order), gaps and overlaps: the slice distance, not the
    thickness or the acquisition order, sets the density."""
    ss = SliceSet.from_stacks(_stacks(atlas_lowres, spacing, thickness, gap))
    for s in range(ss.n_stacks):
        expected = 1.6 ** 3 / (spacing * spacing * (thickness + gap))
        assert _sample_density(ss, s, 1.6) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("spacing", [2.0, 3.6])
def test_density_is_the_adjoint_coverage_inside_a_stack(atlas_lowres, spacing):
    """The rule's premise: inside the brain, the adjoint of a stack's pixels is about its density
    (median over the voxels that several slices reach, within 10 %)."""
    ss = SliceSet.from_stacks(_stacks(atlas_lowres, spacing, 4.0))
    res = 1.6
    affine, shape, _ = output_grid(ss, res)
    psf = acq.psf_kernel(ss.spacing, ss.thickness, res)
    sel = ss.pixel_stack() == 0
    cov = acq.adjoint(torch.ones(int(sel.sum())), shape, affine, ss.poses, ss.coords[sel], ss.slice_id[sel], psf)
    # the interior: away from the masked region's border (erode by two voxels)
    inside = cov > 0
    core = inside.clone()
    for ax in range(3):
        for sh in (-2, -1, 1, 2):
            core &= torch.roll(inside, sh, ax)
    assert int(core.sum()) > 100
    assert float(cov[core].median()) == pytest.approx(_sample_density(ss, 0, res), rel=0.10)


def test_region_of_interest_does_not_depend_on_pixel_size(atlas_lowres):
    """The brain is inside the region for fine and coarse pixels alike; the absolute threshold of
    0.1 (kept as the fraction for 1 x 1 x 3 mm on 0.8 mm) made the coarse one's region collapse."""
    assert COVERAGE_FRACTION * 0.8 ** 3 / 3.0 == pytest.approx(0.1)
    mask = atlas_lowres.mask.bool()
    A = torch.as_tensor(atlas_lowres.affine, dtype=torch.float64)
    brain = torch.nonzero(mask).double() @ A[:3, :3].T + A[:3, 3]
    volumes = {}
    for spacing in (2.0, 3.6):  # densities 0.256 and 0.079 voxels per pixel at 1.6 mm
        prep = prepare(_stacks(atlas_lowres, spacing, 4.0), 1.6, have_stack_masks=True)
        inv = torch.as_tensor(np.linalg.inv(prep.affine), dtype=torch.float64)
        ijk = torch.round(brain @ inv[:3, :3].T + inv[:3, 3]).long()
        shape = torch.tensor(prep.roi.shape)
        ok = ((ijk >= 0) & (ijk < shape)).all(1)
        hit = torch.zeros(len(ijk), dtype=torch.bool)
        hit[ok] = prep.roi[ijk[ok, 0], ijk[ok, 1], ijk[ok, 2]].cpu()
        assert float(hit.float().mean()) > 0.97, f"{spacing} mm pixels: brain inside the region {float(hit.float().mean()):.2f}"
        volumes[spacing] = int(prep.roi.sum())
    assert volumes[3.6] == pytest.approx(volumes[2.0], rel=0.25)
