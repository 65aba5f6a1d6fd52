"""Slice orientations an exam covers (slice2vol.core.geometry.orientation_groups) and the warning
``prepare`` gives where the stacks cover fewer than three planes (README "Stack layouts")."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from slice2vol.core.geometry import orientation_groups, slice_normal
from slice2vol.core.preprocess import layout_record, prepare
from slice2vol.core.runtime import seed_everything
from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks


def _tilted(deg: float, about=(1.0, 0.0, 0.0), thickness: float = 3.0) -> np.ndarray:
    """An axial stack affine (slices 3 mm apart along S) turned by ``deg`` about ``about``."""
    from scipy.spatial.transform import Rotation

    A = np.eye(4)
    A[:3, :3] = Rotation.from_rotvec(np.radians(deg) * np.asarray(about)).as_matrix() @ np.diag([1.0, 1.0, thickness])
    return A


def test_slice_normal_is_the_unit_slice_axis():
    n = slice_normal(_tilted(30.0))
    assert np.linalg.norm(n) == pytest.approx(1.0)
    assert n @ np.array([0.0, 0.0, 1.0]) == pytest.approx(np.cos(np.radians(30.0)))


@pytest.mark.parametrize("deg,together", [(0.0, True), (30.0, True), (44.0, True), (46.0, False), (90.0, False),
                                          (150.0, True), (180.0, True)])
def test_stacks_within_45_degrees_share_a_plane_either_sign(deg, together):
    groups = orientation_groups([_tilted(0.0), _tilted(deg, about=(0.6, 0.8, 0.0))])  # normal tilted by deg
    assert groups == ([[0, 1]] if together else [[0], [1]])


def test_orthogonal_planes_and_rescans():
    ax, cor, sag = _tilted(0.0), _tilted(90.0, (1.0, 0.0, 0.0)), _tilted(90.0, (0.0, 1.0, 0.0))
    assert orientation_groups([ax, cor, sag]) == [[0], [1], [2]]
    assert orientation_groups([sag, cor, ax, _tilted(10.0), _tilted(100.0, (0.0, 1.0, 0.0))]) == [[0, 4], [1], [2, 3]]


@pytest.mark.parametrize("orientations,planes", [(("axial", "coronal", "sagittal"), 3),
                                                 (("sagittal", "sagittal", "coronal"), 2)])
def test_prepare_records_the_planes_and_warns_below_three(atlas_lowres, caplog, orientations, planes):
    cfg = SimulationConfig(n_stacks=3, orientations=orientations, spacing=2.0, thickness=4.0, motion="none",
                           noise=0.02, margin=4.0)
    stacks = simulate_stacks(atlas_lowres, None, cfg, seed_everything(0), progress=False).stacks
    with caplog.at_level(logging.WARNING, logger="slice2vol"):
        prep = prepare(stacks, 1.6, have_stack_masks=True)
    assert prep.layout["planes"] == planes
    assert sorted(n for g in prep.layout["orientation_groups"] for n in g) == sorted(st.name for st in stacks)
    warned = [r.getMessage() for r in caplog.records if "slice orientation" in r.getMessage()]
    if planes < 3:
        assert len(warned) == 1 and "2 slice orientation(s) only" in warned[0] and stacks[0].name in warned[0]
    else:
        assert warned == []


def test_one_stack_is_not_warned_about(atlas_lowres, caplog):
    cfg = SimulationConfig(n_stacks=1, orientations=("axial",), spacing=2.0, thickness=4.0, motion="none", margin=4.0)
    st = simulate_stacks(atlas_lowres, None, cfg, seed_everything(0), progress=False).stacks
    with caplog.at_level(logging.WARNING, logger="slice2vol"):
        rec = layout_record(st)
    assert rec["planes"] == 1 and not [r for r in caplog.records if "slice orientation" in r.getMessage()]
