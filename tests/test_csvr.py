"""cSVR network and operators (issue 5): adjoint push/pull, forward shape and rigidity, shipped
weights on motion-free stacks, and a training step that learns.  Each test is tiny (1 thread)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slice2vol.core.image import SliceSet, Stack, Volume
from slice2vol.methods.csvr.infer import load_model, register_csvr
from slice2vol.methods.csvr.inputs import prepare_inputs, to_network_poses, to_original_poses
from slice2vol.methods.csvr.network import CSVRConfig, CSVRNet
from slice2vol.methods.csvr.operators import pull, push, push_normalised, trilinear_corners
from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks
from slice2vol.training.csvr import evaluate_tre, multilayer_loss, train_step

TINY = CSVRConfig(channels=(4, 6, 8), hidden=(6, 8, 8), spacing=2.0, fov=48.0, iterations=(1, 1, 1))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _blob_volume(n: int = 20, res: float = 2.0) -> Volume:
    """An off-centre ellipsoid with an inner structure: asymmetric so poses are determined."""
    ax = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * res
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    r2 = (x / 16) ** 2 + (y / 13) ** 2 + (z / 11) ** 2
    inner = ((x - 4) / 5) ** 2 + ((y + 3) / 4) ** 2 + (z / 6) ** 2 < 1
    data = torch.where(r2 < 1, 100.0 - 40 * r2, torch.zeros(())) + 60 * inner.float()
    A = np.diag([res, res, res, 1.0])
    A[:3, 3] = -(n - 1) / 2 * res
    return Volume(data, A, r2 < 1)


def _tiny_case(motion: str, seed: int = 0):
    vol = _blob_volume()
    cfg = SimulationConfig(n_stacks=2, orientations=("axial", "sagittal"), spacing=2.0, thickness=3.0,
                           margin=2.0, motion=motion, noise=0.0)
    return simulate_stacks(vol, vol.mask, cfg, seed)


def test_push_is_the_adjoint_of_pull():
    g = torch.Generator().manual_seed(0)
    shape = (5, 6, 7)
    V = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    grid = torch.rand(200, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2  # some points outside
    y = torch.randn(200, 3, generator=g, dtype=torch.float64)
    lhs = (pull(V, grid) * y).sum()
    rhs = (V * push(y, grid, shape)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    # pull (grid_sample) and the explicit corner weights of push agree point by point
    idx, w = trilinear_corners(grid, shape)
    explicit = (V.reshape(3, -1)[:, idx] * w).sum(-1).T
    assert torch.allclose(pull(V, grid), explicit, atol=1e-12)
    # eq. 5: a constant feature pushed with any weights reads back as that constant (up to eps)
    vol, den = push_normalised(torch.full((200, 1), 2.0, dtype=torch.float64), torch.rand(200, generator=g, dtype=torch.float64),
                               grid, shape, eps=1e-9)
    assert torch.allclose(vol[den > 1e-3], torch.tensor(2.0, dtype=torch.float64))


def test_forward_returns_one_finite_rigid_pose_per_slice():
    g = torch.Generator().manual_seed(1)
    stacks = []
    for k, (N, H, W) in enumerate([(5, 16, 14), (4, 12, 18)]):
        R = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
        R = R * torch.sign(torch.linalg.det(R))
        poses = np.tile(np.eye(4), (N, 1, 1))
        poses[:, :3, :3] = R.numpy()
        poses[:, :3, 3] = np.arange(N)[:, None] * 3.0 * R[:, 2].numpy() + k
        mask = torch.zeros(N, H, W, dtype=torch.bool)
        mask[:, 2:-2, 3:-3] = True
        stacks.append(Stack(torch.rand(N, H, W, generator=g) * 100, mask, poses, (1.5, 1.5), 3.0, np.eye(4), np.arange(N)))
    torch.manual_seed(0)
    net = CSVRNet(TINY)
    for p in net.parameters():  # non-zero update heads, so the field really moves
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        poses = register_csvr(stacks, model=net)
    assert poses.shape == (9, 4, 4)
    assert torch.isfinite(poses).all()
    R = poses[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=poses.dtype).expand(9, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(9, dtype=poses.dtype), atol=1e-5)
    assert torch.allclose(poses[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=poses.dtype).expand(9, 4))
    # an untrained (zero-initialised) network keeps every slice at its header pose
    with torch.no_grad():
        same = register_csvr(SliceSet.from_stacks(stacks), model=CSVRNet(TINY))
    assert torch.allclose(same, torch.as_tensor(np.concatenate([s.poses for s in stacks])), atol=1e-3)


def test_network_input_size_does_not_hinge_on_the_last_digits_of_the_pixel_spacing():
    """A 39-pixel crop of 1 mm pixels is 19.5 working pixels of 2 mm: the same stack from NIfTI
    (float32 spacing 1 +- 3e-8) or DICOM must give the network one input size (it gave 19 or 20,
    and poses up to 3.8 mm apart, in the DICOM benchmark)."""
    N, H, W = 3, 40, 40
    mask = torch.zeros(N, H, W, dtype=torch.bool)
    mask[:, 4:37, 4:37] = True  # 33 pixels, + 3 margin each side: 39
    sizes = set()
    for dx in (1.0 - 3e-8, 1.0, 1.0 + 3e-8):
        st = Stack(torch.ones(N, H, W), mask, np.tile(np.eye(4), (N, 1, 1)), (dx, dx), 3.0, np.eye(4), np.arange(N))
        sizes.add(tuple(prepare_inputs([st], 2.0).stacks[0].images.shape))
    assert sizes == {(N, 2, 20, 20)}  # 39 * 1 / 2 = 19.5 -> 20 (halves to even)


def _atlas_tre(atlas, motion: str) -> tuple[float, float]:
    """Median-over-stacks TRE (mm) of the shipped network and of the header poses on one case."""
    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=2.0, thickness=3.0,
                           margin=4.0, motion=motion, noise=0.02)
    r = evaluate_tre(load_model(), [simulate_stacks(atlas, atlas.mask, cfg, 0)])
    return r["network"][0], r["header"][0]


def test_shipped_weights_keep_motion_free_stacks_near_identity(atlas_lowres):
    # The CPU-trained model moves motion-free slices by 1.44 +- 0.27 mm median TRE on the 15
    # validation atlases (max 2.0; MODEL_CARD.md) and by 1.2 mm on this case; "near identity"
    # is that level, not a target (a fully trained model should do better: tighten it then).
    net, header = _atlas_tre(atlas_lowres, "none")
    assert header < 1e-6 and net < 2.5, net


def test_shipped_weights_reduce_moderate_motion(atlas_lowres):
    # 15 of 15 validation atlases improve at moderate motion (5.05 -> 3.88 mm mean, MODEL_CARD.md)
    net, header = _atlas_tre(atlas_lowres, "moderate")
    assert net < header, (net, header)


def test_training_step_reduces_the_loss_on_a_fixed_batch():
    case = _tiny_case("mild")
    inp = prepare_inputs(case.stacks, TINY.spacing)
    gt = to_network_poses(case.true_poses, inp)
    # the network frames round-trip to the original ones
    back = to_original_poses(torch.cat(gt).double(), inp)
    assert np.allclose(back, np.concatenate(case.true_poses), atol=1e-3)
    torch.manual_seed(0)
    net = CSVRNet(TINY)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with torch.no_grad():
        before = float(multilayer_loss(net(inp)[1], gt))
    for _ in range(8):
        train_step(net, opt, inp, gt)
    with torch.no_grad():
        after = float(multilayer_loss(net(inp)[1], gt))
    assert after < 0.9 * before, (before, after)


def test_train_command_resumes_from_exported_weights_with_a_motion_mix(tmp_path):
    """``train-csvr --init-weights W --motion a,b``: starts from W (0 steps exports W back) and
    trains on the listed levels; an unknown level is one clear error."""
    import nibabel as nib

    from slice2vol.cli.parser import main as cli_main
    from slice2vol.training.csvr import export_weights, split_motions

    def train_main(argv):
        return cli_main(["train-csvr", *argv])

    vol = _blob_volume()
    for folder in (tmp_path / "data/fetal_atlases/crl2017/BLOB", tmp_path / "data/fetal_atlases/spina_bifida2021/GA22_notoperated"):
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(vol.data.numpy(), vol.affine), folder / "t2.nii.gz")
        nib.save(nib.Nifti1Image(vol.mask.numpy().astype(np.uint8), vol.affine), folder / "mask.nii.gz")
    torch.manual_seed(0)
    init = export_weights(CSVRNet(TINY), tmp_path / "init.pt", {})
    common = ["--data", str(tmp_path / "data"), "--init-weights", str(init), "--motion", "mild,none",
              "--atlas-resolution", "2.0"]
    assert train_main(["--output", str(tmp_path / "r0"), "--steps", "0", "--export", str(tmp_path / "e0.pt")] + common) == 0
    a, b = load_model(init).state_dict(), load_model(tmp_path / "e0.pt").state_dict()
    assert load_model(tmp_path / "e0.pt").config.channels == TINY.channels
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_main(["--output", str(tmp_path / "r2"), "--steps", "2", "--lr", "1e-2",
                       "--export", str(tmp_path / "e2.pt")] + common) == 0
    c = load_model(tmp_path / "e2.pt").state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert torch.load(tmp_path / "r2" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert (tmp_path / "r2" / "log.csv").read_text().count("\n") >= 3  # header, step 0 and final validation
    assert split_motions("mild, csvr") == ["mild", "csvr"]
    assert train_main(["--output", str(tmp_path / "r3"), "--steps", "1", "--motion", "mild,wild",
                       "--data", str(tmp_path / "data")]) == 2
