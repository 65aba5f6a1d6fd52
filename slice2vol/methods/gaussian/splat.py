"""Evaluate sums of Gaussians on a lattice, each Gaussian only inside its truncation box.

This is the one kernel behind both GaussianSVR renderers (:mod:`.render`): the voxeliser (the
lattice is the volume's voxel grid) and the analytic slice renderer (the lattice is the pixel
grid of every slice, with a single plane through-slice).  For primitive ``j`` with lattice-space
centre ``c_j``, precision ``P_j`` (inverse covariance in lattice units) and amplitude ``a_j``::

    out[flat(x)] += a_j * exp(-1/2 (x - c_j)^T P_j (x - c_j))   for lattice points x in box_j

``box_j`` is the cube ``round(c_j) + {-r..r}^dims`` (the caller picks ``r`` from the 3-sigma
extent), and with ``cut`` only its points with ``(x - c_j)^T P_j (x - c_j) <= cut`` count: the
renderers pass ``cut = 9``, the 3-sigma ellipsoid, which holds about half of the cube's points or
fewer (elongated Gaussians), so the kernels do half the work or less.  The test is done in
float64 by both paths, so they agree on the support.  The caller lays the lattice out *padded* by
at least ``r`` on every side, so no bounds test is needed per point, and crops afterwards.

Cost is what matters on a CPU, so the box is evaluated separably: with ``d = o - f`` per axis
(``o`` the integer offset, ``f = c - round(c)``), ``d^T P d`` splits into three two-axis terms
that broadcast to the box, and the backward pass reduces the incoming gradient over the box
axes first (``sum_x w d_a d_b = sum_{o_a, o_b} d_a d_b sum_rest w``).  The backward pass is
written out (:class:`_Splat`) and recomputes each chunk's exponentials, so memory does not
grow with the number of evaluations.  Gradients, with ``e = exp(-1/2 d^T P d)``:

    d out / d a_j = e,    d out / d c_j = a_j e P_j d,    d out / d P_j = -1/2 a_j e d d^T

``tests/test_gaussian.py`` checks values and gradients against a dense brute-force evaluation.

On the CPU the numba kernels of :mod:`._splat_numba` compute the same sums (to float rounding),
with the acquisition operators' rule (:mod:`slice2vol.core.fused`): numba is a wheel, so nothing
needs a compiler on the user's machine; they are compiled at first use and cached on disk;
``SLICE2VOL_NO_NUMBA=1`` (or ``SLICE2VOL_NO_EXTENSIONS=1``), or numba missing, runs the PyTorch
path above instead.  ``benchmarks/bench_splat.py`` (sizes and box radii of the default STA29 run,
2 threads, best of 7) measured them on the renderers' 3-sigma ellipsoids at 4.8x the PyTorch path on
the voxel grid and 6.0x on the slice planes; against the whole box (2.6x and 3.1x, what they
evaluated before) the ellipsoid takes the voxel grid's forward from 349 to 176 ms and its
backward from 203 to 147 ms, the slice planes' from 186 / 149 to 148 / 114 ms (single runs move
by 20-30 % on this shared machine), with float32's ``exp`` evaluated inline
(``_splat_numba._exp_neg``): PyPI's llvmlite has no SVML, and with the libm call they were only
1.5x and 2.8x.  They replace
a C++ kernel that ``torch.utils.cpp_extension`` built at first use, which needed a compiler and
the Python headers on the user's machine and took about 40 s to build; on small boxes
(60,000 Gaussians, half-widths 1-3) the numba kernels were as fast or faster than it (forward 92
vs 150 ms, backward 51 vs 59 ms).  The test suite checks that the two paths agree.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["splat", "splat_l1", "compiled_kernels", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 1 << 21  # lattice evaluations per chunk (tens of MB of temporaries)


def _quadratic(di: Tensor, dj: Tensor, dk: Tensor, p: Tensor) -> Tensor:
    """``q = d^T P d`` over a box, ``(J, n, n, m)``, from the per-axis offsets ``di, dj (J, n)``,
    ``dk (J, m)`` and ``P (J, 3, 3)``, as three two-axis terms broadcast to the box."""
    x_ij = (p[:, 0, 0, None, None] * (di * di)[:, :, None] + p[:, 1, 1, None, None] * (dj * dj)[:, None, :]
            + 2 * p[:, 0, 1, None, None] * di[:, :, None] * dj[:, None, :])  # (J, n, n)
    y_ik = 2 * p[:, 0, 2, None, None] * di[:, :, None] * dk[:, None, :] + p[:, 2, 2, None, None] * (dk * dk)[:, None, :]
    z_jk = 2 * p[:, 1, 2, None, None] * dj[:, :, None] * dk[:, None, :]  # (J, n, m)
    return x_ij[..., None] + y_ik[:, :, None, :] + z_jk[:, None, :, :]


def _box(centre: Tensor, prec: Tensor, base: Tensor, strides: Tensor, r: int, dims: int, cut: float = math.inf):
    """Box of a chunk: ``e (J, n, n, m)`` exponentials (0 where ``q > cut``, ``q`` evaluated in
    float64), ``flat (J, n, n, m)`` indices, and the per-axis offsets ``d (J, 3, n)`` (axis 2 has
    one entry when ``dims == 2``)."""
    o = torch.arange(-r, r + 1, device=centre.device, dtype=centre.dtype)
    f = centre - torch.round(centre.detach())
    di = o[None] - f[:, 0:1]  # (J, n)
    dj = o[None] - f[:, 1:2]
    dk = (o[None] - f[:, 2:3]) if dims == 3 else -centre[:, 2:3]  # (J, m); 2D: the plane at w = 0
    e = torch.exp(_quadratic(di, dj, dk, prec).mul_(-0.5))
    if cut < math.inf:  # the ellipsoid: the support is decided in float64, as the numba kernels do
        q64 = _quadratic(di.detach().double(), dj.detach().double(), dk.detach().double(), prec.detach().double())
        e = torch.where(q64 <= cut, e, torch.zeros((), dtype=e.dtype, device=e.device))
    oi = torch.arange(-r, r + 1, device=centre.device)
    ok = oi if dims == 3 else oi[:1] * 0
    flat = (base[:, None, None, None] + (oi[None] * strides[:, 0:1])[:, :, None, None]
            + (oi[None] * strides[:, 1:2])[:, None, :, None] + (ok[None] * strides[:, 2:3])[:, None, None, :])
    return e, flat, di, dj, dk


class _Splat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, centre, prec, amp, base, strides, size, r, dims, chunk, cut):
        out = torch.zeros(size, dtype=centre.dtype, device=centre.device)
        n = 2 * r + 1
        step = max(1, chunk // (n * n * (n if dims == 3 else 1)))
        for s in range(0, centre.shape[0], step):
            sl = slice(s, s + step)
            e, flat, *_ = _box(centre[sl], prec[sl], base[sl], strides[sl], r, dims, cut)
            out.index_add_(0, flat.reshape(-1), e.mul_(amp[sl, None, None, None]).reshape(-1))
        ctx.save_for_backward(centre, prec, amp, base, strides)
        ctx.meta = (r, dims, chunk, cut)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        centre, prec, amp, base, strides = ctx.saved_tensors
        r, dims, chunk, cut = ctx.meta
        g_c, g_p, g_a = torch.zeros_like(centre), torch.zeros_like(prec), torch.zeros_like(amp)
        n = 2 * r + 1
        step = max(1, chunk // (n * n * (n if dims == 3 else 1)))
        for s in range(0, centre.shape[0], step):
            sl = slice(s, s + step)
            e, flat, di, dj, dk = _box(centre[sl], prec[sl], base[sl], strides[sl], r, dims, cut)
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
        return g_c, g_p, g_a, None, None, None, None, None, None, None


_NB: object | None = None  # the kernel module once imported, False when the import failed


def compiled_kernels():
    """The numba splat kernels (:mod:`._splat_numba`), or ``None`` when the fused CPU path is
    unavailable or switched off (``SLICE2VOL_NO_NUMBA=1`` / ``SLICE2VOL_NO_EXTENSIONS=1``, see
    :func:`slice2vol.core.fused.available`): then the PyTorch path runs."""
    global _NB
    from slice2vol.core import fused

    if not fused.available():
        return None
    if _NB is None:
        try:
            from slice2vol.methods.gaussian import _splat_numba

            _NB = _splat_numba
        except Exception as exc:  # a broken numba install: the PyTorch path is always there
            log.warning("gaussian: compiled splat kernels unavailable (%s); using the slower PyTorch path",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _NB = False
    return _NB or None


def _threads(n_gaussians: int) -> int:
    """Blocks of Gaussians (one private output copy each) of a forward call: torch's thread count
    within numba's pool, and at least 256 Gaussians a block (a copy costs more than it saves)."""
    import numba

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    return max(1, min(n, (n_gaussians + 255) // 256))


class _SplatNumba(torch.autograd.Function):
    @staticmethod
    def forward(ctx, centre, prec, amp, base, strides, radius, size, dims, cut):
        from slice2vol.core import fused

        k = compiled_kernels()
        args = tuple(t.detach().contiguous() for t in (centre, prec, amp, base, strides, radius))
        ctx.save_for_backward(*args)
        ctx.dims, ctx.cut = dims, cut
        out = torch.zeros(size, dtype=centre.dtype)
        priv = np.zeros((_threads(centre.shape[0]) - 1, size), dtype=out.numpy().dtype)
        fused._launch(k.splat_forward_kernel, *(a.numpy() for a in args), dims, float(cut), out.numpy(), priv)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from slice2vol.core import fused

        c, p, a, base, st, rad = ctx.saved_tensors
        gc, gp, ga = torch.empty_like(c), torch.empty_like(p), torch.empty_like(a)
        g = grad_out.detach().to(c.dtype).contiguous()
        fused._launch(compiled_kernels().splat_backward_kernel, g.numpy(), c.numpy(), p.numpy(), a.numpy(),
                      base.numpy(), st.numpy(), rad.numpy(), ctx.dims, float(ctx.cut), gc.numpy(), gp.numpy(),
                      ga.numpy())
        return gc, gp, ga, None, None, None, None, None, None


class _SplatL1(torch.autograd.Function):
    """The weighted L1 loss of a splat against a target, its gradient computed with it: the loss is
    a scalar, so the splat's backward can run in the forward call, on the loss's own gradient, and
    no lattice-sized tensor passes through autograd (the voxel-grid fit's per-step cost was as much
    in the autograd engine, fresh lattice-sized allocations and their page faults as in the kernels)."""

    @staticmethod
    def forward(ctx, centre, prec, amp, base, strides, radius, target, weight, dims, cut, scratch):
        from slice2vol.core import fused

        k = compiled_kernels()
        c, p, a, b, st, rad = (t.detach().contiguous().numpy() for t in (centre, prec, amp, base, strides, radius))
        size = target.shape[0]
        T = _threads(c.shape[0])
        buf = scratch.get("buf") if scratch is not None else None
        if buf is None or buf.shape != (T, size) or buf.dtype != c.dtype:
            buf = np.empty((T, size), dtype=c.dtype)  # row 0: the output, then the gradient; others: threads' copies
            if scratch is not None:
                scratch["buf"] = buf
        loss = fused._launch(k.splat_l1_kernel, c, p, a, b, st, rad, dims, float(cut), target, weight, buf[0], buf[1:])
        gc, gp, ga = np.empty_like(c), np.empty_like(p), np.empty_like(a)
        fused._launch(k.splat_backward_kernel, buf[0], c, p, a, b, st, rad, dims, float(cut), gc, gp, ga)
        ctx.save_for_backward(torch.from_numpy(gc), torch.from_numpy(gp), torch.from_numpy(ga))
        return torch.tensor(loss, dtype=centre.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        gc, gp, ga = ctx.saved_tensors
        return gc * grad_loss, gp * grad_loss, ga * grad_loss, None, None, None, None, None, None, None, None


def splat_l1(centre: Tensor, prec: Tensor, amp: Tensor, radius: Tensor, base: Tensor, strides: Tensor,
             target: Tensor, weight: Tensor, dims: int = 3, cut: float = math.inf, use_extension: bool = True,
             scratch: dict | None = None) -> Tensor:
    """``sum_i weight_i |splat(...)_i - target_i|``: a splat's weighted L1 distance to a target on
    the same (padded) lattice, differentiable in ``centre``, ``prec``, ``amp`` (arguments as
    :func:`splat`; ``target``, ``weight (size,)``, zero weight on the padding).

    The numba path computes the splat, the loss and the gradients in two kernel calls
    (:class:`_SplatL1`); its gradients are those of the PyTorch expression, bitwise where the loss
    has the form ``|v - t| * m / n``: ``sign(v - t) * w``.  ``scratch``: a dict the caller keeps
    between calls, so the lattice-sized buffers are reused.  The loss itself is summed in float64
    (the PyTorch path: in the input dtype)."""
    if (use_extension and centre.device.type == "cpu" and centre.dtype in (torch.float32, torch.float64)
            and compiled_kernels() is not None and centre.shape[0] > 0):
        t = target.detach().to(centre.dtype).contiguous().numpy()
        w = weight.detach().to(centre.dtype).contiguous().numpy()
        return _SplatL1.apply(centre, prec, amp, base.long(), strides.long(), radius.long(), t, w, dims, cut,
                              scratch)
    v = splat(centre, prec, amp, radius, base, strides, target.shape[0], dims=dims, use_extension=False, cut=cut)
    return ((v - target).abs() * weight).sum()


def splat(centre: Tensor, prec: Tensor, amp: Tensor, radius: Tensor, base: Tensor, strides: Tensor, size: int,
          dims: int = 3, chunk: int = DEFAULT_CHUNK, use_extension: bool = True, cut: float = math.inf) -> Tensor:
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
        use_extension: use the compiled (numba) CPU kernels when available (same result).
        cut: only the box's points with ``q = d^T P d <= cut`` count (the ellipsoid of Mahalanobis
            radius ``sqrt(cut)``, decided in float64 by both paths); ``inf``: the whole box.
    Returns:
        ``(size,)`` tensor.
    """
    if centre.shape[0] == 0:
        return torch.zeros(size, dtype=centre.dtype, device=centre.device) + 0 * amp.sum()
    if (use_extension and centre.device.type == "cpu" and centre.dtype in (torch.float32, torch.float64)
            and compiled_kernels() is not None):
        return _SplatNumba.apply(centre, prec, amp, base.long(), strides.long(), radius.long(), size, dims, cut)
    out = torch.zeros(size, dtype=centre.dtype, device=centre.device)
    for r in torch.unique(radius).tolist():
        idx = torch.nonzero(radius == r, as_tuple=False).squeeze(1)
        out = out + _Splat.apply(centre[idx], prec[idx], amp[idx], base[idx], strides[idx], size, int(r), dims, chunk,
                                 cut)
    return out
