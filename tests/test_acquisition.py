"""Behaviour of the slice acquisition model (slice2vol.core.acquisition).

Everything here runs on tiny volumes (a few hundred voxels) in float64 so the identities tested
(adjointness, quadrature moments, trilinear sampling, gradients) hold to rounding, not to
float32 noise.  Volumes use oblique, anisotropic affines and slices random oblique poses, so
nothing silently relies on axis-aligned grids.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slice2vol.core import acquisition as acq
from slice2vol.core.geometry import slice_pixel_coords
from slice2vol.core.transforms import axis_angle_to_matrix, params_to_matrix

D = torch.float64
QUALITIES = ("thin", "normal", "high")
VOL_SHAPE = (9, 10, 11)
VOL_SPACING = (1.2, 1.0, 1.5)


def _rotation(gen: torch.Generator, max_angle: float = math.pi) -> torch.Tensor:
    axis = torch.nn.functional.normalize(torch.randn(3, generator=gen, dtype=D), dim=0)
    return axis_angle_to_matrix(axis * torch.rand(1, generator=gen, dtype=D) * max_angle)


def _volume_affine(gen: torch.Generator, shape=VOL_SHAPE, spacing=VOL_SPACING) -> np.ndarray:
    """Oblique anisotropic voxel-to-world affine whose grid is centred on world (3, -2, 5)."""
    A = np.eye(4)
    A[:3, :3] = _rotation(gen).numpy() * np.asarray(spacing)
    A[:3, 3] = np.array([3.0, -2.0, 5.0]) - A[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return A


def _case(seed: int, quality: str = "normal", n_slices: int = 5, H: int = 6, W: int = 7, drop: float = 0.2,
          thickness=(2.5, 3.0)):
    """A random oblique acquisition of a tiny volume, float64.

    Slices have random orientations and centres within 3 mm of the volume centre; a random
    ``drop`` fraction of pixels is removed (as masks do), so ``slice_id`` is not a regular pattern.
    Returns a dict with volume, affine, poses, coords, slice_id, psf and values ``y`` (random).
    """
    g = torch.Generator().manual_seed(seed)
    affine = _volume_affine(g)
    poses = torch.zeros(n_slices, 4, 4, dtype=D)
    for n in range(n_slices):
        poses[n, :3, :3] = _rotation(g)
        poses[n, :3, 3] = torch.tensor([3.0, -2.0, 5.0], dtype=D) + 3 * (2 * torch.rand(3, generator=g, dtype=D) - 1)
        poses[n, 3, 3] = 1
    spacing = torch.tensor([[1.3, 1.1]] * n_slices, dtype=D)
    thick = torch.tensor([thickness[n % len(thickness)] for n in range(n_slices)], dtype=D)
    xy = slice_pixel_coords(H, W, (1.3, 1.1), dtype=D).reshape(-1, 3)
    coords = xy.repeat(n_slices, 1)
    sid = torch.arange(n_slices).repeat_interleave(H * W)
    keep = torch.rand(coords.shape[0], generator=g) >= drop
    coords, sid = coords[keep], sid[keep]
    psf = acq.psf_kernel(spacing, thick, float(min(VOL_SPACING)), quality=quality)
    volume = torch.rand(VOL_SHAPE, generator=g, dtype=D)
    y = torch.randn(coords.shape[0], generator=g, dtype=D)
    return dict(volume=volume, affine=affine, poses=poses, coords=coords, slice_id=sid, psf=psf, y=y)


# ------------------------------------------------------------------------------------ adjoint


@pytest.mark.parametrize("chunk", [acq.DEFAULT_CHUNK, 13])
@pytest.mark.parametrize("quality", QUALITIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_adjoint_dot_product(seed, quality, chunk):
    """<A x, y> == <x, A^T y> to rounding (float64), for forward/adjoint and for Projector."""
    c = _case(seed, quality)
    x, y = c["volume"], c["y"]
    args = (c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"])
    Ax = acq.forward(x, *args, chunk=chunk)
    ATy = acq.adjoint(y, VOL_SHAPE, *args, chunk=chunk)
    lhs, rhs = float((Ax * y).sum()), float((x * ATy).sum())
    assert abs(lhs) > 1e-3  # the slices do hit the volume: the test is not 0 == 0
    assert lhs == pytest.approx(rhs, rel=1e-10)

    proj = acq.Projector(VOL_SHAPE, c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"], chunk=chunk)
    lhs_p, rhs_p = float((proj.forward(x) * y).sum()), float((x * proj.adjoint(y)).sum())
    assert lhs_p == pytest.approx(rhs_p, rel=1e-10)
    assert lhs_p == pytest.approx(lhs, rel=1e-12)


@pytest.mark.parametrize("quality", QUALITIES)
def test_projector_matches_functions_and_chunking_changes_nothing(quality):
    c = _case(2, quality)
    x, y = c["volume"], c["y"]
    args = (c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"])
    ref_f = acq.forward(x, *args)
    ref_a = acq.adjoint(y, VOL_SHAPE, *args)
    for chunk in (1, 7, 50, acq.DEFAULT_CHUNK):
        torch.testing.assert_close(acq.forward(x, *args, chunk=chunk), ref_f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acq.adjoint(y, VOL_SHAPE, *args, chunk=chunk), ref_a, rtol=1e-12, atol=1e-12)
        proj = acq.Projector(VOL_SHAPE, c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"], chunk=chunk)
        torch.testing.assert_close(proj.forward(x), ref_f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(proj.adjoint(y), ref_a, rtol=1e-12, atol=1e-12)


def test_multichannel_forward_is_per_channel():
    c = _case(3)
    args = (c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"])
    two = torch.stack([c["volume"], 2 * c["volume"] ** 2])
    out = acq.forward(two, *args, chunk=11)
    assert out.shape == (2, c["coords"].shape[0])
    torch.testing.assert_close(out[0], acq.forward(c["volume"], *args), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], acq.forward(2 * c["volume"] ** 2, *args), rtol=1e-12, atol=1e-12)


def test_forward_without_pixels_is_empty():
    c = _case(4)
    none = torch.zeros(0, dtype=torch.long)
    out = acq.forward(c["volume"], c["affine"], c["poses"], c["coords"][:0], none, c["psf"])
    assert out.shape == (0,)
    vol = acq.adjoint(c["y"][:0], VOL_SHAPE, c["affine"], c["poses"], c["coords"][:0], none, c["psf"])
    assert vol.shape == VOL_SHAPE and float(vol.abs().sum()) == 0.0


# ------------------------------------------------------------------------------------ PSF


@pytest.mark.parametrize("quality", QUALITIES)
def test_psf_weights_sum_to_one_and_are_centred(quality):
    spacing = torch.tensor([[1.0, 1.0], [0.8, 1.2], [2.0, 2.0], [1.0, 1.0]], dtype=D)
    thick = torch.tensor([3.0, 2.5, 4.0, 3.0], dtype=D)
    psf = acq.psf_kernel(spacing, thick, 0.8, quality=quality)
    assert psf.offsets.shape[:2] == psf.weights.shape
    # the in-plane rule is exact in float64
    torch.testing.assert_close(psf.weights.sum(1), torch.ones(4, dtype=D), rtol=0, atol=1e-12)
    assert bool((psf.weights >= 0).all())
    mean = (psf.weights[..., None] * psf.offsets).sum(1)
    torch.testing.assert_close(mean, torch.zeros(4, 3, dtype=D), rtol=0, atol=1e-12)
    # identical (spacing, thickness) rows get identical kernels
    torch.testing.assert_close(psf.offsets[0], psf.offsets[3])
    if quality == "thin":
        assert psf.n_samples == 1


def test_normal_psf_moves_its_isotropic_part_to_the_volume(monkeypatch):
    """``normal``: the largest isotropic Gaussian inside every slice's PSF (the smallest in-plane
    sigma, 1.2 x the finest pixel as FWHM) becomes ``volume_sigma``; the nodes keep only what is
    left (in-plane nothing at equal spacings, so one in-plane node), and the total second moment
    per axis is unchanged.  ``high`` / ``thin`` and ``PREFILTER = False`` keep everything in nodes."""
    sp = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.8, 1.2]], dtype=D)
    th = torch.tensor([3.0, 2.0, 3.0], dtype=D)
    psf = acq.psf_kernel(sp, th, 0.8, quality="normal")
    vs = 1.2 * 0.8 * acq.FWHM_TO_SIGMA
    assert psf.volume_sigma == pytest.approx(vs)
    used = psf.weights[0] > 0
    assert torch.unique(psf.offsets[0][used][:, :2], dim=0).shape[0] == 1  # one in-plane node at 1 mm
    # slice 2 (0.8 x 1.2 mm pixels): in-plane variance = nodes + prefilter = (1.2 sigma-per-FWHM x spacing)^2
    var2 = (psf.weights[2, :, None] * psf.offsets[2] ** 2).sum(0) + vs ** 2
    want = (1.2 * acq.FWHM_TO_SIGMA * torch.tensor([0.8, 1.2], dtype=D)) ** 2
    # the 1.2 mm axis keeps sqrt(sigma^2 - vs^2) = 0.46 mm < the 0.8 mm voxel: one node, as before
    assert float(var2[0]) == pytest.approx(float(want[0]), rel=1e-9)
    for quality in ("high", "thin"):
        assert acq.psf_kernel(sp, th, 0.8, quality=quality).volume_sigma == 0.0
    monkeypatch.setattr(acq, "PREFILTER", False)
    assert acq.psf_kernel(sp, th, 0.8, quality="normal").volume_sigma == 0.0


@pytest.mark.parametrize("sigma_mm", [0.2, 0.51, 1.3])
def test_prefilter_is_self_adjoint_with_the_requested_variance(sigma_mm):
    """Zero-padded symmetric separable kernels: ``<P x, y> == <x, P y>`` (so the operators stay
    exact adjoints) and a point spreads with variance ``sigma^2`` along every axis of an oblique
    anisotropic grid (3-tap exact-variance kernel below half a voxel, sampled Gaussian above)."""
    g = torch.Generator().manual_seed(5)
    A = _volume_affine(g, shape=(15, 16, 17))
    psf = acq.PSF(torch.zeros(1, 1, 3, dtype=D), torch.ones(1, 1, dtype=D), sigma_mm)
    x, y = torch.randn(15, 16, 17, generator=g, dtype=D), torch.randn(15, 16, 17, generator=g, dtype=D)
    lhs = float((acq.prefilter(x, A, psf) * y).sum())
    assert lhs == pytest.approx(float((x * acq.prefilter(y, A, psf)).sum()), rel=1e-12)
    delta = torch.zeros(15, 16, 17, dtype=D)
    delta[7, 8, 8] = 1.0
    out = acq.prefilter(delta, A, psf)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-12)
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    for axis, centre in enumerate((7, 8, 8)):
        prof = out.sum(dim=tuple(a for a in range(3) if a != axis))
        d = (torch.arange(prof.numel(), dtype=D) - centre) * float(spacing[axis])
        assert float((prof * d ** 2).sum()) == pytest.approx(sigma_mm ** 2, rel=0.03)
    # channels are filtered alike, and a zero sigma changes nothing
    two = torch.stack([x, y])
    torch.testing.assert_close(acq.prefilter(two, A, psf)[1], acq.prefilter(y, A, psf), rtol=0, atol=1e-12)
    assert acq.prefilter(x, A, acq.PSF(psf.offsets, psf.weights)) is x


def test_psf_select_repeat_and_cast_keep_the_volume_part():
    psf = acq.psf_kernel(torch.tensor([[1.0, 1.0], [1.2, 1.2]], dtype=D), torch.tensor([3.0, 2.0], dtype=D), 0.8)
    assert psf.volume_sigma > 0
    for q in (psf.select(torch.tensor([1])), psf.repeat(3), psf.to(torch.float32)):
        assert q.volume_sigma == psf.volume_sigma
    assert psf.repeat(3).offsets.shape[0] == 6 and psf.select(torch.tensor([1])).offsets.shape[0] == 1


def _truncated_gaussian_variance_ratio(c: float) -> float:
    """Var / sigma^2 of a Gaussian truncated to [-c sigma, c sigma]."""
    phi = math.exp(-0.5 * c * c) / math.sqrt(2 * math.pi)
    return 1 - 2 * c * phi / math.erf(c / math.sqrt(2))


@pytest.mark.parametrize("thickness", [2.0, 3.0, 4.5])
def test_psf_through_plane_variance(thickness):
    """Through-plane variance of the quadrature vs sigma^2 = (thickness / 2.3548)^2.

    The kernel is truncated at ``truncate`` standard deviations and renormalised (documented in
    the module; the FWHM is still the thickness), so at the default ``truncate=2`` its variance
    lies between that of the continuous truncated Gaussian, 0.774 sigma^2, and sigma^2: the
    equally spaced rule puts full weight on its end nodes at +-2 sigma, which the continuous
    truncation does not, so a coarse rule has *more* variance.  ``normal`` moves the PSF's
    isotropic part (variance ``volume_sigma^2``, untruncated) into a volume prefilter, so its total
    is nearer sigma^2 (0.85-0.96 here); ``high`` keeps every node (0.79-0.88).  With ``truncate=4``
    the rule matches the full sigma^2 to 1.5%.
    """
    sigma2 = (thickness / (2 * math.sqrt(2 * math.log(2)))) ** 2
    assert sigma2 == pytest.approx((thickness / 2.3548) ** 2, rel=1e-4)
    sp = torch.tensor([[1.0, 1.0]], dtype=D)
    th = torch.tensor([thickness], dtype=D)

    def zvar(psf):  # nodes plus the isotropic part the operators apply to the volume
        return float((psf.weights[0] * psf.offsets[0, :, 2] ** 2).sum()) + psf.volume_sigma ** 2

    trunc = _truncated_gaussian_variance_ratio(2.0)
    assert trunc == pytest.approx(0.774, abs=1e-3)
    normal = zvar(acq.psf_kernel(sp, th, 0.8, quality="normal")) / sigma2
    high = zvar(acq.psf_kernel(sp, th, 0.8, quality="high")) / sigma2
    wide = zvar(acq.psf_kernel(sp, th, 0.2, truncate=4.0, quality="high")) / sigma2
    assert trunc - 1e-6 <= high <= normal <= 1.0  # finer rule: closer to the truncated Gaussian
    assert wide == pytest.approx(1.0, rel=0.015)
    # thin slices: nothing through plane
    assert zvar(acq.psf_kernel(sp, th, 0.8, quality="thin")) == 0.0


def test_psf_inplane_variance_is_exact_for_the_3_point_rule():
    """In-plane: Gauss-Hermite 3-point rule, variance exactly (1.2 * spacing / 2.3548)^2; below the
    voxel size a single node (trilinear interpolation blurs instead)."""
    sp = torch.tensor([[1.5, 2.0]], dtype=D)
    th = torch.tensor([3.0], dtype=D)
    psf = acq.psf_kernel(sp, th, 0.8, quality="high")
    w, o = psf.weights[0], psf.offsets[0]
    for axis, dx in ((0, 1.5), (1, 2.0)):
        expected = (1.2 * dx * acq.FWHM_TO_SIGMA) ** 2
        assert float((w * o[:, axis] ** 2).sum()) == pytest.approx(expected, rel=1e-12)
    # normal quality on a coarse volume: in-plane sigma (0.76 / 1.02 mm) < 1.6 mm voxels -> single node
    psf_n = acq.psf_kernel(sp, th, 1.6, quality="normal")
    assert float(psf_n.offsets[0, :, :2].abs().max()) == 0.0


def test_psf_quadrature_is_exact_in_float64():
    sp = torch.tensor([[1.5, 2.0]], dtype=D)
    psf = acq.psf_kernel(sp, torch.tensor([3.0], dtype=D), 0.8, quality="high")
    assert abs(float(psf.weights.sum()) - 1.0) < 1e-14
    expected = (1.2 * 1.5 * acq.FWHM_TO_SIGMA) ** 2
    assert float((psf.weights[0] * psf.offsets[0, :, 0] ** 2).sum()) == pytest.approx(expected, rel=1e-13)


# ------------------------------------------------------------------------- sampling identities


def _trilinear(data: np.ndarray, affine: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Hand-written trilinear interpolation at world points ``x (P, 3)``; 0 outside the grid
    (each of the 8 corner voxels contributes only if it exists, as grid_sample's zero padding)."""
    ijk = (x - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    out = np.zeros(len(x))
    f = np.floor(ijk).astype(int)
    t = ijk - f
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                idx = f + np.array([di, dj, dk])
                w = (np.where(di, t[:, 0], 1 - t[:, 0]) * np.where(dj, t[:, 1], 1 - t[:, 1])
                     * np.where(dk, t[:, 2], 1 - t[:, 2]))
                ok = np.all((idx >= 0) & (idx < np.asarray(data.shape)), axis=1)
                out[ok] += w[ok] * data[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return out


def test_thin_psf_forward_is_trilinear_sampling_at_pixel_centres():
    c = _case(5, "thin", drop=0.0)
    out = acq.forward(c["volume"], c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"]).numpy()
    P = c["poses"].numpy()[c["slice_id"].numpy()]
    world = np.einsum("pab,pb->pa", P[:, :3, :3], c["coords"].numpy()) + P[:, :3, 3]
    ref = _trilinear(c["volume"].numpy(), c["affine"], world)
    assert (ref != 0).mean() > 0.5  # most pixels fall inside the tiny volume
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_normal_psf_forward_is_weighted_sum_of_trilinear_samples():
    """s_p = sum_k w_k V(T (c_p + o_k)) exactly, with the offsets rotated with the slice."""
    c = _case(6, "high", drop=0.5)
    out = acq.forward(c["volume"], c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"]).numpy()
    P = c["poses"].numpy()
    sid = c["slice_id"].numpy()
    offs, wts = c["psf"].offsets.numpy(), c["psf"].weights.numpy()
    ref = np.zeros(len(sid))
    for k in range(offs.shape[1]):
        local = c["coords"].numpy() + offs[sid, k]
        world = np.einsum("pab,pb->pa", P[sid, :3, :3], local) + P[sid, :3, 3]
        ref += wts[sid, k] * _trilinear(c["volume"].numpy(), c["affine"], world)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("quality", QUALITIES)
def test_forward_of_constant_volume_is_that_constant_inside_the_support(quality):
    """Pixels whose PSF nodes all lie inside the grid (at least one voxel from its faces, so
    no trilinear stencil touches the zero padding) see exactly the constant."""
    shape = (24, 25, 26)
    g = torch.Generator().manual_seed(7)
    A = _volume_affine(g, shape, (1.0, 1.0, 1.0))
    c = _case(8, quality)
    vol = torch.full(shape, 37.5, dtype=D)
    out = acq.forward(vol, A, c["poses"], c["coords"], c["slice_id"], c["psf"])
    pts, w = acq.sample_points(c["poses"], c["coords"], c["slice_id"], c["psf"])
    ijk = (pts - torch.as_tensor(A[:3, 3])) @ torch.linalg.inv(torch.as_tensor(A[:3, :3])).T
    inside = ((ijk >= 1) & (ijk <= torch.tensor(shape, dtype=D) - 2)).all(-1) | (w == 0)
    inside = inside.all(-1)
    assert int(inside.sum()) > 0.8 * len(inside)
    torch.testing.assert_close(out[inside], torch.full_like(out[inside], 37.5), rtol=1e-12, atol=0)
    # and the normalisation of A^T: splatting ones from those pixels conserves their total weight
    cov = acq.adjoint(inside.to(D), shape, A, c["poses"], c["coords"], c["slice_id"], c["psf"])
    assert float(cov.sum()) == pytest.approx(float(inside.sum()), rel=1e-7)


# ---------------------------------------------------------------------------------- gradients


def test_gradcheck_wrt_volume_and_pose_parameters():
    """torch.autograd.gradcheck in float64 on a tiny case, w.r.t. the volume and a 6-parameter
    pose correction (axis-angle + translation via transforms.params_to_matrix) of each slice."""
    c = _case(9, "normal", n_slices=2, H=3, W=4, drop=0.0)
    base = c["poses"]
    coords, sid, psf, A = c["coords"], c["slice_id"], c["psf"], c["affine"]

    vol = c["volume"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: acq.forward(v, A, base, coords, sid, psf, chunk=5), (vol,))

    g = torch.Generator().manual_seed(10)
    p = (0.05 * torch.randn(2, 6, generator=g, dtype=D)).requires_grad_(True)
    volume = c["volume"]

    def f(params):
        return acq.forward(volume, A, params_to_matrix(params) @ base, coords, sid, psf, chunk=5)

    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-5)


def test_gradients_reach_volume_and_poses_in_float32():
    c = _case(11, "normal")
    vol = c["volume"].float().requires_grad_(True)
    poses = c["poses"].float().requires_grad_(True)
    out = acq.forward(vol, c["affine"], poses, c["coords"].float(), c["slice_id"],
                      c["psf"].to(torch.float32), chunk=17)
    (out * c["y"].float()).sum().backward()
    assert vol.grad is not None and float(vol.grad.abs().sum()) > 0
    assert poses.grad is not None and float(poses.grad[:, :3].abs().sum()) > 0
    # the volume gradient of <A v, y> is A^T y
    ref = acq.adjoint(c["y"], VOL_SHAPE, c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"])
    torch.testing.assert_close(vol.grad.double(), ref, rtol=1e-4, atol=1e-5)


def test_projector_forward_is_differentiable_in_volume():
    c = _case(12)
    proj = acq.Projector(VOL_SHAPE, c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"], chunk=9)
    vol = c["volume"].clone().requires_grad_(True)
    (proj.forward(vol) * c["y"]).sum().backward()
    torch.testing.assert_close(vol.grad, proj.adjoint(c["y"]), rtol=1e-12, atol=1e-12)
