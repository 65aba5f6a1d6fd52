"""Atlas (standard) output space: slice2vol.methods.atlas and ``--output-space`` (issue 14, item 4)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from slice2vol.core.image import Volume
from slice2vol.errors import Slice2VolError
from slice2vol.methods import atlas as atlas_mod
from slice2vol.methods.atlas import ATLAS_DIR, load_atlas, register_to_atlas, to_atlas_space


def _rotation(axis, deg) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(deg)
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def _angle_deg(T: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(T[:3, :3]) - 1) / 2, -1, 1))))


def _brain_centre(atlas, w: int) -> np.ndarray:
    idx = torch.nonzero(atlas.mask[w]).double().numpy()
    return (idx @ atlas.affine[:3, :3].T + atlas.affine[:3, 3]).mean(0)


WEEK = 28


@pytest.fixture(scope="module")
def placed():
    """Shipped week 28 with the head turned 130 deg about an oblique axis and shifted 16 mm:
    ``(volume in the scanner, M atlas -> scanner, registration result)``."""
    torch.set_num_threads(1)
    atlas = load_atlas()
    w = atlas.weeks.index(WEEK)
    c = _brain_centre(atlas, w)
    M = np.eye(4)
    M[:3, :3] = _rotation([0.3, -0.8, 0.5], 130.0)
    M[:3, 3] = c - M[:3, :3] @ c + np.array([12.0, -7.0, 9.0])
    vol = Volume(atlas.t2[w] * 1000.0 * atlas.mask[w], M @ atlas.affine)
    res = register_to_atlas(vol, weeks=(24, 26, 28, 30, 32))
    torch.set_num_threads(2)
    return vol, M, res


def test_shipped_atlas_is_complete_small_licensed_and_symmetric():
    meta = json.loads((ATLAS_DIR / "atlas.json").read_text())
    atlas = load_atlas()
    assert atlas.weeks == tuple(range(21, 39)) == tuple(meta["weeks"])
    assert atlas.t2.shape[0] == atlas.mask.shape[0] == 18 and atlas.t2.shape[1:] == atlas.mask.shape[1:]
    assert all(bool(atlas.mask[w].any()) for w in range(18))
    assert np.all(np.diff(atlas.brain_ml) > 0)  # the brain grows week by week
    total = sum(p.stat().st_size for p in ATLAS_DIR.iterdir())
    assert total < 5 * 2**20, total
    assert "BSD 3-Clause" in (ATLAS_DIR / "LICENSE.txt").read_text()
    readme = (ATLAS_DIR / "README.md").read_text()
    assert "Gholipour" in readme and "Scientific Reports 7:476" in readme
    # every week is symmetric about x = 0 (the grid is its own mirror image): standard mid-sagittal plane
    x = atlas.affine[0, 0] * np.arange(atlas.t2.shape[1]) + atlas.affine[0, 3]
    assert np.allclose(x, -x[::-1])
    assert torch.allclose(atlas.t2, torch.flip(atlas.t2, [1]), atol=1e-3)
    assert np.allclose(atlas.affine[:3, :3], np.eye(3) * atlas.resolution)


def test_recovers_a_large_known_rotation_and_offset(placed):
    vol, M, res = placed
    E = res.transform @ M  # atlas -> atlas: the identity if the truth was recovered
    c = _brain_centre(load_atlas(), load_atlas().weeks.index(WEEK))
    assert _angle_deg(E) < 1.0
    assert np.linalg.norm(E[:3, :3] @ c + E[:3, 3] - c) < 1.0
    R = res.transform[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3), atol=1e-6) and np.linalg.det(R) > 0
    assert np.allclose(res.transform[3], [0, 0, 0, 1])


def test_whole_brain_passes_the_reliability_check(placed):
    _, _, res = placed
    assert res.disagreement_deg < 2.0  # forward and reverse registrations agree on a whole brain
    assert res.reliable
    assert res.coverage > 0.95  # the placed atlas brain lies inside the volume's region of interest
    assert res.symmetry_ncc[0] > 0.9  # the placed mid-sagittal plane is the brain's plane of symmetry
    assert res.symmetry_margin > 0.5 and res.symmetry_margin == res.symmetry_ncc[0] - max(res.symmetry_ncc[1:])
    rec = res.to_dict()
    assert rec["reliable"] is True and rec["directions_disagree_deg"] == pytest.approx(res.disagreement_deg)
    assert rec["doubts"] == [] and rec["mirror_ncc_sagittal_coronal_axial"] == pytest.approx(list(res.symmetry_ncc))


def test_mirror_ncc_is_high_only_about_the_mid_sagittal_plane(placed):
    vol, M, _ = placed
    data = vol.data.float()
    brain = data > 0
    T = np.linalg.inv(M)  # the true scanner -> atlas transform
    assert atlas_mod.mirror_ncc(data, vol.affine, brain, T) > 0.95  # the atlas weeks are exactly symmetric
    assert atlas_mod.mirror_ncc(data, vol.affine, brain, T, axis=1) < 0.5  # front-back: no symmetry
    assert atlas_mod.mirror_ncc(data, vol.affine, brain, T, axis=2) < 0.5
    swap = np.eye(4)
    swap[:3, :3] = _rotation([0, 0, 1], 90.0)  # the atlas turned 90 deg about its vertical axis
    assert atlas_mod.mirror_ncc(data, vol.affine, brain, swap @ T) < 0.5
    assert atlas_mod.mirror_ncc(data, vol.affine, brain, swap @ T, axis=1) > 0.95  # the symmetry plane moved there


def _cut(week: int, axis: int, keep_below: bool, M: np.ndarray):
    """Shipped ``week`` at head pose ``M`` with a quarter of its brain (along atlas ``axis``, the
    top / front when ``keep_below``) outside the volume and its region of interest."""
    from slice2vol.core.resample import max_filter

    atlas = load_atlas()
    w = atlas.weeks.index(week)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in atlas.mask[w].shape], indexing="ij"), -1).double()
    world = idx @ torch.as_tensor(atlas.affine[:3, :3]).T + torch.as_tensor(atlas.affine[:3, 3])
    v = world[atlas.mask[w]][:, axis].numpy()
    keep = world[..., axis] <= np.quantile(v, 0.75) if keep_below else world[..., axis] >= np.quantile(v, 0.25)
    roi = (max_filter(atlas.mask[w].float(), 2) > 0) & keep
    return Volume(atlas.t2[w] * 1000.0 * atlas.mask[w] * keep, M @ atlas.affine), roi


def test_reliability_check_catches_a_brain_misplaced_for_lack_of_its_back(placed):
    """The back quarter missing, the brain comes out ~90 deg off and both directions fail the
    same way only rarely; here they disagree (measured 89.7 deg apart).  The top quarter missing,
    the placement stays right and the check passes: it flags a wrong placement, not a cut."""
    torch.set_num_threads(1)
    try:
        _, M, _ = placed
        vol, roi = _cut(WEEK, 1, False, M)
        bad = register_to_atlas(vol, roi, weeks=(24, 26, 28, 30, 32))
        assert _angle_deg(bad.transform @ M) > 20.0
        assert not bad.reliable and bad.disagreement_deg > atlas_mod.MAX_DISAGREEMENT_DEG
        vol, roi = _cut(WEEK, 2, True, M)
        good = register_to_atlas(vol, roi, weeks=(24, 26, 28, 30, 32))
        assert _angle_deg(good.transform @ M) < 3.0
        assert good.reliable
    finally:
        torch.set_num_threads(2)


def test_week_is_the_best_match(placed):
    _, _, res = placed
    assert res.week == WEEK
    assert set(res.scores) == {24, 26, 28, 30, 32}
    assert res.scores[WEEK] == max(res.scores.values()) and 0.9 < res.score <= 1.0
    assert res.scores[24] < res.scores[26] < res.scores[28] > res.scores[30] > res.scores[32]


def test_to_atlas_space_gives_an_axis_aligned_grid_on_the_atlas(placed):
    vol, M, _ = placed
    out = to_atlas_space(vol, np.linalg.inv(M), 1.5)
    assert np.allclose(out.affine[:3, :3], np.eye(3) * 1.5)  # RAS, identity rotation
    atlas = load_atlas()
    w = atlas.weeks.index(WEEK)
    # the output, read at the atlas's voxel centres, is the atlas itself
    from slice2vol.core.resample import resample

    back = resample(out.data, out.affine, atlas.affine, atlas.mask.shape[1:])
    # inside the brain (one voxel in from its edge, which two resamplings blur into the background)
    m = -torch.nn.functional.max_pool3d(-atlas.mask[w].float()[None, None], 3, 1, 1)[0, 0] > 0
    a, b = back[m].double(), (atlas.t2[w][m] * 1000.0).double()
    ncc = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    assert ncc > 0.97
    assert bool(out.mask.any()) and out.data[~out.mask].abs().max() == 0


def test_to_atlas_space_of_the_identity_keeps_values():
    data = torch.zeros(20, 22, 24)
    data[5:15, 6:16, 7:17] = torch.linspace(1, 2, 10)[:, None, None]
    A = np.diag([1.0, 1.0, 1.0, 1.0])
    A[:3, 3] = (-10.0, -11.0, -12.0)
    out = to_atlas_space(Volume(data, A), np.eye(4), 1.0, mask=data > 0, margin_mm=0.0)
    assert out.shape == (10, 10, 10)
    assert np.allclose(out.affine[:3, 3], A[:3, 3] + (5, 6, 7))
    assert torch.allclose(out.data, data[5:15, 6:16, 7:17], atol=1e-4)


@pytest.mark.parametrize("T, message", [
    (np.diag([1.1, 1.0, 1.0, 1.0]), "rigid"),
    (np.diag([-1.0, 1.0, 1.0, 1.0]), "rigid"),  # a mirror is not a rigid motion
    (np.full((4, 4), np.nan), "finite"),
    (np.eye(3), "4x4"),
])
def test_to_atlas_space_refuses_a_bad_transform(T, message):
    vol = Volume(torch.ones(4, 4, 4), np.eye(4))
    with pytest.raises(Slice2VolError, match=message):
        to_atlas_space(vol, T, 1.0)


def test_clear_errors():
    vol = Volume(torch.zeros(10, 10, 10), np.eye(4))
    with pytest.raises(Slice2VolError, match="no positive voxels"):
        register_to_atlas(vol)
    with pytest.raises(Slice2VolError, match="does not match"):
        register_to_atlas(Volume(torch.ones(10, 10, 10), np.eye(4)), torch.ones(9, 10, 10, dtype=torch.bool))
    with pytest.raises(Slice2VolError, match=r"weeks \[19, 40\] are not shipped"):
        register_to_atlas(Volume(torch.ones(10, 10, 10), np.eye(4)), weeks=(19, 30, 40))
    with pytest.raises(Slice2VolError, match="empty"):
        to_atlas_space(Volume(torch.ones(4, 4, 4), np.eye(4)), np.eye(4), 1.0, mask=torch.zeros(4, 4, 4, dtype=torch.bool))


def test_missing_atlas_names_the_way_out(tmp_path):
    with pytest.raises(Slice2VolError, match="--output-space scanner"):
        load_atlas(str(tmp_path))


# ------------------------------------------------------------------------------------ CLI


def test_output_space_option():
    from slice2vol.cli.parser import build_parser

    p = build_parser()
    args = p.parse_args(["reconstruct", "a.nii.gz", "-o", "x.nii.gz"])
    assert args.output_space in atlas_mod.OUTPUT_SPACES
    assert p.parse_args(["demo", "-o", "d", "--output-space", "atlas"]).output_space == "atlas"
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["reconstruct", "a.nii.gz", "-o", "x.nii.gz", "--output-space", "mni"])
    assert exc.value.code == 2


def test_scanner_output_space_leaves_the_volume_alone(placed):
    from slice2vol.cli.commands import _to_output_space

    vol, _, _ = placed
    extra = {}
    out = _to_output_space(argparse.Namespace(output_space="scanner", resolution=1.5), vol, None, extra)
    assert out is vol
    assert extra == {"output_space": "scanner"}


def test_atlas_output_space_records_week_and_transform(placed, monkeypatch, tmp_path, capsys):
    from slice2vol import io
    from slice2vol.cli.commands import _to_output_space

    vol, M, res = placed
    calls = []

    def fake(volume, mask=None, **kw):  # the registration itself is tested above
        calls.append(volume)
        return res

    monkeypatch.setattr(atlas_mod, "register_to_atlas", fake)
    extra = {"timings_s": {"total_s": 1.0}}
    roi = vol.data > 0
    out = _to_output_space(argparse.Namespace(output_space="atlas", resolution=1.5), vol, roi, extra)
    assert calls and calls[0] is vol
    assert np.allclose(out.affine[:3, :3], np.eye(3) * 1.5)
    assert extra["output_space"] == "atlas"
    rec = json.loads(io.write_json(extra, tmp_path / "t.json").read_text())
    T = np.asarray(rec["atlas"]["transform_scanner_to_atlas"])
    assert T.shape == (4, 4) and np.allclose(T, res.transform)
    assert rec["atlas"]["week"] == WEEK and rec["atlas"]["similarity_ncc"] == pytest.approx(res.score)
    assert rec["atlas"]["dense_correction"] is True  # the default registration made ``res``
    assert "scanner" in rec["atlas"]["poses_frame"]
    assert rec["timings_s"]["atlas_s"] > 0
    assert f"week {WEEK}" in capsys.readouterr().out


def test_unreliable_placement_keeps_the_scanner_frame(placed, monkeypatch, tmp_path, caplog):
    import dataclasses
    import logging

    from slice2vol import io
    from slice2vol.cli.commands import _to_output_space

    vol, _, res = placed
    unreliable = dataclasses.replace(res, disagreement_deg=90.0, symmetry_ncc=(0.51, 0.47, 0.2))
    monkeypatch.setattr(atlas_mod, "register_to_atlas", lambda volume, mask=None, **kw: unreliable)
    monkeypatch.setattr(atlas_mod, "to_atlas_space", lambda *a, **kw: pytest.fail("resampled an unreliable placement"))
    extra = {}
    with caplog.at_level(logging.WARNING, logger="slice2vol"):
        out = _to_output_space(argparse.Namespace(output_space="atlas", resolution=1.5), vol, vol.data > 0, extra)
    assert out is vol  # the scanner frame, untouched
    assert extra["output_space"] == "scanner" and extra["output_space_requested"] == "atlas"
    rec = json.loads(io.write_json(extra, tmp_path / "t.json").read_text())
    assert rec["atlas"]["reliable"] is False and rec["atlas"]["directions_disagree_deg"] == pytest.approx(90.0)
    assert len(rec["atlas"]["doubts"]) == 2
    assert np.allclose(rec["atlas"]["transform_scanner_to_atlas"], res.transform)  # the attempt is kept
    assert "atlas space refused" in caplog.text and "90 deg apart" in caplog.text and "reflection 0.51" in caplog.text


@pytest.mark.slow
def test_registration_does_not_depend_on_the_head_pose(atlas_lowres):
    """A brain that is not a shipped week (CRL STA30 as distributed, 1.6 mm) registered at two head
    poses: the two transforms agree once the known pose change is removed."""
    torch.set_num_threads(1)
    vol = Volume(atlas_lowres.data * atlas_lowres.mask, atlas_lowres.affine)
    r0 = register_to_atlas(vol)
    c = vol.affine[:3, :3] @ torch.nonzero(atlas_lowres.mask).double().mean(0).numpy() + vol.affine[:3, 3]
    M = np.eye(4)
    M[:3, :3] = _rotation([-0.6, 0.2, 0.9], 160.0)
    M[:3, 3] = c - M[:3, :3] @ c + np.array([-15.0, 4.0, 10.0])
    r1 = register_to_atlas(Volume(vol.data, M @ vol.affine))
    E = r1.transform @ M @ np.linalg.inv(r0.transform)
    assert _angle_deg(E) < 1.0
    assert np.linalg.norm(E[:3, :3] @ c + E[:3, 3] - c) < 1.0
    assert abs(r0.week - 30) <= 1 and r1.week == r0.week


@pytest.mark.slow
def test_reconstruct_in_atlas_space_end_to_end(tmp_path):
    """The demo stacks through ``reconstruct --output-space atlas``: axis-aligned NIfTI, JSON record,
    scanner-world poses, and a report rebuilt from the folder (poses mapped into the atlas)."""
    from slice2vol import io
    from slice2vol.cli.commands import DEMO_DIR
    from slice2vol.cli.parser import main
    from slice2vol.report import report_from_dir

    meta = json.loads((DEMO_DIR / "demo.json").read_text())
    out, js = tmp_path / "recon.nii.gz", tmp_path / "transforms.json"
    argv = ["reconstruct", *[str(DEMO_DIR / f) for f in meta["stacks"]],
            "--stack-masks", *[str(DEMO_DIR / f) for f in meta["stack_masks"]],
            "-o", str(out), "--output-transforms", str(js), "--output-space", "atlas",
            "--method", "svr", "--iterations", "1", "--resolution", "1.6", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    rec = json.loads(js.read_text())
    assert rec["output_space"] == "atlas" and abs(rec["atlas"]["week"] - 30) <= 2
    v = io.load_volume(out)
    assert np.allclose(v.affine[:3, :3], np.eye(3) * 1.6, atol=1e-5)
    page = report_from_dir(tmp_path)
    assert page.exists()
    from slice2vol.report.folder import report_data_from_dir

    data, _, _ = report_data_from_dir(tmp_path)
    # slices simulated again from the atlas-space volume at the (mapped) poses match the acquired ones
    a = np.concatenate([st.acquired[st.mask] for st in data.stacks])
    b = np.concatenate([st.simulated[st.mask] for st in data.stacks])
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_dense_correction_recovers_the_rigid_part_of_a_warp():
    """A week warped non-rigidly (smooth displacements of up to ~2.5 mm whose least-squares rigid
    part, the Kabsch fit of the true correspondences over the atlas brain, is 1.2 deg and 1.4 mm):
    from the unwarped pose the demons correction lands on that rigid part (0.3 deg off when
    written); the start itself is 1.2 deg off, so a correction that did nothing fails."""
    from slice2vol.core.resample import sample_at
    from slice2vol.core.transforms import kabsch

    torch.set_num_threads(1)
    atlas = load_atlas()
    w = atlas.weeks.index(WEEK)
    A = torch.as_tensor(atlas.affine)
    c = torch.as_tensor(_brain_centre(atlas, w))

    def v(x):  # backward warp psi(x) = x + v(x), mm
        s = (x - c) / 40.0
        return torch.stack([1.2 + 1.2 * torch.sin(3 * s[:, 1]), -0.6 + 1.5 * torch.sin(3 * s[:, 2]) * s[:, 0],
                            0.9 * torch.cos(3 * s[:, 0])], 1)

    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in atlas.t2.shape[1:]],
                                     indexing="ij"), -1).reshape(-1, 3)
    x = idx @ A[:3, :3].T + A[:3, 3]
    moving = sample_at(atlas.t2[w].double(), atlas.affine, x + v(x)).reshape(atlas.t2.shape[1:]).float()
    # truth: the moving point corresponding to atlas point a solves x + v(x) = a
    a = atlas_mod._points(atlas.mask[w], atlas.affine)
    q = a.clone()
    for _ in range(30):
        q = a - v(q)
    truth = kabsch(a, q)
    assert _angle_deg(truth.numpy()) > 1.0  # far from the start
    got = atlas_mod._dense_rigid(moving, atlas.affine, torch.eye(4, dtype=torch.float64), atlas, w)
    E = (torch.linalg.inv(truth) @ got).numpy()
    assert _angle_deg(E) < 0.5
    assert np.linalg.norm(E[:3, :3] @ c.numpy() + E[:3, 3] - c.numpy()) < 0.4
    torch.set_num_threads(2)



def test_dense_correction_ignores_what_the_volume_does_not_cover():
    """A week with the top quarter of its brain cut off, as at the edge of a field of view, at the
    true pose: told where the volume has data, the correction stays put (written: 0.05 deg, 0.04 mm);
    without that it drags the missing part of the atlas into the void (0.9 mm)."""
    torch.set_num_threads(1)
    atlas = load_atlas()
    w = atlas.weeks.index(WEEK)
    k = torch.nonzero(atlas.mask[w])[:, 2]
    cut = int(k.max() - 0.25 * (k.max() - k.min()))
    moving = atlas.t2[w].clone()
    moving[:, :, cut:] = 0
    covered = torch.ones_like(atlas.mask[w])
    covered[:, :, cut:] = False
    c = _brain_centre(atlas, w)
    I = torch.eye(4, dtype=torch.float64)

    def shift(T):
        return float(np.linalg.norm(T[:3, :3] @ c + T[:3, 3] - c))

    T = atlas_mod._dense_rigid(moving, atlas.affine, I, atlas, w, covered).numpy()
    assert _angle_deg(T) < 0.3 and shift(T) < 0.2
    assert shift(atlas_mod._dense_rigid(moving, atlas.affine, I, atlas, w).numpy()) > 0.5
    torch.set_num_threads(2)


def test_report_names_a_refused_atlas_space():
    from slice2vol.report.data import _record_info

    doubt = "registering the atlas to the volume and the volume to the atlas gave orientations 90 deg apart"
    rows = dict(_record_info({"output_space": "scanner", "output_space_requested": "atlas",
                              "atlas": {"directions_disagree_deg": 89.7, "reliable": False, "doubts": [doubt]}}))
    assert "refused" in rows["output space"] and "90 deg apart" in rows["output space"]
    assert dict(_record_info({"output_space": "scanner"}))["output space"] == "scanner"
