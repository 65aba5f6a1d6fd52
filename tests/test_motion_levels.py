"""Issue 11: the ``extreme`` random-walk motion level, interleave packages, stack tilts, motion
statistics and the atlas split.  Geometry only (no rendering), so the file is fast."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from slice2vol.core.image import Volume
from slice2vol.errors import Slice2VolError
from slice2vol.simulation.motion import (
    MotionParams,
    apply_motion,
    motion_statistics,
    motion_values,
    percentiles,
    sample_motion,
)
from slice2vol.simulation.simulate import (
    SimulationConfig,
    SimulationParams,
    interleaved_order,
    realism_for,
    sample_simulation_params,
)


@pytest.fixture(scope="module")
def brain() -> Volume:
    """Brain-sized ellipsoid (radii 40, 48, 36 mm) on a 2 mm LAS grid."""
    shape = (50, 58, 46)
    A = np.diag([-2.0, 2.0, 2.0, 1.0])
    A[:3, 3] = [50.0, -60.0, -40.0]
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1) - (np.asarray(shape) - 1) / 2
    r = np.sqrt((((ijk * 2.0) / np.array([40.0, 48.0, 36.0])) ** 2).sum(-1))
    return Volume(torch.from_numpy((1000 * np.clip(1.1 - r, 0, 1)).astype(np.float32)), A)


@pytest.fixture(scope="module")
def small() -> Volume:
    """The phantom the old-level reference values below were recorded on."""
    shape = (30, 34, 28)
    A = np.diag([-2.0, 2.0, 2.0, 1.0])
    A[:3, 3] = [30, -30, -25]
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1) - (np.array(shape) - 1) / 2
    r = np.sqrt(((ijk * 2) ** 2 / np.array([20.0, 24, 18]) ** 2).sum(-1))
    return Volume(torch.from_numpy((1000 * np.clip(1.1 - r, 0, 1)).astype(np.float32)), A)


def _orthogonal(level: str, **kw) -> SimulationConfig:
    return SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=2.0, thickness=3.0,
                            noise=0.0, motion=level, **(realism_for(level) | kw))


def _case(volume: Volume, config: SimulationConfig, seed: int):
    params = sample_simulation_params(volume, None, config, seed)
    nominal = [g.nominal_poses()[0] for g in params.geometry]
    times = [g.times for g in params.geometry]
    return params, apply_motion(params.motion, nominal, times), nominal, times


# ------------------------------------------------------------------------------ extreme level


def test_extreme_reaches_the_severe_independent_case(brain):
    """Per-slice rotation of true vs nominal: median >= 14 deg, p90 >= 24 deg (the independent
    simulator's severe case); translations of several mm, reaching ~15 mm at the top."""
    pooled: dict[str, list] = {}
    for seed in range(6):
        params, true, nominal, times = _case(brain, _orthogonal("extreme"), seed)
        assert all(s.kind == "walk" for s in params.motion.stacks)
        for k, v in motion_values(true, nominal, params.centre, times).items():
            pooled.setdefault(k, []).append(v)
    stats = {k: percentiles(np.concatenate(v)) for k, v in pooled.items()}
    assert stats["rotation_deg"]["p50"] >= 14.0
    assert stats["rotation_deg"]["p90"] >= 24.0
    assert stats["rotation_deg"]["max"] < 90.0
    assert 3.0 <= stats["translation_mm"]["p50"] <= 10.0
    assert stats["displacement_mm"]["p90"] >= 12.0
    assert stats["displacement_mm"]["max"] >= 15.0
    assert stats["translation_mm"]["max"] >= 10.0
    assert stats["step_rotation_deg"]["max"] >= 10.0  # abrupt jumps between consecutive slices


def test_extreme_realism_and_other_levels_unchanged():
    assert realism_for("extreme") == {"interleave": 0, "stack_tilt_max": 15.0}
    for level in ("none", "mild", "moderate", "severe", "csvr", "rot20", "trans5"):
        assert realism_for(level) == {}


def test_walk_params_json_round_trip_reproduces_poses_exactly(brain):
    params, true, nominal, times = _case(brain, _orthogonal("extreme"), 3)
    assert params.motion.stacks[0].jump_times or any(s.jump_times for s in params.motion.stacks[1:])
    text = json.dumps(params.to_dict())
    again = SimulationParams.from_dict(json.loads(text))
    assert again.to_dict() == params.to_dict()
    for a, b in zip(apply_motion(again.motion, nominal, times), true):
        np.testing.assert_array_equal(a, b)
    geometry = [g.nominal_poses()[0] for g in again.geometry]
    for a, b in zip(geometry, nominal):
        np.testing.assert_array_equal(a, b)


def test_old_motion_json_still_loads():
    """Parameters written before ``kind``/``walk`` existed load as spline trajectories."""
    old = {"level": "mild", "centre": [0.0, 0.0, 0.0],
           "stacks": [{"knot_times": [0.0, 4.0], "control": [[0.01, 0, 0, 1.0, 0, 0], [0, 0, 0, 0, 0, 0]],
                       "bulk": [0.0] * 6, "jump_times": [], "jumps": []}]}
    m = MotionParams.from_dict(old)
    assert m.stacks[0].kind == "spline"
    out = apply_motion(m, [np.tile(np.eye(4), (5, 1, 1))], [np.arange(5.0)])[0]
    assert abs(out[0, 0, 3] - 1.0) < 1e-12


def test_walk_is_bounded_and_interpolates_its_states():
    rng = np.random.default_rng(0)
    t = np.arange(400.0)
    m = sample_motion("extreme", [t], [np.array([0, 0, 1.0])], np.zeros(3), rng)
    s = m.stacks[0]
    assert s.kind == "walk" and len(s.walk) == 400 and not s.control
    walk = np.asarray(s.walk)
    assert np.degrees(np.abs(walk[:, :3])).max() < 30  # mean reversion keeps it bounded


# ------------------------------------------------------------------------- old levels unchanged


def test_old_levels_give_the_same_samples_as_before():
    """Reference values recorded before the walk level existed (same seed, same numbers)."""
    times = [np.arange(12, dtype=float), 12 + interleaved_order(9, 2).astype(float)]
    normals = [np.array([0, 0, 1.0]), np.array([1.0, 0, 0])]
    ref = {  # level: (stack0 control[0][0], stack0 control[-1][5], stack1 control[1][2], K1, J1, bulk1[0])
        "mild": (2.1470226e-05, -0.34321182078, -0.043925743435, 2, 0, 0.0),
        "moderate": (6.4410679e-05, -0.91523152208, -0.131777230306, 3, 0, 0.0),
        "severe": (0.000128821358, 1.085057435287, -0.084701237644, 3, 1, 0.0),
        "csvr": (0.104281865103, 2.05352794662, 0.081638839983, 63, 0, 0.19902333168),
        "rot20": (0.087333110863, 0.0, -0.023592645016, 3, 0, 0.0),
        "trans7.5": (0.0, 4.389928788206, -0.0, 3, 0, 0.0),
    }
    for level, (a, b, c, k, j, bulk) in ref.items():
        p = sample_motion(level, times, normals, np.array([1.0, 2, 3]), np.random.default_rng(7))
        s0, s1 = p.stacks
        assert s0.kind == s1.kind == "spline" and not s0.walk
        assert (s0.control[0][0], s0.control[-1][5], s1.control[1][2]) == pytest.approx((a, b, c), abs=1e-11)
        assert (len(s1.control), len(s1.jump_times)) == (k, j)
        assert s1.bulk[0] == pytest.approx(bulk, abs=1e-11)


def test_old_simulation_params_unchanged(small):
    """Whole sampled geometry + motion + artefacts as recorded before interleave=0 / stack tilts."""
    p = sample_simulation_params(small, None, SimulationConfig(motion="severe"), 11)
    g = p.geometry[2]
    assert g.affine == [[0.0, 0.0, 3.0, -30.5], [1.0, 0.0, 0.0, -32.0], [0.0, 1.0, 0.0, -27.0], [0.0, 0.0, 0.0, 1.0]]
    assert g.shape == [71, 59, 22] and g.interleave == 2 and g.stack_tilt_axis is None and g.stack_tilt_deg == 0.0
    assert p.motion.stacks[1].control[1] == pytest.approx(
        [0.08607171526196959, 0.06569871123149167, 0.04206666824552915, 3.82267825779454, -5.327919358172409,
         2.4557186329994574], abs=1e-12)
    assert p.motion.stacks[2].jump_times == []
    p = sample_simulation_params(small, None, SimulationConfig(motion="csvr", n_stacks=4), 11)
    g = p.geometry[3]
    assert g.tilt_axis == pytest.approx([-0.9999897063626383, 0.0045373085374987064, 0.0], abs=1e-12)
    assert g.affine[1] == pytest.approx([-0.00015460344729945064, 0.9659265279769897, 0.7764491438865662,
                                         -39.438236236572266], abs=1e-9)
    assert g.shape == [64, 72, 22] and len(p.motion.stacks[3].control) == 69
    assert p.motion.stacks[3].bulk[2] == pytest.approx(0.0938244047696329, abs=1e-12)
    p = sample_simulation_params(small, None, SimulationConfig(motion="moderate", interleave=3, n_stacks=4,
                                                               bias=0.2, gamma=0.1), 11)
    assert p.artefacts.gamma == pytest.approx([0.9294559372121103, 1.046882500312985, 0.9883563467836299,
                                               0.8586036981377546], abs=1e-12)
    assert p.artefacts.noise_seed == 276102407
    assert p.geometry[1].order[:8] == [0, 9, 17, 1, 10, 18, 2, 11]
    assert p.motion.stacks[3].control[0][3] == pytest.approx(0.8424212885565951, abs=1e-12)


# --------------------------------------------------------------------------- interleave, tilts


def test_interleaved_order_is_svrtk_packages():
    for n in (1, 2, 7, 10, 23):
        for p in (1, 2, 3, 4):
            order = interleaved_order(n, p)
            assert sorted(order.tolist()) == list(range(n))
            k = np.arange(n)
            expected = sorted(k.tolist(), key=lambda i: (i % p, i))  # package after package, increasing k
            assert np.argsort(order).tolist() == expected
            for j in range(1, p):  # every slice of package j after every slice of package j-1
                if np.any(k % p == j):
                    assert order[k % p == j].min() > order[k % p == j - 1].max()
    assert interleaved_order(7, 3).tolist() == [0, 3, 5, 1, 4, 6, 2]


def test_interleave_zero_draws_packages_1_to_4(brain):
    seen = set()
    for seed in range(8):
        params = sample_simulation_params(brain, None, _orthogonal("none", interleave=0), seed)
        for g in params.geometry:
            assert 1 <= g.interleave <= 4
            assert g.order == interleaved_order(g.shape[2], g.interleave).tolist()
            seen.add(g.interleave)
    assert seen == {1, 2, 3, 4}
    with pytest.raises(Slice2VolError):
        SimulationConfig(interleave=-1).validate()


def test_stack_tilt_within_bound(brain):
    nominal_normal = {"axial": [0, 0, 1.0], "coronal": [0, -1.0, 0], "sagittal": [1.0, 0, 0]}
    angles = []
    for seed in range(6):
        params = sample_simulation_params(brain, None, _orthogonal("none", stack_tilt_max=15.0), seed)
        for g in params.geometry:
            A = np.asarray(g.affine)
            n = A[:3, 2] / np.linalg.norm(A[:3, 2])
            angle = math.degrees(math.acos(min(1.0, float(n @ np.asarray(nominal_normal[g.orientation])))))
            assert 0 <= g.stack_tilt_deg <= 15.0
            assert angle == pytest.approx(g.stack_tilt_deg, abs=1e-3)  # about an in-plane axis: all of it tilts the normal
            assert abs(float(np.asarray(g.stack_tilt_axis) @ n)) < 1e-6
            angles.append(angle)
    assert max(angles) > 10.0
    with pytest.raises(Slice2VolError):
        SimulationConfig(stack_tilt_max=-1.0).validate()


def test_zero_tilt_and_fixed_interleave_draw_nothing(brain):
    """stack_tilt_max=0 and interleave>=1 leave every sample as it was (no extra random draw)."""
    a = sample_simulation_params(brain, None, _orthogonal("severe", stack_tilt_max=0.0, interleave=2), 5)
    b = sample_simulation_params(brain, None, SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"),
                                                               spacing=2.0, thickness=3.0, noise=0.0, motion="severe"), 5)
    assert a.to_dict() == b.to_dict()


# ------------------------------------------------------------------------------- statistics


def test_motion_statistics_of_a_known_motion():
    nominal = np.tile(np.eye(4), (4, 1, 1))
    nominal[:, 2, 3] = [-3.0, 0.0, 3.0, 6.0]
    true = nominal.copy()
    true[:, 0, 3] += [0.0, 1.0, 2.0, 3.0]  # x-translations 0..3 mm
    stats = motion_statistics([true], [nominal], [0.0, 0.0, 0.0], [np.array([0.0, 2.0, 1.0, 3.0])])
    assert stats["slices"] == 4
    assert stats["rotation_deg"]["max"] == pytest.approx(0.0, abs=1e-6)
    assert stats["translation_mm"]["max"] == pytest.approx(3.0)
    assert stats["displacement_mm"]["p50"] == pytest.approx(1.5)
    # time order 0, 2, 1, 3: steps 2, 1, 2 mm
    assert stats["step_displacement_mm"]["max"] == pytest.approx(2.0)
    assert stats["step_displacement_mm"]["p10"] == pytest.approx(1.2)


# ------------------------------------------------------------------------------------- splits

DATA = __import__("slice2vol.io").io.shared_data_dir() / "fetal_atlases"


def test_splits_are_disjoint_and_cover_the_atlases_on_disk():
    from slice2vol.simulation.splits import SPLITS, TEST_ATLASES, TRAIN_ATLASES, VALIDATION_ATLASES, split_atlases

    assert split_atlases("validation") == ("GA22_notoperated", "GA27_operated", "GA32_operated")
    assert (len(TRAIN_ATLASES), len(VALIDATION_ATLASES), len(TEST_ATLASES)) == (18, 3, 12)
    sets = [set(v) for v in SPLITS.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 33
    with pytest.raises(Slice2VolError):
        split_atlases("holdout")
    if not DATA.is_dir():
        pytest.skip(f"no shared atlases at {DATA}")
    on_disk = {p.parent.name for p in DATA.glob("*/*/t2.nii.gz")}
    assert on_disk == set().union(*sets)
    assert {p.parent.name for p in (DATA / "crl2017").glob("*/t2.nii.gz")} == set(TRAIN_ATLASES)


def test_csvr_training_uses_the_split():
    from slice2vol.simulation.splits import VALIDATION_ATLASES
    from slice2vol.training import csvr as train

    assert train.VALIDATION_ATLASES == VALIDATION_ATLASES


def test_benchmark_atlases_accepts_a_split_name():
    from slice2vol.cli.parser import build_parser
    from slice2vol.evaluation import benchmark as bm
    from slice2vol.simulation.splits import TEST_ATLASES, VALIDATION_ATLASES

    if not DATA.is_dir():
        pytest.skip(f"no shared atlases at {DATA}")
    args = build_parser().parse_args(["benchmark", "--output", "/tmp/never-written", "--data", str(DATA.parent),
                                      "--atlases", "validation,STA23", "--motion", "extreme"])
    cfg = bm.config_from_args(args)
    assert cfg.atlases == [*VALIDATION_ATLASES, "STA23"] and cfg.motion == ["extreme"]
    args.atlases = ["test"]
    assert bm.config_from_args(args).atlases == list(TEST_ATLASES)
