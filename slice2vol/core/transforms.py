"""Batched, differentiable rigid transforms.

Conventions (the only place they are written down):

* A rigid transform is a ``(..., 4, 4)`` homogeneous matrix ``T = [[R, t], [0, 1]]`` mapping
  points in millimetres from one frame to another: ``x' = R @ x + t``.
* Its 6-parameter form is ``(..., 6) = (rx, ry, rz, tx, ty, tz)``: an axis-angle rotation vector
  (radians; direction = axis, norm = angle) followed by a translation in mm.  ``params_to_matrix``
  and ``matrix_to_params`` are inverse to each other for angles in ``[0, pi)``.
* Composition follows matrix multiplication: ``compose(A, B)`` applies ``B`` first.

Everything is pure tensor code that works for any batch shape, dtype and device, and is
differentiable (the small-angle branches avoid the 0/0 of the textbook formulas).

>>> import torch
>>> p = torch.tensor([[0.1, -0.2, 0.3, 1.0, 2.0, 3.0]], dtype=torch.float64)
>>> torch.allclose(matrix_to_params(params_to_matrix(p)), p)
True
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "skew",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "params_to_matrix",
    "matrix_to_params",
    "compose",
    "invert",
    "apply",
    "rotation_about",
    "kabsch",
    "rotation_angle",
]


def skew(v: Tensor) -> Tensor:
    """Cross-product matrix: ``skew(v) @ w == cross(v, w)``. ``(..., 3) -> (..., 3, 3)``."""
    z = torch.zeros_like(v[..., 0])
    x, y, w = v[..., 0], v[..., 1], v[..., 2]
    return torch.stack(
        [torch.stack([z, -w, y], -1), torch.stack([w, z, -x], -1), torch.stack([-y, x, z], -1)], -2
    )


def axis_angle_to_matrix(r: Tensor) -> Tensor:
    """Rodrigues' formula. ``(..., 3)`` rotation vectors (rad) -> ``(..., 3, 3)`` rotations."""
    theta2 = (r * r).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    # Taylor series below 1e-4 rad keep the gradients finite at the identity.
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2_safe)
    K = skew(r)
    eye = torch.eye(3, dtype=r.dtype, device=r.device).expand(K.shape)
    return eye + a * K + b * (K @ K)


def matrix_to_axis_angle(R: Tensor) -> Tensor:
    """Inverse of :func:`axis_angle_to_matrix` for angles in ``[0, pi)``. ``(..., 3, 3) -> (..., 3)``.

    The angle comes from ``atan2(sin, cos)`` (accurate over the whole range, unlike ``acos``) and
    the small-angle branch uses a series, so gradients are finite at the identity.
    """
    trace = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    cos = (trace - 1) / 2
    w = torch.stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1
    )  # 2 sin(theta) * axis
    s2 = (w * w).sum(-1)  # 4 sin^2
    small = s2 < 1e-10
    sin = torch.sqrt(torch.where(small, torch.ones_like(s2), s2)) / 2
    theta = torch.atan2(sin, cos)
    factor = torch.where(small & (cos > 0), 0.5 + s2 / 48, theta / (2 * sin))
    r = w * factor[..., None]
    # Near pi the antisymmetric part vanishes; recover the axis from the symmetric part instead.
    near_pi = (theta > torch.pi - 1e-3) | (small & (cos < 0))
    if bool(near_pi.any()):
        S = (R + R.transpose(-1, -2)) / 2 - cos[..., None, None] * torch.eye(3, dtype=R.dtype, device=R.device)
        idx = torch.diagonal(S, dim1=-2, dim2=-1).argmax(-1)
        axis = torch.gather(S, -1, idx[..., None, None].expand(*S.shape[:-1], 1)).squeeze(-1)
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        # keep the sign consistent with the (tiny) antisymmetric part
        sign = torch.where((axis * w).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(R.dtype)
        # the angle from the true sine (``sin`` above is a placeholder where ``small``): snapping
        # every angle within ~5e-6 rad of pi to pi lost that much accuracy
        ang = torch.atan2(torch.sqrt(s2.clamp_min(1e-300)) / 2, cos)  # clamp: finite gradients at s2 = 0
        r = torch.where(near_pi[..., None], axis * sign * ang[..., None], r)
    return r


def params_to_matrix(p: Tensor) -> Tensor:
    """``(..., 6)`` (axis-angle rad, translation mm) -> ``(..., 4, 4)`` rigid matrices."""
    R = axis_angle_to_matrix(p[..., :3])
    top = torch.cat([R, p[..., 3:, None]], -1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], -2)


def matrix_to_params(T: Tensor) -> Tensor:
    """``(..., 4, 4)`` rigid matrices -> ``(..., 6)`` parameters."""
    return torch.cat([matrix_to_axis_angle(T[..., :3, :3]), T[..., :3, 3]], -1)


def compose(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B``: apply ``B`` first. Broadcasts over batch dimensions."""
    return A @ B


def invert(T: Tensor) -> Tensor:
    """Inverse of rigid ``(..., 4, 4)`` matrices without a general matrix inverse."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    top = torch.cat([Rt, -Rt @ t], -1)
    return torch.cat([top, T[..., 3:, :]], -2)


def apply(T: Tensor, x: Tensor) -> Tensor:
    """Apply ``(..., 4, 4)`` transforms to ``(..., 3)`` points (broadcasting)."""
    return (T[..., :3, :3] @ x[..., None]).squeeze(-1) + T[..., :3, 3]


def rotation_about(p: Tensor, centre: Tensor) -> Tensor:
    """Rigid matrix for parameters ``p`` (..., 6) whose rotation acts about ``centre`` (..., 3) mm.

    ``x' = centre + R (x - centre) + t``: the natural parameterisation for moving an object (a
    slice, a stack, a brain) without swinging it around the world origin.
    """
    T = params_to_matrix(p)
    R = T[..., :3, :3]
    t = T[..., :3, 3] + centre - (R @ centre[..., None]).squeeze(-1)
    T = T.clone()
    T[..., :3, 3] = t
    return T


def kabsch(src: Tensor, dst: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted least-squares rigid transform mapping ``src`` onto ``dst`` (Arun et al. 1987).

    Args:
        src, dst: ``(..., P, 3)`` corresponding points (mm).
        weights: optional ``(..., P)`` non-negative weights.
    Returns:
        ``(..., 4, 4)`` proper rigid transform ``T`` minimising ``sum w |T src - dst|^2``.
    """
    if weights is None:
        weights = torch.ones(src.shape[:-1], dtype=src.dtype, device=src.device)
    w = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    mu_s = (w[..., None] * src).sum(-2)
    mu_d = (w[..., None] * dst).sum(-2)
    H = ((src - mu_s[..., None, :]) * w[..., None]).transpose(-1, -2) @ (dst - mu_d[..., None, :])
    U, _, Vh = torch.linalg.svd(H)
    d = torch.sign(torch.linalg.det(Vh.transpose(-1, -2) @ U.transpose(-1, -2)))
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    R = Vh.transpose(-1, -2) @ D @ U.transpose(-1, -2)
    t = mu_d - (R @ mu_s[..., None]).squeeze(-1)
    T = torch.zeros(*R.shape[:-2], 4, 4, dtype=src.dtype, device=src.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1
    return T


def rotation_angle(R: Tensor) -> Tensor:
    """Angle (rad) of ``(..., 3, 3)`` rotations, or of the rotation part of ``(..., 4, 4)``."""
    R = R[..., :3, :3]
    trace = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    return torch.acos(((trace - 1) / 2).clamp(-1.0, 1.0))
