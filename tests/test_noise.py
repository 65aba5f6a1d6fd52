"""Noise estimation (``core.noise``) and the noise-adaptive regularisation it sets
(``core.reconstruction.regularisation_for_noise``, ``Prepared.regularisation``, SVR)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slice2vol.core.image import Stack
from slice2vol.core.noise import MIN_NOISE_PIXELS, relative_noise, stack_noise
from slice2vol.core.reconstruction import DEFAULT_LAM, regularisation_for_noise


def _stack(noise: float, n=8, h=48, w=40, seed=0, mask_fraction=0.6) -> Stack:
    """Smooth anatomy-like intensities (mean ~1000 inside an ellipse, zero outside, as a
    skull-stripped simulation) plus white Gaussian noise of ``noise`` x the mean inside."""
    g = torch.Generator().manual_seed(seed)
    k, i, j = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                             torch.arange(w, dtype=torch.float32), indexing="ij")
    r2 = ((i - h / 2) / (mask_fraction * h / 2)) ** 2 + ((j - w / 2) / (mask_fraction * w / 2)) ** 2
    body = r2 < 1
    smooth = 1000 * (1 + 0.3 * torch.sin(i / 6) * torch.cos(j / 7 + k / 2))
    data = torch.where(body, smooth, torch.zeros(())) + noise * 1000 * torch.randn((n, h, w), generator=g) * body
    poses = np.stack([np.eye(4) for _ in range(n)])
    return Stack(name="synthetic", slices=data, mask=body, affine=np.diag([1.0, 1.0, 3.0, 1.0]), poses=poses,
                 spacing=(1.0, 1.0), thickness=3.0, index=np.arange(n))


@pytest.mark.parametrize("noise", [0.01, 0.03, 0.1])
def test_white_noise_is_recovered_inside_the_mask(noise):
    """The zero background outside the mask and the smooth anatomy must not bias the estimate."""
    st = _stack(noise)
    est = stack_noise(st)
    mean = float(st.slices[st.mask].mean())
    assert est * mean == pytest.approx(noise * 1000, rel=0.08)


def test_noise_free_smooth_anatomy_reads_near_zero():
    assert stack_noise(_stack(0.0)) < 0.002


def test_too_few_interior_pixels_give_nan_and_the_median_skips_them():
    small = _stack(0.05, n=2, h=20, w=20, mask_fraction=0.5)
    assert int(small.mask.sum()) < MIN_NOISE_PIXELS
    assert math.isnan(stack_noise(small))
    median, per = relative_noise([small, _stack(0.02), _stack(0.06, seed=1), _stack(0.04, seed=2)])
    assert math.isnan(per[0])
    assert median == pytest.approx(0.04, rel=0.1)
    assert math.isnan(relative_noise([small])[0])


def test_mismatched_mask_is_refused():
    st = _stack(0.02)
    bad = Stack(**{**st.__dict__, "mask": st.mask[:, :-1]})
    with pytest.raises(ValueError, match="same"):
        stack_noise(bad)


def test_regularisation_rule_has_its_floor_and_slope():
    assert regularisation_for_noise(None) == DEFAULT_LAM
    assert regularisation_for_noise(float("nan")) == DEFAULT_LAM
    assert regularisation_for_noise(0.01) == DEFAULT_LAM
    assert regularisation_for_noise(0.04) == pytest.approx(DEFAULT_LAM)
    assert regularisation_for_noise(0.12) == pytest.approx(0.06)
    lams = [regularisation_for_noise(x) for x in np.linspace(0, 0.3, 31)]
    assert all(b >= a for a, b in zip(lams, lams[1:]))


def _sim(atlas, noise: float, seed: int = 0):
    from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks

    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=1.6, thickness=3.2,
                           motion="none", noise=noise, margin=4.0)
    return simulate_stacks(atlas, None, cfg, torch.Generator().manual_seed(seed), progress=False).stacks


def test_prepare_records_the_noise_and_the_regularisation_follows_it(atlas_lowres):
    from slice2vol.core.preprocess import prepare

    low = prepare(_sim(atlas_lowres, 0.02), 1.6, have_stack_masks=True)
    high = prepare(_sim(atlas_lowres, 0.15), 1.6, have_stack_masks=True)
    assert len(high.noise["per_stack"]) == 3
    assert high.noise["median"] == pytest.approx(0.15, rel=0.15)
    assert low.regularisation == DEFAULT_LAM
    assert high.regularisation == pytest.approx(regularisation_for_noise(high.noise["median"]))
    assert high.regularisation > 1.5 * DEFAULT_LAM


def test_svr_uses_the_noise_adaptive_weight_unless_given_and_it_pays_at_high_noise(atlas_lowres):
    """At 30 % noise the adaptive weight must reconstruct the (noise-free) truth better than the
    low-noise default (about +0.7 dB here; at this case's 1.6 mm slices and voxels the PSF already
    averages much of the noise away, so lower noise shows less); an explicit ``lam`` is used as given."""
    from slice2vol.core.preprocess import prepare
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.methods.svr import SVRConfig, reconstruct_svr

    from slice2vol.core.reconstruction import EDGE_DELTA

    prep = prepare(_sim(atlas_lowres, 0.3, seed=1), 1.6, have_stack_masks=True)
    # the edge threshold, which also follows the noise, is held fixed: this is about lam
    base = dict(register_slices=False, iterations=2, progress=False, edge=EDGE_DELTA, final_rounds=1)
    adaptive = reconstruct_svr(prep, SVRConfig(**base))
    fixed = reconstruct_svr(prep, SVRConfig(lam=DEFAULT_LAM, **base))
    assert adaptive.regularisation == pytest.approx(prep.regularisation)
    assert fixed.regularisation == DEFAULT_LAM
    gt = atlas_lowres
    p_adaptive = compare_volumes(adaptive.volume, gt, align=False, scale=True)["psnr"]
    p_fixed = compare_volumes(fixed.volume, gt, align=False, scale=True)["psnr"]
    assert p_adaptive > p_fixed + 0.3


def test_regularisation_option_is_checked(tmp_path, capsys, make_stack):
    from slice2vol.cli.parser import main

    a, b = str(make_stack("a.nii.gz")), str(make_stack("b.nii.gz", shape=(12, 10, 6)))
    out = str(tmp_path / "o.nii.gz")
    assert main(["reconstruct", a, b, "-o", out, "--regularisation", "0"]) == 2
    assert main(["reconstruct", a, b, "-o", out, "--regularisation", "nan"]) == 2
    assert main(["reconstruct", a, b, "-o", out, "--method", "gaussian", "--regularisation", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "--regularisation must be a positive number, got 0.0" in err
    assert "--regularisation must be a positive number, got nan" in err
    assert "--regularisation only applies to --method auto, svr or csvr" in err
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("method", ["svr", "auto"])
def test_regularisation_option_reaches_the_method(method, atlas_lowres):
    """``--regularisation`` becomes the ``lam`` option, which SVR (alone or as auto's Refine) uses as given."""
    from types import SimpleNamespace

    from slice2vol.cli.commands import _method_options
    from slice2vol.methods.run import run_reconstruction

    args = SimpleNamespace(method=method, regularisation=0.07, packages=None, stacks=["a", "b", "c"])
    options = _method_options(args)
    assert options["lam"] == 0.07
    _, result, _ = run_reconstruction(_sim(atlas_lowres, 0.02), resolution=1.6, method=method, have_stack_masks=True,
                                      iterations=1, progress=False, options=options)
    assert result.regularisation == 0.07


def test_gaussian_warns_on_noisy_stacks_only(atlas_lowres, caplog):
    """GaussianSVR follows noise (``NOISY`` in its module): a noisy case says so, a clean one does not."""
    import logging
    from dataclasses import replace

    from slice2vol.core.preprocess import prepare
    from slice2vol.methods.gaussian.optimise import NOISY, GaussianConfig, reconstruct_gaussian

    prep = prepare(_sim(atlas_lowres, 0.02), 1.6, have_stack_masks=True)
    cfg = GaussianConfig(init="stack", iterations=1, n_init=500, fit_iterations=0, progress=False)
    with caplog.at_level(logging.WARNING, logger="slice2vol.methods.gaussian.optimise"):
        reconstruct_gaussian(prep, cfg)
        assert not any("noisy" in r.getMessage() for r in caplog.records)
        noisy = replace(prep, noise={**prep.noise, "median": NOISY + 0.02})
        reconstruct_gaussian(noisy, cfg)
    assert any("stacks are noisy (8.0 %" in r.getMessage() for r in caplog.records)


def test_noise_ceiling_makes_a_perfect_prediction_of_noisy_slices_score_one():
    """The noise-free signal predicts a noisy slice with NCC sqrt(1 - sigma^2 / var(y)); divided by
    the ceiling it scores about 1, and without a noise estimate nothing changes."""
    from slice2vol.core.image import SliceSet
    from slice2vol.evaluation.metrics import per_slice_ncc
    from slice2vol.evaluation.quality import noise_ceiling

    clean = _stack(0.0)
    noisy = _stack(0.15)
    ss = SliceSet.from_stacks([noisy, _stack(0.0, seed=3)])
    signal = torch.cat([clean.slices[clean.mask], clean.slices[clean.mask]])
    raw = per_slice_ncc(signal.to(ss.values.dtype), ss.values, ss.slice_id, ss.n_slices)
    ceiling = noise_ceiling(ss, [0.15, 0.0])
    lo, hi = ss.stack_slices[0], ss.stack_slices[1]
    assert float(raw[lo:hi].max()) < 0.95  # the noise caps the raw NCC well below 1
    ratio = (raw / ceiling)[lo:hi]
    assert abs(float(ratio.mean()) - 1) < 0.02 and float((ratio - 1).abs().max()) < 0.08  # per-slice sampling
    assert torch.equal(ceiling[hi:], torch.ones(ss.n_slices - hi, dtype=torch.float64))  # noise 0
    assert torch.equal(noise_ceiling(ss, None), torch.ones(ss.n_slices, dtype=torch.float64))
    assert torch.equal(noise_ceiling(ss, [float("nan"), None]), torch.ones(ss.n_slices, dtype=torch.float64))


def test_quality_corrects_only_for_noise_above_its_calibration_level():
    """The verdict's thresholds were calibrated at 2 % noise: there and below the NCCs are left as
    they are; above, they are raised by the ceiling's ratio."""
    from slice2vol.core.image import SliceSet
    from slice2vol.evaluation.quality import CALIBRATION_NOISE, noise_ceiling

    ss = SliceSet.from_stacks([_stack(0.15), _stack(0.01, seed=4)])
    lo, hi = ss.stack_slices[0], ss.stack_slices[1]
    rel = noise_ceiling(ss, [0.15, 0.01], reference=CALIBRATION_NOISE)
    assert torch.equal(rel[hi:], torch.ones(ss.n_slices - hi, dtype=torch.float64))
    expected = noise_ceiling(ss, [0.15, None]) / noise_ceiling(ss, [CALIBRATION_NOISE, None])
    assert torch.allclose(rel[lo:hi], expected[lo:hi]) and float(rel[lo:hi].max()) < 0.9
    assert torch.equal(noise_ceiling(ss, [CALIBRATION_NOISE, None], reference=CALIBRATION_NOISE),
                       torch.ones(ss.n_slices, dtype=torch.float64))


def test_report_noise_line_survives_odd_records():
    from slice2vol.report.page import _noise_cell

    assert _noise_cell(None) is None and _noise_cell({"median": 0.02}) is None
    assert _noise_cell({"per_stack": ["x"], "median": 0.1}) is None
    assert _noise_cell({"per_stack": [0.081, None], "median": 0.081, "regularisation": 0.0405}) == \
        "8.1 % of the mean brain intensity (per stack: 8.1 %, n/a); regularisation 0.0405"


@pytest.mark.parametrize("noise", [0.02, 0.08])
def test_zero_filled_stack_reads_its_noise_on_the_acquired_grid(noise):
    """Zero filling correlates the noise of neighbouring stored pixels, so it read several times
    low on the stored grid; with the acquired pixel known it reads as the stack acquired."""
    import dataclasses

    from slice2vol.core import noise as noise_mod
    from slice2vol.simulation.simulate import zero_fill_stack

    body = _stack(noise, h=64, w=56, mask_fraction=0.8)
    # tissue around the brain as in a scanner's image (a zero background would ring when zero-filled)
    g = torch.Generator().manual_seed(1)
    around = 1000 + noise * 1000 * torch.randn(body.slices.shape, generator=g)
    acquired = dataclasses.replace(body, slices=torch.where(body.mask, body.slices, around))
    stored = zero_fill_stack(acquired, 2)
    assert tuple(stored.slices.shape[1:]) == (128, 112) and stored.spacing == pytest.approx((0.5, 0.5))
    known = dataclasses.replace(stored, psf_spacing=(1.0, 1.0))  # what in-plane detection records
    truth = stack_noise(acquired)
    assert stack_noise(known) == pytest.approx(truth, rel=0.1)
    assert stack_noise(stored) < 0.5 * truth  # the stored pixel as PSF: the old, low reading
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(noise_mod, "ACQUIRED_GRID", False)
        assert stack_noise(known) < 0.5 * truth  # the A/B switch restores it


def test_acquired_grid_leaves_stacks_stored_as_acquired_alone():
    from slice2vol.core.noise import acquired_grid

    st = _stack(0.02)
    x, m = acquired_grid(st.slices, st.mask.float(), st.spacing, st.spacing)
    assert x is st.slices
    y, mm = acquired_grid(st.slices, st.mask.float(), (1.0, 1.0), (2.0, 1.0))
    assert tuple(y.shape) == (8, 24, 40) and tuple(mm.shape) == (8, 24, 40)
    assert float(y[mm > 0].mean()) == pytest.approx(float(st.slices[st.mask].mean()), rel=0.05)
