"""Signal loss (slices darkened by fetal motion during their acquisition): detection in
``core.preprocess.signal_loss_pixels`` and its use by ``prepare``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.core.image import Stack, Volume
from slice2vol.core.preprocess import prepare, signal_loss_pixels
from slice2vol.simulation.simulate import signal_loss_field


def _stack(n=12, h=40, w=36, spacing=1.0, seed=0) -> Stack:
    """A smooth blob seen in ``n`` parallel slices 3 mm apart, with a little texture and noise."""
    g = torch.Generator().manual_seed(seed)
    k, i, j = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                             torch.arange(w, dtype=torch.float32), indexing="ij")
    r2 = ((i - h / 2) / (0.4 * h)) ** 2 + ((j - w / 2) / (0.4 * w)) ** 2 + ((k - n / 2) / (0.55 * n)) ** 2
    body = (r2 < 1).float()
    tex = 1 + 0.3 * torch.sin(i / 3) * torch.cos(j / 4 + k / 2)
    data = 1000 * body * tex + 10 * torch.rand((n, h, w), generator=g)
    A = np.diag([spacing, spacing, 3.0, 1.0])
    poses = np.stack([np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3.0 * kk], [0, 0, 0, 1]], dtype=np.float64)
                      for kk in range(n)])
    return Stack(name="synthetic.nii.gz", slices=data, mask=body.bool(), affine=A, poses=poses,
                 spacing=(spacing, spacing), thickness=3.0, index=np.arange(n), order=None)


def test_undamaged_stack_has_no_signal_loss():
    st = _stack()
    assert not bool(signal_loss_pixels(st).any())


def test_a_dark_slice_and_a_dark_band_are_found_and_nothing_else():
    st = _stack()
    n, h, w = st.slices.shape
    band = {"angle_deg": 0.0, "offset": 0.0, "width": 0.2}
    losses = [{"slice": 4, "depth": 0.8, "band": None}, {"slice": 7, "depth": 0.9, "band": band}]
    field = signal_loss_field(losses, n, h, w)
    dark = Stack(**{**st.__dict__, "slices": st.slices * field})
    flagged = signal_loss_pixels(dark)
    interior = st.mask.clone()
    assert bool(flagged[4][interior[4] & (field[4] < 0.5)].float().mean() > 0.9)  # the whole dark slice
    lost7 = interior[7] & (field[7] < 0.4)
    assert bool(flagged[7][lost7].float().mean() > 0.8)  # the band's core
    assert not bool(flagged[7][interior[7] & (field[7] > 0.95)].any())  # not beside the band
    others = [k for k in range(n) if k not in (4, 7)]
    assert not bool(flagged[others].any())  # its neighbours are brighter, not lost
    assert not bool((flagged & ~st.mask).any())


def test_both_neighbours_must_be_there_and_consecutive():
    """A pixel is compared with both spatial neighbours: a lost slice at the stack's end, or next
    to a gap in the file's slice indices, is left to the robust statistics (the end of an object
    is darker than its one neighbour by partial volume)."""
    st = _stack()
    n = st.slices.shape[0]
    for k in (0, 5):
        field = signal_loss_field([{"slice": k, "depth": 0.8, "band": None}], *st.slices.shape)
        dark = Stack(**{**st.__dict__, "slices": st.slices * field})
        assert bool(signal_loss_pixels(dark)[k].any()) == (k == 5)
    gap = Stack(**{**dark.__dict__, "index": np.r_[np.arange(6), np.arange(7, n + 1)]})  # 5 and 6 not adjacent
    assert not bool(signal_loss_pixels(gap)[5].any())


def test_prepare_leaves_lost_pixels_out_with_stack_masks_only():
    stacks = [_stack(seed=s) for s in range(3)]
    n, h, w = stacks[0].slices.shape
    field = signal_loss_field([{"slice": 5, "depth": 0.8, "band": None}], n, h, w)
    stacks[1] = Stack(**{**stacks[1].__dict__, "slices": stacks[1].slices * field})
    prep = prepare(stacks, 2.0, have_stack_masks=True, register=False)
    assert not bool(prep.stacks[1].mask[5].any()) and bool(stacks[1].mask[5].any())
    assert torch.equal(prep.stacks[0].mask, stacks[0].mask)
    rec = prep.signal_loss
    assert rec["applied"] and [s["slices"] for s in rec["stacks"]] == [[], [5], []]
    assert rec["stacks"][1]["pixels"] == int(stacks[1].mask[5].sum())
    kept = prepare(stacks, 2.0, have_stack_masks=True, register=False, detect_signal_loss=False)
    assert torch.equal(kept.stacks[1].mask, stacks[1].mask) and kept.signal_loss == {"applied": False, "why": "turned off"}
    # one 3D mask in the template's frame: no detection (it does not follow a moving brain)
    vol = Volume(torch.ones(h, w, n), stacks[0].affine, torch.ones(h, w, n, dtype=torch.bool))
    masked = prepare(stacks, 2.0, mask=vol, template=0, register=False)
    assert bool(masked.stacks[1].mask[5].any()) and not masked.signal_loss["applied"]


@pytest.mark.parametrize("spacing", [0.8, 1.5])
def test_detection_scales_with_the_pixel_spacing(spacing):
    """The smoothing is in mm: the same loss is found at another in-plane resolution."""
    st = _stack(spacing=spacing)
    field = signal_loss_field([{"slice": 6, "depth": 0.8, "band": None}], *st.slices.shape)
    dark = Stack(**{**st.__dict__, "slices": st.slices * field})
    f = signal_loss_pixels(dark)
    assert bool(f[6].any()) and not bool(f[5].any())
