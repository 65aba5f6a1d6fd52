"""Rendering Gaussians: onto a voxel grid (``--psf sampled``) or straight onto slices (``--psf analytic``).

Both use :func:`.splat.splat`, so both are memory-bounded and differentiable in every Gaussian
parameter; the slice renderer is also differentiable in the slice poses.

**Voxeliser** (GaussianSVR): ``V(x_v) = sum_j I_j exp(-1/2 (x_v - mu_j)^T Sigma_j^-1 (x_v - mu_j))`` at
the voxel centres ``x_v`` of a grid, each Gaussian inside its ellipsoid of Mahalanobis radius
``truncate`` (3): the voxels with ``(x_v - mu_j)^T Sigma_j^-1 (x_v - mu_j) <= 9``, visited row by
row inside the axis-aligned box spanning 3 standard deviations of its marginals (3D Gaussian
splatting's 3-sigma cut; the cube alone would evaluate about twice as many voxels, most of them
beyond 3 sigma, and clipped the tails unevenly: at 3 sigma along the widest axis, much further
along the others).  Slices are then simulated from ``V`` by
the shared acquisition model (:mod:`slice2vol.core.acquisition`): this is ``--psf sampled``.

**Analytic slices** (Dannecker et al., MIDL 2026): a Gaussian blurred by a Gaussian PSF is a
Gaussian, so the PSF-integrated value of pixel ``c`` of slice ``n`` is, in the slice frame,

    s_nc = sum_j I_j sqrt(|Sigma_j| / |C_nj|) exp(-1/2 (c - m_nj)^T C_nj^-1 (c - m_nj))
    m_nj = R_n^T (mu_j - t_n),    C_nj = R_n^T Sigma_j R_n + Sigma_PSF

with ``Sigma_PSF = diag(sx^2, sy^2, sz^2)`` the same PSF as the acquisition model (in-plane FWHM
1.2 x pixel spacing, through-plane FWHM = slice thickness) and ``c = (u, v, 0)``.  A Gaussian
contributes to slice ``n`` only if the plane lies within ``truncate`` standard deviations of it
(``|m_w| <= 3 sqrt(C_ww)``), and then only to the pixels inside its 3-sigma ellipsoid (in-plane
box, points with ``q <= 9``, the plane's offset included).  No voxel
grid and no PSF quadrature is involved.  The sampled path additionally blurs by trilinear
interpolation of the voxel grid (about a third of a voxel in standard deviation), so the two agree
only to that extent (``tests/test_gaussian.py`` checks a single Gaussian).

On the CPU with the numba kernels the per-pair quantities (``m_nj``, ``C_nj``, its inverse and
determinant, the kept pairs) come from two kernels with a hand-written backward
(:class:`_PairsNumba`, float64 inside); elsewhere (CUDA, ``SLICE2VOL_NO_NUMBA=1``) the same
formulas run as PyTorch operations under autograd, the reference the kernels are tested against.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from slice2vol.core import acquisition as acq
from slice2vol.methods.gaussian.model import GaussianModel, covariance, precision, quat_to_matrix, scaled_outer
from slice2vol.methods.gaussian import splat as splat_mod
from slice2vol.methods.gaussian.splat import DEFAULT_CHUNK, splat, splat_l1

__all__ = ["voxelise", "VoxelL1", "render_slices", "SliceLattice", "psf_sigmas", "dense_gaussians"]


def psf_sigmas(spacing: Tensor, thickness: Tensor, inplane_fwhm: float = 1.2) -> Tensor:
    """``(M, 3)`` PSF standard deviations (mm) in the slice frame, as :func:`acquisition.psf_kernel` uses."""
    return torch.stack([spacing[:, 0] * inplane_fwhm * acq.FWHM_TO_SIGMA, spacing[:, 1] * inplane_fwhm * acq.FWHM_TO_SIGMA,
                        thickness * acq.FWHM_TO_SIGMA], -1)


def _voxel_boxes(model: GaussianModel | dict, affine: np.ndarray, shape: tuple[int, int, int], truncate: float,
                 max_radius: int):
    """The splat arguments of :func:`voxelise`: the Gaussians whose box reaches the grid, their
    voxel-space centres ``(K, 3)``, precisions ``(K, 3, 3)``, intensities, radii, flat base indices
    and strides on the grid padded by ``P2`` voxels on every side (shape ``pn``)."""
    t = model.tensors() if isinstance(model, GaussianModel) else model
    mu, ls, q, inten = t["means"], t["log_scales"], t["quats"], t["intensities"]
    dev, dt = mu.device, mu.dtype
    A = torch.as_tensor(affine, dtype=dt, device=dev)
    Ainv = torch.linalg.inv(A)
    centre = mu @ Ainv[:3, :3].T + Ainv[:3, 3]
    # voxel-space precision A^T R S^-2 R^T A; einsum with a fixed 3x3 runs as one matrix product
    Rq = quat_to_matrix(q)
    prec = scaled_outer(torch.einsum("ba,jbk->jak", A[:3, :3], Rq), torch.exp(-2 * ls))
    with torch.no_grad():  # the diagonal of the voxel-space covariance A^-1 R S^2 R^T A^-T
        N = torch.einsum("ab,jbk->jak", Ainv[:3, :3], Rq.detach())
        var = (N * N * torch.exp(2 * ls.detach())[:, None, :]).sum(-1)
        radius = torch.ceil(truncate * var.amax(-1).sqrt()).long()
        radius = radius.clamp(1, max_radius)
        n = torch.tensor(shape, device=dev, dtype=dt)
        keep = ((centre >= -radius[:, None]) & (centre <= n - 1 + radius[:, None])).all(1)
        idx = torch.nonzero(keep, as_tuple=False).squeeze(1)
    Ni, Nj, Nk = shape
    R = int(radius[idx].max()) if idx.numel() else 1
    # kept centres lie within r of the grid, so boxes reach 2r beyond it: pad by 2R
    P2 = 2 * R
    pn = (Ni + 2 * P2, Nj + 2 * P2, Nk + 2 * P2)
    st = torch.tensor([pn[1] * pn[2], pn[2], 1], device=dev)
    c = centre[idx]
    base = ((torch.round(c.detach()).long() + P2) * st).sum(-1)
    return c, prec[idx], inten[idx], radius[idx], base, st.expand(idx.shape[0], 3), pn, P2


def voxelise(model: GaussianModel | dict, affine: np.ndarray, shape: tuple[int, int, int], truncate: float = 3.0,
             max_radius: int = 10, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Evaluate the Gaussians at the voxel centres of a grid.

    Args:
        model: a :class:`GaussianModel` (or a dict with its four tensors).
        affine: ``(4, 4)`` voxel-to-world of the grid (mm).
        shape: grid shape ``(Ni, Nj, Nk)``.
        truncate: support radius in standard deviations (Mahalanobis; the box is its bounding box).
        max_radius: cap on the box half-width in voxels (larger Gaussians are truncated; density
            control prunes them before they matter).
    Returns:
        ``(Ni, Nj, Nk)`` volume, differentiable in the model's parameters.
    """
    c, prec, inten, radius, base, st, pn, P2 = _voxel_boxes(model, affine, shape, truncate, max_radius)
    Ni, Nj, Nk = shape
    out = splat(c, prec, inten, radius, base, st, pn[0] * pn[1] * pn[2], dims=3, chunk=chunk, cut=truncate * truncate)
    return out.reshape(pn)[P2:P2 + Ni, P2:P2 + Nj, P2:P2 + Nk]


class VoxelL1:
    """Mean absolute difference between the voxelised Gaussians and a target volume inside a mask,
    ``sum_mask |voxelise(model) - target| / |mask|``, differentiable in the model's parameters:
    :func:`voxelise` and the loss in one step, for a fit that evaluates it many times on one grid.

    The target and the mask's weights are laid out on the voxeliser's padded grid once per padding
    (it changes only when the largest box does), and the fused path (:func:`.splat.splat_l1`)
    keeps its lattice-sized scratch between calls.  The gradients equal those of
    ``((voxelise(model) - target).abs() * mask).sum() / mask.sum()`` (bitwise on the numba path,
    tested); the loss value is summed in float64 there.

    Args:
        target: ``(Ni, Nj, Nk)`` volume.
        mask: ``(Ni, Nj, Nk)`` bool or 0/1 voxels that count.
        affine: ``(4, 4)`` voxel-to-world of the grid (mm).
    """

    def __init__(self, target: Tensor, mask: Tensor, affine: np.ndarray, truncate: float = 3.0,
                 max_radius: int = 10) -> None:
        self.target = target.detach()
        m = mask.to(target.dtype)
        # the weight as autograd forms the gradient of ``(|d| * m).sum() / m.sum()``: m * (1 / n)
        self.weight = m * (torch.ones((), dtype=target.dtype) / m.sum().clamp_min(1))
        self.affine, self.shape = affine, tuple(target.shape)
        self.truncate, self.max_radius = truncate, max_radius
        self._padded: dict[int, tuple[Tensor, Tensor]] = {}
        self._scratch: dict = {}

    def _pad(self, P2: int, pn: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        if P2 not in self._padded:
            Ni, Nj, Nk = self.shape
            out = []
            for v in (self.target, self.weight):
                p = torch.zeros(pn, dtype=v.dtype, device=v.device)
                p[P2:P2 + Ni, P2:P2 + Nj, P2:P2 + Nk] = v
                out.append(p.reshape(-1))
            self._padded = {P2: (out[0], out[1])}  # one padding at a time
        return self._padded[P2]

    def __call__(self, model: GaussianModel | dict) -> Tensor:
        c, prec, inten, radius, base, st, pn, P2 = _voxel_boxes(model, self.affine, self.shape, self.truncate,
                                                               self.max_radius)
        t, w = self._pad(P2, pn)
        return splat_l1(c, prec, inten, radius, base, st, t, w, dims=3, cut=self.truncate * self.truncate,
                        scratch=self._scratch)


class SliceLattice:
    """Pixel lattices of ``M`` slices laid end to end in one dense buffer.

    Slice ``n`` (stack shape ``(H, W)``) is padded by ``pad`` pixels on every side and occupies
    ``offset[n] : offset[n] + (H + 2 pad)(W + 2 pad)``; pixel ``(a, b)`` is at
    ``offset[n] + (a + pad)(W + 2 pad) + b + pad``.  ``pixel_index (P,)`` maps a :class:`~slice2vol.core.image.SliceSet`'s
    masked pixels into the buffer.
    """

    def __init__(self, ss, pad: int = 16) -> None:
        dev = ss.device
        hw = torch.zeros(ss.n_slices, 2, dtype=torch.long, device=dev)
        for s, (H, W) in enumerate(ss.shapes):
            hw[ss.stack_slices[s]:ss.stack_slices[s + 1]] = torch.tensor([H, W], device=dev)
        self.hw = hw
        self.pad = pad
        phw = hw + 2 * pad  # every slice padded so Gaussian boxes up to ``pad`` need no bounds test
        size = phw[:, 0] * phw[:, 1]
        self.row = phw[:, 1]
        self.offset = torch.cumsum(size, 0) - size
        self.size = int(size.sum())
        hw_p = hw[ss.slice_id]
        a = ss.flat_index % (hw_p[:, 0] * hw_p[:, 1]) // hw_p[:, 1]
        b = ss.flat_index % hw_p[:, 1]
        self.pixel_index = self.offset[ss.slice_id] + (a + pad) * self.row[ss.slice_id] + b + pad
        self.spacing = ss.spacing
        self.psf_spacing = ss.psf_pixel  # the acquired pixel where the scanner interpolated
        self.thickness = ss.thickness


def render_slices(model: GaussianModel | dict, poses: Tensor, lattice: SliceLattice, slices: Tensor | None = None,
                  truncate: float = 3.0, max_radius: int = 10, psf_scale: float = 1.0,
                  chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Analytic PSF-integrated slices (module docstring), for all slices or a subset.

    Args:
        model: the Gaussians.
        poses: ``(M, 4, 4)`` slice-to-world (differentiable).
        lattice: the slices' pixel lattices.
        slices: ``(B,)`` int64 slices to render (default all).  Pixels of other slices stay 0.
        psf_scale: multiplies the in-plane PSF width (2 when rendering for 2x-coarsened slices).
    Returns:
        ``(lattice.size,)`` dense buffer; index it with ``lattice.pixel_index``.
    """
    t = model.tensors() if isinstance(model, GaussianModel) else model
    mu, ls, q, inten = t["means"], t["log_scales"], t["quats"], t["intensities"]
    dev, dt = mu.device, mu.dtype
    if slices is None:
        slices = torch.arange(poses.shape[0], device=dev)
    R = poses[slices, :3, :3]  # (B, 3, 3)
    tr = poses[slices, :3, 3]
    sig = psf_sigmas(lattice.psf_spacing[slices], lattice.thickness[slices]).to(dt)
    sig = sig * torch.tensor([psf_scale, psf_scale, 1.0], device=dev, dtype=dt)
    cov = covariance(ls, q)  # (J, 3, 3)
    hw = lattice.hw[slices]
    sp = lattice.spacing[slices].to(dt)
    with torch.no_grad():
        # |m_w| <= truncate sqrt(n^T Sigma n + sig_w^2), as two matrix products: the (B, J, 3)
        # differences and the (B, J, 3, 3) contraction were a tenth of a render
        normal = R[:, :, 2]  # (B, 3) world direction of w
        m_w = mu @ normal.T - (tr * normal).sum(-1)  # (J, B)
        nn = (normal[:, :, None] * normal[:, None, :]).reshape(-1, 9)  # (B, 9)
        c_ww = cov.reshape(-1, 9) @ nn.T + sig[:, 2] ** 2  # (J, B)
        near = (m_w.abs() <= truncate * c_ww.sqrt()).T
        b_idx, j_idx = torch.nonzero(near, as_tuple=True)
    D = torch.stack([sp[:, 0], sp[:, 1], torch.ones_like(sp[:, 0])], -1)  # (B, 3) lattice unit -> mm
    max_rad = min(max_radius, lattice.pad // 2)  # kept centres lie within rad of the slice: boxes reach 2 rad
    if dev.type == "cpu" and dt in (torch.float32, torch.float64) and splat_mod.compiled_kernels() is not None:
        half = torch.stack([(hw[:, 0] - 1).to(dt) / 2, (hw[:, 1] - 1).to(dt) / 2], -1)
        c, prec, amp, keep, rad = _PairsNumba.apply(R, tr, mu, cov, torch.exp(ls.sum(-1)), inten, b_idx, j_idx,
                                                     sig, D, half, hw, truncate, max_rad)
        sl = slices[b_idx[keep]]
        return _splat_pairs(lattice, sl, c, prec, amp, rad, truncate, chunk)
    Rb = R[b_idx]
    m = (Rb.transpose(-1, -2) @ (mu[j_idx] - tr[b_idx])[..., None])[..., 0]  # (Q, 3) slice frame mm
    C = Rb.transpose(-1, -2) @ cov[j_idx] @ Rb + torch.diag_embed(sig[b_idx] ** 2)
    Cinv = torch.linalg.inv(C)
    det_ratio = torch.exp(2 * ls[j_idx].sum(-1)) / torch.linalg.det(C)
    amp = inten[j_idx] * det_ratio.clamp_min(0).sqrt()
    H, W = hw[b_idx, 0], hw[b_idx, 1]
    D = D[b_idx]
    centre = torch.stack([m[:, 0] / D[:, 0] + (H - 1).to(dt) / 2, m[:, 1] / D[:, 1] + (W - 1).to(dt) / 2, m[:, 2]], -1)
    prec = D[:, :, None] * Cinv * D[:, None, :]
    with torch.no_grad():
        rad = torch.ceil(truncate * torch.maximum(C[:, 0, 0].sqrt() / D[:, 0], C[:, 1, 1].sqrt() / D[:, 1])).long()
        rad = rad.clamp(1, max_rad)
        inside = ((centre[:, 0] >= -rad) & (centre[:, 0] <= H - 1 + rad)
                  & (centre[:, 1] >= -rad) & (centre[:, 1] <= W - 1 + rad))
        keep = torch.nonzero(inside, as_tuple=False).squeeze(1)
    sl = slices[b_idx[keep]]
    return _splat_pairs(lattice, sl, centre[keep], prec[keep], amp[keep], rad[keep], truncate, chunk)


def _splat_pairs(lattice: SliceLattice, sl: Tensor, c: Tensor, prec: Tensor, amp: Tensor, rad: Tensor,
                 truncate: float, chunk: int) -> Tensor:
    """The kept pairs' Gaussians (slice ``sl``, lattice centre ``c``, precision, amplitude, box
    half-width) splatted on the slices' lattice, each inside its ``truncate``-sigma ellipsoid."""
    row = lattice.row[sl]
    rc = torch.round(c.detach()).long()
    base = lattice.offset[sl] + (rc[:, 0] + lattice.pad) * row + rc[:, 1] + lattice.pad
    strides = torch.stack([row, torch.ones_like(row), torch.zeros_like(row)], -1)
    return splat(c, prec, amp, rad, base, strides, lattice.size, dims=2, chunk=chunk, cut=truncate * truncate)


class _PairsNumba(torch.autograd.Function):
    """The analytic renderer's slice-Gaussian pair algebra (the PyTorch lines of
    :func:`render_slices` from ``Rb`` to ``keep``) as two numba kernels
    (:func:`._splat_numba.pairs_forward_kernel`, ``pairs_backward_kernel``): closed-form 3x3
    products, adjugate inverse and determinant in float64, no per-pair temporaries in autograd
    (under autograd that algebra, its gathers and its backward were about two thirds of a render:
    batched 3x3 products a quarter, LU solves a tenth).  Outputs the kept pairs only: ``centre (K, 3)``, ``prec (K, 3, 3)``, ``amp (K,)``,
    and, not differentiable, their indices into the pairs ``keep (K,)`` and box half-widths."""

    @staticmethod
    def forward(ctx, R, tr, mu, cov, s3, inten, b_idx, j_idx, sig, D, half, hw, truncate, max_rad):
        from slice2vol.core import fused

        k = splat_mod.compiled_kernels()
        dt = mu.dtype
        ins = [x.detach().contiguous() for x in (R, tr, mu, cov, s3, inten)]
        aux = [x.detach().contiguous() for x in (b_idx, j_idx, sig, D, half)] + [hw.contiguous()]
        Q = b_idx.shape[0]
        centre, prec, amp = torch.empty(Q, 3, dtype=dt), torch.empty(Q, 3, 3, dtype=dt), torch.empty(Q, dtype=dt)
        rad, inside = np.empty(Q, dtype=np.int64), np.empty(Q, dtype=np.bool_)
        if Q:
            fused._launch(k.pairs_forward_kernel, *(x.numpy() for x in ins + aux), float(truncate), int(max_rad),
                          centre.numpy(), prec.numpy(), amp.numpy(), rad, inside)
        keep = torch.from_numpy(np.flatnonzero(inside))
        ctx.save_for_backward(*ins, b_idx[keep].contiguous(), j_idx[keep].contiguous(), *aux[2:4])
        ctx.mark_non_differentiable(keep)
        return centre[keep], prec[keep], amp[keep], keep, torch.from_numpy(rad)[keep]

    @staticmethod
    def backward(ctx, g_centre, g_prec, g_amp, _keep, _rad):
        from slice2vol.core import fused

        R, tr, mu, cov, s3, inten, b_k, j_k, sig, D = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (R, tr, mu, cov, s3, inten)]
        K = b_k.shape[0]
        gs = [torch.zeros(sh, dtype=mu.dtype) if g is None else g.detach().to(mu.dtype).contiguous()
              for g, sh in ((g_centre, (K, 3)), (g_prec, (K, 3, 3)), (g_amp, (K,)))]
        scratch = np.empty((K, 23))
        fused._launch(splat_mod.compiled_kernels().pairs_backward_kernel, *(x.numpy() for x in (R, tr, mu, cov, s3, inten, b_k,
                      j_k, sig, D)), *(g.numpy() for g in gs), *(g.numpy() for g in grads), scratch)
        return (*grads,) + (None,) * 8


def dense_gaussians(model: GaussianModel | dict, points: Tensor) -> Tensor:
    """Brute-force ``V(x)`` at ``(N, 3)`` world points with no truncation (for tests; O(N J) memory)."""
    t = model.tensors() if isinstance(model, GaussianModel) else model
    d = points[:, None, :] - t["means"][None]
    P = precision(t["log_scales"], t["quats"])
    qf = torch.einsum("nja,jab,njb->nj", d, P, d)
    return (t["intensities"][None] * torch.exp(-0.5 * qf)).sum(1)
