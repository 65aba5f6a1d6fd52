"""The super-resolution's noise-adaptive edge threshold (``core.reconstruction.edge_threshold_for_noise``),
the white-noise check it relies on (``core.noise.coarse_ratio``) and how it reaches the methods."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slice2vol.core.image import Stack
from slice2vol.core.noise import WHITE_RATIO_MAX, coarse_ratio, stack_noise
from slice2vol.core.reconstruction import (EDGE_DELTA, EDGE_FLOOR, EDGE_NOISE_SLOPE, edge_threshold_for_noise,
                                           psf_average, super_resolve)
from test_noise import _sim, _stack


def _upsampled(st: Stack) -> Stack:
    """``st`` stored 2x upsampled in-plane (bilinear): noise correlated between neighbours."""
    x = F.interpolate(st.slices[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    m = F.interpolate(st.mask[:, None].float(), scale_factor=2, mode="nearest")[:, 0] > 0.5
    return Stack(**{**st.__dict__, "slices": x, "mask": m, "spacing": (0.5, 0.5)})


def test_edge_rule_floor_slope_and_fallback():
    assert edge_threshold_for_noise(0.0) == EDGE_FLOOR
    assert edge_threshold_for_noise(0.1) == pytest.approx(EDGE_NOISE_SLOPE * 0.1)
    for unknown in (None, float("nan")):
        assert edge_threshold_for_noise(unknown) == EDGE_DELTA
    assert edge_threshold_for_noise(0.1, white=False) == EDGE_DELTA
    edges = [edge_threshold_for_noise(x) for x in np.linspace(0, 0.3, 31)]
    assert all(b >= a for a, b in zip(edges, edges[1:]))


@pytest.mark.parametrize("noise", [0.01, 0.03, 0.1])
def test_white_noise_reads_alike_on_both_grids_and_interpolated_noise_does_not(noise):
    st = _stack(noise, n=8, h=96, w=80)
    white = coarse_ratio([st])
    assert 0.7 < white < 2.0 < WHITE_RATIO_MAX
    interpolated = coarse_ratio([_upsampled(st)])
    assert interpolated > WHITE_RATIO_MAX
    # the reason for the check: interpolated noise reads several times low
    assert stack_noise(_upsampled(st)) < 0.5 * stack_noise(st)


def test_coarse_ratio_is_nan_without_estimates():
    small = _stack(0.05, n=2, h=20, w=20, mask_fraction=0.5)
    assert math.isnan(coarse_ratio([small]))
    assert math.isnan(coarse_ratio([]))


def test_prepare_records_whiteness_and_the_edge_threshold_follows(atlas_lowres):
    from slice2vol.core.preprocess import prepare

    white = prepare(_sim(atlas_lowres, 0.06), 1.6, have_stack_masks=True)
    assert white.noise["white"] and white.noise["coarse_ratio"] <= WHITE_RATIO_MAX
    assert white.edge_threshold == pytest.approx(edge_threshold_for_noise(white.noise["median"]))
    assert white.edge_threshold > EDGE_FLOOR
    clean = prepare(_sim(atlas_lowres, 0.0), 1.6, have_stack_masks=True)
    assert not clean.noise["white"]  # the anatomy, not noise: the estimate sets nothing
    assert clean.edge_threshold == EDGE_DELTA


def test_super_resolve_edge_is_relative_to_the_slices_99th_percentile(atlas_lowres):
    from slice2vol.core import acquisition as acq
    from slice2vol.core.preprocess import prepare

    prep = prepare(_sim(atlas_lowres, 0.02), 1.6, have_stack_masks=True)
    ss = prep.slices
    psf = acq.psf_kernel(ss.spacing, ss.thickness, 1.6)
    y, c, sid = ss.values, ss.coords, ss.slice_id
    V0 = psf_average(y, torch.ones_like(y), prep.shape, prep.affine, ss.poses, c, sid, psf)
    args = (V0, prep.affine, ss.poses, c, sid, y, psf)
    p99 = float(torch.quantile(y[:: max(1, y.numel() // 100000)], 0.99))
    a = super_resolve(*args, edge=0.03, iterations=3)
    b = super_resolve(*args, delta=0.03 * p99, iterations=3)
    c3 = super_resolve(*args, iterations=3)
    assert torch.allclose(a, b)
    assert torch.allclose(c3, super_resolve(*args, delta=EDGE_DELTA * p99, iterations=3))
    assert not torch.allclose(a, c3)


def test_svr_takes_the_threshold_from_the_noise_unless_given(atlas_lowres, monkeypatch):
    """SVR's final solves take ``prep.edge_threshold`` unless ``SVRConfig.edge`` is set (the result
    records it); the volumes the registration works on (global search, coarse and fine stages)
    keep ``SVRConfig.edge_stages``."""
    import slice2vol.methods.svr as svr
    from slice2vol.core.preprocess import prepare

    prep = prepare(_sim(atlas_lowres, 0.06), 1.6, have_stack_masks=True)
    assert prep.edge_threshold != EDGE_DELTA
    seen = []
    real = svr.super_resolve

    def spy(*a, **k):
        seen.append((k.get("edge"), k["iterations"]))
        return real(*a, **k)

    monkeypatch.setattr(svr, "super_resolve", spy)
    base = dict(iterations=1, coarse_iterations=1, search_rounds=1, progress=False)
    cfg = svr.SVRConfig(**base)
    res = svr.reconstruct_svr(prep, cfg)
    final = [(prep.edge_threshold, cfg.final_cg_iterations)] * cfg.final_rounds
    assert seen[-cfg.final_rounds:] == final and res.edge_threshold == prep.edge_threshold
    assert len(seen) > cfg.final_rounds and {e for e, _ in seen[:-cfg.final_rounds]} == {EDGE_DELTA}
    seen.clear()
    res = svr.reconstruct_svr(prep, svr.SVRConfig(edge=0.2, edge_stages=0.15, final_rounds=1, **base))
    assert seen[-1] == (0.2, cfg.final_cg_iterations) and {e for e, _ in seen[:-1]} == {0.15}
    assert res.edge_threshold == 0.2
