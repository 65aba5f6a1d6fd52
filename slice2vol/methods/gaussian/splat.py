"""Evaluate sums of Gaussians on a lattice, each Gaussian only inside its truncation box.

This is the one kernel behind both GaussianSVR renderers (:mod:`.render`): the voxeliser (the
lattice is the volume's voxel grid) and the analytic slice renderer (the lattice is the pixel
grid of every slice, with a single plane through-slice).  For primitive ``j`` with lattice-space
centre ``c_j``, precision ``P_j`` (inverse covariance in lattice units) and amplitude ``a_j``::

    out[flat(x)] += a_j * exp(-1/2 (x - c_j)^T P_j (x - c_j))   for lattice points x in box_j

``box_j`` is the cube ``round(c_j) + {-r..r}^dims`` (the caller picks ``r`` from the 3-sigma
extent).  The caller lays the lattice out *padded* by at least ``r`` on every side, so no bounds
test is needed per point, and crops afterwards.

Cost is what matters on a CPU, so the box is evaluated separably: with ``d = o - f`` per axis
(``o`` the integer offset, ``f = c - round(c)``), ``d^T P d`` splits into three two-axis terms
that broadcast to the box, and the backward pass reduces the incoming gradient over the box
axes first (``sum_x w d_a d_b = sum_{o_a, o_b} d_a d_b sum_rest w``).  The backward pass is
written out (:class:`_Splat`) and recomputes each chunk's exponentials, so memory does not
grow with the number of evaluations.  Gradients, with ``e = exp(-1/2 d^T P d)``:

    d out / d a_j = e,    d out / d c_j = a_j e P_j d,    d out / d P_j = -1/2 a_j e d d^T

``tests/test_gaussian.py`` checks values and gradients against a dense brute-force evaluation.

On the CPU an optional compiled kernel (``csrc/splat_cpu.cpp``, built by
``torch.utils.cpp_extension`` at first use and cached, as MONAI does for its optional kernels)
computes the same sums (to float rounding) about ten times faster; without a C++ compiler, or with
``SLICE2VOL_NO_EXTENSIONS=1``, the PyTorch path above runs instead.  The test suite checks that
the two agree.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["splat", "cpu_extension", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 1 << 21  # lattice evaluations per chunk (tens of MB of temporaries)


def _box(centre: Tensor, prec: Tensor, base: Tensor, strides: Tensor, r: int, dims: int):
    """Box of a chunk: ``e (J, n, n, m)`` exponentials, ``flat (J, n, n, m)`` indices, and the
    per-axis offsets ``d (J, 3, n)`` (axis 2 has one entry when ``dims == 2``)."""
    o = torch.arange(-r, r + 1, device=centre.device, dtype=centre.dtype)
    f = centre - torch.round(centre.detach())
    di = o[None] - f[:, 0:1]  # (J, n)
    dj = o[None] - f[:, 1:2]
    dk = (o[None] - f[:, 2:3]) if dims == 3 else -centre[:, 2:3]  # (J, m); 2D: the plane at w = 0
    p = prec
    x_ij = (p[:, 0, 0, None, None] * (di * di)[:, :, None] + p[:, 1, 1, None, None] * (dj * dj)[:, None, :]
            + 2 * p[:, 0, 1, None, None] * di[:, :, None] * dj[:, None, :])  # (J, n, n)
    y_ik = 2 * p[:, 0, 2, None, None] * di[:, :, None] * dk[:, None, :] + p[:, 2, 2, None, None] * (dk * dk)[:, None, :]
    z_jk = 2 * p[:, 1, 2, None, None] * dj[:, :, None] * dk[:, None, :]  # (J, n, m)
    q = x_ij[..., None] + y_ik[:, :, None, :] + z_jk[:, None, :, :]
    e = torch.exp(q.mul_(-0.5))
    oi = torch.arange(-r, r + 1, device=centre.device)
    ok = oi if dims == 3 else oi[:1] * 0
    flat = (base[:, None, None, None] + (oi[None] * strides[:, 0:1])[:, :, None, None]
            + (oi[None] * strides[:, 1:2])[:, None, :, None] + (ok[None] * strides[:, 2:3])[:, None, None, :])
    return e, flat, di, dj, dk


class _Splat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, centre, prec, amp, base, strides, size, r, dims, chunk):
        out = torch.zeros(size, dtype=centre.dtype, device=centre.device)
        n = 2 * r + 1
        step = max(1, chunk // (n * n * (n if dims == 3 else 1)))
        for s in range(0, centre.shape[0], step):
            sl = slice(s, s + step)
            e, flat, *_ = _box(centre[sl], prec[sl], base[sl], strides[sl], r, dims)
            out.index_add_(0, flat.reshape(-1), e.mul_(amp[sl, None, None, None]).reshape(-1))
        ctx.save_for_backward(centre, prec, amp, base, strides)
        ctx.meta = (r, dims, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        centre, prec, amp, base, strides = ctx.saved_tensors
        r, dims, chunk = ctx.meta
        g_c, g_p, g_a = torch.zeros_like(centre), torch.zeros_like(prec), torch.zeros_like(amp)
        n = 2 * r + 1
        step = max(1, chunk // (n * n * (n if dims == 3 else 1)))
        for s in range(0, centre.shape[0], step):
            sl = slice(s, s + step)
            e, flat, di, dj, dk = _box(centre[sl], prec[sl], base[sl], strides[sl], r, dims)
            ge = grad_out[flat.reshape(-1)].reshape(e.shape).mul_(e)  # (J, n, n, m)
            g_a[sl] = ge.sum((1, 2, 3))
            w = ge * amp[sl, None, None, None]
            w_ij, w_ik, w_jk = w.sum(3), w.sum(2), w.sum(1)
            w_i, w_j, w_k = w_ij.sum(2), w_ij.sum(1), w_ik.sum(1)
            # first and second moments of d under w
            m1 = torch.stack([(w_i * di).sum(1), (w_j * dj).sum(1), (w_k * dk).sum(1)], -1)  # (J, 3)
            s_ii = (w_i * di * di).sum(1)
            s_jj = (w_j * dj * dj).sum(1)
            s_kk = (w_k * dk * dk).sum(1)
            s_ij = (w_ij * di[:, :, None] * dj[:, None, :]).sum((1, 2))
            s_ik = (w_ik * di[:, :, None] * dk[:, None, :]).sum((1, 2))
            s_jk = (w_jk * dj[:, :, None] * dk[:, None, :]).sum((1, 2))
            m2 = torch.stack([torch.stack([s_ii, s_ij, s_ik], -1), torch.stack([s_ij, s_jj, s_jk], -1),
                              torch.stack([s_ik, s_jk, s_kk], -1)], -2)
            # d = o - (c - round(c)) in-box and d_k = -c_k for the 2D plane: d d / d c = -I either way
            g_c[sl] = (prec[sl] @ m1[..., None])[..., 0]
            g_p[sl] = -0.5 * m2
        return g_c, g_p, g_a, None, None, None, None, None, None


_EXT: object | None = None
_EXT_TRIED = False


def _cpu_tag() -> str:
    """Short hash of this CPU's model and instruction-set flags.  The kernel is built with
    ``-march=native`` into a cache that torch keys by source and flags only; a home folder shared
    by machines with different CPUs (a cluster) would otherwise load a binary with instructions
    this CPU lacks, which crashes instead of falling back."""
    import hashlib
    import platform

    info = platform.machine() + platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        pass
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def cpu_extension():
    """The compiled CPU kernel, built at first use; ``None`` when unavailable or disabled."""
    global _EXT, _EXT_TRIED
    if _EXT_TRIED:
        return _EXT
    _EXT_TRIED = True
    if os.environ.get("SLICE2VOL_NO_EXTENSIONS", "") not in ("", "0"):
        return None
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).resolve().parent / "csrc" / "splat_cpu.cpp"
        log.info("gaussian: compiling the CPU splat kernel (first use only)")
        _EXT = load(name=f"slice2vol_splat_cpu_{_cpu_tag()}", sources=[str(src)],
                    extra_cflags=["-O3", "-fopenmp", "-ffast-math", "-march=native"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no headers, ...: the PyTorch path is always there
        log.warning("gaussian: compiled CPU kernel unavailable (%s); using the slower PyTorch path",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _EXT = None
    return _EXT


class _SplatExt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, centre, prec, amp, base, strides, radius, size, dims):
        ext = cpu_extension()
        args = (centre.contiguous(), prec.contiguous(), amp.contiguous(), base.contiguous(), strides.contiguous(),
                radius.contiguous())
        ctx.save_for_backward(*args)
        ctx.dims = dims
        return ext.forward(*args, dims, size)

    @staticmethod
    def backward(ctx, grad_out):
        c, p, a, base, st, rad = ctx.saved_tensors
        gc, gp, ga = cpu_extension().backward(grad_out.contiguous(), c, p, a, base, st, rad, ctx.dims)
        return gc, gp, ga, None, None, None, None, None


def splat(centre: Tensor, prec: Tensor, amp: Tensor, radius: Tensor, base: Tensor, strides: Tensor, size: int,
          dims: int = 3, chunk: int = DEFAULT_CHUNK, use_extension: bool = True) -> Tensor:
    """Sum of truncated Gaussians on a padded lattice, differentiable in ``centre``, ``prec``, ``amp``.

    Args:
        centre: ``(J, 3)`` lattice-space centres (lattice units).  With ``dims == 2`` the third
            entry is the distance of the Gaussian from the single lattice plane (``w = 0``).
        prec: ``(J, 3, 3)`` symmetric precision matrices in lattice units.
        amp: ``(J,)`` amplitudes.
        radius: ``(J,)`` int64 box half-width (grouped internally by value); the lattice must be
            padded by at least this much around ``round(centre)``.
        base: ``(J,)`` int64 flat index of the lattice point ``round(centre)`` (plane point for 2D).
        strides: ``(J, 3)`` int64 flat-index strides of the three lattice axes.
        size: length of the output.
        dims: 3 for a volume, 2 for slices.
        chunk: lattice evaluations per chunk (memory bound) of the PyTorch path.
        use_extension: use the compiled CPU kernel when available (same result).
    Returns:
        ``(size,)`` tensor.
    """
    out = torch.zeros(size, dtype=centre.dtype, device=centre.device)
    if centre.shape[0] == 0:
        return out + 0 * amp.sum()
    if use_extension and centre.device.type == "cpu" and cpu_extension() is not None:
        return _SplatExt.apply(centre, prec, amp, base, strides, radius.long(), size, dims)
    for r in torch.unique(radius).tolist():
        idx = torch.nonzero(radius == r, as_tuple=False).squeeze(1)
        out = out + _Splat.apply(centre[idx], prec[idx], amp[idx], base[idx], strides[idx], size, int(r), dims, chunk)
    return out
