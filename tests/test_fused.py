"""The fused CPU operators (slice2vol.core.fused) against the PyTorch reference path.

Tiny oblique cases: anisotropic, rotated volume grids; random oblique slice poses, some of them
partly outside the volume (edge pixels, zero padding); every PSF quality.  The reference is the
same public function run with ``SLICE2VOL_NO_NUMBA=1``, so the dispatch itself is under test too.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from slice2vol.core import acquisition as acq
from slice2vol.core import fused
from slice2vol.core.geometry import slice_pixel_coords
from slice2vol.core.registration import gradient_channels, register, slice_centres, smooth
from slice2vol.core.transforms import axis_angle_to_matrix, rotation_about

needs_numba = pytest.mark.skipif(not fused.available(), reason=f"fused path unavailable: {fused.reason_unavailable()}")
SHAPE = (9, 12, 10)
SPACING = (1.2, 0.9, 1.5)


@contextlib.contextmanager
def torch_path():
    """Run the block on the PyTorch reference path."""
    old = os.environ.get(fused.ENV_DISABLE)
    os.environ[fused.ENV_DISABLE] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[fused.ENV_DISABLE]
        else:
            os.environ[fused.ENV_DISABLE] = old


def _rotation(g: torch.Generator, dtype) -> torch.Tensor:
    axis = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    return axis_angle_to_matrix(axis * torch.rand(1, generator=g, dtype=torch.float64) * math.pi).to(dtype)


def _case(seed: int, quality: str = "normal", dtype=torch.float64, n_slices: int = 6, H: int = 8, W: int = 9,
          reach: float = 6.0, shape=SHAPE, spacing=SPACING, smooth: bool = False):
    """Random oblique acquisition of a small volume; slice centres up to ``reach`` mm from the volume
    centre, so some slices stick out of the grid (the volume is about 11-14 mm wide)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(g, torch.float64).numpy() * np.asarray(spacing)
    affine[:3, 3] = centre.numpy() - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    poses = torch.eye(4, dtype=torch.float64).repeat(n_slices, 1, 1)
    for n in range(n_slices):
        poses[n, :3, :3] = _rotation(g, torch.float64)
        poses[n, :3, 3] = centre + reach * (2 * torch.rand(3, generator=g, dtype=torch.float64) - 1)
    sp = torch.tensor([[1.1, 0.9]] * n_slices, dtype=torch.float64)
    thick = torch.tensor([2.0 + 0.5 * (n % 3) for n in range(n_slices)], dtype=torch.float64)
    coords = slice_pixel_coords(H, W, (1.1, 0.9), dtype=torch.float64).reshape(-1, 3).repeat(n_slices, 1)
    sid = torch.arange(n_slices).repeat_interleave(H * W)
    keep = torch.rand(coords.shape[0], generator=g) >= 0.15
    coords, sid = coords[keep], sid[keep]
    psf = acq.psf_kernel(sp, thick, float(min(spacing)), quality=quality)
    if smooth == "linear":
        idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
        volume = 1.0 + idx @ torch.tensor([0.3, -0.2, 0.25], dtype=torch.float64)
    elif smooth:
        idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
        c = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
        volume = torch.exp(-(((idx - c) / torch.tensor(shape, dtype=torch.float64) * 2.2) ** 2).sum(-1))
    else:
        volume = torch.rand(shape, generator=g, dtype=torch.float64)
    y = torch.randn(coords.shape[0], generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(volume=cast(volume), affine=affine, poses=cast(poses), coords=cast(coords), slice_id=sid,
                psf=acq.PSF(cast(psf.offsets), cast(psf.weights), psf.volume_sigma), y=cast(y))


def _args(c):
    return c["affine"], c["poses"], c["coords"], c["slice_id"], c["psf"]


# --------------------------------------------------------------------------- dispatch / fallback


def test_env_var_forces_the_torch_path(monkeypatch):
    c = _case(0)
    with torch_path():
        assert not fused.available() and acq.backend() == "torch"
        assert fused.ENV_DISABLE in fused.reason_unavailable()
        ref = acq.forward(c["volume"], *_args(c))

    def boom(*a, **k):
        raise AssertionError("fused kernel called")

    monkeypatch.delenv(fused.ENV_NO_EXTENSIONS, raising=False)
    monkeypatch.setattr(fused, "_forward_raw", boom)
    monkeypatch.setattr(fused, "_adjoint_raw", boom)
    monkeypatch.setenv(fused.ENV_DISABLE, "1")
    torch.testing.assert_close(acq.forward(c["volume"], *_args(c)), ref)  # no kernel reached
    acq.adjoint(c["y"], SHAPE, *_args(c))
    acq.Projector(SHAPE, *_args(c)).forward(c["volume"])
    if fused._kernels():  # and without the variable the kernels are what runs
        monkeypatch.setenv(fused.ENV_DISABLE, "0")
        assert acq.backend() == "numba"
        with pytest.raises(AssertionError, match="fused kernel called"):
            acq.forward(c["volume"], *_args(c))
        monkeypatch.setenv(fused.ENV_NO_EXTENSIONS, "1")  # the package-wide switch also selects the torch path
        assert acq.backend() == "torch"
        acq.forward(c["volume"], *_args(c))


def test_without_numba_the_torch_path_runs():
    """numba made unimportable in a fresh interpreter: operators still work, on the torch path."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from slice2vol.core import acquisition as acq, fused\n"
        "assert not fused.available() and 'numba' in fused.reason_unavailable(), fused.reason_unavailable()\n"
        "assert acq.backend() == 'torch'\n"
        "from slice2vol.core.geometry import slice_pixel_coords\n"
        "c = slice_pixel_coords(4, 4, (1.0, 1.0)).reshape(-1, 3)\n"
        "psf = acq.psf_kernel(torch.ones(1, 2), torch.full((1,), 2.0), 1.0)\n"
        "s = acq.forward(torch.ones(6, 6, 6), torch.eye(4).numpy() * 1.0, torch.eye(4)[None] + torch.tensor("
        "[[[0, 0, 0, 2.5], [0, 0, 0, 2.5], [0, 0, 0, 2.5], [0, 0, 0, 0]]]), c, torch.zeros(16, dtype=torch.long), psf)\n"
        "assert s.shape == (16,) and float(s.min()) > 0.5, s\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != fused.ENV_DISABLE}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_pose_gradients_take_the_torch_path():
    """A graph through the poses (GaussianSVR's sampled mode) keeps autograd's pose gradient."""
    c = _case(1)
    poses = c["poses"].clone().requires_grad_(True)
    acq.forward(c["volume"], c["affine"], poses, c["coords"], c["slice_id"], c["psf"]).sum().backward()
    with torch_path():
        p2 = c["poses"].clone().requires_grad_(True)
        acq.forward(c["volume"], c["affine"], p2, c["coords"], c["slice_id"], c["psf"]).sum().backward()
    assert poses.grad is not None and float(poses.grad.abs().sum()) > 0
    torch.testing.assert_close(poses.grad, p2.grad)


# --------------------------------------------------------------------------- values vs reference


@needs_numba
@pytest.mark.parametrize("quality", ["thin", "normal", "high"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_and_adjoint_match_reference(seed, quality):
    c = _case(seed, quality)
    f = acq.forward(c["volume"], *_args(c))
    a = acq.adjoint(c["y"], SHAPE, *_args(c))
    with torch_path():
        f_ref = acq.forward(c["volume"], *_args(c))
        a_ref = acq.adjoint(c["y"], SHAPE, *_args(c))
    # the case has edge pixels: some PSF nodes outside the grid, some pixels entirely outside
    assert 0 < int((f_ref == 0).sum()) < f_ref.numel()
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)


@needs_numba
def test_float32_matches_reference_and_keeps_dtype():
    c = _case(3, dtype=torch.float32)
    f = acq.forward(c["volume"], *_args(c))
    a = acq.adjoint(c["y"], SHAPE, *_args(c))
    with torch_path():
        f_ref = acq.forward(c["volume"], *_args(c))
        a_ref = acq.adjoint(c["y"], SHAPE, *_args(c))
    assert f.dtype == a.dtype == torch.float32
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-5)


@needs_numba
def test_projector_and_multichannel_match_reference():
    c = _case(4)
    proj = acq.Projector(SHAPE, *_args(c))
    assert proj.geom is not None and not proj.chunks  # fused: no cached node positions
    two = torch.stack([c["volume"], c["volume"] ** 2])
    with torch_path():
        ref = acq.Projector(SHAPE, *_args(c))
        assert ref.geom is None
        f_ref, a_ref, two_ref = ref.forward(c["volume"]), ref.adjoint(c["y"]), acq.forward(two, *_args(c))
    torch.testing.assert_close(proj.forward(c["volume"]), f_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(proj.adjoint(c["y"]), a_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acq.forward(two, *_args(c)), two_ref, rtol=1e-10, atol=1e-12)


def test_projector_casts_inputs_to_its_dtype_on_both_paths():
    """A float32 volume / values through a float64 Projector: the same numbers on the torch path (the
    one CUDA runs) as on the fused path; the torch path used to raise on the dtype mismatch."""
    c = _case(6)
    v32, y32 = c["volume"].float(), c["y"].float()
    with torch_path():
        proj = acq.Projector(SHAPE, *_args(c), dtype=torch.float64)
        assert proj.geom is None
        f, a = proj.forward(v32), proj.adjoint(y32)
    assert f.dtype == a.dtype == torch.float64
    torch.testing.assert_close(f, acq.Projector(SHAPE, *_args(c)).forward(v32.double()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, acq.Projector(SHAPE, *_args(c)).adjoint(y32.double()), rtol=1e-10, atol=1e-12)


@needs_numba
def test_slices_outside_the_volume_and_empty_inputs():
    c = _case(5)
    far = c["poses"].clone()
    far[:, :3, 3] += 500.0  # every slice far outside
    assert float(acq.forward(c["volume"], c["affine"], far, c["coords"], c["slice_id"], c["psf"]).abs().max()) == 0
    assert float(acq.adjoint(c["y"], SHAPE, c["affine"], far, c["coords"], c["slice_id"], c["psf"]).abs().max()) == 0
    none = torch.zeros(0, dtype=torch.long)
    assert acq.forward(c["volume"], c["affine"], c["poses"], c["coords"][:0], none, c["psf"]).shape == (0,)
    assert float(acq.adjoint(c["y"][:0], SHAPE, c["affine"], c["poses"], c["coords"][:0], none, c["psf"]).abs().sum()) == 0


# --------------------------------------------------------------------------- adjointness, gradients


@needs_numba
@pytest.mark.parametrize("quality", ["thin", "normal", "high"])
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_dot_product_on_the_fused_path(quality, dtype, rel):
    """<A x, y> == <x, A^T y>: float64 to rounding; float32 (float64 sums over PSF nodes, float32
    voxel accumulation as the PyTorch path) to a few float32 ulps of the sum."""
    c = _case(6, quality, dtype=dtype)
    x, y = c["volume"], c["y"]
    lhs = float((acq.forward(x, *_args(c)).double() * y.double()).sum())
    rhs = float((x.double() * acq.adjoint(y, SHAPE, *_args(c)).double()).sum())
    assert abs(lhs) > 1e-2
    assert lhs == pytest.approx(rhs, rel=rel)


@needs_numba
def test_autograd_forward_backward_is_the_adjoint_and_vice_versa():
    c = _case(7)
    geom = fused.Geometry(SHAPE, *_args(c))
    v = c["volume"].clone().requires_grad_(True)
    y = c["y"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fused.forward(t, geom), (v,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda t: fused.adjoint(t, geom), (y,), eps=1e-6, atol=1e-8)
    # through the public function: the volume gradient of <A V, y> is A^T y
    v2 = c["volume"].clone().requires_grad_(True)
    (acq.forward(v2, *_args(c)) * c["y"]).sum().backward()
    with torch_path():
        a_ref = acq.adjoint(c["y"], SHAPE, *_args(c))
    torch.testing.assert_close(v2.grad, a_ref, rtol=1e-10, atol=1e-12)


@needs_numba
def test_adjoint_is_bitwise_deterministic_across_threads():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one numba thread only")
    c = _case(8, "high", dtype=torch.float32, n_slices=12, reach=3.0)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            outs.append(acq.adjoint(c["y"], SHAPE, *_args(c)))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


# --------------------------------------------------------------------------- forward with Jacobian


def _jac_case(seed, dtype=torch.float64, quality="normal", smooth=True):
    c = _case(seed, quality, dtype=dtype, shape=(14, 16, 15), spacing=(0.9, 0.8, 1.1), reach=3.0, smooth=smooth)
    # forward_jacobian reads the channels of the prefiltered volume (its caller applies the PSF's volume part)
    ch, _ = gradient_channels(acq.prefilter(c["volume"], c["affine"], c["psf"]), c["affine"])
    centres = slice_centres(c["poses"], c["coords"], c["slice_id"]).to(dtype) + 0.7
    return c, ch, centres


@needs_numba
@pytest.mark.parametrize("quality", ["thin", "normal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_jacobian_matches_reference(quality, dtype):
    c, ch, centres = _jac_case(9, dtype, quality)
    s, J = acq.forward_jacobian(ch, *_args(c), centres)
    with torch_path():
        s_ref, J_ref = acq.forward_jacobian(ch, *_args(c), centres)
        f_ref = acq.forward(c["volume"], *_args(c))
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(s, s_ref, **tol)
    torch.testing.assert_close(J, J_ref, **tol)
    torch.testing.assert_close(s, f_ref, **tol)  # its first output is the forward operator
    # channels-first storage gives the same numbers (the kernel copies to channels-last)
    s2, J2 = acq.forward_jacobian(ch.contiguous(), *_args(c), centres)
    assert torch.equal(s2, s) and torch.equal(J2, J)


@needs_numba
@pytest.mark.parametrize("volume,tol", [("linear", 1e-6), ("gaussian", 0.1)])
def test_forward_jacobian_matches_finite_differences(volume, tol):
    """``J`` against central differences of the forward operator under left-multiplied rigid
    corrections about the slice centres.  ``J`` is built from the volume's sampled gradient
    (central differences, trilinearly interpolated): exact for a linear volume (where this checks
    the geometry -- centres, cross products, signs -- to rounding), and within the discretisation
    error for a smooth blob."""
    c, ch, centres = _jac_case(10, smooth=True if volume == "gaussian" else "linear")
    _, J = acq.forward_jacobian(ch, *_args(c), centres)
    M = c["poses"].shape[0]
    h = 1e-4
    fd = torch.zeros_like(J)
    for d in range(6):
        p = torch.zeros(M, 6, dtype=torch.float64)
        p[:, d] = h
        plus = acq.forward(c["volume"], c["affine"], rotation_about(p, centres) @ c["poses"], c["coords"], c["slice_id"], c["psf"])
        minus = acq.forward(c["volume"], c["affine"], rotation_about(-p, centres) @ c["poses"], c["coords"], c["slice_id"],
                            c["psf"])
        fd[:, d] = (plus - minus) / (2 * h)
    # pixels whose PSF stays well inside the grid (zero padding makes the edge non-smooth); the
    # outer voxel layer counts as outside: the channels' central differences reach one voxel further
    core = torch.zeros_like(c["volume"])
    core[1:-1, 1:-1, 1:-1] = 1
    inside = acq.forward(core, *_args(c)) > 1 - 1e-9
    assert int(inside.sum()) > 50
    assert float(fd[inside].abs().max()) > 0.1  # the corrections do move the pixels' values
    err = (J - fd)[inside].norm() / fd[inside].norm()
    assert float(err) < tol, float(err)


@needs_numba
def test_registration_same_result_on_both_paths():
    """register() end to end: the fused Jacobian and the reference give the same corrections."""
    c = _case(11, shape=(20, 22, 18), spacing=(0.9, 0.8, 1.0), reach=2.0, n_slices=5, H=12, W=12)
    c["volume"] = smooth(c["volume"], 1.5, np.asarray((0.9, 0.8, 1.0)))  # random texture, no symmetry
    g = torch.Generator().manual_seed(0)
    true = c["poses"]
    delta = torch.cat([0.05 * torch.randn(5, 3, generator=g, dtype=torch.float64),
                       0.8 * torch.randn(5, 3, generator=g, dtype=torch.float64)], 1)
    moved = rotation_about(delta, slice_centres(true, c["coords"], c["slice_id"])) @ true
    y = acq.forward(c["volume"], c["affine"], true, c["coords"], c["slice_id"], c["psf"])
    kw = dict(sigmas=(1.0, 0.0), iterations=6)
    r = register(c["volume"], c["affine"], moved, c["coords"], c["slice_id"], y, c["psf"], **kw)
    with torch_path():
        r_ref = register(c["volume"], c["affine"], moved, c["coords"], c["slice_id"], y, c["psf"], **kw)
    torch.testing.assert_close(r.poses, r_ref.poses, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.cost, r_ref.cost, rtol=1e-6, atol=1e-9)
    # and it did register: closer to the truth than the start
    assert float((r.poses - true).abs().max()) < 0.5 * float((moved - true).abs().max())


@needs_numba
@pytest.mark.parametrize("shape", [(2, 3, 4), (7, 5, 6)])
def test_gradient_channels_and_normal_equations_match_reference(shape):
    g = torch.Generator().manual_seed(13)
    v = torch.rand(shape, generator=g)
    aff = np.diag([0.9, 1.1, 1.3, 1.0])
    ch, tw = gradient_channels(v, aff)
    with torch_path():
        ch_ref, tw_ref = gradient_channels(v, aff)
    assert ch.shape == (4,) + shape and torch.equal(ch, ch_ref) and torch.equal(tw, tw_ref)
    assert ch.permute(1, 2, 3, 0).is_contiguous()  # channels last in memory, for the fused Jacobian
    from slice2vol.core.registration import _normal_equations

    P, G = 300, 4
    J, a, w, r = (torch.randn(P, 6, generator=g), torch.rand(P, generator=g) + 0.5, torch.rand(P, generator=g),
                  torch.randn(P, generator=g))
    w[::7] = 0
    grp = torch.randint(0, G - 1, (P,), generator=g)  # group G-1 gets no pixel
    H, b = _normal_equations(J, a, w, r, grp, G)
    with torch_path():
        H_ref, b_ref = _normal_equations(J, a, w, r, grp, G)
    torch.testing.assert_close(H, H_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-5)
    assert float(H[G - 1].abs().sum()) == 0 and torch.equal(H, H.transpose(-1, -2))


@needs_numba
def test_concurrent_calls_from_python_threads():
    """numba's workqueue pool aborts the process on concurrent launches; the module serialises them
    (dask workers with several threads call the operators from several threads)."""
    import threading

    c = _case(14, dtype=torch.float32)
    ref_f, ref_a = acq.forward(c["volume"], *_args(c)), acq.adjoint(c["y"], SHAPE, *_args(c))
    bad = []

    def work():
        for _ in range(20):
            if not (torch.equal(acq.forward(c["volume"], *_args(c)), ref_f)
                    and torch.equal(acq.adjoint(c["y"], SHAPE, *_args(c)), ref_a)):
                bad.append(1)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_stage_timer_counts_nested_stages_exclusively():
    import time

    from slice2vol.cli.commands import _profile_table, _stage_times
    from slice2vol.core import stages

    stages.reset()
    with stages.stage("outer"):
        time.sleep(0.02)
        with stages.stage("inner"):
            time.sleep(0.05)
        with stages.stage("inner"):
            time.sleep(0.01)
    snap = stages.snapshot()
    assert snap["inner"]["calls"] == 2 and snap["outer"]["calls"] == 1
    assert 0.055 <= snap["inner"]["seconds"] < 0.5
    assert 0.015 <= snap["outer"]["seconds"] < snap["inner"]["seconds"]  # the inner time is not counted twice
    st = _stage_times(1.0)
    assert set(st) == {"outer", "inner", "checks and other"} and abs(sum(st.values()) - 1.0) < 1e-2
    table = _profile_table({"total_s": 1.0, "stages_s": st}, torch.device("cpu"))
    assert "inner" in table and "checks and other" in table and acq.backend() in table
    stages.reset()
    assert stages.snapshot() == {}


# --------------------------------------------------------------------------- CUDA


def test_choosing_cuda_turns_off_cudnn_tf32(monkeypatch):
    """resolve_device('cuda'/'auto' on a GPU machine) keeps cuDNN's float32 convolutions in float32;
    choosing the CPU leaves the flag alone.  (CUDA itself is faked: only the flag is under test.)"""
    from slice2vol.core.runtime import resolve_device

    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert resolve_device("cpu").type == "cpu" and torch.backends.cudnn.allow_tf32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_device("auto").type == "cuda"
        assert not torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = True
        assert resolve_device("cuda").type == "cuda" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_operators_match_cpu():
    c = _case(12, dtype=torch.float32)
    f_cpu = acq.forward(c["volume"], *_args(c))
    a_cpu = acq.adjoint(c["y"], SHAPE, *_args(c))
    cu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    cu["psf"] = c["psf"].to("cuda")
    assert acq.backend("cuda") == "torch"
    torch.testing.assert_close(acq.forward(cu["volume"], *_args(cu)).cpu(), f_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acq.adjoint(cu["y"], SHAPE, *_args(cu)).cpu(), a_cpu, rtol=1e-4, atol=1e-4)
    ch, _ = gradient_channels(cu["volume"], c["affine"])
    centres = slice_centres(cu["poses"], cu["coords"], cu["slice_id"])
    s, J = acq.forward_jacobian(ch, *_args(cu), centres)
    s_cpu, J_cpu = acq.forward_jacobian(ch.cpu(), *_args(c), centres.cpu())
    torch.testing.assert_close(s.cpu(), s_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(J.cpu(), J_cpu, rtol=1e-3, atol=1e-3)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_ncc_matches_reference_with_degenerate_segments(dtype):
    """per_slice_ncc's kernel: the same values as the scatter-add path, NaN where the torch path
    gives NaN (an empty segment, a one-pixel segment, a constant segment)."""
    from slice2vol.core.similarity import per_slice_ncc

    g = torch.Generator().manual_seed(21)
    P, S = 5000, 40
    x = torch.randn(P, generator=g, dtype=dtype)
    y = (0.3 * x + torch.randn(P, generator=g, dtype=dtype)).to(dtype)
    seg = torch.randint(0, S - 3, (P,), generator=g)  # S-3..S-1 start empty
    seg[0] = S - 2  # one pixel
    seg[1:4] = S - 1
    x[1:4] = 2.0  # constant: no variance
    out = per_slice_ncc(x, y, seg, S)
    with torch_path():
        ref = per_slice_ncc(x, y, seg, S)
    assert out.dtype == torch.float64 and out.shape == (S,)
    assert torch.equal(out.isnan(), ref.isnan()) and bool(out[S - 3:].isnan().all())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), rtol=0, atol=1e-12)


@needs_numba
@pytest.mark.parametrize("fit_scale", [True, False])
def test_registration_costs_kernel_matches_the_torch_formula(fit_scale):
    g = torch.Generator().manual_seed(22)
    P, M, G = 4000, 12, 5
    s = torch.rand(P, generator=g) + 0.1
    y = 1.7 * s + 0.05 * torch.randn(P, generator=g)
    w = torch.rand(P, generator=g)
    sid = torch.randint(0, M - 1, (P,), generator=g)  # slice M-1 has no pixel: scale 1
    s[sid == 3] = 0.0  # a slice that simulates to 0: scale 1, not 0/0
    y[sid == 4] *= 40.0  # an implausible scale: clipped to 5
    group = torch.arange(M) % G
    a, r, cost = fused.registration_costs(s, y, w, sid, group[sid], M, G, fit_scale)
    if fit_scale:
        num = torch.zeros(M, dtype=torch.float64).index_add_(0, sid, (w * s * y).double())
        den = torch.zeros(M, dtype=torch.float64).index_add_(0, sid, (w * s * s).double())
        a_ref = torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.ones_like(den)).clamp(0.2, 5.0).float()
    else:
        a_ref = torch.ones(M)
    r_ref = a_ref[sid] * s - y
    c = torch.zeros(G, dtype=torch.float64).index_add_(0, group[sid], (w * r_ref * r_ref).double())
    n = torch.zeros(G, dtype=torch.float64).index_add_(0, group[sid], w.double())
    assert a.dtype == r.dtype == cost.dtype == torch.float32
    torch.testing.assert_close(a, a_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cost, (c / n).float(), rtol=1e-5, atol=0)
    assert float(a[M - 1]) == 1.0 and float(a[3]) == 1.0 and (not fit_scale or float(a[4]) == 5.0)


@needs_numba
@pytest.mark.parametrize("shape", [(9, 12, 10), (3, 2, 5), (2, 6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blur_matches_reference_with_kernels_longer_than_the_axis(shape, dtype):
    """gaussian_blur's fused axis pass: same values as pad + conv1d, edges replicated (kernels
    longer than an axis included), 3D and 4D (channels), and a constant volume stays constant."""
    from slice2vol.core.resample import gaussian_blur

    g = torch.Generator().manual_seed(31)
    v = torch.rand(shape, generator=g, dtype=dtype)
    for vol, sig in ((v, (1.3, 0.0, 2.1)), (torch.stack([v, 2 * v]), 1.7)):
        out = gaussian_blur(vol, sig, (0.8, 1.1, 0.9))
        with torch_path():
            ref = gaussian_blur(vol, sig, (0.8, 1.1, 0.9))
        assert out.shape == ref.shape and out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    c = gaussian_blur(torch.full(shape, 3.0, dtype=dtype), 2.0, (1.0, 1.0, 1.0))
    torch.testing.assert_close(c, torch.full(shape, 3.0, dtype=dtype))
    # with autograd through the volume the PyTorch path runs (the kernel is not differentiable)
    x = v.clone().requires_grad_(True)
    gaussian_blur(x, 1.0, (1.0, 1.0, 1.0)).sum().backward()
    assert x.grad is not None and x.grad.shape == shape
