"""Fused CPU acquisition operators: forward, adjoint and forward-with-Jacobian without temporaries.

:mod:`slice2vol.core.acquisition` dispatches here (CPU tensors only) and keeps its PyTorch code
as the reference and the fallback.  Where the PyTorch path materialises every PSF node's position
(``(pixels, K, 3)``) and lets ``grid_sample`` and its backward read them, these kernels compute
each node's position from the slice pose on the fly, read the volume trilinearly and accumulate
in float64 in the same pass (numba's parallel CPU JIT, :mod:`slice2vol.core._fused_numba`):

* ``forward``: ``s_p = sum_k w_k V(T_n (c_p + o_k))``, one thread per block of pixels;
* ``adjoint``: its exact transpose, a trilinear splat; each thread owns a slab of the volume, so
  the reduction is deterministic (bitwise the same at any thread count, equal to a serial splat);
* ``forward_jacobian``: the registration's simulated pixels and their six derivatives with respect
  to a rigid correction, from a 4-channel (volume + gradient) volume, in one pass; with it the
  rest of a registration step: the 4-channel volume itself (``gradient_channels``) and the 6x6
  normal equations of every group (``normal_equations``), so a Levenberg-Marquardt iteration
  allocates nothing per PSF node or per pixel-times-36.

The same numbers as the PyTorch path up to float32 rounding (positions are computed in float64
here, in the pose dtype there); ``tests/test_fused.py`` checks values, gradients and adjointness.

Selection: the fused path runs when numba can be imported and the tensors are on the CPU.
``SLICE2VOL_NO_NUMBA=1`` forces the PyTorch path (read at every call, so it can be set at any
time), as does the package-wide ``SLICE2VOL_NO_EXTENSIONS=1``.  Kernels are compiled at their
first call (about 20 s for the float32 set on a 2-core machine, once) and cached on disk by
numba (``cache=True``: ``__pycache__`` beside this module, numba's per-user cache directory when
that is not writable, or ``NUMBA_CACHE_DIR``), so later processes load them in under a second.
Threads: as many as ``torch.get_num_threads()`` (at most numba's ``NUMBA_NUM_THREADS``), so
``--threads`` and ``OMP_NUM_THREADS`` govern both paths.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch
from torch import Tensor

__all__ = ["ENV_DISABLE", "available", "reason_unavailable", "Geometry", "forward", "adjoint", "forward_jacobian",
           "normal_equations", "gradient_channels", "segment_ncc", "registration_costs",
           "blur_axis"]

log = logging.getLogger(__name__)

#: Environment variable that forces the PyTorch path when set to anything but "", "0", "false", "no".
ENV_DISABLE = "SLICE2VOL_NO_NUMBA"

_KERNELS = None  # the imported kernel module, False when numba is missing
_LOCK = threading.Lock()  # one kernel launch at a time per process (see _kernels)
_IMPORT_ERROR = ""


#: The package-wide "no compiled kernels" switch (also turns off the GaussianSVR C++ splat kernel).
ENV_NO_EXTENSIONS = "SLICE2VOL_NO_EXTENSIONS"


def _disabled_by_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no") for v in (ENV_DISABLE, ENV_NO_EXTENSIONS))


def _kernels():
    global _KERNELS, _IMPORT_ERROR
    if _KERNELS is None:
        try:
            import numba

            # numba's own thread pool, not OpenMP: numba's OpenMP layer shares libgomp with torch and
            # sets torch's intra-op thread count to NUMBA_NUM_THREADS as a side effect (measured: a
            # 1-thread torch run became 2-thread and 8x slower on a loaded 2-core machine).  The
            # workqueue pool aborts the process if two Python threads launch kernels at once (dask
            # workers with several threads do): _LOCK serialises the launches.
            if not os.environ.get("NUMBA_THREADING_LAYER"):
                numba.config.THREADING_LAYER = "workqueue"
            from slice2vol.core import _fused_numba

            _KERNELS = _fused_numba
        except Exception as e:  # numba missing, or broken (llvmlite mismatch): the torch path runs
            _KERNELS = False
            _IMPORT_ERROR = f"{type(e).__name__}: {e}"
            log.debug("fused operators unavailable (%s); using the PyTorch path", _IMPORT_ERROR)
    return _KERNELS


def available() -> bool:
    """True when the fused CPU path will run (numba importable and not disabled by the environment)."""
    return not _disabled_by_env() and bool(_kernels())


def reason_unavailable() -> str:
    """Why :func:`available` is false ("" when it is true), for logs and benchmarks."""
    if _disabled_by_env():
        return f"{ENV_DISABLE} or {ENV_NO_EXTENSIONS} is set"
    if not _kernels():
        return f"numba not importable ({_IMPORT_ERROR})"
    return ""


def _set_threads() -> int:
    """Give numba torch's thread count (capped at numba's pool); returns torch's count."""
    import numba

    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return n


def _launch(kernel, *args):
    """Run a parallel kernel with torch's thread count, leaving torch's count as it was (a
    user-chosen OpenMP layer, ``NUMBA_THREADING_LAYER=omp``, can change it); returns the kernel's
    result."""
    with _LOCK:
        n = _set_threads()
        try:
            return kernel(*args)
        finally:
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)


def _np(t: Tensor, dtype=None) -> np.ndarray:
    """Contiguous CPU numpy view of ``t`` (a copy only where dtype or layout differ)."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous().numpy()


class Geometry:
    """Slice geometry of one operator in the kernels' terms, prepared once per poses.

    Args:
        shape: ``(Ni, Nj, Nk)`` volume grid.
        affine: ``(4, 4)`` voxel-to-world of the grid (numpy or tensor).
        poses: ``(M, 4, 4)`` slice-to-world.
        coords, slice_id: ``(P, 3)`` slice-frame pixel positions (mm), ``(P,)`` slices.
        psf: :class:`~slice2vol.core.acquisition.PSF` (offsets ``(M, K, 3)`` mm, weights ``(M, K)``).

    Only ``(M, K)``-sized arrays are built (``O(M K)`` memory), never per-PSF-node positions.
    """

    def __init__(self, shape, affine, poses: Tensor, coords: Tensor, slice_id: Tensor, psf):
        self.shape = tuple(int(s) for s in shape)
        A = torch.as_tensor(np.asarray(affine, dtype=np.float64) if not isinstance(affine, Tensor) else affine,
                            dtype=torch.float64).cpu()
        T = poses.detach().to(torch.float64).cpu()
        self.poses64 = T
        Mv = torch.linalg.inv(A) @ T  # (M, 4, 4) slice frame -> voxel index
        self.mats = Mv[:, :3, :].contiguous().numpy()
        off = psf.offsets.detach().to(torch.float64).cpu()
        self.offs = (off @ Mv[:, :3, :3].transpose(-1, -2)).contiguous().numpy()  # index-space offsets
        # per-slice extent of the offsets (all K nodes, padding included): the interior test
        self.ext = np.ascontiguousarray(np.concatenate([self.offs.min(1), self.offs.max(1)], 1)) if self.offs.size \
            else np.zeros((self.offs.shape[0], 6))
        self.psf_offsets = off
        self.wts = psf.weights.detach().to(torch.float64).cpu().contiguous().numpy()
        cdt = np.float64 if coords.dtype == torch.float64 else np.float32
        self.coords = _np(coords, torch.float64 if cdt is np.float64 else torch.float32)
        self.sid = _np(slice_id, torch.int64)
        self.n_pixels = int(self.coords.shape[0])
        self._bins = None
        self._bins_threads = None

    def bins(self, n_threads: int):
        """Slab ownership of the adjoint (cached per thread count; results do not depend on it)."""
        if self._bins is None or self._bins_threads != n_threads:
            n_slabs = max(1, min(self.shape[0], n_threads))  # balanced by pixel count: one per thread
            self._bins = _kernels().bin_pixels(self.mats, self.offs, self.wts, self.coords, self.sid,
                                               self.shape[0], n_slabs)
            self._bins_threads = n_threads
        return self._bins


def _forward_raw(volume: Tensor, geom: Geometry) -> Tensor:
    k = _kernels()
    vol = volume.detach()
    if vol.dtype not in (torch.float32, torch.float64):
        vol = vol.float()
    out = torch.empty(geom.n_pixels, dtype=vol.dtype)
    if geom.n_pixels:
        _launch(k.forward_kernel, _np(vol), geom.mats, geom.offs, geom.wts, geom.ext, geom.coords, geom.sid, out.numpy())
    return out


def _adjoint_raw(values: Tensor, geom: Geometry) -> Tensor:
    import numba

    k = _kernels()
    vals = values.detach()
    if vals.dtype not in (torch.float32, torch.float64):
        vals = vals.float()
    out = torch.zeros(geom.shape, dtype=vals.dtype)
    if geom.n_pixels:
        n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        bounds, starts, order = geom.bins(n)
        _launch(k.adjoint_kernel, _np(vals), geom.mats, geom.offs, geom.wts, geom.ext, geom.coords, geom.sid, bounds,
                starts, order, out.numpy())
    return out


class _Forward(torch.autograd.Function):
    """``A V`` with ``A^T`` as its backward (differentiable in the volume)."""

    @staticmethod
    def forward(ctx, volume: Tensor, geom: Geometry) -> Tensor:
        ctx.geom = geom
        return _forward_raw(volume, geom)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _Adjoint.apply(grad, ctx.geom), None


class _Adjoint(torch.autograd.Function):
    """``A^T y`` with ``A`` as its backward (differentiable in the values)."""

    @staticmethod
    def forward(ctx, values: Tensor, geom: Geometry) -> Tensor:
        ctx.geom = geom
        return _adjoint_raw(values, geom)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _Forward.apply(grad, ctx.geom), None


def forward(volume: Tensor, geom: Geometry) -> Tensor:
    """``(Ni, Nj, Nk)`` (or ``(C, Ni, Nj, Nk)``) -> ``(P,)`` (or ``(C, P)``); differentiable in ``volume``."""
    if volume.dim() == 4:
        return torch.stack([_Forward.apply(v, geom) for v in volume.unbind(0)]) if volume.shape[0] else \
            volume.new_zeros(0, geom.n_pixels)
    return _Forward.apply(volume, geom)


def adjoint(values: Tensor, geom: Geometry) -> Tensor:
    """``(P,)`` -> ``(Ni, Nj, Nk)``; differentiable in ``values``."""
    return _Adjoint.apply(values, geom)


def forward_jacobian(channels: Tensor, to_world_grad: Tensor, geom: Geometry, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Simulated pixels ``s (P,)`` and ``J (P, 6)``, their derivatives w.r.t. a rigid correction.

    Args:
        channels: ``(4, Ni, Nj, Nk)`` volume and its index-space derivatives (any strides;
            channels-last storage avoids a copy).
        to_world_grad: ``(3, 3)`` index-space -> world (mm^-1) gradient matrix.
        geom: :class:`Geometry` of the slices.
        centres: ``(M, 3)`` world rotation centre of each slice's correction (mm).
    Returns:
        ``s`` and ``J`` (columns: rotation ``omega`` (rad), translation ``t`` (mm)) in the dtype of
        ``channels``; not differentiable.
    """
    k = _kernels()
    ch = channels.detach().permute(1, 2, 3, 0)
    dtype = ch.dtype if ch.dtype in (torch.float32, torch.float64) else torch.float32
    ch = _np(ch, dtype)
    rots = geom.poses64[:, :3, :].contiguous().numpy()
    offs_w = (geom.psf_offsets @ geom.poses64[:, :3, :3].transpose(-1, -2)).contiguous().numpy()
    s = torch.empty(geom.n_pixels, dtype=dtype)
    J = torch.empty(geom.n_pixels, 6, dtype=dtype)
    if geom.n_pixels:
        _launch(k.forward_jacobian_kernel, ch, geom.mats, geom.offs, geom.ext, rots, offs_w, geom.wts, geom.coords,
                geom.sid, _np(to_world_grad, torch.float64), _np(centres, torch.float64), s.numpy(), J.numpy())
    return s, J


def normal_equations(J: Tensor, scale: Tensor, weights: Tensor, resid: Tensor, group: Tensor,
                     n_groups: int) -> tuple[Tensor, Tensor]:
    """Gauss-Newton normal equations of the registration, per group, in one serial pass.

    ``H[g] = sum_p w_p a_p^2 J_p J_p^T`` and ``b[g] = sum_p w_p a_p J_p r_p`` over the pixels ``p``
    of group ``g`` (``J (P, 6)``, ``scale``/``weights``/``resid``/``group`` ``(P,)``), accumulated in
    float64 in pixel order (deterministic); returned as ``(G, 6, 6)``, ``(G, 6)`` in ``J``'s dtype.
    """
    k = _kernels()
    H = np.zeros((n_groups, 6, 6))
    b = np.zeros((n_groups, 6))
    if J.shape[0]:
        with _LOCK:
            k.normal_equations_kernel(_np(J), _np(scale), _np(weights), _np(resid), _np(group, torch.int64), H, b)
    return torch.from_numpy(H).to(J.dtype), torch.from_numpy(b).to(J.dtype)


def gradient_channels(volume: Tensor) -> Tensor:
    """``(Ni, Nj, Nk, 4)``: ``volume`` and its index-space derivatives as ``torch.gradient`` gives
    them (central differences, one-sided at the faces), channels last, in one pass."""
    k = _kernels()
    vol = volume.detach()
    out = torch.empty(tuple(vol.shape) + (4,), dtype=vol.dtype)
    _launch(k.gradient_channels_kernel, _np(vol), out.numpy())
    return out


def segment_ncc(x: Tensor, y: Tensor, seg: Tensor, n_segments: int) -> Tensor:
    """``(S,)`` float64 Pearson correlation of ``x`` and ``y`` (``(P,)``) within each segment
    ``seg (P,)`` in ``0..S-1`` (NaN with < 2 entries or no variance), in one kernel instead of
    six scatter-adds and their temporaries (:func:`slice2vol.core.similarity.per_slice_ncc`)."""
    k = _kernels()
    out = np.empty(n_segments)
    with _LOCK:
        k.segment_ncc_kernel(_np(x), _np(y), _np(seg, torch.int64), out)
    return torch.from_numpy(out)


def registration_costs(s: Tensor, values: Tensor, weights: Tensor, slice_id: Tensor, group: Tensor, n_slices: int,
                       n_groups: int, fit_scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One registration cost evaluation (:func:`slice2vol.core.registration.register`): the slice
    scales ``a (M,)``, residuals ``r = a s - y (P,)`` and per-group weighted mean squared residual
    ``cost (G,)``, in ``s``'s dtype, from two passes over the pixels (sums in float64)."""
    k = _kernels()
    dt = s.dtype
    a = torch.empty(n_slices, dtype=dt)
    r = torch.empty(s.shape[0], dtype=dt)
    cost = torch.empty(n_groups, dtype=dt)
    with _LOCK:
        k.registration_costs_kernel(_np(s), _np(values, dt), _np(weights, dt), _np(slice_id, torch.int64),
                                    _np(group, torch.int64), bool(fit_scale), a.numpy(), r.numpy(), cost.numpy())
    return a, r, cost


def blur_axis(volume: Tensor, axis: int, kernel: Tensor) -> Tensor:
    """``volume (Ni, Nj, Nk)`` convolved along ``axis`` with the odd-length 1D ``kernel``, edges
    replicated, C-contiguous, in ``volume``'s dtype (:func:`slice2vol.core.resample.gaussian_blur`'s
    axis pass without ``conv1d``'s ``K``-fold temporary); not differentiable."""
    k = _kernels()
    v = _np(volume)
    out = torch.empty(tuple(volume.shape), dtype=volume.dtype)
    _launch(k.blur_axis_kernel, v, _np(kernel, torch.float64), int(axis), out.numpy())
    return out
