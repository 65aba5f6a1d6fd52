"""Behaviour of resampling, image metrics, TRE, slice consistency and ``slice2vol evaluate``."""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from slice2vol import io
from slice2vol.cli.parser import main
from slice2vol.core.geometry import slice_pixel_coords
from slice2vol.core.image import SliceSet, Volume
from slice2vol.core.resample import gaussian_blur, resample
from slice2vol.core.transforms import params_to_matrix, rotation_about
from slice2vol.errors import Slice2VolError
from slice2vol.evaluation import metrics


def phantom(n: int = 24, res: float = 2.0) -> Volume:
    """A smooth, asymmetric blob in an ellipsoidal mask, centred on the world origin."""
    affine = np.diag([res, res, res, 1.0])
    affine[:3, 3] = -(n - 1) / 2 * res
    ax = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * res
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    inside = (x / 20) ** 2 + (y / 17) ** 2 + (z / 15) ** 2 <= 1
    data = 100 * torch.exp(-(x**2 + y**2 + z**2) / 400) + 40 * torch.sin(x / 6 + 0.5) * torch.cos(y / 8) + 20 * (z > 3)
    data = torch.where(inside, data + 60, torch.zeros_like(data)).float()
    return Volume(gaussian_blur(data, 1.5, [res] * 3), affine, inside)


# ----------------------------------------------------------------------------- resampling

def test_resample_identity_returns_input():
    v = torch.rand(5, 6, 7)
    rigid = params_to_matrix(torch.tensor([0.3, -0.2, 0.1, 4.0, 5.0, 6.0], dtype=torch.float64)).numpy()
    A = rigid @ np.diag([1.0, 2.0, 3.0, 1.0])  # oblique, anisotropic voxels
    assert torch.allclose(resample(v, A, A, v.shape), v, atol=1e-5)
    assert torch.equal(resample(v, A, A, v.shape, mode="nearest"), v)


def test_resample_through_shifted_affine_matches_known_shift():
    v = torch.rand(8, 5, 4)
    src = np.eye(4)
    src[0, 3] = 2.0  # source voxel i sits at world x = i + 2
    out = resample(v, src, np.eye(4), v.shape, chunk=20)  # chunk < one slab: exercises the loop
    assert torch.allclose(out[2:], v[:-2], atol=1e-5)
    assert out[:2].abs().max() < 1e-6  # outside the source: zeros (row 1 is exactly one voxel out)


def test_resample_single_slice_source_is_bounded_through_plane():
    v = torch.rand(4, 5, 1)
    src = np.eye(4)
    src[2, 3] = 1.0  # the one slice lies at z = 1
    tgt = np.eye(4)  # target planes at z = 0, 1, 2, 3
    out = resample(v, src, tgt, (4, 5, 4))
    assert torch.allclose(out[..., 1], v[..., 0], atol=1e-6)
    assert out[..., [0, 2, 3]].abs().max() < 1e-6  # no smearing of the slice along its normal
    half = np.eye(4)
    half[2, 3] = 0.5  # half a voxel off the slice: linear weight 1/2, nearest still inside
    assert torch.allclose(resample(v, src, half, (4, 5, 1)), 0.5 * v, atol=1e-6)
    assert torch.allclose(resample(v, src, half, (4, 5, 1), mode="nearest"), v)


def test_gaussian_blur_keeps_constants_and_smooths_in_mm():
    assert torch.allclose(gaussian_blur(torch.full((6, 7, 8), 3.0), 2.0, [1, 1, 1]), torch.full((6, 7, 8), 3.0))
    impulse = torch.zeros(41, 5, 5)
    impulse[20, 2, 2] = 1
    out = gaussian_blur(impulse, [2.0, 0.0, 0.0], [0.5, 1.0, 1.0])  # 2 mm = 4 voxels, along i only
    profile = out[:, 2, 2]
    var_vox = float((profile * (torch.arange(41) - 20.0) ** 2).sum() / profile.sum())
    assert var_vox == pytest.approx(16.0, rel=0.05)  # (3-sigma truncation trims ~3 %)
    assert float(out.sum()) == pytest.approx(1.0) and torch.all(out[20][torch.arange(5) != 2] == 0)


# ----------------------------------------------------------------------------- image metrics

def test_psnr_identical_is_infinite_and_decreases_with_noise():
    ref = phantom()
    g = torch.Generator().manual_seed(0)
    assert math.isinf(float(metrics.psnr(ref.data, ref.data, ref.mask)))
    noisy = [ref.data + s * torch.randn(ref.shape, generator=g) for s in (1, 4, 16)]
    values = [float(metrics.psnr(x, ref.data, ref.mask)) for x in noisy]
    assert values[0] > values[1] > values[2]


def test_ssim_nrmse_ncc_on_identical_and_scaled_images():
    ref = phantom()
    assert float(metrics.ssim3d(ref.data, ref.data)) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics.ssim3d(ref.data, ref.data, ref.mask)) == pytest.approx(1.0, abs=1e-6)
    noisy = ref.data + 5 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    assert float(metrics.ssim3d(noisy, ref.data, ref.mask)) < 0.99
    assert float(metrics.nrmse(ref.data, ref.data, ref.mask)) == 0.0
    assert float(metrics.nrmse(torch.zeros(ref.shape), ref.data, ref.mask)) == pytest.approx(1.0)
    assert float(metrics.ncc(3 * ref.data + 7, ref.data, ref.mask)) == pytest.approx(1.0, abs=1e-9)


def test_metrics_reject_empty_or_mismatched_masks():
    ref = phantom()
    with pytest.raises(Slice2VolError):
        metrics.psnr(ref.data, ref.data, torch.zeros(ref.shape, dtype=torch.bool))
    with pytest.raises(Slice2VolError):
        metrics.ssim3d(ref.data, ref.data, torch.ones(3, 3, 3, dtype=torch.bool))


def test_compare_volumes_recovers_linear_intensity_map():
    ref = phantom()
    recon = Volume(0.5 * ref.data + 3.0, ref.affine)  # so a = 2, b = -6 maps it back
    out = metrics.compare_volumes(recon, ref)
    assert out["scale_a"] == pytest.approx(2.0, rel=1e-4)
    assert out["scale_b"] == pytest.approx(-6.0, abs=1e-3)
    assert out["ssim"] == pytest.approx(1.0, abs=1e-4) and out["psnr"] > 60
    assert out["fov_coverage"] == 1.0 and out["mask_voxels"] == int(ref.mask.sum())
    raw = metrics.compare_volumes(recon, ref, scale=False)
    assert (raw["scale_a"], raw["scale_b"]) == (1.0, 0.0) and raw["psnr"] < 20
    assert raw["ncc"] == pytest.approx(1.0, abs=1e-6)  # correlation ignores the intensity map


def test_compare_volumes_resamples_through_world_coordinates():
    ref = phantom()
    # A reconstruction on its own grid, one voxel along, covering reference voxels i = 1..11 only.
    A = ref.affine.copy()
    A[0, 3] += 2.0
    recon = Volume(ref.data[1:12].clone(), A)
    out = metrics.compare_volumes(recon, ref)
    covered = ref.mask.clone()
    covered[0], covered[12:] = False, False
    assert out["fov_coverage"] == pytest.approx(int(covered.sum()) / int(ref.mask.sum()))
    exact = metrics.compare_volumes(recon, ref, mask=covered)
    assert exact["psnr"] > 80 and exact["ssim"] == pytest.approx(1.0, abs=1e-5) and exact["fov_coverage"] == 1.0


def test_compare_volumes_align_undoes_a_rigid_motion_without_the_methods_registration(monkeypatch):
    # Evaluation must not share code with what it evaluates (issue 12 item 10): the alignment may
    # not touch slice2vol's registration core, so make that core unusable.
    import slice2vol.core.registration as reg

    def forbidden(*a, **k):
        raise AssertionError("evaluation used slice2vol.core.registration")

    monkeypatch.setattr(reg, "register", forbidden)
    monkeypatch.setattr(reg, "register_volumes", forbidden)
    ref = phantom(n=40, res=1.5)
    p = torch.tensor([0.05, -0.04, 0.12, 2.0, -1.5, 1.0], dtype=torch.float64)
    T = rotation_about(p, torch.zeros(3, dtype=torch.float64)).numpy()
    recon = Volume(3 * resample(ref.data, ref.affine, T @ ref.affine, ref.shape) + 7, ref.affine)  # recon(x) = ref(T x)
    plain = metrics.compare_volumes(recon, ref)
    aligned = metrics.compare_volumes(recon, ref, align=True)
    assert not plain["aligned"] and plain["alignment"] == "none" and plain["transform"] is None
    assert aligned["aligned"] and "SimpleITK" in aligned["alignment"]
    assert aligned["psnr"] > plain["psnr"] + 8 and aligned["ssim"] > 0.97
    # recon sampled at the returned T' reproduces ref, so T' = T^-1 (to a fraction of a voxel)
    D = np.asarray(aligned["transform"]) @ T
    pts = np.array([[20.0, 0, 0, 1], [0, 20.0, 0, 1], [0, 0, 20.0, 1], [-15.0, 10.0, -5.0, 1]]).T
    assert np.linalg.norm((D @ pts - pts)[:3], axis=0).max() < 0.3


def test_align_rigid_keeps_ras_geometry_of_oblique_grids():
    # the RAS<->LPS and [i,j,k]<->[k,j,i] conversions: a volume and its copy on an oblique,
    # anisotropic grid are the same object in the world, so the alignment is the identity
    from slice2vol.evaluation.align import align_rigid

    ref = phantom(n=40, res=1.5)
    rigid = params_to_matrix(torch.tensor([0.2, -0.1, 0.3, 1.0, 2.0, -1.0], dtype=torch.float64)).numpy()
    A = rigid @ np.diag([1.2, 1.4, 1.6, 1.0])
    A[:3, 3] += rigid[:3, :3] @ (-(np.array([48, 42, 38]) - 1) / 2 * np.array([1.2, 1.4, 1.6]))
    oblique = Volume(resample(ref.data, ref.affine, A, (48, 42, 38)), A)
    T = align_rigid(oblique, ref, ref.mask, threads=1)
    pts = np.array([[20.0, 0, 0, 1], [0, 20.0, 0, 1], [0, 0, 20.0, 1]]).T
    assert np.linalg.norm((T @ pts - pts)[:3], axis=0).max() < 0.3


def test_align_rigid_keeps_the_better_of_its_two_runs(monkeypatch):
    """A run that converges in the wrong basin (here: the sparse run made to return a transform
    30 deg off) loses to the full-sampling run on the correlation over every masked voxel."""
    import SimpleITK as sitk

    from slice2vol.evaluation import align

    ref = phantom(n=40, res=1.5)
    real = align._register
    runs = []

    def sparse_goes_astray(f_img, m_img, mask_img, centre, sampling, threads):
        runs.append(sampling)
        tx = real(f_img, m_img, mask_img, centre, sampling, threads)
        if sampling < align.FULL_SAMPLING:
            tx = sitk.Euler3DTransform(tx)
            tx.SetRotation(0.0, 0.0, np.radians(30.0))
        return tx

    monkeypatch.setattr(align, "_register", sparse_goes_astray)
    T = align.align_rigid(ref, ref, ref.mask, threads=1)
    assert runs == [0.2, align.FULL_SAMPLING]
    pts = np.array([[20.0, 0, 0, 1], [0, 20.0, 0, 1], [0, 0, 20.0, 1]]).T
    assert np.linalg.norm((T @ pts - pts)[:3], axis=0).max() < 0.3


def test_evaluate_says_when_it_compares_unaligned(tmp_path, capsys):
    ref, _, _ = _case(tmp_path)
    out = tmp_path / "m.json"
    assert main(["evaluate", ref, "--reference", ref, "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "aligned: NO" in text and "WITHOUT alignment" in text and "--align" in text
    assert json.loads(out.read_text())["image"]["alignment"] == "none"


# ----------------------------------------------------------------------------- TRE

def _slice_grid(M: int = 4, H: int = 5, W: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    coords = slice_pixel_coords(H, W, (1.5, 2.0), dtype=torch.float64).reshape(-1, 3).repeat(M, 1)
    sid = torch.arange(M).repeat_interleave(H * W)
    poses = torch.eye(4, dtype=torch.float64).repeat(M, 1, 1)
    poses[:, 2, 3] = torch.arange(M, dtype=torch.float64) * 3  # a stack of parallel slices
    return poses, coords, sid


def test_tre_zero_for_identical_poses():
    poses, coords, sid = _slice_grid()
    assert metrics.slice_tre(poses, poses, coords, sid).abs().max() < 1e-9


def test_tre_of_pure_translation():
    gt, coords, sid = _slice_grid()
    est = gt.clone()
    est[:, :3, 3] += torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    unaligned = metrics.slice_tre(est, gt, coords, sid, align=False)
    assert torch.allclose(unaligned, torch.full((4,), 5.0, dtype=torch.float64))
    assert metrics.slice_tre(est, gt, coords, sid, align=True).max() < 1e-6


def test_tre_of_rotation_is_farthest_pixel_displacement():
    gt, coords, sid = _slice_grid()
    est = gt.clone()
    theta = 0.2
    R = rotation_about(torch.tensor([0.0, 0.0, theta, 0, 0, 0], dtype=torch.float64), gt[1, :3, 3])
    est[1] = R @ gt[1]  # slice 1 rotated in-plane about its own centre
    tre = metrics.slice_tre(est, gt, coords, sid, align=False)
    corner = math.hypot(2 * 1.5, 3 * 2.0)  # farthest pixel of a 5 x 7 slice from its centre
    assert float(tre[1]) == pytest.approx(2 * math.sin(theta / 2) * corner, rel=1e-9)
    assert float(tre[[0, 2, 3]].abs().max()) < 1e-12


def test_tre_summary_and_empty_slices():
    per_slice = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, float("nan")], dtype=torch.float64)
    s = metrics.tre_summary(per_slice, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert s["per_stack_median"] == [2.0, 15.0] and s["median"] == 8.5
    assert s["mean"] == pytest.approx(7.2) and s["max"] == 20.0 and s["n_slices"] == 5
    assert s["p90"] == pytest.approx(np.percentile([1, 2, 3, 10, 20], 90))


def test_match_poses_by_stack_order_and_index():
    eye = np.tile(np.eye(4), (3, 1, 1))
    gt = [{"index": np.array([0, 1, 2]), "poses": eye + np.arange(3)[:, None, None]}]
    est = [{"index": np.array([2, 0]), "poses": eye[:2] * 2}]  # slice 1 excluded, order shuffled
    m = metrics.match_poses(est, gt)
    assert m.index.tolist() == [0, 2] and m.stack_id.tolist() == [0, 0]
    assert np.array_equal(m.gt, gt[0]["poses"][[0, 2]])
    with pytest.raises(Slice2VolError):
        metrics.match_poses([{"index": np.array([5]), "poses": eye[:1]}], gt)
    with pytest.raises(Slice2VolError):
        metrics.match_poses(est, gt + gt)


# ----------------------------------------------------------------------------- slice consistency

def _stack_of(volume: Volume, path) -> str:
    io.save_volume(volume.data.numpy(), path, volume.affine)
    return str(path)


def test_slice_consistency_of_a_perfect_simulation(tmp_path):
    vol = phantom()
    st = io.load_stack(_stack_of(vol, tmp_path / "s.nii.gz"), thickness=2.0)
    ss = SliceSet.from_stacks([st])
    sim = metrics.simulate_slices(vol, ss)
    perfect = metrics.slice_consistency(replace(ss, values=sim), sim, per_slice=True)
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-6) and perfect["ncc"] == pytest.approx(1.0, abs=1e-9)
    assert math.isinf(perfect["psnr"]) and len(perfect["per_slice"]["ncc"]) == ss.n_slices
    noisy = sim + 5 * torch.randn(sim.shape, generator=torch.Generator().manual_seed(2))
    worse = metrics.slice_consistency(replace(ss, values=noisy), sim)
    assert worse["ssim"] < 0.99 and worse["ncc"] < perfect["ncc"]
    assert worse["per_stack"][0]["n_slices"] == worse["n_slices"]


# ----------------------------------------------------------------------------- command line

def _case(tmp_path):
    """Reference, mask and two stacks (axial and a cyclic permutation) with GT and estimated poses."""
    vol = phantom()
    ref = str(tmp_path / "gt.nii.gz")
    io.save_volume(vol.data.numpy(), ref, vol.affine)
    io.save_volume(vol.mask.numpy().astype(np.uint8), tmp_path / "mask.nii.gz", vol.affine, dtype=np.uint8)
    perm = vol.affine[:, [1, 2, 0, 3]]
    s0 = _stack_of(vol, tmp_path / "s0.nii.gz")
    s1 = _stack_of(Volume(vol.data.permute(1, 2, 0).contiguous(), perm), tmp_path / "s1.nii.gz")
    stacks = [io.load_stack(p) for p in (s0, s1)]
    gt_poses = [st.poses for st in stacks]
    io.write_json(io.poses_to_json(stacks, gt_poses), tmp_path / "gt.json")
    est_stacks = [stacks[0].select(np.arange(stacks[0].n_slices) > 0), stacks[1]]  # slice 0 excluded
    est_poses = [p.copy() for p in (gt_poses[0][1:], gt_poses[1])]
    est_poses[1][3, :3, 3] += [0.0, 0.0, 1.0]  # one slice off by 1 mm
    io.write_json(io.poses_to_json(est_stacks, est_poses), tmp_path / "est.json")
    return ref, s0, s1


def test_evaluate_cli_writes_json(tmp_path, capsys):
    ref, s0, s1 = _case(tmp_path)
    out = tmp_path / "metrics.json"
    argv = ["evaluate", ref, "--reference", ref, "--mask", str(tmp_path / "mask.nii.gz"), "--device", "cpu",
            "--poses", str(tmp_path / "est.json"), "--gt-poses", str(tmp_path / "gt.json"),
            "--stacks", s0, s1, "--thickness", "2", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "TRE" in text and "consistency" in text
    res = json.loads(out.read_text())
    assert res["image"]["ssim"] == pytest.approx(1.0, abs=1e-5) and res["image"]["psnr"] > 100
    assert len(res["tre"]["per_slice"]["tre"]) == 24 + 23  # slice 0 of stack 0 was excluded from the estimate
    assert res["consistency"]["per_slice"]["index"][:2] == [1, 2]
    assert 0 < res["tre"]["max"] < 1.5 and res["tre"]["unaligned"]["max"] == pytest.approx(1.0)
    assert res["consistency"]["n_slices"] == res["tre"]["n_slices"] and res["consistency"]["ncc"] > 0.9


def test_evaluate_cli_tre_without_stacks_uses_default_grid(tmp_path, capsys):
    ref, _, _ = _case(tmp_path)
    argv = ["evaluate", ref, "--poses", str(tmp_path / "est.json"), "--gt-poses", str(tmp_path / "gt.json"),
            "--device", "cpu", "--json", str(tmp_path / "m.json")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert "image" not in res and "consistency" not in res and "default grid" in res["tre"]["points"]
    assert res["tre"]["unaligned"]["max"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "nothing to evaluate"),
        (["--reference", "{ref}", "--mask", "{bad_mask}"], "does not match"),
        (["--reference", "{tmp}/missing.nii.gz"], "not found"),
        (["--gt-poses", "{tmp}/gt.json", "--reference", "{ref}"], "--gt-poses needs --poses"),
    ],
)
def test_evaluate_cli_rejects_bad_input(tmp_path, capsys, extra, message):
    ref, _, _ = _case(tmp_path)
    bad_mask = tmp_path / "bad_mask.nii.gz"
    io.save_volume(np.ones((5, 5, 5), dtype=np.uint8), bad_mask, np.eye(4), dtype=np.uint8)
    argv = ["evaluate", ref, "--device", "cpu", "--json", str(tmp_path / "never.json")]
    argv += [a.format(ref=ref, bad_mask=bad_mask, tmp=tmp_path) for a in extra]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.startswith("slice2vol: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never.json").exists()


def test_evaluate_cli_refuses_unusable_stack(tmp_path, capsys, bad_stack):
    ref, _, _ = _case(tmp_path)
    path, pattern = bad_stack
    assert main(["evaluate", ref, "--stacks", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slice2vol: error:") and len(err.strip().splitlines()) == 1
    assert re.search(pattern, err)


def test_evaluate_cli_refuses_to_overwrite_an_input_before_computing(tmp_path, capsys):
    ref, s0, _ = _case(tmp_path)
    before = (tmp_path / "gt.json").read_bytes()
    assert main(["evaluate", ref, "--stacks", s0, "--device", "cpu", "--json", str(tmp_path / "gt.json"),
                 "--poses", str(tmp_path / "gt.json")]) == 2
    captured = capsys.readouterr()
    assert "overwrite" in captured.err and captured.out == ""
    assert (tmp_path / "gt.json").read_bytes() == before


def test_evaluate_cli_consistency_at_header_poses_of_an_oblique_stack(tmp_path, capsys, make_stack, make_affine):
    vol = phantom()
    recon = tmp_path / "recon.nii.gz"
    io.save_volume(vol.data.numpy(), recon, vol.affine)
    # An oblique stack centred in the phantom, filled with slices simulated from the phantom at
    # its header poses: evaluated at those poses it must be consistent.
    shape, spacing = np.array([16, 14, 8]), np.array([1.5, 1.5, 3.0])
    R = params_to_matrix(torch.tensor([0.4, -0.3, 0.8, 0, 0, 0], dtype=torch.float64)).numpy()[:3, :3]
    A = make_affine(R, spacing, -R @ (spacing * (shape - 1) / 2))
    stack = io.load_stack(make_stack("obl.nii.gz", shape=tuple(shape), affine=A))
    ss = SliceSet.from_stacks([stack])
    io.save_stack(stack, tmp_path / "sim.nii.gz", data=ss.to_images(metrics.simulate_slices(vol, ss))[0])
    assert main(["evaluate", str(recon), "--stacks", str(tmp_path / "sim.nii.gz"), "--device", "cpu",
                 "--json", str(tmp_path / "m.json")]) == 0
    con = json.loads((tmp_path / "m.json").read_text())["consistency"]
    assert con["poses"] == "stack headers" and con["ncc"] > 0.999 and con["ssim"] > 0.99

