"""The cSVR network (paper Section 4 and supplement A), sized for CPU training.

Shapes: a stack in network form has ``N`` slices of ``H x W`` working pixels (see
:mod:`.inputs`); level ``l = 0..L-1`` of the encoder has ``h_l x w_l`` pixels with
``h_0 = H`` and ``h_{l+1} = ceil(h_l / 2)``; level-``l`` pixel ``m`` sits at working pixel
``2^l m``.  All positions are in the centred world frame (world minus the input centre), mm.

* **Encoder**: one 2D CNN with shared weights over every slice of every stack; level ``l`` gives
  ``channels[l]`` features per pixel (stride-2 convolutions between levels).
* **Initial positions (eq. 8)**: at the coarsest level, pixel ``p = (a, b)`` of slice ``n`` goes
  to ``R_n (S_s (p - C_s)) + t_n``: ``C_s`` centres the pixel indices on the slice centre,
  ``S_s`` scales them to mm at that level (``2^s x`` working spacing), ``R_n`` is the stack
  orientation (shared by the stack's slices) and ``t_n`` the slice's prescribed position from
  its index (``T_n``), i.e. the header ("nominal") pose of the slice.
* **Decoder**, coarse to fine, one block per level:
  (a) push the level's slice features into a feature volume (a cube of side ``fov`` mm with
  voxels of the level's pixel size) at the current positions, normalised by the pushed mask
  weights (eq. 5); (b) pull simulated slice features back at the same positions (eq. 6);
  (c) a small 2D CNN sees acquired and simulated features plus the pixel's in-plane coordinate
  and predicts a displacement update (eq. 7) in the slice's current frame (rotation of the
  per-slice rigid fit, treated as a constant), in units of the level's pixel size.
  Between levels the positions are carried as the per-slice rigid fit plus the bilinearly
  upsampled non-rigid residual.
* **Output**: at the finest level the displacement field of each slice is projected to one
  rigid transform by mask-weighted Kabsch/Arun: one pose per slice.

Differences from the paper (to fit a 1-thread CPU): 2D (not (2, 3, 3) 3D) decoder kernels, two
convolutions per encoder level instead of four, and 2.5 x 10^5 instead of 6.6 x 10^8 parameters (default config).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from slice2vol.core.transforms import kabsch
from slice2vol.methods.csvr.inputs import NetworkInput
from slice2vol.methods.csvr.operators import pull, push_normalised

__all__ = ["CSVRConfig", "CSVRNet", "LevelState", "level_coords", "initial_positions", "rigid_fit"]

_COORD_SCALE = 50.0  # mm: in-plane coordinates enter the update CNNs as u / 50, v / 50


@dataclass
class CSVRConfig:
    """Architecture hyper-parameters (saved with the weights).

    Attributes:
        channels: features per encoder level, fine to coarse (its length is the number of levels).
        hidden: hidden channels of each level's update CNN, fine to coarse.
        spacing: working in-plane pixel spacing mm (level 0).
        fov: side of the cubic feature volumes mm (centred on the brain).
        iterations: update blocks per level, fine to coarse (the paper: 1 each).
    """

    channels: tuple[int, ...] = (8, 16, 24, 32, 32)
    hidden: tuple[int, ...] = (16, 24, 32, 48, 48)
    spacing: float = 2.0
    fov: float = 160.0
    iterations: tuple[int, ...] = (1, 1, 1, 1, 1)

    @property
    def levels(self) -> int:
        return len(self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CSVRConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.1))


class Encoder(nn.Module):
    """Shared 2D slice encoder: ``(B, 2, H, W)`` -> list of ``(B, channels[l], h_l, w_l)``."""

    def __init__(self, channels: tuple[int, ...], in_ch: int = 2):
        super().__init__()
        blocks, c = [], in_ch
        for l, cl in enumerate(channels):
            blocks.append(nn.Sequential(_conv(c, cl, 1 if l == 0 else 2), _conv(cl, cl)))
            c = cl
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for b in self.blocks:
            x = b(x)
            out.append(x)
        return out


class UpdateBlock(nn.Module):
    """Eq. 7's ``Delta f``: (acquired, simulated features, coordinates) -> ``(B, 3, h, w)`` update."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(_conv(2 * channels + 2, hidden), _conv(hidden, hidden), _conv(hidden, hidden))
        self.out = nn.Conv2d(hidden, 3, 3, 1, 1)
        # Zero start: an untrained block leaves the positions where they are (identity motion).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, acquired: Tensor, simulated: Tensor, uv: Tensor) -> Tensor:
        return self.out(self.net(torch.cat([acquired, simulated, uv], 1)))


def level_coords(h: int, w: int, H: int, W: int, spacing: tuple[float, float], level: int,
                 device: torch.device | str | None = None) -> Tensor:
    """Slice-frame mm ``(h, w, 3)`` of level-``level`` pixels (pixel ``m`` at working pixel
    ``2^level m``) of an ``H x W`` working slice; ``w = 0``.  This is ``S_s (p - C_s)`` of eq. 8."""
    f = 2 ** level
    u = (torch.arange(h, dtype=torch.float32, device=device) * f - (H - 1) / 2) * spacing[0]
    v = (torch.arange(w, dtype=torch.float32, device=device) * f - (W - 1) / 2) * spacing[1]
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    return torch.stack([uu, vv, torch.zeros_like(uu)], -1)


def initial_positions(poses: Tensor, coords: Tensor) -> Tensor:
    """Eq. 8: prescribed world positions ``(N, h, w, 3)`` of slice pixels ``coords (h, w, 3)``
    under nominal (centred) poses ``(N, 4, 4)`` (``R_n`` and ``T_n`` of the paper)."""
    return torch.einsum("nab,hwb->nhwa", poses[:, :3, :3], coords) + poses[:, None, None, :3, 3]


def rigid_fit(coords: Tensor, positions: Tensor, weights: Tensor) -> Tensor:
    """Per-slice weighted Kabsch/Arun: rigid ``(N, 4, 4)`` mapping slice-frame ``coords (h, w, 3)``
    closest to ``positions (N, h, w, 3)`` with pixel ``weights (N, h, w)``.

    A small floor on the weights keeps slices without (or with collinear) mask pixels defined:
    they then follow the field over their whole plane.  Computed in float64 for the SVD.
    """
    N = positions.shape[0]
    src = coords.reshape(1, -1, 3).expand(N, -1, 3).double()
    dst = positions.reshape(N, -1, 3).double()
    w = weights.reshape(N, -1).double() + 1e-3
    return kabsch(src, dst, w).to(positions.dtype)


def _apply_rigid(T: Tensor, coords: Tensor) -> Tensor:
    """``(N, 4, 4)`` transforms of ``coords (h, w, 3)`` -> ``(N, h, w, 3)``."""
    return initial_positions(T, coords)


def _upsample(field: Tensor, h: int, w: int) -> Tensor:
    """Residual ``(N, hc, wc, 3)`` at level ``l + 1`` -> ``(N, h, w, 3)`` at level ``l`` (fine pixel
    ``m`` lies at coarse pixel ``m / 2``; constant beyond the last coarse pixel)."""
    N, hc, wc, _ = field.shape
    kw = {"dtype": field.dtype, "device": field.device}
    gy = torch.arange(h, **kw) / 2 / max(hc - 1, 1) * 2 - 1 if hc > 1 else torch.zeros(h, **kw)
    gx = torch.arange(w, **kw) / 2 / max(wc - 1, 1) * 2 - 1 if wc > 1 else torch.zeros(w, **kw)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    grid = torch.stack([xx, yy], -1).to(field.dtype).expand(N, h, w, 2)
    out = F.grid_sample(field.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.permute(0, 2, 3, 1)


@dataclass
class LevelState:
    """Per-level outputs, coarse to fine; per stack lists.

    Attributes:
        level: encoder level (``L - 1`` first).
        coords: per stack ``(h, w, 3)`` slice-frame mm.
        masks: per stack ``(N, h, w)`` soft mask weights.
        positions: per stack ``(N, h, w, 3)`` predicted centred world positions after the level.
    """

    level: int
    coords: list[Tensor]
    masks: list[Tensor]
    positions: list[Tensor] = field(default_factory=list)


class CSVRNet(nn.Module):
    """See the module doc.  ``forward(NetworkInput) -> (poses (M, 4, 4), [LevelState])``."""

    def __init__(self, config: CSVRConfig | None = None):
        super().__init__()
        self.config = config or CSVRConfig()
        c = self.config
        self.encoder = Encoder(c.channels)
        self.updates = nn.ModuleList(
            nn.ModuleList(UpdateBlock(c.channels[l], c.hidden[l]) for _ in range(c.iterations[l])) for l in range(c.levels))

    def _volume_shape(self, level: int) -> tuple[tuple[int, int, int], float]:
        vox = self.config.spacing * 2 ** level
        n = int(math.ceil(self.config.fov / vox / 2)) * 2 + 1  # odd: a voxel at the centre
        return (n, n, n), (n - 1) / 2 * vox  # shape, half-extent mm (grid coordinate 1)

    def _step(self, level: int, block: UpdateBlock, feats: list[Tensor], st: LevelState, X: list[Tensor]) -> list[Tensor]:
        """One push / pull / update at ``level`` for all stacks (eqs. 5-7)."""
        shape, half = self._volume_shape(level)
        vals, wts, grids = [], [], []
        for f, m, x in zip(feats, st.masks, X):
            keep = m.reshape(-1) > 0
            vals.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])[keep])
            wts.append(m.reshape(-1)[keep])
            grids.append(x.reshape(-1, 3)[keep].flip(-1) / half)  # (k, j, i) <- (x, y, z), axis-aligned cube
        V, _ = push_normalised(torch.cat(vals), torch.cat(wts), torch.cat(grids), shape)
        out = []
        vox = self.config.spacing * 2 ** level
        for f, m, x, c in zip(feats, st.masks, X, st.coords):
            N, C, h, w = f.shape
            sim = pull(V, x.reshape(-1, 3).flip(-1) / half).T.reshape(C, N, h, w).transpose(0, 1)
            uv = (c[..., :2] / _COORD_SCALE).permute(2, 0, 1)[None].expand(N, 2, h, w)
            delta = block(f, sim, uv).permute(0, 2, 3, 1) * vox  # (N, h, w, 3) mm, slice frame
            R = rigid_fit(c, x.detach(), m)[:, :3, :3].detach()
            out.append(x + torch.einsum("nab,nhwb->nhwa", R, delta))
        return out

    def forward(self, inp: NetworkInput) -> tuple[Tensor, list[LevelState]]:
        L = self.config.levels
        feats, masks, coords = [], [], []
        for s in inp.stacks:
            N, _, H, W = s.images.shape
            fl = self.encoder(s.images)
            ml, m = [], s.mask[:, None]
            for l in range(L):
                if l > 0:
                    m = F.avg_pool2d(m, 3, 2, 1, count_include_pad=False)  # centred on pixel 2m, like the convs
                ml.append(m[:, 0])
            feats.append(fl)
            masks.append(ml)
            coords.append([level_coords(fl[l].shape[2], fl[l].shape[3], H, W, s.spacing, l, s.images.device)
                           for l in range(L)])
        states: list[LevelState] = []
        X: list[Tensor] = []
        for l in range(L - 1, -1, -1):
            st = LevelState(l, [c[l] for c in coords], [m[l] for m in masks])
            if l == L - 1:
                X = [initial_positions(s.poses, c) for s, c in zip(inp.stacks, st.coords)]
            else:
                prev = states[-1]
                Xn = []
                for x, cp, mp, c in zip(X, prev.coords, prev.masks, st.coords):
                    T = rigid_fit(cp, x.detach(), mp).detach()
                    resid = x - _apply_rigid(T, cp)
                    Xn.append(_apply_rigid(T, c) + _upsample(resid, c.shape[0], c.shape[1]))
                X = Xn
            for block in self.updates[l]:
                X = self._step(l, block, [f[l] for f in feats], st, X)
            st.positions = X
            states.append(st)
        fine = states[-1]
        poses = torch.cat([rigid_fit(c, x.detach(), m) for c, x, m in zip(fine.coords, fine.positions, fine.masks)])
        return poses, states
