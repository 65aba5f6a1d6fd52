"""Behaviour of the stack simulator (slice2vol.simulation.simulate, slice2vol.simulation.motion).

Small volumes keep the file fast: a synthetic ellipsoid phantom on a 2 mm grid with a
left-handed (LAS) affine, so nothing silently assumes RAS voxel axes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slice2vol.cli.parser import main
from slice2vol.core.image import Volume
from slice2vol.core.transforms import matrix_to_axis_angle, rotation_angle
from slice2vol.errors import Slice2VolError
from slice2vol.io import load_poses_json, load_stack
from slice2vol.simulation.motion import CSVR_BULK_DEG, MotionParams, StackMotion, apply_motion, sample_motion
from slice2vol.simulation.simulate import (
    SimulationConfig,
    SimulationParams,
    apply_simulation,
    interleaved_order,
    orientation_rotation,
    sample_simulation_params,
    signal_loss_field,
    save_simulation,
    simulate_stacks,
    slice_psf,
)

RES = 2.0
FAST = dict(spacing=2.0, thickness=4.0, noise=0.0, margin=6.0)


def _phantom_affine(shape) -> np.ndarray:
    A = np.diag([-RES, RES, RES, 1.0])  # i runs right-to-left: det < 0
    A[:3, 3] = [(shape[0] - 1) / 2 * RES + 3.0, -(shape[1] - 1) / 2 * RES - 2.0, -(shape[2] - 1) / 2 * RES + 1.0]
    return A


def _world_grid(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module")
def phantom() -> Volume:
    """Smooth ellipsoidal 'brain' (radii 28, 34, 26 mm) with an internal blob, 2 mm voxels."""
    shape = (40, 46, 38)
    A = _phantom_affine(shape)
    x = _world_grid(shape, A) - A[:3, :3] @ ((np.asarray(shape) - 1) / 2) - A[:3, 3]
    r = np.sqrt((x[..., 0] / 28) ** 2 + (x[..., 1] / 34) ** 2 + (x[..., 2] / 26) ** 2)
    edge = np.clip((1.15 - r) / 0.3, 0, 1)
    inside = edge * edge * (3 - 2 * edge)  # smoothstep: a soft edge ~8 mm wide, exactly 0 outside
    blob = np.exp(-((x[..., 0] - 8) ** 2 + (x[..., 1] + 6) ** 2 + (x[..., 2] - 4) ** 2) / (2 * 8.0**2))
    data = (1000 * inside * (1 + 0.5 * blob)).astype(np.float32)
    mask = torch.from_numpy(r <= 1.0)
    return Volume(torch.from_numpy(data), A, mask)


def _motion_size(true: list[np.ndarray], nominal: list[np.ndarray]) -> tuple[float, float]:
    """Mean rotation (deg) and slice-centre displacement (mm) of true vs nominal poses."""
    T = np.concatenate(true)
    N = np.concatenate(nominal)
    rel = torch.from_numpy(T @ np.linalg.inv(N))
    angle = float(torch.rad2deg(rotation_angle(rel)).mean())
    shift = float(np.linalg.norm(T[:, :3, 3] - N[:, :3, 3], axis=1).mean())
    return angle, shift


# ------------------------------------------------------------------------------ geometry


def test_orientations_are_proper_and_oblique_is_tilted():
    for base in ("axial", "coronal", "sagittal"):
        R = orientation_rotation(base)
        assert np.allclose(R.T @ R, np.eye(3)) and np.isclose(np.linalg.det(R), 1.0)
    assert np.allclose(orientation_rotation("axial")[:, 2], [0, 0, 1])
    assert np.allclose(np.abs(orientation_rotation("coronal")[:, 2]), [0, 1, 0])
    assert np.allclose(orientation_rotation("sagittal")[:, 2], [1, 0, 0])
    R = orientation_rotation("coronal", [1.0, 0.0, 0.0], 15.0)
    cos = abs(R[:, 2] @ orientation_rotation("coronal")[:, 2])
    assert math.isclose(math.degrees(math.acos(cos)), 15.0, abs_tol=1e-9)


def test_interleaved_order():
    assert interleaved_order(5, 2).tolist() == [0, 3, 1, 4, 2]
    assert interleaved_order(7, 3).tolist() == [0, 3, 5, 1, 4, 6, 2]
    assert interleaved_order(4, 1).tolist() == [0, 1, 2, 3]


def test_fov_covers_mask_and_times_are_global(phantom):
    cfg = SimulationConfig(n_stacks=4, motion="none", **FAST)
    params = sample_simulation_params(phantom, None, cfg, 0)
    pts = _world_grid(phantom.shape, phantom.affine)[phantom.mask.numpy()]
    offset = 0
    for g in params.geometry:
        A = np.asarray(g.affine)
        assert np.linalg.det(A[:3, :3]) > 0
        ijk = (pts - A[:3, 3]) @ np.linalg.inv(A[:3, :3]).T
        assert (ijk >= -1e-6).all() and (ijk <= np.asarray(g.shape) - 1 + 1e-6).all()
        assert sorted(g.order) == list(range(g.shape[2]))
        assert g.time_offset == offset
        offset += g.shape[2]
    assert np.allclose(params.centre, pts.mean(0))


# -------------------------------------------------------------------------------- motion


def test_no_motion_true_poses_are_nominal(phantom):
    res = simulate_stacks(phantom, None, SimulationConfig(motion="none", **FAST), torch.Generator().manual_seed(1))
    for st, P in zip(res.stacks, res.true_poses):
        assert np.array_equal(st.poses, P)


def test_same_seed_same_output_other_seed_other_motion(phantom):
    cfg = SimulationConfig(n_stacks=2, motion="moderate", **{**FAST, "noise": 0.05})
    a = simulate_stacks(phantom, None, cfg, torch.Generator().manual_seed(7))
    b = simulate_stacks(phantom, None, cfg, torch.Generator().manual_seed(7))
    c = simulate_stacks(phantom, None, cfg, torch.Generator().manual_seed(8))
    for sa, sb in zip(a.stacks, b.stacks):
        assert torch.equal(sa.slices, sb.slices) and torch.equal(sa.mask, sb.mask)
    assert all(np.array_equal(p, q) for p, q in zip(a.true_poses, b.true_poses))
    assert a.params.to_dict() == b.params.to_dict()
    assert not np.allclose(a.true_poses[0], c.true_poses[0])


def test_motion_grows_from_mild_to_severe(phantom):
    sizes = {}
    for level in ("mild", "moderate", "severe"):
        cfg = SimulationConfig(motion=level, **FAST)
        per_seed = []
        for seed in range(3):
            p = sample_simulation_params(phantom, None, cfg, seed)
            nominal = [g.nominal_poses()[0] for g in p.geometry]
            per_seed.append(_motion_size(apply_motion(p.motion, nominal, [g.times for g in p.geometry]), nominal))
        sizes[level] = np.mean(per_seed, 0)
    assert sizes["mild"][0] < sizes["moderate"][0] < sizes["severe"][0]
    assert sizes["mild"][1] < sizes["moderate"][1] < sizes["severe"][1]
    assert 0.5 < sizes["mild"][0] < 4 and 2 < sizes["moderate"][0] < 10  # "several degrees"


def test_motion_acts_about_brain_centre():
    centre = np.array([10.0, -5.0, 3.0])
    params = MotionParams("manual", centre.tolist(), [StackMotion([0.0], [[0.0, 0.0, 0.3, 0.0, 0.0, 0.0]])])
    pose = np.eye(4)
    pose[:3, 3] = centre  # a slice centred on the brain centre only turns
    out = apply_motion(params, [pose[None]], [np.zeros(1)])[0][0]
    assert np.allclose(out[:3, 3], centre)
    assert math.isclose(float(rotation_angle(torch.from_numpy(out))), 0.3, rel_tol=1e-9)


def test_motion_is_smooth_within_a_stack():
    rng = np.random.default_rng(0)
    times = [np.arange(40.0)]
    p = sample_motion("moderate", times, [np.array([0, 0, 1.0])], np.zeros(3), rng)
    m = p.stacks[0]
    assert len(m.knot_times) >= 4 and not m.jumps
    from slice2vol.simulation.motion import trajectory_params

    fine = trajectory_params(m, np.linspace(0, 39, 400))
    assert np.allclose(trajectory_params(m, np.asarray(m.knot_times)), m.control)  # interpolating
    jumps = np.abs(np.diff(fine, axis=0)).max(0)
    assert (jumps[:3] < math.radians(2)).all() and (jumps[3:] < 1.0).all()


@pytest.mark.parametrize("level, rot_max, trans_max", [("rot15", 15.0, 0.0), ("trans7.5", 0.0, 7.5)])
def test_sweep_levels_vary_one_magnitude_within_its_range(level, rot_max, trans_max):
    from slice2vol.simulation.motion import motion_level

    rng = np.random.default_rng(0)
    p = sample_motion(level, [np.arange(40.0), np.arange(40.0, 70.0)], [np.array([0, 0, 1.0])] * 2, np.zeros(3), rng)
    control = np.concatenate([np.asarray(m.control) for m in p.stacks])
    rot, trans = np.degrees(np.abs(control[:, :3])), np.abs(control[:, 3:])
    assert rot.max() <= rot_max and trans.max() <= trans_max
    # uniform over the range: the largest of ~50 draws per component comes close to the bound
    assert rot.max() > 0.8 * rot_max if rot_max else rot.max() == 0
    assert trans.max() > 0.8 * trans_max if trans_max else trans.max() == 0
    assert all(not m.jumps for m in p.stacks)
    assert motion_level("rot15").knot_interval == motion_level("trans7.5").knot_interval
    with pytest.raises(Slice2VolError, match="rot<degrees>"):
        motion_level("rotate15")


def test_csvr_bulk_rotation_is_in_plane_and_within_12_degrees(phantom):
    cfg = SimulationConfig(n_stacks=3, motion="csvr", **FAST)
    angles, counts = [], []
    for seed in range(12):
        p = sample_simulation_params(phantom, None, cfg, seed)
        for g, m in zip(p.geometry, p.motion.stacks):
            normal = np.asarray(g.affine)[:3, 2] / np.linalg.norm(np.asarray(g.affine)[:3, 2])
            rotvec = np.asarray(m.bulk[:3])
            angle = math.degrees(np.linalg.norm(rotvec))
            assert angle <= CSVR_BULK_DEG + 1e-9 and not any(m.bulk[3:])
            if angle > 1e-6:
                assert abs(abs(rotvec @ normal) / np.linalg.norm(rotvec) - 1) < 1e-9
            angles.append(angle)
            counts.append(len(m.knot_times))
            # with the perturbations removed, the true poses are the bulk in-plane rotation alone
            still = MotionParams("csvr", p.motion.centre, [StackMotion([0.0], [[0.0] * 6], m.bulk)])
            nominal = g.nominal_poses()[0]
            true = apply_motion(still, [nominal], [g.times])[0]
            rel = matrix_to_axis_angle(torch.from_numpy(true @ np.linalg.inv(nominal))[:, :3, :3]).numpy()
            assert np.allclose(rel, rotvec, atol=1e-9)
    assert max(angles) > 6 and 1 <= min(counts) and max(counts) <= 100 and len(set(counts)) > 5


# ----------------------------------------------------------------------------- rendering


def _trilinear_at(volume: Volume, world: np.ndarray) -> np.ndarray:
    """Independent direct resampling: trilinear interpolation of the volume at world points."""
    ijk = (world - volume.affine[:3, 3]) @ np.linalg.inv(volume.affine[:3, :3]).T
    shape = np.asarray(volume.shape)
    grid = torch.from_numpy((2 * ijk / (shape - 1) - 1)[..., ::-1].copy()).float()
    out = F.grid_sample(volume.data[None, None].float(), grid.reshape(1, -1, 1, 1, 3), align_corners=True)
    return out.reshape(world.shape[:-1]).numpy()


def _pixel_world(stack) -> np.ndarray:
    """World coordinates ``(N, H, W, 3)`` of every pixel from the stack affine."""
    N, H, W = stack.slices.shape
    ijk = np.stack(np.meshgrid(np.arange(H), np.arange(W), np.arange(N), indexing="ij"), -1).astype(np.float64)
    return np.moveaxis(ijk @ stack.affine[:3, :3].T + stack.affine[:3, 3], 2, 0)


@pytest.mark.parametrize("profile", ["gaussian", "box"])
def test_linear_volume_is_reproduced_exactly_by_the_symmetric_psf(phantom, profile):
    """A symmetric PSF leaves a linear intensity ramp unchanged: slices equal direct resampling."""
    x = _world_grid(phantom.shape, phantom.affine)
    ramp = Volume(torch.from_numpy((500 + 3 * x[..., 0] - 2 * x[..., 1] + 4 * x[..., 2]).astype(np.float32)),
                  phantom.affine, phantom.mask)
    cfg = SimulationConfig(orientations=("axial", "oblique", "sagittal"), motion="none", profile=profile, **FAST)
    res = simulate_stacks(ramp, None, cfg, 0)
    inner = phantom.mask.numpy()
    for st in res.stacks:
        world = _pixel_world(st)
        direct = _trilinear_at(ramp, world)
        # pixels whose whole PSF (reach < 4 mm) stays inside the brain, far from the volume edge
        ijk = np.rint((world - phantom.affine[:3, 3]) @ np.linalg.inv(phantom.affine[:3, :3]).T).astype(int)
        ok = np.all((ijk >= 3) & (ijk < np.asarray(phantom.shape) - 3), -1)
        ok[ok] = inner[tuple(ijk[ok].T)]
        assert ok.sum() > 500
        assert np.abs(st.slices.numpy()[ok] - direct[ok]).max() < 5e-3


def test_slice_profiles_have_their_moments_and_are_recorded(phantom, tmp_path):
    """``box``: uniform over the pixel and the slab (variances dx^2/12 and thickness^2/12 up to the
    midpoint rule), narrower through-plane than the ``gaussian`` model of the same FWHM; the
    profile is part of each stack's recorded geometry, so the parameters reproduce a box simulation."""
    box, gauss = slice_psf((1.0, 1.2), 3.0, 0.8, "box", 2), slice_psf((1.0, 1.2), 3.0, 0.8, "gaussian", 2)
    for psf in (box, gauss):
        torch.testing.assert_close(psf.weights.sum(1), torch.ones(2), rtol=0, atol=1e-6)
        assert psf.volume_sigma == 0.0  # every part explicit: not the reconstruction's operator
    var = (box.weights[0, :, None] * box.offsets[0] ** 2).sum(0)
    torch.testing.assert_close(var, torch.tensor([1.0 / 12, 1.44 / 12, 9.0 / 12]), rtol=0.07, atol=0)
    assert float(var[2]) < float((gauss.weights[0] * gauss.offsets[0, :, 2] ** 2).sum())
    cfg = SimulationConfig(n_stacks=2, motion="mild", profile="box", **FAST)
    res = simulate_stacks(phantom, None, cfg, 4)
    other = simulate_stacks(phantom, None, SimulationConfig(n_stacks=2, motion="mild", **FAST), 4)
    assert all(g.profile == "box" for g in res.params.geometry)
    assert not torch.equal(res.stacks[0].slices, other.stacks[0].slices)  # same seed, other profile
    save_simulation(res, tmp_path)
    obj = json.loads((tmp_path / "gt_poses.json").read_text())
    again = apply_simulation(phantom, None, SimulationParams.from_dict(obj["simulation"]["params"]))
    for a, b in zip(res.stacks, again.stacks):
        assert torch.equal(a.slices, b.slices)


def test_no_motion_stack_matches_direct_resampling(phantom):
    res = simulate_stacks(phantom, None, SimulationConfig(motion="none", **FAST), 0)
    for st in res.stacks:
        direct = _trilinear_at(phantom, _pixel_world(st))
        sim = st.slices.numpy()
        m = st.mask.numpy()
        assert st.slices.min() >= 0
        rel = np.abs(sim - direct)[m].mean() / direct[m].mean()
        assert rel < 0.03, rel  # the PSF blurs only the soft edge and the smooth blob
        assert np.corrcoef(sim.ravel(), direct.ravel())[0, 1] > 0.99
        # the through-plane blur is real: the simulated slices are not the direct resampling
        assert np.abs(sim - direct).max() > 1.0
        # the stack mask is the brain mask at the pixels
        mask_value = _trilinear_at(Volume(phantom.mask.float(), phantom.affine), _pixel_world(st))
        # pixels that read exactly 0.5 on this axis-aligned grid are ties: which side of the threshold
        # they land on is float rounding (the fused CPU operator computes positions in float64, this
        # reference in float32), so they are left out
        clear = np.abs(mask_value - 0.5) > 1e-4
        assert (m == (mask_value > 0.5))[clear].mean() > 0.995


def test_artefacts(phantom):
    base_cfg = dict(n_stacks=1, motion="none", spacing=2.0, thickness=4.0, margin=6.0)
    clean = simulate_stacks(phantom, None, SimulationConfig(noise=0.0, **base_cfg), 3).stacks[0]
    noisy = simulate_stacks(phantom, None, SimulationConfig(noise=0.05, **base_cfg), 3)
    ref = noisy.params.intensity_ref
    bg = noisy.stacks[0].slices[clean.slices == 0]  # Rayleigh background: mean sd * sqrt(pi / 2)
    assert bg.numel() > 100
    assert math.isclose(float(bg.mean()), 0.05 * ref * math.sqrt(math.pi / 2), rel_tol=0.1)
    biased = simulate_stacks(phantom, None, SimulationConfig(noise=0.0, bias=0.2, slice_bias=0.1, **base_cfg), 3)
    ratio = (biased.stacks[0].slices / clean.slices)[clean.slices > 10]
    assert ratio.min() >= math.exp(-0.3) - 1e-4 and ratio.max() <= math.exp(0.3) + 1e-4 and ratio.std() > 0.01
    gam = simulate_stacks(phantom, None, SimulationConfig(noise=0.0, gamma=0.3, **base_cfg), 3)
    g = gam.params.artefacts.gamma[0]
    top = clean.slices.max()
    assert torch.allclose(gam.stacks[0].slices, top * (clean.slices / top) ** g, rtol=1e-4, atol=1e-3)



def test_signal_loss_darkens_the_chosen_slices_only(phantom):
    """Signal loss multiplies the chosen slices by ``1 - depth * g`` before the noise; every other
    slice, and every other artefact of the seed, is the same as without it."""
    base_cfg = dict(n_stacks=2, motion="mild", spacing=2.0, thickness=4.0, margin=6.0, noise=0.0, bias=0.1)
    plain = simulate_stacks(phantom, None, SimulationConfig(**base_cfg), 4)
    lossy = simulate_stacks(phantom, None, SimulationConfig(signal_loss=0.25, **base_cfg), 4)
    assert lossy.params.artefacts.bias_coeffs == plain.params.artefacts.bias_coeffs
    for s, (a, b) in enumerate(zip(plain.stacks, lossy.stacks)):
        losses = lossy.params.artefacts.signal_loss[s]
        N = a.slices.shape[0]
        assert len(losses) == round(0.25 * N) and len({d["slice"] for d in losses}) == len(losses)
        hit = torch.zeros(N, dtype=torch.bool)
        hit[[d["slice"] for d in losses]] = True
        assert torch.equal(a.slices[~hit], b.slices[~hit])
        field = signal_loss_field(losses, N, a.slices.shape[1], a.slices.shape[2])
        torch.testing.assert_close(b.slices, a.slices * field, rtol=1e-5, atol=1e-3)
        for d in losses:  # dark: whole slices to 1 - depth, bands down to 1 - depth at their centre
            k = d["slice"]
            assert float(field[k].min()) == pytest.approx(1 - d["depth"], abs=0.05 if d["band"] else 1e-6)
            assert float(b.slices[k].sum()) < float(a.slices[k].sum())


def test_signal_loss_band_runs_along_its_angle():
    """A band at 0 deg is a function of the first in-plane coordinate only, darkest at ``offset``."""
    band = {"angle_deg": 0.0, "offset": 0.0, "width": 0.2}
    f = signal_loss_field([{"slice": 0, "depth": 0.8, "band": band}], 1, 21, 11)[0]
    assert torch.allclose(f, f[:, :1].expand_as(f))
    assert float(f[10, 0]) == pytest.approx(0.2, abs=1e-6) and float(f[0, 0]) > 0.99
    g = signal_loss_field([{"slice": 0, "depth": 0.8, "band": {**band, "angle_deg": 90.0}}], 1, 11, 21)[0]
    assert torch.allclose(g, g[:1, :].expand_as(g), atol=1e-6)


# ------------------------------------------------------------------------------ files


def test_written_stacks_reload_with_the_recorded_geometry(phantom, tmp_path):
    cfg = SimulationConfig(orientations=("coronal", "oblique", "axial"), motion="severe", **{**FAST, "noise": 0.02})
    res = simulate_stacks(phantom, None, cfg, 5)
    save_simulation(res, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gt_poses.json", "mask_00.nii.gz", "mask_01.nii.gz", "mask_02.nii.gz",
        "stack_00.nii.gz", "stack_01.nii.gz", "stack_02.nii.gz"]
    for s, st in enumerate(res.stacks):
        loaded = load_stack(tmp_path / f"stack_{s:02d}.nii.gz", thickness=st.thickness)
        assert np.array_equal(loaded.poses, st.poses)  # exactly, not approximately
        assert torch.equal(loaded.slices, st.slices)
        img = nib.load(tmp_path / f"stack_{s:02d}.nii.gz")
        H, W, N = img.shape
        # a voxel's world coordinate equals pose @ its slice-frame coordinate
        rng = np.random.default_rng(s)
        for i, j, k in zip(rng.integers(0, H, 5), rng.integers(0, W, 5), rng.integers(0, N, 5)):
            world = img.affine @ [i, j, k, 1]
            u, v = (i - (H - 1) / 2) * st.spacing[0], (j - (W - 1) / 2) * st.spacing[1]
            assert np.allclose(loaded.poses[k] @ [u, v, 0, 1], world, atol=1e-9)
        m = nib.load(tmp_path / f"mask_{s:02d}.nii.gz")
        assert m.get_data_dtype() == np.uint8 and np.array_equal(m.affine, img.affine)
        assert np.array_equal(np.asarray(m.dataobj).astype(bool), np.moveaxis(st.mask.numpy(), 0, 2))


def test_gt_poses_json_round_trips_and_reproduces_the_simulation(phantom, tmp_path):
    cfg = SimulationConfig(n_stacks=2, motion="csvr", bias=0.1, gamma=0.1, signal_loss=0.2, **{**FAST, "noise": 0.03})
    res = simulate_stacks(phantom, None, cfg, 11)
    assert all(res.params.artefacts.signal_loss)
    save_simulation(res, tmp_path)
    entries = load_poses_json(tmp_path / "gt_poses.json")
    for e, st, P in zip(entries, res.stacks, res.true_poses):
        assert e["name"] == st.name
        assert np.array_equal(e["poses"], P)
        assert np.array_equal(e["order"], st.order) and np.array_equal(e["index"], st.index)
    obj = json.loads((tmp_path / "gt_poses.json").read_text())
    params = SimulationParams.from_dict(obj["simulation"]["params"])
    again = apply_simulation(phantom, None, params)
    for a, b in zip(res.stacks, again.stacks):
        assert torch.equal(a.slices, b.slices)
    assert obj["simulation"]["config"]["motion"] == "csvr"


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_stacks=3, orientations=("axial", "coronal")), "orientations"),
    (dict(orientations=("axial", "diagonal", "coronal")), "orientation"),
    (dict(motion="wild"), "motion"),
    (dict(noise=-1.0), "noise"),
    (dict(n_stacks=0), "stacks"),
    (dict(thickness=2.0, gap=-2.0), "gap"),
    (dict(signal_loss=1.5), "signal loss"),
    (dict(signal_loss=-0.1), "signal loss"),
    (dict(profile="sinc"), "slice profile"),
])
def test_bad_config_raises(phantom, kwargs, words):
    with pytest.raises(Slice2VolError, match=words):
        simulate_stacks(phantom, None, SimulationConfig(**{**FAST, **kwargs}), 0)


def test_bad_mask_raises(phantom):
    with pytest.raises(Slice2VolError, match="empty"):
        simulate_stacks(phantom, torch.zeros(phantom.shape, dtype=torch.bool), SimulationConfig(**FAST), 0)
    with pytest.raises(Slice2VolError, match="shape"):
        simulate_stacks(phantom, torch.ones(4, 4, 4, dtype=torch.bool), SimulationConfig(**FAST), 0)


# -------------------------------------------------------------------------------- CLI


def _write_phantom(phantom, folder: Path) -> tuple[Path, Path]:
    gt, mask = folder / "gt.nii.gz", folder / "gt_mask.nii.gz"
    nib.save(nib.Nifti1Image(phantom.data.numpy(), phantom.affine), gt)
    nib.save(nib.Nifti1Image(phantom.mask.numpy().astype(np.uint8), phantom.affine), mask)
    return gt, mask


def test_cli_simulate(phantom, tmp_path, capsys):
    gt, mask = _write_phantom(phantom, tmp_path)
    out = tmp_path / "sim"
    args = ["simulate", str(gt), "--mask", str(mask), "--output", str(out), "--spacing", "2", "--thickness", "4",
            "--stacks", "2", "--orientations", "sagittal", "oblique", "--motion", "mild", "--seed", "3",
            "--slice-profile", "box"]
    assert main(args) == 0
    entries = load_poses_json(out / "gt_poses.json")
    recorded = json.loads((out / "gt_poses.json").read_text())["simulation"]
    assert recorded["config"]["profile"] == "box"
    assert [g["profile"] for g in recorded["params"]["geometry"]] == ["box", "box"]
    assert [e["name"] for e in entries] == ["stack_00.nii.gz", "stack_01.nii.gz"]
    st = load_stack(out / "stack_00.nii.gz", thickness=4.0, mask=out / "mask_00.nii.gz")
    assert st.slices.shape[0] == len(entries[0]["poses"])
    # sagittal: slice normal along world x
    assert np.allclose(np.abs(st.poses[0][:3, 2]), [1, 0, 0])
    assert main(["simulate", str(gt), "--output", str(tmp_path / "bad"), "--stacks", "3",
                 "--orientations", "axial"]) == 2
    assert "orientations" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["simulate", str(gt), "--output", str(gt)]) == 2  # a file, and the input at that
    assert "not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------- real atlas data


def test_atlas_csvr_simulation(shared_data):
    """cSVR-distribution motion on a real atlas (``shared_data``: tests/conftest.py, skips if absent)."""
    folder = shared_data / "fetal_atlases" / "crl2017" / "STA30"
    img, msk = nib.load(folder / "t2.nii.gz"), nib.load(folder / "mask.nii.gz")
    # every other voxel: 1.6 mm grid, eight times fewer voxels, quick to simulate from
    A = img.affine.copy()
    A[:3, :3] *= 2
    vol = Volume(torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32)[::2, ::2, ::2].copy()), A,
                 torch.from_numpy(np.asarray(msk.dataobj)[::2, ::2, ::2] > 0))
    cfg = SimulationConfig(motion="csvr", spacing=2.0, thickness=4.0, bias=0.1, gamma=0.1)
    res = simulate_stacks(vol, None, cfg, torch.Generator().manual_seed(0))
    for st in res.stacks:
        frac = float(st.mask.float().mean())
        assert 0.05 < frac < 0.6
        inside = st.slices[st.mask]
        assert float(inside.mean()) > 0.3 * res.params.intensity_ref
