"""numba kernels of the fused acquisition operators (imported lazily by :mod:`slice2vol.core.fused`).

Every kernel works in voxel-index space ``(i, j, k)`` of a C-contiguous ``(Ni, Nj, Nk)`` volume
(``k`` fastest): a PSF node of pixel ``p`` of slice ``n`` sits at ``B_n c_p + b_n + O_nk`` where
``[B_n | b_n] = affine^-1 @ pose_n`` (``mats``, ``(M, 3, 4)``) and ``O_nk = B_n o_k`` are the PSF
offsets already turned into index space (``offs``, ``(M, K, 3)``).  Positions and sums are in
float64 whatever the volume's dtype; trilinear reads use zero padding exactly like
``grid_sample(..., padding_mode="zeros", align_corners=True)``: a corner outside the grid reads 0.

The adjoint scatters by output ownership: the volume is cut into slabs along ``i``, each slab is
written by one thread only, and inside a slab pixels are visited in their own order.  Every voxel
therefore receives its contributions in (pixel, PSF node, corner) order whatever the number of
threads or slabs: the result is bitwise reproducible and equal to a serial splat.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange, types
from numba.extending import overload

# fastmath without ``nnan``/``ninf``: LLVM may contract multiply-adds and reorder a pixel's sum over
# its PSF nodes (about 10 % faster; the order is fixed at compile time, so results stay
# reproducible), but keeps the NaN-failing range checks on positions.  Scatters into the volume
# are memory updates it cannot reorder.
_FASTMATH = {"contract", "afn", "reassoc", "nsz", "arcp"}
_JIT = dict(cache=True, fastmath=_FASTMATH, error_model="numpy")


def _real(x, arr):
    """``x`` as the element type of ``arr`` (float32 interpolation for float32 volumes)."""
    raise NotImplementedError  # only called from jitted code, see the overload


@overload(_real, inline="always")
def _real_overload(x, arr):
    if arr.dtype == types.float32:
        return lambda x, arr: np.float32(x)
    return lambda x, arr: np.float64(x)


@nb.njit(inline="always")
def _interior(bx, by, bz, ext, n, lo_i, hi_i, Nj, Nk):
    """True when every PSF node of a pixel based at ``(bx, by, bz)`` has all 8 corners with
    ``lo_i <= i < hi_i`` and inside the grid in ``j``, ``k`` (``ext (M, 6)``: per-slice min/max of
    the index-space offsets); then the kernels skip every per-corner test."""
    return (bx + ext[n, 0] >= lo_i and bx + ext[n, 3] < hi_i - 1 and by + ext[n, 1] >= 0.0
            and by + ext[n, 4] < Nj - 1 and bz + ext[n, 2] >= 0.0 and bz + ext[n, 5] < Nk - 1)


@nb.njit(inline="always")
def _trilinear(vol, x, y, z):
    """Trilinear read of ``vol`` at index position ``(x, y, z)``, 0 outside (float64)."""
    Ni, Nj, Nk = vol.shape
    # NaN fails these comparisons, so a NaN position reads 0 instead of reaching int()
    if not (x > -1.0 and x < Ni and y > -1.0 and y < Nj and z > -1.0 and z < Nk):
        return 0.0
    fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
    i0, j0, k0 = int(fx), int(fy), int(fz)
    ax, ay, az = x - fx, y - fy, z - fz
    if i0 >= 0 and i0 + 1 < Ni and j0 >= 0 and j0 + 1 < Nj and k0 >= 0 and k0 + 1 < Nk:
        v00 = vol[i0, j0, k0] * (1.0 - az) + vol[i0, j0, k0 + 1] * az
        v01 = vol[i0, j0 + 1, k0] * (1.0 - az) + vol[i0, j0 + 1, k0 + 1] * az
        v10 = vol[i0 + 1, j0, k0] * (1.0 - az) + vol[i0 + 1, j0, k0 + 1] * az
        v11 = vol[i0 + 1, j0 + 1, k0] * (1.0 - az) + vol[i0 + 1, j0 + 1, k0 + 1] * az
        return (v00 * (1.0 - ay) + v01 * ay) * (1.0 - ax) + (v10 * (1.0 - ay) + v11 * ay) * ax
    acc = 0.0
    for di in range(2):
        i = i0 + di
        if i < 0 or i >= Ni:
            continue
        wi = ax if di else 1.0 - ax
        for dj in range(2):
            j = j0 + dj
            if j < 0 or j >= Nj:
                continue
            wj = ay if dj else 1.0 - ay
            for dk in range(2):
                k = k0 + dk
                if k < 0 or k >= Nk:
                    continue
                acc += wi * wj * (az if dk else 1.0 - az) * vol[i, j, k]
    return acc


@nb.njit(parallel=True, **_JIT)
def forward_kernel(vol, mats, offs, wts, ext, coords, sid, out):
    """``out[p] = sum_k w_nk V(B_n c_p + b_n + O_nk)`` for every pixel ``p`` (``n = sid[p]``)."""
    Ni, Nj, Nk = vol.shape
    flat = vol.ravel()
    sJ, sI = Nk, Nj * Nk
    P = coords.shape[0]
    K = wts.shape[1]
    for p in prange(P):
        n = sid[p]
        cx, cy, cz = np.float64(coords[p, 0]), np.float64(coords[p, 1]), np.float64(coords[p, 2])
        bx = mats[n, 0, 0] * cx + mats[n, 0, 1] * cy + mats[n, 0, 2] * cz + mats[n, 0, 3]
        by = mats[n, 1, 0] * cx + mats[n, 1, 1] * cy + mats[n, 1, 2] * cz + mats[n, 1, 3]
        bz = mats[n, 2, 0] * cx + mats[n, 2, 1] * cy + mats[n, 2, 2] * cz + mats[n, 2, 3]
        acc = 0.0
        if _interior(bx, by, bz, ext, n, 0, Ni, Nj, Nk):
            for k in range(K):
                x, y, z = bx + offs[n, k, 0], by + offs[n, k, 1], bz + offs[n, k, 2]
                i0, j0, k0 = int(x), int(y), int(z)  # x, y, z >= 0: truncation is floor
                ax, ay, az = _real(x - i0, flat), _real(y - j0, flat), _real(z - k0, flat)
                b = i0 * sI + j0 * sJ + k0
                c = flat[b]
                v00 = c + az * (flat[b + 1] - c)
                c = flat[b + sJ]
                v01 = c + az * (flat[b + sJ + 1] - c)
                c = flat[b + sI]
                v10 = c + az * (flat[b + sI + 1] - c)
                c = flat[b + sI + sJ]
                v11 = c + az * (flat[b + sI + sJ + 1] - c)
                v0 = v00 + ay * (v01 - v00)
                v1 = v10 + ay * (v11 - v10)
                acc += wts[n, k] * (v0 + ax * (v1 - v0))
        else:
            for k in range(K):
                w = wts[n, k]
                if w == 0.0:
                    continue
                acc += w * _trilinear(vol, bx + offs[n, k, 0], by + offs[n, k, 1], bz + offs[n, k, 2])
        out[p] = acc


@nb.njit(inline="always")
def _corner_shares(wv, ax, ay, az):
    """The 8 trilinear shares of ``wv``, ordered (di, dj, dk) = 000, 001, 010, 011, 100, ...

    The one formula both adjoint paths use, so a contribution is the same bits whichever path (and
    so whichever slab partition) handles it."""
    v1 = wv * ax
    v0 = wv - v1
    v01 = v0 * ay
    v00 = v0 - v01
    v11 = v1 * ay
    v10 = v1 - v11
    t00, t01, t10, t11 = v00 * az, v01 * az, v10 * az, v11 * az
    return v00 - t00, t00, v01 - t01, t01, v10 - t10, t10, v11 - t11, t11


@nb.njit(inline="always")
def _splat(out, x, y, z, wv, lo, hi):
    """Add ``wv`` trilinearly at ``(x, y, z)`` to the corners with ``lo <= i < hi`` (and in the grid)."""
    Ni, Nj, Nk = out.shape
    if not (x > -1.0 and x < Ni and y > -1.0 and y < Nj and z > -1.0 and z < Nk):
        return
    fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
    i0, j0, k0 = int(fx), int(fy), int(fz)
    ax, ay, az = _real(x - fx, out), _real(y - fy, out), _real(z - fz, out)
    c = _corner_shares(_real(wv, out), ax, ay, az)
    for corner in range(8):
        i, j, k = i0 + (corner >> 2), j0 + ((corner >> 1) & 1), k0 + (corner & 1)
        if lo <= i < hi and 0 <= j < Nj and 0 <= k < Nk:
            out[i, j, k] += c[corner]


@nb.njit(**_JIT)
def bin_pixels(mats, offs, wts, coords, sid, Ni, n_slabs):
    """Assign pixels to the ``i``-slabs their PSF corners touch, for :func:`adjoint_kernel`.

    Slab boundaries are chosen so every slab holds about as many pixels (balanced threads).
    Returns ``bounds (S + 1,)`` (slab ``s`` owns ``bounds[s] <= i < bounds[s + 1]``),
    ``starts (S + 1,)`` and ``order (L,)``: slab ``s`` processes pixels
    ``order[starts[s]:starts[s + 1]]``, in increasing pixel order.
    """
    P = coords.shape[0]
    M, K = wts.shape
    # i-extent of each slice's used PSF nodes
    rmin = np.zeros(M)
    rmax = np.zeros(M)
    for n in range(M):
        lo, hi = np.inf, -np.inf
        for k in range(K):
            if wts[n, k] != 0.0:
                lo = min(lo, offs[n, k, 0])
                hi = max(hi, offs[n, k, 0])
        if lo > hi:
            lo, hi = 0.0, 0.0
        rmin[n], rmax[n] = lo, hi
    first = np.empty(P, np.int64)
    last = np.empty(P, np.int64)
    hist = np.zeros(Ni + 1, np.int64)
    for p in range(P):
        n = sid[p]
        bx = (mats[n, 0, 0] * np.float64(coords[p, 0]) + mats[n, 0, 1] * np.float64(coords[p, 1])
              + mats[n, 0, 2] * np.float64(coords[p, 2]) + mats[n, 0, 3])
        a, b = bx + rmin[n], bx + rmax[n]
        if not (b > -1.0 and a < Ni):  # also drops NaN positions
            first[p], last[p] = 1, 0
            continue
        f = max(0, int(math.floor(max(a, -1.0))))
        l = min(Ni - 1, int(math.floor(min(b, float(Ni)))) + 1)
        first[p], last[p] = f, l
        hist[f] += 1
    # balanced boundaries: cut where the cumulative count of pixels (by first corner) reaches s/S
    total = 0
    for i in range(Ni):
        total += hist[i]
    bounds = np.empty(n_slabs + 1, np.int64)
    bounds[0] = 0
    s, cum = 1, 0
    for i in range(Ni):
        cum += hist[i]
        while s < n_slabs and cum * n_slabs >= s * total:
            bounds[s] = i + 1
            s += 1
    while s < n_slabs:
        bounds[s] = Ni
        s += 1
    bounds[n_slabs] = Ni
    slab_of = np.empty(Ni, np.int64)
    for s in range(n_slabs):
        for i in range(bounds[s], bounds[s + 1]):
            slab_of[i] = s
    counts = np.zeros(n_slabs + 1, np.int64)
    for p in range(P):
        if first[p] > last[p]:
            continue
        for s in range(slab_of[first[p]], slab_of[last[p]] + 1):
            counts[s + 1] += 1
    starts = np.cumsum(counts)
    fill = starts[:-1].copy()
    order = np.empty(starts[-1], np.int64)
    for p in range(P):
        if first[p] > last[p]:
            continue
        for s in range(slab_of[first[p]], slab_of[last[p]] + 1):
            order[fill[s]] = p
            fill[s] += 1
    return bounds, starts, order


# no fastmath here: a contraction LLVM applied in one path and not the other would make a
# contribution's bits depend on the path, hence on the slab partition, hence on the thread count
@nb.njit(parallel=True, cache=True, error_model="numpy")
def adjoint_kernel(values, mats, offs, wts, ext, coords, sid, bounds, starts, order, out):
    """``out += A^T values``: each slab of ``out`` is written by one thread (see module doc)."""
    Ni, Nj, Nk = out.shape
    flat = out.ravel()
    sJ, sI = Nk, Nj * Nk
    K = wts.shape[1]
    n_slabs = bounds.shape[0] - 1
    for s in prange(n_slabs):
        lo, hi = bounds[s], bounds[s + 1]
        if lo >= hi:
            continue
        for q in range(starts[s], starts[s + 1]):
            p = order[q]
            v = np.float64(values[p])
            if v == 0.0:
                continue
            n = sid[p]
            cx, cy, cz = np.float64(coords[p, 0]), np.float64(coords[p, 1]), np.float64(coords[p, 2])
            bx = mats[n, 0, 0] * cx + mats[n, 0, 1] * cy + mats[n, 0, 2] * cz + mats[n, 0, 3]
            by = mats[n, 1, 0] * cx + mats[n, 1, 1] * cy + mats[n, 1, 2] * cz + mats[n, 1, 3]
            bz = mats[n, 2, 0] * cx + mats[n, 2, 1] * cy + mats[n, 2, 2] * cz + mats[n, 2, 3]
            if _interior(bx, by, bz, ext, n, lo, hi, Nj, Nk):
                for k in range(K):
                    x, y, z = bx + offs[n, k, 0], by + offs[n, k, 1], bz + offs[n, k, 2]
                    i0, j0, k0 = int(x), int(y), int(z)
                    ax, ay, az = _real(x - i0, flat), _real(y - j0, flat), _real(z - k0, flat)
                    c000, c001, c010, c011, c100, c101, c110, c111 = _corner_shares(_real(wts[n, k] * v, flat), ax, ay, az)
                    b = i0 * sI + j0 * sJ + k0
                    flat[b] += c000
                    flat[b + 1] += c001
                    flat[b + sJ] += c010
                    flat[b + sJ + 1] += c011
                    flat[b + sI] += c100
                    flat[b + sI + 1] += c101
                    flat[b + sI + sJ] += c110
                    flat[b + sI + sJ + 1] += c111
            else:  # near the slab's or the grid's faces: per node, the fast splat where its corners allow
                for k in range(K):
                    w = wts[n, k]
                    if w == 0.0:
                        continue
                    x, y, z = bx + offs[n, k, 0], by + offs[n, k, 1], bz + offs[n, k, 2]
                    if x >= lo and x < hi - 1 and y >= 0.0 and y < Nj - 1 and z >= 0.0 and z < Nk - 1:
                        i0, j0, k0 = int(x), int(y), int(z)
                        ax, ay, az = _real(x - i0, flat), _real(y - j0, flat), _real(z - k0, flat)
                        c000, c001, c010, c011, c100, c101, c110, c111 = _corner_shares(_real(w * v, flat), ax, ay, az)
                        b = i0 * sI + j0 * sJ + k0
                        flat[b] += c000
                        flat[b + 1] += c001
                        flat[b + sJ] += c010
                        flat[b + sJ + 1] += c011
                        flat[b + sI] += c100
                        flat[b + sI + 1] += c101
                        flat[b + sI + sJ] += c110
                        flat[b + sI + sJ + 1] += c111
                    else:
                        _splat(out, x, y, z, w * v, lo, hi)


@nb.njit(inline="always")
def _trilinear4(ch, x, y, z):
    """Trilinear read of the 4 channels of ``ch (Ni, Nj, Nk, 4)`` at ``(x, y, z)``, 0 outside."""
    Ni, Nj, Nk = ch.shape[0], ch.shape[1], ch.shape[2]
    c0 = 0.0
    c1 = 0.0
    c2 = 0.0
    c3 = 0.0
    if not (x > -1.0 and x < Ni and y > -1.0 and y < Nj and z > -1.0 and z < Nk):
        return c0, c1, c2, c3
    fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
    i0, j0, k0 = int(fx), int(fy), int(fz)
    ax, ay, az = x - fx, y - fy, z - fz
    for di in range(2):
        i = i0 + di
        if i < 0 or i >= Ni:
            continue
        wi = ax if di else 1.0 - ax
        for dj in range(2):
            j = j0 + dj
            if j < 0 or j >= Nj:
                continue
            wij = wi * (ay if dj else 1.0 - ay)
            for dk in range(2):
                k = k0 + dk
                if k < 0 or k >= Nk:
                    continue
                wc = wij * (az if dk else 1.0 - az)
                c0 += wc * ch[i, j, k, 0]
                c1 += wc * ch[i, j, k, 1]
                c2 += wc * ch[i, j, k, 2]
                c3 += wc * ch[i, j, k, 3]
    return c0, c1, c2, c3


@nb.njit(inline="always")
def _lerp4(flat, p, q, t):
    """``flat[p:p+4] + t * (flat[q:q+4] - flat[p:p+4])`` as 4 scalars."""
    a0, a1, a2, a3 = flat[p], flat[p + 1], flat[p + 2], flat[p + 3]
    return (a0 + t * (flat[q] - a0), a1 + t * (flat[q + 1] - a1), a2 + t * (flat[q + 2] - a2),
            a3 + t * (flat[q + 3] - a3))


@nb.njit(inline="always")
def _interp4_inside(flat, x, y, z, sI, sJ):
    """4-channel trilinear read at an index position whose 8 corners are all in the grid."""
    i0, j0, k0 = int(x), int(y), int(z)
    ax, ay, az = _real(x - i0, flat), _real(y - j0, flat), _real(z - k0, flat)
    # the 4 channels of a corner are adjacent (16 B); lerp along k, then j, then i
    b = i0 * sI + j0 * sJ + 4 * k0
    c0, c1, c2, c3 = _lerp4(flat, b, b + 4, az)
    d0, d1, d2, d3 = _lerp4(flat, b + sJ, b + sJ + 4, az)
    e0, e1, e2, e3 = _lerp4(flat, b + sI, b + sI + 4, az)
    f0, f1, f2, f3 = _lerp4(flat, b + sI + sJ, b + sI + sJ + 4, az)
    c0, c1, c2, c3 = c0 + ay * (d0 - c0), c1 + ay * (d1 - c1), c2 + ay * (d2 - c2), c3 + ay * (d3 - c3)
    e0, e1, e2, e3 = e0 + ay * (f0 - e0), e1 + ay * (f1 - e1), e2 + ay * (f2 - e2), e3 + ay * (f3 - e3)
    return c0 + ax * (e0 - c0), c1 + ax * (e1 - c1), c2 + ax * (e2 - c2), c3 + ax * (e3 - c3)


@nb.njit(parallel=True, **_JIT)
def forward_jacobian_kernel(ch, mats, offs, ext, rots, offs_w, wts, coords, sid, gmat, centres, s_out, j_out):
    """Simulated pixels and their derivatives w.r.t. a rigid correction about ``centres``.

    ``ch (Ni, Nj, Nk, 4)``: the volume and its index-space derivatives, channels last.
    ``rots (M, 3, 4)``: slice-to-world poses; ``offs_w (M, K, 3)``: PSF offsets in world mm;
    ``gmat (3, 3)``: index-space -> world gradient; ``centres (M, 3)`` world mm.
    ``s_out[p] = sum_k w_k V(x_k)``, ``j_out[p] = sum_k w_k [(x_k - c) x g_k, g_k]`` with ``x_k``
    the world position of node ``k`` and ``g_k = gmat d_k`` the world gradient there (``d_k``: the
    interpolated index-space derivatives).  Both sums are linear in ``d_k``, so the loop only
    accumulates ``sum w d`` and ``sum w u d^T`` (``u = x - c``) and ``gmat`` is applied once per pixel.
    """
    Ni, Nj, Nk = ch.shape[0], ch.shape[1], ch.shape[2]
    flat = ch.ravel()
    sJ, sI = 4 * Nk, 4 * Nj * Nk
    P = coords.shape[0]
    K = wts.shape[1]
    for p in prange(P):
        n = sid[p]
        cx, cy, cz = np.float64(coords[p, 0]), np.float64(coords[p, 1]), np.float64(coords[p, 2])
        bx = mats[n, 0, 0] * cx + mats[n, 0, 1] * cy + mats[n, 0, 2] * cz + mats[n, 0, 3]
        by = mats[n, 1, 0] * cx + mats[n, 1, 1] * cy + mats[n, 1, 2] * cz + mats[n, 1, 3]
        bz = mats[n, 2, 0] * cx + mats[n, 2, 1] * cy + mats[n, 2, 2] * cz + mats[n, 2, 3]
        # world position of the pixel, relative to the rotation centre
        rx = rots[n, 0, 0] * cx + rots[n, 0, 1] * cy + rots[n, 0, 2] * cz + rots[n, 0, 3] - centres[n, 0]
        ry = rots[n, 1, 0] * cx + rots[n, 1, 1] * cy + rots[n, 1, 2] * cz + rots[n, 1, 3] - centres[n, 1]
        rz = rots[n, 2, 0] * cx + rots[n, 2, 1] * cy + rots[n, 2, 2] * cz + rots[n, 2, 3] - centres[n, 2]
        inside = _interior(bx, by, bz, ext, n, 0, Ni, Nj, Nk)
        s = 0.0
        d0 = 0.0  # sum w d
        d1 = 0.0
        d2 = 0.0
        m00 = 0.0  # sum w u d^T
        m01 = 0.0
        m02 = 0.0
        m10 = 0.0
        m11 = 0.0
        m12 = 0.0
        m20 = 0.0
        m21 = 0.0
        m22 = 0.0
        for k in range(K):
            w = wts[n, k]
            if w == 0.0:
                continue
            x, y, z = bx + offs[n, k, 0], by + offs[n, k, 1], bz + offs[n, k, 2]
            if inside:
                c0, c1, c2, c3 = _interp4_inside(flat, x, y, z, sI, sJ)
            else:
                c0, c1, c2, c3 = _trilinear4(ch, x, y, z)
            ux, uy, uz = rx + offs_w[n, k, 0], ry + offs_w[n, k, 1], rz + offs_w[n, k, 2]
            s += w * c0
            e1, e2, e3 = w * c1, w * c2, w * c3
            d0 += e1
            d1 += e2
            d2 += e3
            m00 += ux * e1
            m01 += ux * e2
            m02 += ux * e3
            m10 += uy * e1
            m11 += uy * e2
            m12 += uy * e3
            m20 += uz * e1
            m21 += uz * e2
            m22 += uz * e3
        # sum w g = G sum w d;  sum w u x g: component x = sum_b (M[y, b] G[z, b] - M[z, b] G[y, b]), ...
        s_out[p] = s
        j_out[p, 0] = ((m10 * gmat[2, 0] + m11 * gmat[2, 1] + m12 * gmat[2, 2])
                       - (m20 * gmat[1, 0] + m21 * gmat[1, 1] + m22 * gmat[1, 2]))
        j_out[p, 1] = ((m20 * gmat[0, 0] + m21 * gmat[0, 1] + m22 * gmat[0, 2])
                       - (m00 * gmat[2, 0] + m01 * gmat[2, 1] + m02 * gmat[2, 2]))
        j_out[p, 2] = ((m00 * gmat[1, 0] + m01 * gmat[1, 1] + m02 * gmat[1, 2])
                       - (m10 * gmat[0, 0] + m11 * gmat[0, 1] + m12 * gmat[0, 2]))
        j_out[p, 3] = gmat[0, 0] * d0 + gmat[0, 1] * d1 + gmat[0, 2] * d2
        j_out[p, 4] = gmat[1, 0] * d0 + gmat[1, 1] * d1 + gmat[1, 2] * d2
        j_out[p, 5] = gmat[2, 0] * d0 + gmat[2, 1] * d1 + gmat[2, 2] * d2


@nb.njit(**_JIT)
def normal_equations_kernel(J, scale, weights, resid, group, H, b):
    """``H[g] += w a^2 J J^T``, ``b[g] += w a J r`` over pixels in order (serial, deterministic).

    ``J (P, 6)``, ``scale (P,)`` the slice intensity scale of each pixel, ``weights (P,)``,
    ``resid (P,)``, ``group (P,)``; ``H (G, 6, 6)`` and ``b (G, 6)`` float64, zeroed by the caller.
    """
    P = J.shape[0]
    js = np.empty(6)
    for p in range(P):
        w = np.float64(weights[p])
        if w == 0.0:
            continue
        g = group[p]
        a = np.float64(scale[p])
        for u in range(6):
            js[u] = a * np.float64(J[p, u])
        wr = w * np.float64(resid[p])
        for u in range(6):
            wu = w * js[u]
            b[g, u] += js[u] * wr
            for v in range(u, 6):
                H[g, u, v] += wu * js[v]
    G = H.shape[0]
    for g in range(G):
        for u in range(6):
            for v in range(u):
                H[g, u, v] = H[g, v, u]


@nb.njit(parallel=True, **_JIT)
def gradient_channels_kernel(vol, out):
    """``out (Ni, Nj, Nk, 4)`` = ``vol`` and its index-space derivatives, as ``torch.gradient``
    computes them (central differences inside, one-sided first differences at the faces; every
    axis at least 2 long).  The face cases are decided per row, so the inner loop has no branches."""
    Ni, Nj, Nk = vol.shape
    for i in prange(Ni):
        ip, im = min(i + 1, Ni - 1), max(i - 1, 0)
        hi = 0.5 if 0 < i < Ni - 1 else 1.0  # 1 / (distance between the two samples)
        for j in range(Nj):
            jp, jm = min(j + 1, Nj - 1), max(j - 1, 0)
            hj = 0.5 if 0 < j < Nj - 1 else 1.0
            for k in range(Nk):
                out[i, j, k, 0] = vol[i, j, k]
                out[i, j, k, 1] = (vol[ip, j, k] - vol[im, j, k]) * hi
                out[i, j, k, 2] = (vol[i, jp, k] - vol[i, jm, k]) * hj
            out[i, j, 0, 3] = vol[i, j, 1] - vol[i, j, 0]
            for k in range(1, Nk - 1):
                out[i, j, k, 3] = (vol[i, j, k + 1] - vol[i, j, k - 1]) * 0.5
            out[i, j, Nk - 1, 3] = vol[i, j, Nk - 1] - vol[i, j, Nk - 2]


@nb.njit(**_JIT)
def segment_ncc_kernel(x, y, seg, out):
    """``out[s]`` = Pearson correlation of ``x`` and ``y`` over the entries with ``seg == s``
    (``x``, ``y``, ``seg`` ``(P,)``; ``out (S,)`` float64), NaN for segments with fewer than 2
    entries or no variance.  Two passes in float64 (means, then centred sums), the same formula as
    :func:`slice2vol.core.similarity.per_slice_ncc`'s PyTorch path, in pixel order (deterministic);
    serial, because the segments' sums are tiny next to the forward pass that produced ``x``."""
    S = out.shape[0]
    n = np.zeros(S)
    sx = np.zeros(S)
    sy = np.zeros(S)
    P = x.shape[0]
    for p in range(P):
        s = seg[p]
        n[s] += 1.0
        sx[s] += np.float64(x[p])
        sy[s] += np.float64(y[p])
    for s in range(S):
        d = max(n[s], 1.0)
        sx[s] /= d
        sy[s] /= d
    sxx = np.zeros(S)
    syy = np.zeros(S)
    sxy = np.zeros(S)
    for p in range(P):
        s = seg[p]
        xc = np.float64(x[p]) - sx[s]
        yc = np.float64(y[p]) - sy[s]
        sxx[s] += xc * xc
        syy[s] += yc * yc
        sxy[s] += xc * yc
    for s in range(S):
        den = math.sqrt(sxx[s] * syy[s])
        out[s] = sxy[s] / max(den, 1e-300) if (n[s] >= 2.0 and den > 0.0) else np.nan


@nb.njit(**_JIT)
def registration_costs_kernel(s, values, weights, slice_id, group, fit_scale, a, r, cost):
    """The registration's per-iteration bookkeeping in two serial passes over the pixels.

    ``a (M,)``: each slice's least-squares intensity scale ``sum w s y / sum w s^2`` (1 where the
    denominator is <= 1e-12, clipped to [0.2, 5]; 1 without ``fit_scale``); ``r (P,) = a s - y``;
    ``cost (G,)``: the weighted mean of ``r^2`` over each group's pixels.  Sums in float64 in pixel
    order; ``a``, ``r`` and ``cost`` are written in the caller's dtype."""
    M = a.shape[0]
    G = cost.shape[0]
    P = s.shape[0]
    num = np.zeros(M)
    den = np.zeros(M)
    if fit_scale:
        for p in range(P):
            n = slice_id[p]
            ws = np.float64(weights[p]) * np.float64(s[p])
            num[n] += ws * np.float64(values[p])
            den[n] += ws * np.float64(s[p])
    for n in range(M):
        an = num[n] / max(den[n], 1e-12) if den[n] > 1e-12 else 1.0
        a[n] = min(max(an, 0.2), 5.0)
    c = np.zeros(G)
    wsum = np.zeros(G)
    for p in range(P):
        rp = a[slice_id[p]] * s[p] - values[p]  # in the caller's dtype, as the PyTorch path
        r[p] = rp
        g = group[p]
        w = np.float64(weights[p])
        c[g] += w * np.float64(rp) * np.float64(rp)
        wsum[g] += w
    for g in range(G):
        cost[g] = c[g] / max(wsum[g], 1e-12)


@nb.njit(inline="always")
def _tap_index(n, shift, size, blurred):
    """Index a tap reads along one axis: ``n + shift`` clamped to ``[0, size - 1]`` (replicated
    edges) on the blurred axis, ``n`` on the other."""
    return min(max(n + shift, 0), size - 1) if blurred else n


@nb.njit(inline="always")
def _blur_rows(x, w, i, on_i, on_j, Ni, Nj, Nk, K, h, zero, out):
    """Plane ``i`` of :func:`blur_axis_kernel` along axis 0 (``on_i, on_j = True, False``) or 1
    (``False, True``): whole rows along ``k``, ``x[ii, jj, :]`` added into ``out[i, j, :]`` tap by
    tap.  Called with literal flags: each axis gets its own loop after inlining, the same machine
    code as one written per axis (choosing the index per tap at run time cost 10-30 % on float32)."""
    for j in range(Nj):
        for k in range(Nk):
            out[i, j, k] = zero
        for t in range(K):
            ii, jj = _tap_index(i, t - h, Ni, on_i), _tap_index(j, t - h, Nj, on_j)
            wt = _real(w[t], x)
            for k in range(Nk):
                out[i, j, k] += wt * x[ii, jj, k]


@nb.njit(parallel=True, **_JIT)
def blur_axis_kernel(x, w, axis, out):
    """``out = x`` convolved along ``axis`` (0, 1 or 2) with the odd-length kernel ``w (K,)``,
    edges replicated (the index clamped), as ``F.pad(..., mode="replicate")`` then ``conv1d``
    (:func:`slice2vol.core.resample._blur_axis`) but without their copies: ``conv1d`` on CPU
    unfolds its input into a ``K``-times larger temporary (measured: +100 MB peaks at 0.8 mm).
    ``x`` and ``out`` are C-contiguous ``(Ni, Nj, Nk)`` of one dtype; taps are added in order."""
    Ni, Nj, Nk = x.shape
    K = w.shape[0]
    h = K // 2
    zero = _real(0.0, x)
    for i in prange(Ni):
        if axis == 0:
            _blur_rows(x, w, i, True, False, Ni, Nj, Nk, K, h, zero, out)
        elif axis == 1:
            _blur_rows(x, w, i, False, True, Ni, Nj, Nk, K, h, zero, out)
        else:
            for j in range(Nj):
                for k in range(Nk):
                    acc = zero
                    for t in range(K):
                        kk = min(max(k + t - h, 0), Nk - 1)
                        acc += _real(w[t], x) * x[i, j, kk]
                    out[i, j, k] = acc
