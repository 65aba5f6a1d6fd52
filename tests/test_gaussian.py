"""GaussianSVR building blocks (slice2vol.methods.gaussian): voxeliser, analytic slices, gradients,
density control, files, and a small synthetic case that must converge."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.cli.parser import main
from slice2vol.core import acquisition as acq
from slice2vol.core.geometry import axis_aligned_grid
from slice2vol.core.image import SliceSet, Stack
from slice2vol.core.transforms import params_to_matrix
from slice2vol.errors import Slice2VolError
from slice2vol.methods.gaussian import splat as splat_mod
from slice2vol.methods.gaussian.model import GaussianModel, init_from_volume, load_gaussians, save_gaussians
from slice2vol.methods.gaussian.optimise import GaussianConfig, dssim_loss, reconstruct_gaussian, tv_loss
from slice2vol.methods.gaussian.render import SliceLattice, dense_gaussians, psf_sigmas, render_slices, voxelise


def _model(J=25, dtype=torch.float64, seed=0, spread=12.0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(J, 3, generator=g, dtype=dtype) * spread - 1
    ls = torch.log(torch.rand(J, 3, generator=g, dtype=dtype) * 0.6 + 0.4)
    q = torch.randn(J, 4, generator=g, dtype=dtype)
    inten = torch.randn(J, generator=g, dtype=dtype)
    return GaussianModel(mu, ls, q, inten)


@pytest.fixture(params=["pytorch", "compiled"])
def kernel(request, monkeypatch):
    """Run a test with the PyTorch path and with the compiled CPU kernel (skipped if unavailable)."""
    if request.param == "pytorch":
        monkeypatch.setattr(splat_mod, "compiled_kernels", lambda: None)
    elif splat_mod.compiled_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable (numba missing or disabled)")
    return request.param


def _grid():
    A = np.diag([0.9, 1.0, 1.1, 1.0])
    A[:3, 3] = [0.5, -0.3, 0.2]
    return A, (14, 13, 12)


def test_voxeliser_matches_dense_evaluation_values_and_gradients(kernel):
    m = _model()
    A, shape = _grid()
    V = voxelise(m, A, shape, truncate=6.0)  # 6 sigma: truncation error below 1e-7
    ii = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    pts = ii.reshape(-1, 3) @ torch.tensor(A[:3, :3]).T + torch.tensor(A[:3, 3])
    Vd = dense_gaussians(m, pts).reshape(shape)
    assert torch.allclose(V, Vd, atol=1e-7 * float(Vd.detach().abs().max()))
    w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.autograd.grad((V * w).sum(), list(m.parameters()))
    gd = torch.autograd.grad((Vd * w).sum(), list(m.parameters()))
    for a, b in zip(g, gd):
        assert torch.allclose(a, b, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("dims", [2, 3])
def test_splat_support_is_the_ellipsoid_inside_the_box(kernel, dims):
    """With ``cut`` a Gaussian reaches exactly the lattice points of its box with
    ``d^T P d <= cut`` (brute force over the box, float64), and the values there are unchanged."""
    g = torch.Generator().manual_seed(3)
    r, n = 6, 13
    L = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.3
    P = L @ L.T + torch.diag(torch.tensor([0.15, 0.6, 0.3], dtype=torch.float64))  # anisotropic, oblique
    centre = torch.tensor([[r + 0.3, r - 0.2, (r + 0.1) if dims == 3 else 0.4]], dtype=torch.float64)
    shape = (n, n, n if dims == 3 else 1)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1])
    rc = torch.round(centre)
    if dims == 2:
        rc[:, 2] = 0
    base = (rc.long() * strides).sum(1)
    size = int(np.prod(shape))
    args = (centre, P[None], torch.ones(1, dtype=torch.float64), torch.tensor([r]), base, strides[None], size)
    box = splat_mod.splat(*args, dims=dims).reshape(shape)
    ell = splat_mod.splat(*args, dims=dims, cut=9.0).reshape(shape)
    idx = torch.stack(torch.meshgrid(*[torch.arange(k, dtype=torch.float64) for k in shape], indexing="ij"), -1)
    d = idx - centre[0] if dims == 3 else torch.cat([idx[..., :2] - centre[0, :2], -centre[0, 2].expand(shape + (1,))], -1)
    q = torch.einsum("...a,ab,...b->...", d, P, d)
    inside = q <= 9.0
    assert 0 < int(inside.sum()) < 0.6 * int((box > 0).sum())  # the cut removes most of the box's corners
    assert bool((ell[~inside] == 0).all())
    torch.testing.assert_close(ell[inside], box[inside], rtol=1e-12, atol=0)
    torch.testing.assert_close(ell[inside], torch.exp(-0.5 * q[inside]), rtol=1e-12, atol=0)


def test_three_sigma_box_truncation_is_small():
    m = _model()
    A, shape = _grid()
    V3, V6 = voxelise(m, A, shape, truncate=3.0), voxelise(m, A, shape, truncate=6.0)
    # each Gaussian loses at most exp(-4.5) of its peak at the box faces
    assert float((V3 - V6).detach().abs().max()) < 0.05 * float(m.intensities.detach().abs().sum())
    assert float((V3 - V6).detach().abs().max()) > 0  # and the box really truncates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_kernel_agrees_with_pytorch_path(monkeypatch, dtype):
    if splat_mod.compiled_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    m = _model(J=600, dtype=dtype)  # > 256 per thread: the private output copies are used
    A, shape = _grid()
    V1 = voxelise(m, A, shape)
    g1 = torch.autograd.grad(V1.square().sum(), list(m.parameters()))
    monkeypatch.setattr(splat_mod, "compiled_kernels", lambda: None)
    V2 = voxelise(m, A, shape)
    g2 = torch.autograd.grad(V2.square().sum(), list(m.parameters()))
    assert torch.allclose(V1, V2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()))


def _one_stack(n=3, H=21, W=19, thickness=3.0, spacing=(1.0, 1.2), rot=(0.2, -0.1, 0.3), shift=(0.2, 0.1, 0.0)):
    poses = np.stack([np.eye(4)] * n)
    for k in range(n):
        poses[k, 2, 3] = (k - (n - 1) / 2) * 2.0
    R = params_to_matrix(torch.tensor([list(rot) + list(shift)], dtype=torch.float64))[0].numpy()
    st = Stack(slices=torch.rand(n, H, W), mask=torch.ones(n, H, W, dtype=torch.bool), poses=R @ poses,
               spacing=spacing, thickness=thickness, affine=np.eye(4), index=np.arange(n))
    return SliceSet.from_stacks([st])


def _single(dtype=torch.float64):
    f = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    return GaussianModel(f([0.3, -0.4, 0.5]), torch.log(f([1.5, 0.8, 1.1])), f([0.9, 0.2, -0.3, 0.1]),
                         torch.tensor([2.0], dtype=dtype))


def test_analytic_slices_match_brute_force_psf_integral(kernel):
    m = _single()
    ss = _one_stack()
    lat = SliceLattice(ss)
    a = render_slices(m, ss.poses.double(), lat)[lat.pixel_index].detach()
    sig = psf_sigmas(ss.spacing[:1], ss.thickness[:1])[0].double()
    x = torch.linspace(-4, 4, 33, dtype=torch.float64)
    g = torch.stack(torch.meshgrid(x, x, x, indexing="ij"), -1).reshape(-1, 3) * sig  # nodes in mm
    w = torch.exp(-0.5 * ((g / sig) ** 2).sum(-1))
    w = w / w.sum()
    P = ss.poses.double()[ss.slice_id]
    b = []
    for lo in range(0, P.shape[0], 128):  # 128 pixels x 33^3 nodes at a time: ~110 MB, not 5 GB
        local = ss.coords.double()[lo:lo + 128, None, :] + g[None]
        pts = (P[lo:lo + 128, None, :3, :3] @ local[..., None])[..., 0] + P[lo:lo + 128, None, :3, 3]
        b.append((dense_gaussians(m, pts.reshape(-1, 3)).reshape(pts.shape[:2]) * w).sum(1).detach())
    b = torch.cat(b)
    # the formula (5-sigma support: what is left is the +-4 sigma quadrature of the reference)
    a5 = render_slices(m, ss.poses.double(), lat, truncate=5.0)[lat.pixel_index].detach()
    assert float((a5 - b).abs().max()) < 2e-3 * float(b.max())
    # the default 3-sigma ellipsoid cuts at most exp(-4.5) = 1.1% of the Gaussian's peak, and does cut
    err = float((a - b).abs().max())
    assert 3e-3 * float(b.max()) < err < 0.012 * float(b.max())


def test_analytic_and_sampled_agree_on_one_gaussian():
    m = _single(torch.float32)
    ss = _one_stack()
    lat = SliceLattice(ss)
    a = render_slices(m, ss.poses, lat)[lat.pixel_index].detach()
    A, shape = axis_aligned_grid(np.array([-12.0] * 3), np.array([12.0] * 3), 0.3)
    V = voxelise(m, A, shape, max_radius=20).detach()
    psf = acq.psf_kernel(ss.spacing, ss.thickness, 0.3, quality="high", truncate=4.0)
    s = acq.forward(V, A, ss.poses, ss.coords, ss.slice_id, psf)
    # the sampled path adds trilinear blur of a 0.3 mm grid; both use the same PSF
    assert float((a - s).abs().max()) < 0.02 * float(s.max())


@pytest.mark.parametrize("psf", ["analytic", "sampled"])
def test_gradients_reach_every_parameter_and_the_poses(psf):
    m = _model(J=40, dtype=torch.float32, spread=6.0)
    ss = _one_stack()
    poses = ss.poses.clone().requires_grad_(True)
    if psf == "analytic":
        lat = SliceLattice(ss)
        out = render_slices(m, poses, lat)[lat.pixel_index]
    else:
        A, shape = axis_aligned_grid(np.array([-12.0] * 3), np.array([12.0] * 3), 1.0)
        V = voxelise(m, A, shape)
        out = acq.forward(V, A, poses, ss.coords, ss.slice_id, acq.psf_kernel(ss.spacing, ss.thickness, 1.0))
    loss = (out - 0.3).square().sum()
    grads = torch.autograd.grad(loss, list(m.parameters()) + [poses])
    for name, g in zip(["means", "log_scales", "quats", "intensities", "poses"], grads):
        assert torch.isfinite(g).all(), name
        assert float(g.abs().max()) > 0, name


def test_analytic_pose_gradient_matches_finite_differences():
    m = _model(J=15, dtype=torch.float64, spread=6.0)
    ss = _one_stack()
    lat = SliceLattice(ss)
    delta = torch.zeros(ss.n_slices, 6, dtype=torch.float64, requires_grad=True)

    def f(d):
        return render_slices(m, ss.poses.double() @ params_to_matrix(d), lat)[lat.pixel_index].square().sum()

    g = torch.autograd.grad(f(delta), delta)[0]
    eps = 1e-6
    for k in range(6):
        e = torch.zeros_like(delta)
        e[1, k] = eps
        fd = float((f(delta + e) - f(delta - e)).detach()) / (2 * eps)
        # boxes are re-centred when a Gaussian crosses a lattice point; tiny steps do not cross
        assert abs(fd - float(g[1, k])) < 1e-4 * max(1.0, abs(fd))


def test_density_control_clones_splits_prunes_and_keeps_adam_state():
    m = _model(J=10, dtype=torch.float32)
    with torch.no_grad():
        m.log_scales[:5] = np.log(0.3)  # small -> cloned
        m.log_scales[5:8] = np.log(2.0)  # large -> split
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    m.intensities.sum().backward()
    opt.step()
    with torch.no_grad():
        m.intensities[9] = 1e-6  # faint -> pruned
    grad = torch.tensor([1.0] * 8 + [0.0, 0.0])
    info = m.densify_and_prune(grad, torch.ones(10), 0.5, split_scale=1.0, min_intensity=1e-3, max_scale=10.0,
                               max_gaussians=100, optimizer=opt)
    assert info == {"cloned": 5, "split": 3, "pruned": 1, "total": 10 - 3 - 1 + 5 + 6}
    assert len(m) == info["total"]
    assert opt.state[m.intensities]["exp_avg"].shape[0] == len(m)  # moments carried over, zeros appended
    m.intensities.sum().backward()  # the new parameters are usable leaves
    opt.step()


def test_cap_on_gaussians_is_respected():
    m = _model(J=10, dtype=torch.float32)
    info = m.densify_and_prune(torch.ones(10), torch.ones(10), 0.5, split_scale=100.0, min_intensity=0.0,
                               max_scale=100.0, max_gaussians=13, optimizer=None)
    assert info["total"] == 13


def test_losses():
    x = torch.rand(2, 1, 16, 16)
    assert float(dssim_loss(x, x)) < 1e-6
    assert float(dssim_loss(x, 1 - x)) > 0.5
    v = torch.zeros(5, 5, 5)
    assert float(tv_loss(v)) == 0
    v[2:, :, :] = 1
    assert float(tv_loss(v)) > 0


def test_save_load_and_render_command(tmp_path):
    m = _model(J=30, dtype=torch.float32, spread=8.0)
    A, shape = axis_aligned_grid(np.zeros(3), np.full(3, 8.0), 1.0)
    f = tmp_path / "g.pt"
    save_gaussians(m, f, meta={"affine": A.tolist(), "shape": list(shape)})
    m2, meta = load_gaussians(f)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    out = tmp_path / "r.nii.gz"
    assert main(["render", str(f), "-o", str(out), "--resolution", "0.5", "--device", "cpu"]) == 0
    import nibabel as nib

    img = nib.load(out)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), 0.5)
    ref = voxelise(m, img.affine, img.shape).clamp_min(0).detach().numpy()
    assert np.allclose(np.asarray(img.dataobj), ref, atol=1e-5)


def test_bad_gaussian_files_and_options(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(Slice2VolError):
        load_gaussians(bad)
    assert main(["render", str(bad), "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert main(["render", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.count("slice2vol: error:") == 2
    assert not (tmp_path / "x.nii.gz").exists()
    with pytest.raises(Slice2VolError):
        GaussianConfig(psf="exact").check()
    with pytest.raises(Slice2VolError):
        GaussianConfig(max_gaussians=5).check()


def test_init_reproduces_a_volume_after_fitting(blob):
    vol = torch.from_numpy(blob((20, 20, 20))).float()
    A = np.eye(4)
    roi = torch.ones(20, 20, 20, dtype=torch.bool)
    m = init_from_volume(vol, A, roi, 3000, n_background=0, size_factor=0.5, generator=torch.Generator().manual_seed(0))
    assert len(m) == 3000
    assert torch.isfinite(m.log_scales).all() and torch.isfinite(m.intensities).all()
    opt = torch.optim.Adam([{"params": [m.means], "lr": 0.01}, {"params": [m.intensities], "lr": 0.05},
                            {"params": [m.log_scales], "lr": 0.02}])
    errs = []
    for _ in range(40):
        V = voxelise(m, A, vol.shape)
        loss = (V - vol).abs().mean()
        errs.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert errs[-1] < 0.5 * errs[0]


def test_small_synthetic_case_converges(atlas_lowres):
    from slice2vol.core.preprocess import prepare
    from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks

    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=2.0, thickness=4.0,
                           motion="none", noise=0.02, margin=4.0)
    sim = simulate_stacks(atlas_lowres, None, cfg, torch.Generator().manual_seed(0))
    prep = prepare(sim.stacks, 1.6, have_stack_masks=True)
    for psf in ("analytic", "sampled"):
        res = reconstruct_gaussian(prep, GaussianConfig(psf=psf, init="stack", iterations=30, n_init=4000,
                                                        fit_iterations=10, densify_from=0.2, densify_every=10,
                                                        lambda_tv=0.01, robust=True, robust_every=10,
                                                        progress=False))
        h = res.history
        first = np.mean([x["l1"] for x in h[:5]])
        last = np.mean([x["l1"] for x in h[-5:]])
        assert last < first, psf
        assert torch.isfinite(res.volume.data).all()
        assert res.poses.shape == (prep.slices.n_slices, 4, 4)
        assert len(res.gaussians) > 0



def test_start_weights_keep_lost_slices_out_of_the_fit(atlas_lowres):
    """Started from SVR, GaussianSVR weights its losses by SVR's robust weights: slices darkened
    by signal loss (the simulator's motion-during-acquisition artefact) then do not pull the
    Gaussians, and the result is closer to the truth than with every slice counted equally; the
    result reports the weights it used."""
    from slice2vol.core.preprocess import prepare
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.simulation.simulate import SimulationConfig, signal_loss_field, simulate_stacks

    torch.set_num_threads(1)  # restored by conftest
    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=1.6, thickness=3.2,
                           motion="none", noise=0.02, margin=4.0, signal_loss=0.3)
    sim = simulate_stacks(atlas_lowres, None, cfg, torch.Generator().manual_seed(1))
    prep = prepare(sim.stacks, 1.6, have_stack_masks=True)
    out = {}
    for weighted in (True, False):
        # enough Gaussians to reproduce the start (fewer leave both runs far below SVR's volume)
        res = reconstruct_gaussian(prep, GaussianConfig(init="svr", iterations=30, n_init=20000, fit_iterations=40,
                                                        start_weights=weighted, progress=False))
        out[weighted] = (res, compare_volumes(res.volume, atlas_lowres, align=True, scale=True)["psnr"])
    # a band of lost signal: its pixels are rejected (whole dark slices are a slice scale instead)
    ss = prep.slices
    res = out[True][0]
    dark = torch.zeros(ss.n_pixels, dtype=torch.bool)
    for n in range(ss.n_slices):
        s_ = int(ss.stack_id[n])
        k = int(prep.stacks[s_].index[n - ss.stack_slices[s_]])
        for d in sim.params.artefacts.signal_loss[s_]:
            if d["slice"] == k and d["band"] is not None and d["depth"] > 0.7:
                H, W = ss.shapes[s_]
                f = signal_loss_field([{**d, "slice": 0}], 1, H, W).reshape(-1)
                pix = ss.slice_id == n
                dark[pix] = f[ss.flat_index[pix] % (H * W)] < 0.5
    assert int(dark.sum()) > 50
    w = res.pixel_weights * res.slice_weights[ss.slice_id]
    assert float(w[dark].mean()) < 0.5 * float(w[~dark].mean()), (float(w[dark].mean()), float(w[~dark].mean()))
    assert bool((out[False][0].slice_weights == 1).all())  # unweighted: every slice counts
    assert out[True][1] > out[False][1] + 0.2, (out[True][1], out[False][1])


def test_splat_kernels_follow_the_fused_operators_switch(monkeypatch):
    """``SLICE2VOL_NO_NUMBA=1`` (the acquisition operators' switch) selects the PyTorch splat too."""
    monkeypatch.setenv("SLICE2VOL_NO_NUMBA", "1")
    assert splat_mod.compiled_kernels() is None
    m = _model(J=30, dtype=torch.float32)
    A, shape = _grid()
    assert voxelise(m, A, shape).shape == shape  # and it still renders


@pytest.mark.parametrize("cut", [float("inf"), 4.0])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_splat_kernels_match_pytorch_on_both_lattices(monkeypatch, dims, dtype, cut):
    """splat() itself, volume (dims 3) and slice-plane (dims 2) lattices, mixed box radii, values
    and all three gradients: compiled kernels against the PyTorch path, on whole boxes and on
    ellipsoids (``cut``: the compiled kernels find each row's range from the quadratic's roots,
    the PyTorch path masks every point)."""
    if splat_mod.compiled_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    g = torch.Generator().manual_seed(5)
    J, r_max = 700, 3
    shape = (12, 11, 10) if dims == 3 else (15, 14, 1)
    pad = [n + 2 * r_max for n in shape] if dims == 3 else [shape[0] + 2 * r_max, shape[1] + 2 * r_max, 1]
    strides = torch.tensor([pad[1] * pad[2], pad[2], 1])
    lo = torch.tensor([r_max, r_max, 0 if dims == 2 else r_max], dtype=dtype)
    hi = torch.tensor([shape[0], shape[1], 1.0 if dims == 2 else shape[2]], dtype=dtype) - 1
    centre = lo + torch.rand(J, 3, generator=g, dtype=dtype) * hi
    if dims == 2:
        centre[:, 2] = torch.randn(J, generator=g, dtype=dtype)  # distance from the plane
    L = torch.randn(J, 3, 3, generator=g, dtype=dtype) * 0.4
    prec = L @ L.transpose(1, 2) + 0.3 * torch.eye(3, dtype=dtype)
    amp = torch.randn(J, generator=g, dtype=dtype)
    rad = torch.randint(1, r_max + 1, (J,), generator=g)
    rc = torch.round(centre)
    if dims == 2:
        rc[:, 2] = 0
    base = (rc.long() * strides).sum(1)
    size = int(np.prod(pad))
    w = torch.randn(size, generator=g, dtype=dtype)

    def run():
        c, p, a = (t.clone().requires_grad_(True) for t in (centre, prec, amp))
        out = splat_mod.splat(c, p, a, rad, base, strides.expand(J, 3), size, dims=dims, cut=cut)
        return (out.detach(),) + torch.autograd.grad((out * w).sum(), (c, p, a))

    fast = run()
    monkeypatch.setattr(splat_mod, "compiled_kernels", lambda: None)
    ref = run()
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    for x, y in zip(fast, ref):
        assert float((x - y).abs().max()) <= tol * float(y.abs().max())


def test_inline_float32_exp_is_as_accurate_as_float32():
    """The splat kernels' float32 exp (no libm call): within a few float32 ulps of exp over the
    range a Gaussian's box sees, ~0 far out, and libm's exp for float64 data."""
    if splat_mod.compiled_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    import numba as nb

    from slice2vol.methods.gaussian._splat_numba import _exp_neg

    @nb.njit
    def run(x, like):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = _exp_neg(x[i], like)
        return out

    x = np.concatenate([-np.geomspace(1e-8, 87.0, 20001), [0.0, -200.0, -1e30]])
    got32 = run(x.astype(np.float32), np.zeros(1, np.float32))
    want = np.exp(x.astype(np.float32).astype(np.float64))
    ok = x > -87
    assert got32.dtype == np.float32
    assert float(np.max(np.abs(got32[ok] - want[ok]) / want[ok])) < 5e-7
    assert got32[-3] == 1.0 and np.all(got32[-2:] < 1e-37) and np.all(got32[-2:] >= 0)
    got64 = run(x, np.zeros(1))
    np.testing.assert_allclose(got64, np.exp(x), rtol=1e-14, atol=0)  # libm (fastmath may reorder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_voxel_l1_equals_the_autograd_loss_and_its_gradients(kernel, dtype):
    """The fit's fused voxeliser + L1 (:class:`VoxelL1`) is ``|voxelise - target|`` masked and
    averaged, with the same gradients: bitwise where the fused kernels run (the same splat sums and
    ``sign * 1/n`` as autograd forms), on an anisotropic grid, reused across calls (scratch kept)."""
    from slice2vol.methods.gaussian.render import VoxelL1

    m = _model(J=40, dtype=dtype)
    A, shape = _grid()
    g = torch.Generator().manual_seed(3)
    target = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(shape, generator=g) > 0.3
    l1 = VoxelL1(target, mask, A)
    for _ in range(2):  # the second call reuses the padded target and the scratch
        V = voxelise(m, A, shape)
        ref = ((V - target).abs() * mask.to(dtype)).sum() / mask.to(dtype).sum()
        g_ref = torch.autograd.grad(ref, list(m.parameters()))
        loss = l1(m)
        g_new = torch.autograd.grad(loss, list(m.parameters()))
        assert torch.allclose(loss, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12)
        for a, b in zip(g_new, g_ref):
            if kernel == "compiled":
                assert torch.equal(a, b)
            else:
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * float(b.abs().max()))
        with torch.no_grad():
            m.means += 0.3  # move: a different support and loss next time


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_pair_algebra_matches_the_pytorch_renderer(dtype, monkeypatch):
    """The analytic renderer's slice-Gaussian pair algebra as numba kernels (``_PairsNumba``: slice
    frame, PSF-convolved covariance, adjugate inverse, determinant, the kept pairs) gives the
    PyTorch renderer's slices and gradients for every Gaussian parameter and every pose: to float64
    rounding in float64, to float32 rounding in float32 (its kernels compute in float64).  Oblique
    slices with anisotropic pixels, Gaussians on and off the slices' edges."""
    if splat_mod.compiled_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable (numba missing or disabled)")
    m = _model(J=60, dtype=dtype, spread=14.0, seed=4)
    ss = _one_stack(n=4, rot=(0.5, -0.3, 0.8))
    lat = SliceLattice(ss)
    poses = ss.poses.to(dtype).clone().requires_grad_(True)
    w = torch.randn(lat.size, dtype=dtype, generator=torch.Generator().manual_seed(2))

    def run():
        out = render_slices(m, poses, lat)
        return out.detach(), torch.autograd.grad((out * w).sum(), list(m.parameters()) + [poses])

    fused_out, fused_g = run()
    monkeypatch.setattr(splat_mod, "compiled_kernels", lambda: None)
    ref_out, ref_g = run()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert float(ref_out.abs().max()) > 0.1
    assert float((fused_out - ref_out).abs().max()) <= tol * float(ref_out.abs().max())
    for name, a, b in zip(["means", "log_scales", "quats", "intensities", "poses"], fused_g, ref_g):
        assert float(b.abs().max()) > 0, name
        assert float((a - b).abs().max()) <= tol * float(b.abs().max()), name


def test_renderer_with_no_gaussian_near_the_slices(kernel):
    """Every Gaussian far from every slice: no pair survives, the slices are zero, and no gradient
    is anything but zero (the fused pair kernels run on zero pairs and return zeros of the right
    shape; the PyTorch path may leave a parameter disconnected)."""
    m = _model(J=10, dtype=torch.float32, spread=5.0)
    with torch.no_grad():
        m.means += 500.0
    ss = _one_stack()
    lat = SliceLattice(ss)
    poses = ss.poses.clone().requires_grad_(True)
    out = render_slices(m, poses, lat)
    grads = torch.autograd.grad(out.sum(), list(m.parameters()) + [poses], allow_unused=True)
    assert out.shape == (lat.size,) and not out.detach().any()
    for p, g in zip(list(m.parameters()) + [poses], grads):
        if kernel == "compiled" or g is not None:
            assert g is not None and g.shape == p.shape and not g.any()


def test_ssim_images_are_the_slices_as_acquired():
    """The D-SSIM term's images (``_images``) are each batch slice's pixels in their own (H, W)
    layout, read from the padded lattice: the target images equal the stack's slices, and a
    prediction written at the pixels' lattice positions comes back in the same places."""
    from slice2vol.methods.gaussian.optimise import _images, _Stage

    ss = _one_stack(n=4, H=9, W=7)
    stage = _Stage("fine", ss, None, np.eye(4), (4, 4, 4), torch.ones(4, 4, 4, dtype=torch.bool), 1)
    buf = torch.zeros(stage.lattice.size)
    buf[stage.lattice.pixel_index] = ss.values * 2
    sel = torch.tensor([3, 1])
    (pred, target, mask, idx), = _images(stage, buf, sel)
    want = ss.values.reshape(4, 1, 9, 7)[sel]
    assert pred.shape == (2, 1, 9, 7) and bool(mask.all()) and torch.equal(idx, sel)
    assert torch.equal(target, want) and torch.equal(pred, 2 * want)
