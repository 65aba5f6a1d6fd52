"""numba kernels of the truncated-Gaussian splat (imported lazily by :mod:`.splat`).

The same sums and gradients as the PyTorch path of :mod:`.splat` (the mathematics is written
there): one Gaussian's box per loop iteration, each box visited once by the forward and once by
the backward pass in the same point order, so both read the same lattice points.

Forward: the Gaussians are cut into one contiguous block per thread, each thread adds into its
own copy of the output and the copies are summed in thread order afterwards.  No atomics, and
for a given thread count the sums are the same on every run (the block boundaries are fixed).
The copies cost ``threads x size`` floats.  Backward: one Gaussian per iteration, no shared
writes, float64 moments.

Compiled by numba at first use and cached on disk beside this module (``cache=True``), as the
acquisition kernels (:mod:`slice2vol.core._fused_numba`); a wheel, no C++ compiler.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange, types
from numba.extending import overload

from slice2vol.core._fused_numba import _real

# as the acquisition kernels: contraction and reassociation of a point's quadratic form are fine,
# NaN/inf semantics are kept.  Offsets, quadratic forms and exponentials are computed in the
# input's dtype (``_real``; float32 like the C++ kernel this replaces, so the loop vectorises),
# the backward moments in float64.
_JIT = dict(cache=True, fastmath={"contract", "afn", "reassoc", "nsz", "arcp"}, error_model="numpy")


def _exp_neg(x, arr):
    """``exp(x)`` for ``x <= 0`` in the precision of ``arr``'s dtype (see the overload)."""
    raise NotImplementedError  # only called from jitted code


@overload(_exp_neg, inline="always")
def _exp_neg_overload(x, arr):
    """float64 data: ``math.exp``.  float32 data: no libm call (PyPI's numba has no vectorised
    ``exp``, and the scalar call was most of the kernels' time): float64 ``exp(x / 128)`` by its
    Taylor series to degree 10 (``|x / 128| <= 0.69`` with ``x`` clamped at -88: truncation below
    1e-9), squared 7 times (relative error ~1e-7, float32's own rounding), returned as float32;
    ``x < -88`` gives ``exp(-88)`` ~ 6e-39 instead of 0.  ``bench_splat.py``: 1.8-4x faster."""
    if arr.dtype == types.float64:
        return lambda x, arr: math.exp(x)

    def fast(x, arr):
        z = max(np.float64(x), -88.0) * (1.0 / 128.0)
        p = 1.0 + z * (1.0 + z * (0.5 + z * (1.0 / 6 + z * (1.0 / 24 + z * (1.0 / 120 + z * (1.0 / 720 + z * (
            1.0 / 5040 + z * (1.0 / 40320 + z * (1.0 / 362880 + z * (1.0 / 3628800))))))))))
        for _ in range(7):
            p = p * p
        return np.float32(p)

    return fast


@nb.njit(inline="always")
def _frac(c, j, dims):
    """Fractional centre offsets ``(f0, f1, f2)`` of Gaussian ``j`` (2D: ``f2`` is the plane distance)."""
    f0 = c[j, 0] - np.rint(c[j, 0])
    f1 = c[j, 1] - np.rint(c[j, 1])
    f2 = c[j, 2] - np.rint(c[j, 2]) if dims == 3 else c[j, 2]
    return f0, f1, f2


@nb.njit(inline="always")
def _q_at(qab, lin, prr, o, fr, c):
    """float64 ``q`` of the row point at offset ``o`` (``d = o - fr`` rounded in ``c``'s dtype)."""
    d = np.float64(_real(o, c) - fr)
    return qab + lin * d + prr * d * d


@nb.njit(inline="always")
def _row_range(qab, lin, prr, fr, o_lo, o_hi, cut, c):
    """Offsets ``lo..hi`` (inclusive, empty when ``lo > hi``) of a box row within ``o_lo..o_hi``
    whose points are inside the ellipsoid, ``q = qab + lin d + prr d^2 <= cut`` in float64 (the
    row's fixed axes' terms ``qab``, ``lin`` are float64 too).  The quadratic's roots give the
    range, and the end points are then settled by the test itself, so the support is exactly the
    points that pass it (what the PyTorch path masks), whatever the roots' rounding."""
    if not (cut < np.inf) or not (prr > 0.0):
        return o_lo, o_hi
    disc = lin * lin - 4.0 * prr * (qab - cut)
    if disc < 0.0:
        return o_hi + 1, o_hi
    s = math.sqrt(disc)
    f = np.float64(fr)
    x_lo = (-lin - s) / (2.0 * prr) + f
    x_hi = (-lin + s) / (2.0 * prr) + f
    lo = o_lo if x_lo <= o_lo else (o_hi + 1 if x_lo > o_hi else int(math.ceil(x_lo)))
    hi = o_hi if x_hi >= o_hi else (o_lo - 1 if x_hi < o_lo else int(math.floor(x_hi)))
    while lo <= hi and _q_at(qab, lin, prr, lo, fr, c) > cut:
        lo += 1
    while lo > o_lo and _q_at(qab, lin, prr, lo - 1, fr, c) <= cut:
        lo -= 1
    while hi >= lo and _q_at(qab, lin, prr, hi, fr, c) > cut:
        hi -= 1
    while hi < o_hi and _q_at(qab, lin, prr, hi + 1, fr, c) <= cut:
        hi += 1
    return lo, hi


@nb.njit(inline="always")
def _fixed_terms(paa, pbb, pab, par, pbr, da, db):
    """float64 ``q`` terms of a row's fixed offsets: ``d_a^T P d_a``-part and the linear coefficient."""
    Da, Db = np.float64(da), np.float64(db)
    qab = np.float64(paa) * Da * Da + np.float64(pbb) * Db * Db + 2.0 * np.float64(pab) * Da * Db
    return qab, 2.0 * (np.float64(par) * Da + np.float64(pbr) * Db)


@nb.njit(inline="always")
def _row(Paa, Pbb, Prr, Pab, Par, Pbr, da, db, fr, r, cut, c):
    """One row of a box at fixed offsets ``da, db``: its support ``lo..hi`` (:func:`_row_range`) and
    the row's constant quadratic term and linear coefficient in ``c``'s dtype (for the values)."""
    q64, lin64 = _fixed_terms(Paa, Pbb, Pab, Par, Pbr, da, db)
    lo, hi = _row_range(q64, lin64, np.float64(Prr), fr, -r, r, cut, c)
    two = _real(2.0, c)
    return lo, hi, Paa * da * da + Pbb * db * db + two * Pab * da * db, two * (Par * da + Pbr * db)


@nb.njit(inline="always")
def _box_axes(c, p, st, j, dims):
    """Gaussian ``j``'s box as two fixed axes ``a, b`` and a row axis (the backward's order too):
    3D ``(i, j, k)``; 2D ``(i, k, j)``, ``b`` the single plane (``o_k = 0``, ``d_k = -c_k``), so a
    row always runs along a lattice axis with ``2 r + 1`` points.  Returns the half-width of ``b``,
    the fractional offsets, the precision entries and the strides in that order."""
    f0, f1, f2 = _frac(c, j, dims)
    P00, P01, P02, P11, P12, P22 = p[j, 0, 0], p[j, 0, 1], p[j, 0, 2], p[j, 1, 1], p[j, 1, 2], p[j, 2, 2]
    if dims == 3:
        return (1, f0, f1, f2, P00, P11, P22, P01, P02, P12, st[j, 0], st[j, 1], st[j, 2])
    return (0, f0, f2, f1, P00, P22, P11, P02, P01, P12, st[j, 0], st[j, 2], st[j, 1])


@nb.njit(inline="always")
def _add_box(c, p, a, base, st, rad, j, dims, cut, out):
    r = rad[j]
    has_b, fa, fb, fr, Paa, Pbb, Prr, Pab, Par, Pbr, st_a, st_b, st_r = _box_axes(c, p, st, j, dims)
    rb = r * has_b
    aj = a[j]
    mhalf = _real(-0.5, c)
    b0 = base[j]
    for oa in range(-r, r + 1):
        da = _real(oa, c) - fa
        for ob in range(-rb, rb + 1):
            db = _real(ob, c) - fb
            lo, hi, qab, lin = _row(Paa, Pbb, Prr, Pab, Par, Pbr, da, db, fr, r, cut, c)
            idx = b0 + oa * st_a + ob * st_b
            for orow in range(lo, hi + 1):
                dr = _real(orow, c) - fr
                out[idx + orow * st_r] += aj * _exp_neg(mhalf * (qab + Prr * dr * dr + lin * dr), c)


@nb.njit(inline="always")
def _add_block(c, p, a, base, st, rad, dims, cut, dst, t, T):
    """Thread block ``t`` of ``T``: the Gaussians ``t * per .. (t + 1) * per`` added into ``dst``."""
    J = c.shape[0]
    per = (J + T - 1) // T
    for j in range(t * per, min(J, (t + 1) * per)):
        _add_box(c, p, a, base, st, rad, j, dims, cut, dst)


@nb.njit(parallel=True, **_JIT)
def splat_forward_kernel(c, p, a, base, st, rad, dims, cut, out, priv):
    """``out (size,) += sum_j a_j exp(-q_j / 2)`` over every Gaussian's box, at the points with
    ``q_j <= cut`` (``inf``: the whole box).

    ``c (J, 3)``, ``p (J, 3, 3)``, ``a (J,)`` in the output dtype; ``base (J,)``, ``st (J, 3)``,
    ``rad (J,)`` int64; ``priv (T - 1, size)`` zeroed scratch of the other ``T - 1`` threads
    (``T = priv.shape[0] + 1`` blocks of Gaussians; thread 0 writes ``out`` directly)."""
    T = priv.shape[0] + 1
    for t in prange(T):
        _add_block(c, p, a, base, st, rad, dims, cut, out if t == 0 else priv[t - 1], t, T)
    size = out.shape[0]
    if T > 1:
        for i in prange(size):
            acc = out[i]
            for t in range(T - 1):
                acc += priv[t, i]
            out[i] = acc


@nb.njit(parallel=True, **_JIT)
def splat_l1_kernel(c, p, a, base, st, rad, dims, cut, target, weight, out, priv):
    """The forward splat and a weighted L1 loss in one call: returns ``sum_i w_i |v_i - t_i|``
    (float64) for ``v`` the splat (:func:`splat_forward_kernel`, same sums in the same order) and
    leaves the loss's gradient ``w_i sign(v_i - t_i)`` in ``out``, ready for
    :func:`splat_backward_kernel`.  ``target``, ``weight``, ``out (size,)``; ``out`` and ``priv``
    are scratch of any content (zeroed here, in parallel)."""
    T = priv.shape[0] + 1
    size = out.shape[0]
    for i in prange(size):
        out[i] = 0
        for t in range(T - 1):
            priv[t, i] = 0
    for t in prange(T):
        _add_block(c, p, a, base, st, rad, dims, cut, out if t == 0 else priv[t - 1], t, T)
    loss = 0.0
    for i in prange(size):
        v = out[i]
        for t in range(T - 1):
            v += priv[t, i]
        d = v - target[i]
        w = weight[i]
        loss += np.float64(w) * abs(np.float64(d))
        out[i] = w * np.sign(d)
    return loss


@nb.njit(parallel=True, **_JIT)
def splat_backward_kernel(g, c, p, a, base, st, rad, dims, cut, gc, gp, ga):
    """Gradients of ``sum_i g_i out_i`` with respect to ``c``, ``p``, ``a`` (``(J, 3)``,
    ``(J, 3, 3)``, ``(J,)``, written, not accumulated): ``ga_j = sum e g``,
    ``gc_j = a_j P_j sum e g d`` and ``gp_j = -1/2 a_j sum e g d d^T`` over the forward's support
    (the box's points with ``q <= cut``).

    The ten moments are separable along the box's last axis (``k`` in 3D; ``j`` on the single plane
    of a 2D lattice): the inner loop accumulates only ``sum w``, ``sum w d_last`` and
    ``sum w d_last^2`` of its row (in the input dtype, so it vectorises; at most ``2 r + 1``
    terms), and each row's sums enter the float64 moments with the row's constant offsets.  One
    loop for both lattices, over fixed axes ``a, b`` and the row axis: ``(i, j, k)`` in 3D,
    ``(i, k, j)`` in 2D with ``b`` the plane (one offset); the moments are mapped back to
    ``(i, j, k)`` after it."""
    J = c.shape[0]
    for j in prange(J):
        r = rad[j]
        has_b, fa, fb, fr, Paa, Pbb, Prr, Pab, Par, Pbr, st_a, st_b, st_r = _box_axes(c, p, st, j, dims)
        rb = r * has_b
        mhalf = _real(-0.5, c)
        zero = _real(0.0, c)
        b0 = base[j]
        sa = 0.0  # sum e g, then its products with d_a, d_b, d_r (m*) and with their pairs (s**)
        ma = 0.0
        mb = 0.0
        mr = 0.0
        saa = 0.0
        sbb = 0.0
        srr = 0.0
        sab = 0.0
        sar = 0.0
        sbr = 0.0
        for oa in range(-r, r + 1):
            da = _real(oa, c) - fa
            for ob in range(-rb, rb + 1):
                db = _real(ob, c) - fb
                lo, hi, qab, lin = _row(Paa, Pbb, Prr, Pab, Par, Pbr, da, db, fr, r, cut, c)
                if lo > hi:
                    continue
                idx = b0 + oa * st_a + ob * st_b
                r0, r1, r2 = zero, zero, zero
                for orow in range(lo, hi + 1):
                    dr = _real(orow, c) - fr
                    ge = g[idx + orow * st_r] * _exp_neg(mhalf * (qab + Prr * dr * dr + lin * dr), c)
                    r0 += ge
                    r1 += ge * dr
                    r2 += ge * dr * dr
                R0, R1, R2 = np.float64(r0), np.float64(r1), np.float64(r2)
                Fa, Fb = np.float64(da), np.float64(db)
                sa += R0
                ma += Fa * R0
                mb += Fb * R0
                mr += R1
                saa += Fa * Fa * R0
                sbb += Fb * Fb * R0
                srr += R2
                sab += Fa * Fb * R0
                sar += Fa * R1
                sbr += Fb * R1
        # back to (i, j, k): a = i in both; 2D swaps b and the row (k, j)
        m0, s00, s12 = ma, saa, sbr
        if dims == 3:
            m1, m2, s11, s22, s01, s02 = mb, mr, sbb, srr, sab, sar
        else:
            m1, m2, s11, s22, s01, s02 = mr, mb, srr, sbb, sar, sab
        aj = np.float64(a[j])
        ga[j] = sa
        m0 *= aj
        m1 *= aj
        m2 *= aj
        # d = o - f, so d d / d c = -I (also for the 2D plane offset d_k = -c_k)
        gc[j, 0] = p[j, 0, 0] * m0 + p[j, 0, 1] * m1 + p[j, 0, 2] * m2
        gc[j, 1] = p[j, 1, 0] * m0 + p[j, 1, 1] * m1 + p[j, 1, 2] * m2
        gc[j, 2] = p[j, 2, 0] * m0 + p[j, 2, 1] * m1 + p[j, 2, 2] * m2
        h = -0.5 * aj
        gp[j, 0, 0] = h * s00
        gp[j, 0, 1] = h * s01
        gp[j, 0, 2] = h * s02
        gp[j, 1, 0] = h * s01
        gp[j, 1, 1] = h * s11
        gp[j, 1, 2] = h * s12
        gp[j, 2, 0] = h * s02
        gp[j, 2, 1] = h * s12
        gp[j, 2, 2] = h * s22


# ------------------------------------------------------------------ analytic renderer: slice-Gaussian pairs


@nb.njit(inline="always")
def _pair_c(R, cov, sig, b, j, C):
    """``C = R_b^T Sigma_j R_b + diag(sig_b^2)`` (slice frame, mm^2) into ``C (3, 3)`` float64;
    returns its determinant."""
    for i in range(3):
        for k in range(i, 3):
            s = 0.0
            for a in range(3):
                t = 0.0
                for c in range(3):
                    t += np.float64(cov[j, a, c]) * np.float64(R[b, c, k])
                s += np.float64(R[b, a, i]) * t
            C[i, k] = s
            C[k, i] = s
    for i in range(3):
        C[i, i] += np.float64(sig[b, i]) * np.float64(sig[b, i])
    return (C[0, 0] * (C[1, 1] * C[2, 2] - C[1, 2] * C[2, 1]) - C[0, 1] * (C[1, 0] * C[2, 2] - C[1, 2] * C[2, 0])
            + C[0, 2] * (C[1, 0] * C[2, 1] - C[1, 1] * C[2, 0]))


@nb.njit(inline="always")
def _pair_cinv(C, det, Ci):
    """``Ci = C^-1`` (symmetric ``C``) by its adjugate, float64."""
    inv = 1.0 / det
    Ci[0, 0] = (C[1, 1] * C[2, 2] - C[1, 2] * C[2, 1]) * inv
    Ci[0, 1] = (C[0, 2] * C[2, 1] - C[0, 1] * C[2, 2]) * inv
    Ci[0, 2] = (C[0, 1] * C[1, 2] - C[0, 2] * C[1, 1]) * inv
    Ci[1, 1] = (C[0, 0] * C[2, 2] - C[0, 2] * C[2, 0]) * inv
    Ci[1, 2] = (C[0, 2] * C[1, 0] - C[0, 0] * C[1, 2]) * inv
    Ci[2, 2] = (C[0, 0] * C[1, 1] - C[0, 1] * C[1, 0]) * inv
    Ci[1, 0] = Ci[0, 1]
    Ci[2, 0] = Ci[0, 2]
    Ci[2, 1] = Ci[1, 2]


@nb.njit(inline="always")
def _pair_setup(R, cov, sig, b_idx, j_idx, q, C, Ci):
    """Pair ``q``'s slice ``b``, Gaussian ``j``, ``C`` and ``Ci = C^-1`` (into the scratch
    ``C, Ci (3, 3)``) and ``det C``; ``Ci = 0`` when ``det C <= 0`` (the pair then has no
    amplitude and no gradient)."""
    b = b_idx[q]
    j = j_idx[q]
    det = _pair_c(R, cov, sig, b, j, C)
    if det > 0.0:
        _pair_cinv(C, det, Ci)
    else:
        Ci[:, :] = 0.0
    return b, j, det


_PAIR_CHUNK = 1024  # pairs per parallel chunk: the 3x3 scratch is allocated once a chunk, not once a pair


@nb.njit(parallel=True, **_JIT)
def pairs_forward_kernel(R, tr, mu, cov, s3, inten, b_idx, j_idx, sig, D, half, hw, truncate, max_rad,
                         centre, prec, amp, rad, inside):
    """The analytic renderer's per-pair algebra (:func:`..render.render_slices`), pair ``q`` of
    slice ``b = b_idx[q]`` and Gaussian ``j = j_idx[q]``: the Gaussian's mean in the slice frame
    ``m = R_b^T (mu_j - t_b)``, its PSF-convolved covariance ``C = R_b^T Sigma_j R_b + diag(sig_b^2)``,
    and written out: ``centre (Q, 3)`` (lattice units ``m_a / D_a + half_a``, and ``m_w`` mm),
    ``prec (Q, 3, 3) = D C^-1 D``, ``amp (Q,) = inten_j s3_j / sqrt(det C)`` (``s3 = prod
    scales``), the box half-width ``rad (Q,)`` and whether the box meets the slice, ``inside (Q,)``.
    Float64 inside, written in the outputs' dtype."""
    Q = b_idx.shape[0]
    for ch in prange((Q + _PAIR_CHUNK - 1) // _PAIR_CHUNK):
        C = np.empty((3, 3))
        Ci = np.empty((3, 3))
        for q in range(ch * _PAIR_CHUNK, min(Q, (ch + 1) * _PAIR_CHUNK)):
            b, j, det = _pair_setup(R, cov, sig, b_idx, j_idx, q, C, Ci)
            for i in range(3):
                m = 0.0
                for a in range(3):
                    m += np.float64(R[b, a, i]) * (np.float64(mu[j, a]) - np.float64(tr[b, a]))
                centre[q, i] = m / np.float64(D[b, i]) + (np.float64(half[b, i]) if i < 2 else 0.0)
                for k in range(3):
                    prec[q, i, k] = np.float64(D[b, i]) * Ci[i, k] * np.float64(D[b, k])
            amp[q] = np.float64(inten[j]) * np.float64(s3[j]) / math.sqrt(det) if det > 0.0 else 0.0
            r = math.ceil(truncate * max(math.sqrt(C[0, 0]) / np.float64(D[b, 0]), math.sqrt(C[1, 1]) / np.float64(D[b, 1])))
            r = min(max(r, 1.0), np.float64(max_rad))
            rad[q] = np.int64(r)
            c0 = np.float64(centre[q, 0])
            c1 = np.float64(centre[q, 1])
            inside[q] = (c0 >= -r) and (c0 <= hw[b, 0] - 1 + r) and (c1 >= -r) and (c1 <= hw[b, 1] - 1 + r)


@nb.njit(parallel=True, **_JIT)
def pairs_backward_kernel(R, tr, mu, cov, s3, inten, b_idx, j_idx, sig, D, g_centre, g_prec, g_amp,
                          gR, gt, gmu, gcov, gs3, ginten, scratch):
    """Gradients of :func:`pairs_forward_kernel`'s ``centre``, ``prec``, ``amp`` (given per pair,
    ``g_*``) with respect to ``R (B, 3, 3)``, ``tr (B, 3)``, ``mu (J, 3)``, ``cov (J, 3, 3)``,
    ``s3 (J,)``, ``inten (J,)``, written (not accumulated) into ``g*`` (same shapes).

    Per pair, with ``G = D g_prec D`` and ``g_m = g_centre / D``: ``g_C = -C^-1 G C^-1 -
    g_amp amp C^-1 / 2`` (``d det^-1/2 = -det^-1/2 C^-1 dC / 2``), ``g_Sigma = R g_C R^T``,
    ``g_R = Sigma R (g_C + g_C^T) + (mu - t) g_m^T``, ``g_mu = -g_t = R g_m``.  The pairs' terms
    go into ``scratch (Q, 23)`` (float64) in parallel, then are summed per slice and per Gaussian in pair
    order (deterministic)."""
    Q = b_idx.shape[0]
    for ch in prange((Q + _PAIR_CHUNK - 1) // _PAIR_CHUNK):
        C = np.empty((3, 3))
        Ci = np.empty((3, 3))
        G = np.empty((3, 3))
        T = np.empty((3, 3))
        gC = np.empty((3, 3))
        for q in range(ch * _PAIR_CHUNK, min(Q, (ch + 1) * _PAIR_CHUNK)):
            b, j, det = _pair_setup(R, cov, sig, b_idx, j_idx, q, C, Ci)
            if not (det > 0.0):
                for k in range(23):
                    scratch[q, k] = 0.0
                continue
            sq = 1.0 / math.sqrt(det)
            a_q = np.float64(inten[j]) * np.float64(s3[j]) * sq
            ga = np.float64(g_amp[q])
            for i in range(3):
                for k in range(3):
                    G[i, k] = np.float64(D[b, i]) * np.float64(g_prec[q, i, k]) * np.float64(D[b, k])
            for i in range(3):  # T = G C^-1
                for k in range(3):
                    T[i, k] = G[i, 0] * Ci[0, k] + G[i, 1] * Ci[1, k] + G[i, 2] * Ci[2, k]
            for i in range(3):
                for k in range(3):
                    gC[i, k] = -(Ci[i, 0] * T[0, k] + Ci[i, 1] * T[1, k] + Ci[i, 2] * T[2, k]) - 0.5 * ga * a_q * Ci[i, k]
            # g_Sigma = R gC R^T
            for a in range(3):
                for c in range(3):
                    s = 0.0
                    for i in range(3):
                        for k in range(3):
                            s += np.float64(R[b, a, i]) * gC[i, k] * np.float64(R[b, c, k])
                    scratch[q, 3 * a + c] = s
            # g_R = Sigma R (gC + gC^T) + d g_m^T
            for a in range(3):  # T = Sigma R
                for k in range(3):
                    T[a, k] = (np.float64(cov[j, a, 0]) * np.float64(R[b, 0, k]) + np.float64(cov[j, a, 1]) * np.float64(R[b, 1, k])
                               + np.float64(cov[j, a, 2]) * np.float64(R[b, 2, k]))
            gm0 = np.float64(g_centre[q, 0]) / np.float64(D[b, 0])
            gm1 = np.float64(g_centre[q, 1]) / np.float64(D[b, 1])
            gm2 = np.float64(g_centre[q, 2]) / np.float64(D[b, 2])
            for a in range(3):
                d_a = np.float64(mu[j, a]) - np.float64(tr[b, a])
                for i in range(3):
                    s = 0.0
                    for k in range(3):
                        s += T[a, k] * (gC[k, i] + gC[i, k])
                    gmi = gm0 if i == 0 else (gm1 if i == 1 else gm2)
                    scratch[q, 9 + 3 * a + i] = s + d_a * gmi
                scratch[q, 18 + a] = np.float64(R[b, a, 0]) * gm0 + np.float64(R[b, a, 1]) * gm1 + np.float64(R[b, a, 2]) * gm2
            scratch[q, 21] = ga * np.float64(inten[j]) * sq  # g s3
            scratch[q, 22] = ga * np.float64(s3[j]) * sq  # g inten
    gR[:] = 0
    gt[:] = 0
    gmu[:] = 0
    gcov[:] = 0
    gs3[:] = 0
    ginten[:] = 0
    for q in range(Q):  # in pair order: the same sums on every run
        b = b_idx[q]
        j = j_idx[q]
        for a in range(3):
            for c in range(3):
                gcov[j, a, c] += scratch[q, 3 * a + c]
                gR[b, a, c] += scratch[q, 9 + 3 * a + c]
            gmu[j, a] += scratch[q, 18 + a]
            gt[b, a] -= scratch[q, 18 + a]
        gs3[j] += scratch[q, 21]
        ginten[j] += scratch[q, 22]
