"""The Gaussian volume model: parameters, initialisation, density control, saving.

A volume is ``V(x) = sum_j I_j exp(-1/2 (x - mu_j)^T Sigma_j^-1 (x - mu_j))`` (GaussianSVR eq. 1)
with ``Sigma_j = R_j S_j^2 R_j^T``: ``R_j`` from a unit quaternion ``(w, x, y, z)`` and ``S_j`` the
diagonal of scales.  All in world millimetres (RAS), so a saved model can be rendered on any grid.

Parameters are stored unconstrained, as 3D Gaussian splatting does: ``log_scales`` (mm) keep the
covariance positive definite and ``quats`` are normalised when used.  Intensities are free (a
slightly negative Gaussian can sharpen an edge); the rendered volume is clamped at 0 only on output.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slice2vol.errors import Slice2VolError

__all__ = ["GaussianModel", "quat_to_matrix", "covariance", "precision", "init_from_volume", "save_gaussians",
           "load_gaussians", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def quat_to_matrix(q: Tensor) -> Tensor:
    """``(J, 4)`` quaternions ``(w, x, y, z)`` (any norm) -> ``(J, 3, 3)`` rotations."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(q.shape[:-1] + (3, 3))


def scaled_outer(M: Tensor, d: Tensor) -> Tensor:
    """``M diag(d) M^T`` for ``M (J, 3, 3)``, ``d (J, 3)``: one batched product (a product with
    ``diag_embed(d)`` is a second one, and batched 3x3 products and their backward are most of
    the cost for tens of thousands of Gaussians on the CPU)."""
    return (M * d[:, None, :]) @ M.transpose(-1, -2)


def covariance(log_scales: Tensor, quats: Tensor) -> Tensor:
    """``(J, 3, 3)`` world covariances (mm^2)."""
    return scaled_outer(quat_to_matrix(quats), torch.exp(2 * log_scales))


def precision(log_scales: Tensor, quats: Tensor) -> Tensor:
    """``(J, 3, 3)`` world precisions (mm^-2), built from the factors (no matrix inverse)."""
    return scaled_outer(quat_to_matrix(quats), torch.exp(-2 * log_scales))


class GaussianModel(torch.nn.Module):
    """``J`` anisotropic 3D Gaussians: ``means (J, 3)`` mm, ``log_scales (J, 3)`` log mm,
    ``quats (J, 4)``, ``intensities (J,)`` (template intensity units, peak value)."""

    def __init__(self, means: Tensor, log_scales: Tensor, quats: Tensor, intensities: Tensor):
        super().__init__()
        self.means = torch.nn.Parameter(means.detach().clone())
        self.log_scales = torch.nn.Parameter(log_scales.detach().clone())
        self.quats = torch.nn.Parameter(quats.detach().clone())
        self.intensities = torch.nn.Parameter(intensities.detach().clone())

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def covariance(self) -> Tensor:
        return covariance(self.log_scales, self.quats)

    def precision(self) -> Tensor:
        return precision(self.log_scales, self.quats)

    def tensors(self) -> dict[str, Tensor]:
        return {"means": self.means, "log_scales": self.log_scales, "quats": self.quats,
                "intensities": self.intensities}

    # ------------------------------------------------------------------ density control
    def replace(self, keep: Tensor, new: dict[str, Tensor] | None, optimizer: torch.optim.Optimizer | None) -> None:
        """Keep the Gaussians where ``keep (J,)`` is true, append ``new`` ones, and carry the
        Adam moments of kept Gaussians over (new ones start at zero moments, as in 3DGS).

        Each parameter is replaced by a new ``Parameter`` (autograd caches a leaf's shape, so
        resizing ``.data`` in place would break the next backward pass) and swapped into the
        optimiser's parameter groups."""
        for name, p in list(self.tensors().items()):
            data = p.data[keep]
            extra = 0
            if new is not None:
                data = torch.cat([data, new[name].to(data)])
                extra = new[name].shape[0]
            q = torch.nn.Parameter(data)
            if optimizer is not None:
                state = optimizer.state.pop(p, None)
                for group in optimizer.param_groups:
                    group["params"] = [q if x is p else x for x in group["params"]]
                if state is not None:
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k in state:
                            s = state[k][keep]
                            state[k] = torch.cat([s, s.new_zeros((extra,) + s.shape[1:])])
                    optimizer.state[q] = state
            setattr(self, name, q)

    def densify_and_prune(self, grad_accum: Tensor, count: Tensor, grad_threshold: float, split_scale: float,
                          min_intensity: float, max_scale: float, max_gaussians: int,
                          optimizer: torch.optim.Optimizer | None, generator: torch.Generator | None = None) -> dict:
        """Adaptive density control (3DGS / GaussianSVR).

        Gaussians whose mean positional gradient exceeds ``grad_threshold`` are cloned when small
        (largest scale <= ``split_scale`` mm) and split in two (samples of the Gaussian, scales
        divided by 1.6) when large.  Gaussians fainter than ``min_intensity`` in magnitude or larger
        than ``max_scale`` mm are pruned.  Growth stops at ``max_gaussians``, largest gradients first.
        Returns counts of what was done.
        """
        with torch.no_grad():
            J = len(self)
            g = grad_accum / count.clamp_min(1)
            smax = torch.exp(self.log_scales.max(1).values)
            grow = g > grad_threshold
            room = max(0, max_gaussians - J)
            if int(grow.sum()) > room:
                order = torch.argsort(torch.where(grow, g, torch.full_like(g, -1.0)), descending=True)
                grow = torch.zeros_like(grow)
                grow[order[:room]] = True
            clone = grow & (smax <= split_scale)
            split = grow & (smax > split_scale)
            new = {k: [] for k in ("means", "log_scales", "quats", "intensities")}
            if bool(clone.any()):
                for k, p in self.tensors().items():
                    new[k].append(p.data[clone])
            if bool(split.any()):
                R = quat_to_matrix(self.quats.data[split])
                s = torch.exp(self.log_scales.data[split])
                for _ in range(2):
                    z = torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)
                    new["means"].append(self.means.data[split] + (R @ (z * s)[..., None])[..., 0])
                    new["log_scales"].append(self.log_scales.data[split] - math.log(1.6))
                    new["quats"].append(self.quats.data[split])
                    new["intensities"].append(self.intensities.data[split])
            prune = (self.intensities.data.abs() < min_intensity) | (smax > max_scale) | split
            new_t = {k: torch.cat(v) if v else p.data[:0] for (k, v), p in zip(new.items(), self.tensors().values())}
            self.replace(~prune, new_t, optimizer)
            return {"cloned": int(clone.sum()), "split": int(split.sum()),
                    "pruned": int(prune.sum() - split.sum()), "total": len(self)}


def _edge_strength(volume: Tensor) -> Tensor:
    """Gradient magnitude by central differences (voxel units)."""
    v = volume[None, None]
    g = []
    for dim in (2, 3, 4):
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = 1
        p = F.pad(v, pad, mode="replicate")
        n = p.shape[dim]
        g.append((p.narrow(dim, 2, n - 2) - p.narrow(dim, 0, n - 2)) / 2)
    return torch.sqrt(sum(x * x for x in g))[0, 0]


def init_from_volume(volume: Tensor, affine: np.ndarray, roi: Tensor, n_foreground: int, n_background: int = 50,
                     edge_weight: float = 1.0, size_factor: float = 0.7, generator: torch.Generator | None = None
                     ) -> GaussianModel:
    """Place Gaussians inside the brain from an initial volume (the core pipeline's eq. 2 average).

    Foreground centres are drawn from voxels of ``roi`` with probability proportional to
    ``intensity + edge_weight * edge strength`` (both normalised to their 99th percentile), so
    more, smaller Gaussians go where there is signal and detail; each is jittered within its
    voxel.  Their isotropic scale is ``size_factor`` times the local spacing implied by that
    sampling density, and their intensity makes the sum of overlapping Gaussians reproduce the
    volume (a closed form for the local density, then one global least-squares factor by the
    caller).  ``n_background`` faint, large Gaussians sit outside the ROI, inside its bounding box,
    as the paper's sparse background set.

    Args:
        volume: ``(Ni, Nj, Nk)`` initial volume.
        affine: its voxel-to-world ``(4, 4)``; may be any rigid-times-scaling grid.
        roi: ``(Ni, Nj, Nk)`` bool brain region.
    """
    dev, dt = volume.device, torch.float32
    A = torch.as_tensor(affine, dtype=dt, device=dev)
    vox = float(torch.linalg.det(A[:3, :3]).abs())  # mm^3 per voxel
    v = volume.to(dt).clamp_min(0)
    idx = torch.nonzero(roi, as_tuple=False)
    if idx.shape[0] == 0:
        raise Slice2VolError("gaussian: the region of interest is empty")
    val = v[roi]
    ref = torch.quantile(val[:: max(1, val.numel() // 100000)], 0.99).clamp_min(1e-6)
    edge = _edge_strength(v)[roi]
    eref = torch.quantile(edge[:: max(1, edge.numel() // 100000)], 0.99).clamp_min(1e-6)
    p = (val / ref).clamp(0, 1) + edge_weight * (edge / eref).clamp(0, 1) + 0.05
    p = p / p.sum()
    # in the voxels' raster order: Gaussians near each other in memory splat near each other on a
    # lattice, so the splat kernels find their rows in cache (~20% of their time at 60k Gaussians)
    pick = torch.multinomial(p, n_foreground, replacement=True, generator=generator).sort().values
    jitter = torch.rand((n_foreground, 3), generator=generator, device=dev, dtype=dt) - 0.5
    grid_pts = idx[pick].to(dt) + jitter
    means = grid_pts @ A[:3, :3].T + A[:3, 3]
    # local density: expected Gaussians per mm^3 near each picked voxel
    density = p[pick] * n_foreground / vox
    sigma = size_factor * density.pow(-1.0 / 3.0)
    sigma = sigma.clamp(0.25 * vox ** (1 / 3), 4.0 * vox ** (1 / 3))
    # sum over overlapping Gaussians ~ I * density * (2 pi)^1.5 sigma^3
    inten = v[tuple(idx[pick].T)] / (density * (2 * math.pi) ** 1.5 * sigma ** 3)
    means_bg, sig_bg = [], []
    if n_background > 0:
        lo, hi = idx.min(0).values.to(dt), idx.max(0).values.to(dt)
        out = ~roi
        cand = torch.nonzero(out, as_tuple=False)
        cand = cand[((cand >= lo) & (cand <= hi)).all(1)]
        if cand.shape[0] > 0:
            sel = cand[torch.randint(cand.shape[0], (n_background,), generator=generator, device=dev)]
            means_bg = sel.to(dt) @ A[:3, :3].T + A[:3, 3]
            sig_bg = torch.full((n_background,), 2.0 * vox ** (1 / 3), device=dev, dtype=dt)
    if len(means_bg):
        means = torch.cat([means, means_bg])
        sigma = torch.cat([sigma, sig_bg])
        inten = torch.cat([inten, torch.zeros(n_background, device=dev, dtype=dt) + 1e-3 * float(ref)])
    J = means.shape[0]
    quats = torch.zeros(J, 4, device=dev, dtype=dt)
    quats[:, 0] = 1
    return GaussianModel(means, torch.log(sigma)[:, None].repeat(1, 3), quats, inten)


def save_gaussians(model: GaussianModel, path, meta: dict | None = None, protect=()) -> None:
    """Write the primitives (world mm) to a ``.pt`` file, atomically, with a format version."""
    from slice2vol.io import atomic_write

    payload = {"format": "slice2vol-gaussians", "version": FORMAT_VERSION,
               **{k: v.detach().float().cpu() for k, v in model.tensors().items()}, "meta": meta or {}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp), protect=protect)


def load_gaussians(path, device: torch.device | str = "cpu") -> tuple[GaussianModel, dict]:
    """Read a file written by :func:`save_gaussians`; clear errors for anything else."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise Slice2VolError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise Slice2VolError(f"{path}: not a slice2vol Gaussian file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != "slice2vol-gaussians":
        raise Slice2VolError(f"{path}: not a slice2vol Gaussian file")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise Slice2VolError(f"{path}: written by a newer slice2vol (format {payload['version']})")
    model = GaussianModel(payload["means"], payload["log_scales"], payload["quats"], payload["intensities"]).to(device)
    return model, dict(payload.get("meta", {}))
