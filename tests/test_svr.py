"""End-to-end behaviour of classical SVR (slice2vol.methods.svr, preprocess, commands).

Stacks are simulated from the CRL STA30 atlas at 1.6 mm (``atlas_lowres``, conftest.py; skipped
without the shared data): three orthogonal stacks of 2 mm pixels and 4 mm contiguous slices with
2% Rician noise, reconstructed at 1.6 mm.  That is coarse enough to run in seconds on a CPU and
fine enough that slice-thickness blur and motion visibly cost PSNR.

The SVR configuration is trimmed for speed with :func:`_config` (an unknown field is an error).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.core.image import SliceSet, Volume
from slice2vol.core.preprocess import choose_template, prepare
from slice2vol.core.runtime import seed_everything
from slice2vol.evaluation.metrics import compare_volumes, slice_tre, tre_summary
from slice2vol.methods.naive import naive_baseline
from slice2vol.methods.run import run_reconstruction
from slice2vol.methods.svr import SVRConfig, reconstruct_svr
from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks

RESOLUTION = 1.6
ORIENTATIONS = ["axial", "coronal", "sagittal"]
# Measured on the no-motion case below: naive PSF average 20.6 dB, SVR (1 iteration) 22.2 dB
# (PSNR in the brain mask, intensity fit a*x+b, range of the atlas).  The threshold leaves 0.7 dB
# for tuning changes and still demands most of the 1.6 dB gain over the naive average: below it
# the super-resolution step is not doing its job.
NO_MOTION_PSNR_MIN = 21.5


def _config(**kw) -> SVRConfig:
    # strict on purpose: a knob that no longer exists must fail here, not be skipped silently
    # (the test would then check a configuration other than the one it names)
    return SVRConfig(**{"progress": False, **kw})


FAST = dict(iterations=1, coarse_iterations=0, reg_iterations=3)


def _simulate(atlas, motion: str, seed, n_stacks: int = 3, orientations=ORIENTATIONS, spacing=2.0, thickness=4.0):
    cfg = SimulationConfig(n_stacks=n_stacks, orientations=orientations[:n_stacks], spacing=spacing,
                           thickness=thickness, motion=motion, noise=0.02, margin=4.0)
    return simulate_stacks(atlas, None, cfg, seed)


def _naive(prep) -> torch.Tensor:
    """Motion-blind baseline: PSF average of the (intensity-normalised) stacks at their header poses."""
    return naive_baseline(prep).volume


@pytest.fixture(scope="module")
def no_motion(atlas_lowres):
    sim = _simulate(atlas_lowres, "none", 1)
    prep = prepare(sim.stacks, RESOLUTION, have_stack_masks=True)
    result = reconstruct_svr(prep, _config(**FAST))
    return sim, prep, result


def test_no_motion_svr_recovers_the_volume(atlas_lowres, no_motion, capsys):
    sim, prep, result = no_motion
    naive = compare_volumes(Volume(_naive(prep), prep.affine), atlas_lowres, align=False)
    svr = compare_volumes(result.volume, atlas_lowres, align=False)
    with capsys.disabled():
        print(f"\n[svr, no motion] PSNR naive {naive['psnr']:.2f} dB -> SVR {svr['psnr']:.2f} dB; "
              f"SSIM {naive['ssim']:.3f} -> {svr['ssim']:.3f}")
    assert svr["fov_coverage"] > 0.99
    assert svr["psnr"] > naive["psnr"] + 0.8
    assert svr["psnr"] > NO_MOTION_PSNR_MIN
    assert svr["ssim"] > naive["ssim"]
    assert 0.8 < svr["scale_a"] < 1.5  # output in the template's intensity units (up to blur)


def test_the_search_moves_stacks_packages_blocks_then_slices(no_motion):
    """The global search's levels run coarse to fine: whole stacks, interleave packages and their
    halves, runs of 8 and then 4 neighbouring slices, single slices; ``search_blocks=()`` drops
    the block levels."""
    from slice2vol.methods.svr import search_groups

    _, prep, result = no_motion
    stages = [h["stage"] for h in result.history if str(h.get("stage", "")).startswith("search")]
    levels = [s for s in stages if s not in ("search", "search-turn")]
    assert levels == ["search-stack", "search-package", "search-half", "search-block8", "search-block4"], stages
    assert stages.index("search") > stages.index("search-block4")
    groups = search_groups(prep, _config())
    sid = prep.slices.stack_id.cpu().numpy()
    for s in range(len(prep.stacks)):
        k = np.asarray(prep.stacks[s].index)
        g8 = groups["block8"].cpu().numpy()[sid == s]
        assert all(len(set(g8[(k - k.min()) // 8 == b])) == 1 for b in set((k - k.min()) // 8))
    assert not any(name.startswith("block") for name in search_groups(prep, _config(search_blocks=())))


def test_no_motion_svr_output_is_well_formed(no_motion):
    sim, prep, result = no_motion
    V = result.volume.data
    ss = prep.slices
    assert tuple(V.shape) == tuple(prep.shape) and np.allclose(result.volume.affine, prep.affine)
    assert bool(torch.isfinite(V).all()) and float(V.min()) >= 0
    assert float(V[~prep.roi].abs().max()) == 0.0
    assert result.poses.shape == (ss.n_slices, 4, 4)
    assert result.scales.shape == result.slice_weights.shape == (ss.n_slices,)
    assert result.simulated.shape == result.pixel_weights.shape == (ss.n_pixels,)
    assert len(result.history) >= 1
    # nothing moved, so the slices stay where the headers put them (TRE: largest pixel displacement)
    true = torch.from_numpy(np.concatenate(sim.true_poses))
    tre = slice_tre(result.poses, true, ss.coords, ss.slice_id)
    assert float(tre.nanmedian()) < 1.0
    # the simulated slices match the acquired ones (2% noise ~ 40 intensity units)
    inside = result.pixel_weights > 0.5
    rel = (result.simulated - ss.values)[inside].norm() / ss.values[inside].norm()
    assert float(rel) < 0.1


def test_same_seed_gives_identical_results(atlas_lowres):
    """Two full runs (simulation with the same seed, preparation, SVR) on the CPU are bit-identical.
    A smaller case than above (two stacks of 2.4 mm pixels, 3.2 mm output, fewer iterations)
    keeps it quick; mild motion so slice registration really moves slices."""
    out = []
    for _ in range(2):
        gen = seed_everything(5)
        sim = _simulate(atlas_lowres, "mild", gen, n_stacks=2, spacing=2.4, thickness=4.8)
        prep = prepare(sim.stacks, 3.2, have_stack_masks=True)
        res = reconstruct_svr(prep, _config(iterations=1, coarse_iterations=1, reg_iterations=2, cg_iterations=4,
                                            final_cg_iterations=4))
        out.append((sim, prep, res))
    (s1, p1, r1), (s2, p2, r2) = out
    for a, b in zip(s1.stacks, s2.stacks):
        assert torch.equal(a.slices, b.slices) and torch.equal(a.mask, b.mask)
    assert torch.equal(p1.slices.poses, p2.slices.poses)
    assert torch.equal(r1.volume.data, r2.volume.data)
    assert torch.equal(r1.poses, r2.poses)
    assert torch.equal(r1.slice_weights, r2.slice_weights)
    assert not torch.equal(r1.poses, p1.slices.poses)  # the slices were re-registered


def test_choose_template_prefers_the_unmoved_stack(atlas_lowres):
    """Same axial geometry (same seed), once without motion, once with severe motion (and once
    moderate): the neighbour-NCC score picks the still stack wherever it is in the list."""
    kw = dict(n_stacks=1, spacing=2.4, thickness=4.8)
    still = _simulate(atlas_lowres, "none", 5, **kw).stacks[0]
    severe = _simulate(atlas_lowres, "severe", 5, **kw).stacks[0]
    moderate = _simulate(atlas_lowres, "moderate", 5, **kw).stacks[0]
    assert np.allclose(still.affine, severe.affine)
    assert choose_template([severe, still]) == 1
    assert choose_template([still, severe]) == 0
    assert choose_template([moderate, severe, still]) == 2


def test_svr_corrects_motion_in_the_default_run(atlas_lowres):
    """The default test run must show that SVR corrects motion, not only that it runs: moderate
    motion, SVR with its default stages trimmed in iterations only.  Thresholds: median slice
    TRE at most half that of the header poses, and PSNR (rigidly aligned) 1 dB over the naive
    average at the same poses."""
    sim = _simulate(atlas_lowres, "moderate", 3)
    prep = prepare(sim.stacks, RESOLUTION, have_stack_masks=True)
    result = reconstruct_svr(prep, _config(iterations=2, coarse_iterations=4, reg_iterations=4, search_rounds=1))
    ss = prep.slices
    true = torch.from_numpy(np.concatenate(sim.true_poses))
    header = SliceSet.from_stacks(prep.stacks).poses
    before = tre_summary(slice_tre(header, true, ss.coords, ss.slice_id), ss.stack_id)["median"]
    after = tre_summary(slice_tre(result.poses, true, ss.coords, ss.slice_id), ss.stack_id)["median"]
    naive = compare_volumes(Volume(_naive(prep), prep.affine), atlas_lowres, align=True)["psnr"]
    svr = compare_volumes(result.volume, atlas_lowres, align=True)["psnr"]
    assert after < 0.5 * before, (before, after)
    assert svr > naive + 1.0, (naive, svr)


@pytest.mark.slow
def test_svr_corrects_moderate_motion(atlas_lowres, capsys):
    """Moderate motion (RMS ~5 deg / 3.5 mm per stack trajectory), the full default pipeline via
    run_reconstruction.  Measured: PSNR (rigidly aligned) naive 19.3 dB -> SVR 22.3 dB; median
    slice TRE 4.5 mm (header poses) -> 0.7 mm.  Thresholds: +1.5 dB, TRE at most half."""
    sim = _simulate(atlas_lowres, "moderate", 1)
    prep, result, timings = run_reconstruction(sim.stacks, resolution=RESOLUTION, have_stack_masks=True,
                                               progress=False)
    naive = compare_volumes(Volume(_naive(prep), prep.affine), atlas_lowres, align=True)
    svr = compare_volumes(result.volume, atlas_lowres, align=True)
    ss = prep.slices
    true = torch.from_numpy(np.concatenate(sim.true_poses))
    header = SliceSet.from_stacks(prep.stacks).poses
    tre_before = tre_summary(slice_tre(header, true, ss.coords, ss.slice_id), ss.stack_id)
    tre_after = tre_summary(slice_tre(result.poses, true, ss.coords, ss.slice_id), ss.stack_id)
    with capsys.disabled():
        print(f"\n[svr, moderate motion] PSNR naive {naive['psnr']:.2f} -> SVR {svr['psnr']:.2f} dB; TRE median "
              f"{tre_before['median']:.2f} -> {tre_after['median']:.2f} mm, p90 {tre_before['p90']:.2f} -> "
              f"{tre_after['p90']:.2f} mm; {timings['total_s']:.0f} s")
    assert svr["psnr"] > naive["psnr"] + 1.5
    assert tre_after["median"] < 0.5 * tre_before["median"]
    assert tre_after["p90"] < tre_before["p90"]


def test_implausible_slice_updates_are_refused():
    """A slice update turning a slice 40 deg (or moving it 25 mm) away from its stack pose is
    reverted to the previous pose; a 5 deg / 3 mm update is kept."""
    from slice2vol.core.transforms import params_to_matrix
    from slice2vol.methods.svr import _plausible

    f32 = torch.float32
    ref = params_to_matrix(torch.tensor([[0.0, 0, 0, 10, 0, 0]] * 3, dtype=f32))
    old = params_to_matrix(torch.tensor([[0.01, 0, 0, 10.5, 0, 0]] * 3, dtype=f32))
    new = params_to_matrix(torch.tensor([
        [float(np.deg2rad(5.0)), 0, 0, 13.0, 0, 0],    # plausible
        [float(np.deg2rad(40.0)), 0, 0, 10.0, 0, 0],   # turned too far
        [0.0, 0, 0, 10.0, 25.0, 0],                    # moved too far
    ], dtype=f32))
    out = _plausible(new, old, ref, (30.0, 20.0))
    torch.testing.assert_close(out[0], new[0])
    torch.testing.assert_close(out[1], old[1])
    torch.testing.assert_close(out[2], old[2])
