"""Behaviour of volume reconstruction from posed slices (slice2vol.core.reconstruction) and of the
robust statistics (slice2vol.core.robust).

Self-contained (no shared data): a synthetic "brain" phantom on a 2 mm grid with sharp-edged
inclusions (so super-resolution has edges to recover), acquired by the shared simulator as
three orthogonal stacks of 4 mm slices at their exact poses; and tiny explicit-matrix cases for
the exact least-squares and scale checks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.core import acquisition as acq
from slice2vol.core.geometry import slice_pixel_coords
from slice2vol.core.image import SliceSet, Volume
from slice2vol.core.reconstruction import normal_diag, psf_average, super_resolve
from slice2vol.core.robust import em_weights, fit_scales
from slice2vol.core.transforms import axis_angle_to_matrix
from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks

D = torch.float64
RES = 2.0


def _phantom(shape=(36, 42, 34)) -> Volume:
    """Ellipsoid (radii 26, 32, 24 mm, 600) with a 3 mm soft edge and four sharp spheres
    (+500, -300, +700, +300) inside; 2 mm voxels, world-axis-aligned, off-centre origin."""
    A = np.diag([RES, RES, RES, 1.0])
    A[:3, 3] = -(np.asarray(shape) - 1) / 2 * RES + np.array([2.0, -3.0, 1.0])
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(np.float64)
    x = (ijk - (np.asarray(shape) - 1) / 2) * RES
    r = np.sqrt((x[..., 0] / 26) ** 2 + (x[..., 1] / 32) ** 2 + (x[..., 2] / 24) ** 2)
    data = 600 * np.clip((1.1 - r) / 0.15, 0, 1)
    for c, rad, val in (((8, -6, 4), 7, 500), ((-10, 8, -5), 5, -300), ((0, 14, 8), 4, 700), ((-6, -16, -2), 6, 300)):
        d = np.sqrt(((x - np.array(c)) ** 2).sum(-1))
        data = data + val * np.clip((rad - d) / 1.5 + 0.5, 0, 1)
    data = data * (r < 1.1)
    return Volume(torch.from_numpy(data.astype(np.float32)), A, torch.from_numpy(r <= 1.0))


@pytest.fixture(scope="module")
def acquired():
    """The phantom, its three orthogonal stacks (2 mm pixels, 4 mm thick, 1% noise, exact poses),
    their slice set and the normal-quality PSF for the 2 mm grid."""
    vol = _phantom()
    cfg = SimulationConfig(n_stacks=3, orientations=["axial", "coronal", "sagittal"], spacing=2.0, thickness=4.0,
                           motion="none", noise=0.01, margin=4.0)
    sim = simulate_stacks(vol, None, cfg, 0)
    ss = SliceSet.from_stacks(sim.stacks)
    psf = acq.psf_kernel(ss.spacing, ss.thickness, RES)
    return vol, ss, psf


def _geometry(ss: SliceSet):
    return ss.poses, ss.coords, ss.slice_id


def _rmse(x: torch.Tensor, vol: Volume) -> float:
    return float(((x - vol.data)[vol.mask] ** 2).mean().sqrt())


def _residual(x, vol, ss, psf, values=None) -> float:
    y = ss.values if values is None else values
    return float(((acq.forward(x, vol.affine, *_geometry(ss), psf) - y) ** 2).mean().sqrt())


# ------------------------------------------------------------------------------ PSF average


def test_psf_average_of_constant_slices_is_that_constant_where_covered(acquired):
    vol, ss, psf = acquired
    ones = torch.ones_like(ss.values)
    avg = psf_average(7.0 * ones, ones, vol.shape, vol.affine, *_geometry(ss), psf)
    cov = normal_diag(ones, vol.shape, vol.affine, *_geometry(ss), psf)
    covered = cov > 1e-6 * cov.max()
    # the slice set holds only the masked (brain) pixels: they cover the brain, not the whole grid
    assert float(covered[vol.mask].float().mean()) > 0.95
    assert float(covered.float().mean()) < 0.5
    torch.testing.assert_close(avg[covered], torch.full_like(avg[covered], 7.0), rtol=1e-5, atol=0)
    assert float(avg[~covered].abs().max()) == 0.0
    # zero-weight pixels do not contribute
    w = (ss.slice_id % 2).to(ss.values.dtype)
    avg_w = psf_average(torch.where(w > 0, 7.0, 1e6) * ones, w, vol.shape, vol.affine, *_geometry(ss), psf)
    assert float(avg_w.max()) < 7.0 + 1e-3


# ----------------------------------------------------------------------- super-resolution


def test_super_resolve_reduces_residual_and_beats_psf_average(acquired, capsys):
    """Exact poses, default regularisation: the data residual falls (nearly) monotonically with
    the CG iteration count, and the reconstruction is closer to the truth than the PSF average.
    Measured: RMSE in the mask 37.3 (PSF average) -> ~26 (8-16 CG iterations), residual 19 -> 5.5
    (the 1% noise is ~4.5)."""
    vol, ss, psf = acquired
    ones = torch.ones_like(ss.values)
    V0 = psf_average(ss.values, ones, vol.shape, vol.affine, *_geometry(ss), psf)
    res = [_residual(V0, vol, ss, psf)]
    rmse = [_rmse(V0, vol)]
    for it in (1, 2, 4, 8, 16):
        V = super_resolve(V0, vol.affine, *_geometry(ss), ss.values, psf, iterations=it)
        assert bool((V >= 0).all())
        res.append(_residual(V, vol, ss, psf))
        rmse.append(_rmse(V, vol))
    with capsys.disabled():
        print(f"\n[super_resolve] residual {['%.2f' % r for r in res]}; RMSE {['%.2f' % r for r in rmse]}")
    for a, b in zip(res, res[1:]):
        assert b <= 1.02 * a  # "monotonically-ish": CG minimises data + regulariser, not the data term alone
    assert res[-1] < 0.4 * res[0]
    assert rmse[4] < 0.85 * rmse[0] and rmse[5] < 0.85 * rmse[0]


def _offset_case(acquired, seed: int):
    """The phantom's slices in float64 from the truth offset by +500 (so the final clamp at 0 never
    acts), with noise of sd 5: ``(vol, psf64, poses, coords, slice_id, y, psf_average start)``."""
    vol, ss, psf = acquired
    psf64 = psf.to(torch.float64)
    poses, coords, sid = ss.poses.double(), ss.coords.double(), ss.slice_id
    truth = vol.data.double() + 500
    g = torch.Generator().manual_seed(seed)
    y = acq.forward(truth, vol.affine, poses, coords, sid, psf64) + 5 * torch.randn(ss.n_pixels, generator=g, dtype=D)
    V0 = psf_average(y, torch.ones_like(y), vol.shape, vol.affine, poses, coords, sid, psf64)
    return vol, psf64, poses, coords, sid, y, V0


def test_cg_without_regularisation_decreases_the_residual_monotonically(acquired):
    """With lam = 0, k CG iterations on the normal equations (CGNR) minimise ||A x - y|| over a
    growing Krylov space, so the residual cannot increase with k (float64; the truth is offset
    by +500 so the final clamp at 0 never acts and the property is exact)."""
    vol, psf64, poses, coords, sid, y, V0 = _offset_case(acquired, seed=0)
    proj = acq.Projector(vol.shape, vol.affine, poses, coords, sid, psf64)
    res = []
    for it in (0, 1, 2, 4, 8, 16):
        V = super_resolve(V0, vol.affine, poses, coords, sid, y, psf64, lam=0.0, iterations=it, tol=0.0)
        res.append(float(((proj.forward(V) - y) ** 2).sum()))
    for a, b in zip(res, res[1:]):
        assert b <= a * (1 + 1e-9)
    assert res[-1] < 0.05 * res[0]


def test_preconditioned_cg_gets_closer_to_the_solution_in_fewer_iterations(acquired):
    """The same regularised problem (float64, edge weights from the same start; the truth offset
    by +500 so the final clamp never acts) solved to convergence, then with 2, 4 and 6 iterations:
    the diagonal preconditioner's iterate is nearer the solution than plain CG's at each count
    (coverage varies a lot between the stacks' overlap and the edges of the field of view)."""
    vol, psf64, poses, coords, sid, y, V0 = _offset_case(acquired, seed=1)
    mask = vol.mask

    def solve(it, pre):
        return super_resolve(V0, vol.affine, poses, coords, sid, y, psf64, mask=mask, delta=50.0, iterations=it,
                             tol=0.0, precondition=pre)

    x_star = solve(300, True)
    torch.testing.assert_close(x_star, solve(300, False), rtol=0, atol=1e-3 * float(x_star.abs().max()))
    for it in (2, 4, 6):
        err_cg = float((solve(it, False) - x_star)[mask].norm())
        err_pcg = float((solve(it, True) - x_star)[mask].norm())
        # 4 is the pipeline's stage count; by 6 plain CG has caught up part of the way (ratio 0.95
        # since the operators apply the PSF's isotropic part to the volume, which couples neighbours)
        assert err_pcg < (0.8 if it <= 4 else 1.0) * err_cg, (it, err_pcg, err_cg)


def _tiny_case(seed: int = 0):
    """A 5x5x5 volume (1 mm, oblique affine) seen by 3 stacks x 7 slices of 8x8 1-mm pixels,
    1.5 mm thick, with random orientations: ~600 equations for 125 unknowns, full column rank."""
    g = torch.Generator().manual_seed(seed)
    shape = (5, 5, 5)
    R = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.5], dtype=D)).numpy()
    A = np.eye(4)
    A[:3, :3] = R
    A[:3, 3] = -R @ np.full(3, 2.0)  # volume centred on the world origin
    poses = []
    for s in range(3):
        Rs = axis_angle_to_matrix(torch.randn(3, generator=g, dtype=D) * 1.0)
        for k in range(7):
            T = torch.eye(4, dtype=D)
            T[:3, :3] = Rs
            T[:3, 3] = Rs[:, 2] * (k - 3) * 1.0 + 0.2 * torch.randn(3, generator=g, dtype=D)
            poses.append(T)
    poses = torch.stack(poses)
    M = poses.shape[0]
    xy = slice_pixel_coords(8, 8, (1.0, 1.0), dtype=D).reshape(-1, 3)
    coords, sid = xy.repeat(M, 1), torch.arange(M).repeat_interleave(64)
    psf = acq.psf_kernel(torch.ones(M, 2, dtype=D), torch.full((M,), 1.5, dtype=D), 1.0)
    proj = acq.Projector(shape, A, poses, coords, sid, psf)
    hit = proj.forward(torch.ones(shape, dtype=D)) > 0
    coords, sid = coords[hit], sid[hit]  # keep pixels that see the volume
    proj = acq.Projector(shape, A, poses, coords, sid, psf)
    mat = torch.stack([proj.forward(e.reshape(shape)) for e in torch.eye(125, dtype=D)], 1)  # (P, 125)
    return shape, A, poses, coords, sid, psf, mat.numpy(), g


@pytest.mark.parametrize("precondition", [False, True])
def test_zero_regularisation_reaches_the_weighted_least_squares_solution(precondition):
    """lam = 0, many CG iterations: the result is argmin sum_p w_p (a_n (A x)_p - y_p)^2 computed
    with numpy's lstsq from the explicit matrix of A (weights and slice scales included), with and
    without the diagonal preconditioner (which changes the path, not the solution)."""
    shape, A, poses, coords, sid, psf, mat, g = _tiny_case()
    assert np.linalg.matrix_rank(mat) == 125
    truth = 50 + 100 * torch.rand(shape, generator=g, dtype=D)
    M = poses.shape[0]
    scales = 0.7 + 0.6 * torch.rand(M, generator=g, dtype=D)
    w = 0.2 + torch.rand(coords.shape[0], generator=g, dtype=D)
    y = scales[sid] * torch.from_numpy(mat @ truth.numpy().ravel()) + torch.randn(coords.shape[0], generator=g, dtype=D)
    sw = np.sqrt(w.numpy())
    Aw = sw[:, None] * scales[sid].numpy()[:, None] * mat
    x_ls = np.linalg.lstsq(Aw, sw * y.numpy(), rcond=None)[0].reshape(shape)
    assert x_ls.min() > 0  # so the final clamp at 0 does not act
    assert np.abs(x_ls - truth.numpy()).max() > 1e-3  # noise: the LS solution is not the truth
    x = super_resolve(torch.zeros(shape, dtype=D), A, poses, coords, sid, y, psf, weights=w, scales=scales,
                      lam=0.0, iterations=400, tol=1e-12, precondition=precondition)
    np.testing.assert_allclose(x.numpy(), x_ls, rtol=1e-6, atol=1e-6 * np.abs(x_ls).max())


def test_super_resolve_accepts_float64_data_with_float32_poses():
    shape, A, poses, coords, sid, psf, mat, g = _tiny_case(2)
    y = torch.from_numpy(mat @ np.full(125, 100.0))
    P32, c32, psf32 = poses.float(), coords.float(), psf.to(torch.float32)
    V0 = psf_average(y, torch.ones_like(y), shape, A, P32, c32, sid, psf32)  # mixed dtypes work here
    assert V0.dtype == D
    x = super_resolve(V0, A, P32, c32, sid, y, psf32, iterations=3)
    assert x.dtype == D


def test_regularisation_smooths_towards_neighbours():
    """With a large lam the solution of noisy data is smoother (smaller total variation) than
    without, and its mean stays close to the data's."""
    shape, A, poses, coords, sid, psf, mat, g = _tiny_case(1)
    truth = torch.full(shape, 100.0, dtype=D)
    y = torch.from_numpy(mat @ truth.numpy().ravel()) + 10 * torch.randn(coords.shape[0], generator=g, dtype=D)
    x0 = super_resolve(truth.clone(), A, poses, coords, sid, y, psf, lam=0.0, iterations=200, tol=1e-10)
    x1 = super_resolve(truth.clone(), A, poses, coords, sid, y, psf, lam=1.0, iterations=200, tol=1e-10)

    def tv(x):
        return float(sum((x.diff(dim=a)).abs().sum() for a in range(3)))

    assert tv(x1) < 0.5 * tv(x0)
    assert float(x1.mean()) == pytest.approx(100.0, rel=0.05)


def test_output_is_non_negative_and_zero_outside_the_mask(acquired):
    """Data whose unconstrained solution goes negative (large negative noise in the background);
    the result is clamped at 0 and is exactly 0 outside the mask, whatever the start volume."""
    vol, ss, psf = acquired
    g = torch.Generator().manual_seed(3)
    y = ss.values + 200 * torch.randn(ss.n_pixels, generator=g)
    mask = torch.zeros(vol.shape, dtype=torch.bool)
    mask[5:30, 6:36, 4:28] = True
    start = 1000 * torch.rand(vol.shape, generator=g)  # non-zero everywhere, also outside the mask
    x = super_resolve(start, vol.affine, *_geometry(ss), y, psf, mask=mask, lam=0.0, iterations=10)
    assert float(x.min()) >= 0.0
    assert float(x[~mask].abs().max()) == 0.0
    assert float((x[mask] == 0).float().mean()) > 0.01  # the clamp did act (background)
    assert float(x[mask].max()) > 100  # and the brain is there


# ------------------------------------------------------------------------------ robust EM

# Regression (fixed): the inlier sd of slice potentials was floored at 1e-3 while one rejected
# pixel among n raises a potential by ~1/sqrt(n), so a single outlier pixel dropped its slice.


def _exact_residuals(acquired, garbage: int | None = None):
    """Residuals ``y - a s`` with ``s`` from the true volume through the simulator's own operator
    (high-quality PSF on the 2 mm grid), so a normal slice's residual is pure Rician noise;
    optionally one slice's intensities replaced by uniform noise over the intensity range."""
    vol, ss, _ = acquired
    psf_high = acq.psf_kernel(ss.spacing, ss.thickness, RES, quality="high")
    s = acq.forward(vol.data, vol.affine, *_geometry(ss), psf_high)
    y = ss.values.clone()
    sel = torch.zeros_like(ss.slice_id, dtype=torch.bool)
    if garbage is not None:
        sel = ss.slice_id == garbage
        g = torch.Generator().manual_seed(1)
        y[sel] = torch.rand(int(sel.sum()), generator=g) * float(ss.values.max())
    a = fit_scales(s, y, ss.slice_id, ss.n_slices)
    return y, y - a[ss.slice_id] * s, sel


def _em_case(acquired):
    _, ss, _ = acquired
    n_px = torch.bincount(ss.slice_id, minlength=ss.n_slices)
    bad = int(torch.argmax(n_px))  # the largest slice: corrupting it matters most
    y, e, sel = _exact_residuals(acquired, bad)
    state = em_weights(e, ss.slice_id, ss.n_slices, float(y.max() - y.min()))
    valid = n_px >= 10  # em_weights' min_pixels
    normal = valid.clone()
    normal[bad] = False
    return state, bad, sel, valid, normal


def test_em_gives_low_weight_to_a_garbage_slice(acquired, capsys):
    """One slice's intensities replaced by uniform noise over the intensity range: its slice
    weight drops below 0.1 (measured 0.0) and its pixels' weights too; normal slices keep weight
    > 0.5 -- all but 4 of 38 (measured), see the xfail test below for those."""
    _, ss, _ = acquired
    state, bad, sel, valid, normal = _em_case(acquired)
    w = state.slice[normal]
    with capsys.disabled():
        print(f"\n[em_weights] garbage slice weight {float(state.slice[bad]):.3f}; normal slices: "
              f"{int((w > 0.5).sum())}/{int(normal.sum())} above 0.5; pixel weights "
              f"{float(state.pixel[sel].mean()):.2f} (garbage) vs {float(state.pixel[~sel].mean()):.2f}")
    assert float(state.slice[bad]) < 0.1
    assert bool(state.excluded()[bad])
    assert float(w.median()) > 0.9
    assert float((w > 0.5).float().mean()) >= 0.8
    assert float(state.pixel[sel].mean()) < 0.3 < 0.9 < float(state.pixel[~sel].mean())
    assert float(state.combined(ss.slice_id)[sel].max()) < 0.1
    # slices with too few pixels to judge get weight 0
    assert bool((state.slice[~valid] == 0).all())


def test_em_keeps_every_normal_slice_next_to_a_garbage_slice(acquired):
    state, bad, sel, valid, normal = _em_case(acquired)
    assert float(state.slice[bad]) < 0.1
    assert float(state.slice[normal].min()) > 0.5


def test_em_on_pure_noise_residuals_excludes_nothing(acquired):
    _, ss, _ = acquired
    y, e, _ = _exact_residuals(acquired)
    state = em_weights(e, ss.slice_id, ss.n_slices, float(y.max() - y.min()))
    valid = torch.bincount(ss.slice_id, minlength=ss.n_slices) >= 10
    assert float(state.slice[valid].min()) > 0.5


def test_em_on_gaussian_residuals_excludes_nothing_and_estimates_sigma():
    g = torch.Generator().manual_seed(0)
    M, per = 20, 400
    sid = torch.arange(M).repeat_interleave(per)
    e = 3.0 * torch.randn(M * per, generator=g, dtype=D)
    state = em_weights(e, sid, M, 300.0)
    assert state.sigma == pytest.approx(3.0, rel=0.05)
    assert float(state.slice.min()) > 0.5 and float(state.pixel.mean()) > 0.99
    # a warm start from the previous state gives the same picture
    again = em_weights(e, sid, M, 300.0, state=state, iterations=2)
    assert again.sigma == pytest.approx(state.sigma, rel=0.01) and float(again.slice.min()) > 0.5


def test_a_single_outlier_pixel_does_not_exclude_its_slice():
    """20 slices x 400 pixels of N(0, 1) residuals; one pixel of slice 5 set to 5 (5 sigma).
    Measured: that pixel gets weight 0.13 (right) and slice 5 gets weight 0.0 (wrong)."""
    g = torch.Generator().manual_seed(0)
    M, per = 20, 400
    sid = torch.arange(M).repeat_interleave(per)
    e = torch.randn(M * per, generator=g, dtype=D)
    e[5 * per + 7] = 5.0
    state = em_weights(e, sid, M, 100.0)
    assert float(state.pixel[5 * per + 7]) < 0.5  # the pixel level rejects the pixel...
    assert float(state.slice[5]) > 0.5  # ...and the slice level keeps the other 399


# ----------------------------------------------------------------------------- slice scales


def test_fit_scales_recovers_known_scales():
    g = torch.Generator().manual_seed(0)
    M, per = 12, 300
    sid = torch.arange(M).repeat_interleave(per)
    s = 100 + 900 * torch.rand(M * per, generator=g, dtype=D)
    a_true = 0.6 + 0.8 * torch.rand(M, generator=g, dtype=D)
    y = a_true[sid] * s
    torch.testing.assert_close(fit_scales(s, y, sid, M), a_true, rtol=1e-12, atol=0)
    # with noise: the least-squares estimate is close
    noisy = y + 5 * torch.randn(M * per, generator=g, dtype=D)
    torch.testing.assert_close(fit_scales(s, noisy, sid, M), a_true, rtol=0.01, atol=0)
    # zero-weight outlier pixels are ignored
    w = torch.ones_like(y)
    out = torch.rand(M * per, generator=g) < 0.1
    corrupted = torch.where(out, 1e4 * torch.ones_like(y), y)
    w[out] = 0
    torch.testing.assert_close(fit_scales(s, corrupted, sid, M, w), a_true, rtol=1e-12, atol=0)


def test_fit_scales_bounds_and_empty_slices():
    sid = torch.tensor([0, 0, 1, 1, 2, 2])
    s = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.0, 0.0])
    y = torch.tensor([10.0, 20.0, 0.01, 0.01, 5.0, 5.0])
    a = fit_scales(s, y, sid, 4)
    torch.testing.assert_close(a, torch.tensor([5.0, 0.2, 1.0, 1.0]))  # clamped to (0.2, 5); no signal -> 1
    torch.testing.assert_close(fit_scales(s, y, sid, 4, bounds=(0.001, 100.0))[:2], torch.tensor([10.0, 0.01]))
