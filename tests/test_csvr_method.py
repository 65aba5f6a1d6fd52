"""``--method csvr`` (issue 5, part 3): network poses moved into the template frame, fixed-pose
reconstruction, the SVR refinement, GaussianSVR's ``--init csvr`` and the CLI's option checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slice2vol
from slice2vol.cli.parser import main
from slice2vol.core.geometry import slice_to_world
from slice2vol.core.preprocess import prepare
from slice2vol.core.transforms import params_to_matrix
from slice2vol.errors import Slice2VolError
from slice2vol.methods.csvr import reconstruct as csvr_reconstruct
from slice2vol.methods.csvr.infer import DEFAULT_WEIGHTS, load_model, register_csvr
from slice2vol.methods.csvr.reconstruct import (
    CSVRMethodConfig,
    align_to_frame,
    network_poses,
    reconstruct_csvr,
    start_scores,
)
from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks


@pytest.fixture(scope="module")
def mild_case(atlas_lowres):
    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=2.0, thickness=4.0,
                           margin=4.0, motion="mild", noise=0.02)
    return simulate_stacks(atlas_lowres, atlas_lowres.mask, cfg, 3)


def _relative(P: torch.Tensor) -> torch.Tensor:
    """Every pose relative to the first: invariant to one global rigid transform."""
    return torch.linalg.inv(P[:1]) @ P


def test_align_to_frame_recovers_a_global_transform():
    g = torch.Generator().manual_seed(0)
    M = 12
    d = torch.float64
    ref = params_to_matrix(torch.cat([0.3 * torch.randn(M, 3, generator=g, dtype=d),
                                      10 * torch.randn(M, 3, generator=g, dtype=d)], 1))
    T = params_to_matrix(torch.tensor([[0.4, -0.2, 0.7, 15.0, -8.0, 3.0]], dtype=ref.dtype))[0]
    coords = torch.randn(600, 3, generator=g, dtype=ref.dtype) * torch.tensor([30.0, 30.0, 0.0], dtype=ref.dtype)
    sid = torch.randint(0, M, (600,), generator=g)
    moved = T @ ref
    back = align_to_frame(moved, ref, coords, sid)
    assert torch.allclose(back, ref, atol=1e-8)
    # per-slice noise on top: the global transform is still a least-squares fit, relative poses kept
    noisy = moved @ params_to_matrix(torch.cat([0.02 * torch.randn(M, 3, generator=g, dtype=d),
                                                torch.randn(M, 3, generator=g, dtype=d)], 1))
    out = align_to_frame(noisy, ref, coords, sid)
    assert torch.allclose(_relative(out), _relative(noisy), atol=1e-8)
    err = (slice_to_world(out, coords, sid) - slice_to_world(ref, coords, sid)).norm(dim=1).mean()
    err_before = (slice_to_world(noisy, coords, sid) - slice_to_world(ref, coords, sid)).norm(dim=1).mean()
    assert err < 0.1 * err_before


def test_network_poses_are_rigid_in_the_template_frame(mild_case):
    torch.set_num_threads(1)
    prep = prepare(mild_case.stacks, 1.6, have_stack_masks=True)
    net = load_model()
    raw = register_csvr(prep.stacks, model=net)
    P = network_poses(prep, model=net)
    assert P.shape == (prep.slices.n_slices, 4, 4) and torch.isfinite(P).all()
    R = P[:, :3, :3].double()
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-4)
    # one global transform only: the network's relative poses are kept
    assert torch.allclose(_relative(P.double()), _relative(raw), atol=1e-3)
    # and the brain sits where stack registration put it (the output grid's frame)
    ss = prep.slices
    c_net = slice_to_world(P, ss.coords, ss.slice_id).mean(0)
    c_stk = slice_to_world(ss.poses, ss.coords, ss.slice_id).mean(0)
    assert float((c_net - c_stk).norm()) < 1.0


@pytest.mark.parametrize("refine", [False, True])
def test_reconstruct_csvr_fixed_and_refined(mild_case, refine):
    torch.set_num_threads(1)
    prep = prepare(mild_case.stacks, 1.6, have_stack_masks=True)
    res = reconstruct_csvr(prep, CSVRMethodConfig(refine=refine, start="network", iterations=1, progress=False))
    assert res.volume.shape == prep.shape and torch.isfinite(res.volume.data).all()
    assert float(res.volume.data[prep.roi].std()) > 0
    assert res.poses.shape == (prep.slices.n_slices, 4, 4)
    assert res.history[0]["stage"] == "network"
    start = network_poses(prep)
    moved = float((res.poses[:, :3, 3] - start[:, :3, 3]).norm(dim=1).max())
    if refine:
        assert moved > 0.01  # the SVR stage registered slices
    else:
        assert moved < 1e-5  # poses fixed


def _perturbed(P: torch.Tensor, rot_deg: float, trans_mm: float, seed: int = 0) -> torch.Tensor:
    """Every slice moved by its own random rigid transform (about its slice-frame origin)."""
    g = torch.Generator().manual_seed(seed)
    M = P.shape[0]
    d = torch.float64
    e = torch.cat([torch.deg2rad(torch.tensor(rot_deg, dtype=d)) * torch.randn(M, 3, generator=g, dtype=d),
                   trans_mm * torch.randn(M, 3, generator=g, dtype=d)], 1)
    return (P.double() @ params_to_matrix(e)).to(P.dtype)


def test_start_scores_prefer_consistent_poses(mild_case):
    torch.set_num_threads(1)
    prep = prepare(mild_case.stacks, 1.6, have_stack_masks=True)
    P = prep.slices.poses
    s = start_scores(prep, {"stack": P, "small": _perturbed(P, 2, 1.5), "large": _perturbed(P, 8, 6, seed=1)})
    assert set(s) == {"stack", "small", "large"} and all(-1 <= v <= 1 for v in s.values())
    assert s["stack"] > s["small"] > s["large"]


@pytest.mark.parametrize("network_is_better", [False, True])
def test_refine_starts_from_the_better_pose_set(mild_case, monkeypatch, network_is_better):
    """``start="auto"``: SVR starts from whichever pose set explains the slices better; the
    network is replaced by a stub so the test controls which set that is."""
    torch.set_num_threads(1)
    prep = prepare(mild_case.stacks, 1.6, have_stack_masks=True)
    good, bad = prep.slices.poses, _perturbed(prep.slices.poses, 8, 6)
    if network_is_better:
        prep = csvr_reconstruct.replace(prep, slices=prep.slices.with_poses(bad))
        monkeypatch.setattr(csvr_reconstruct, "network_poses", lambda *a, **k: good)
    else:
        monkeypatch.setattr(csvr_reconstruct, "network_poses", lambda *a, **k: bad)
    seen = {}
    real_svr = csvr_reconstruct.reconstruct_svr

    def spy(start, cfg):
        seen["poses"] = start.slices.poses
        return real_svr(start, cfg)

    monkeypatch.setattr(csvr_reconstruct, "reconstruct_svr", spy)
    res = reconstruct_csvr(prep, CSVRMethodConfig(refine=True, iterations=1, progress=False))
    head = res.history[0]
    assert head["start"] == ("network" if network_is_better else "stack")
    assert head["start_scores"]["network" if network_is_better else "stack"] > \
        head["start_scores"]["stack" if network_is_better else "network"]
    assert torch.equal(seen["poses"], good)
    # "network" always takes the network's poses, and fixed-pose csvr never chooses
    reconstruct_csvr(prep, CSVRMethodConfig(refine=True, start="network", iterations=1, progress=False))
    assert torch.equal(seen["poses"], good if network_is_better else bad)


def test_svr_settings_reach_the_reconstruction_stage(mild_case, monkeypatch):
    """``CSVRMethodConfig.svr`` is applied to the SVR stage's config (auto's A/B switches use it);
    an unknown name is refused before the network runs."""
    prep = prepare(mild_case.stacks, 1.6, have_stack_masks=True)
    monkeypatch.setattr(csvr_reconstruct, "network_poses", lambda *a, **k: prep.slices.poses)
    seen = []

    def spy(start, cfg):
        seen.append(cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr(csvr_reconstruct, "reconstruct_svr", spy)
    for refine in (True, False):
        with pytest.raises(RuntimeError, match="stop here"):
            reconstruct_csvr(prep, CSVRMethodConfig(refine=refine, start="network", progress=False,
                                                    svr={"turn_step_deg": None, "search_rounds": 1}))
    assert [c.turn_step_deg for c in seen] == [None, None] and [c.search_rounds for c in seen] == [1, 1]
    assert seen[0].register_slices and not seen[1].register_slices  # the method's own settings stay
    with pytest.raises(Slice2VolError, match="unknown SVR setting.*'turn_step'"):
        reconstruct_csvr(prep, CSVRMethodConfig(refine=True, svr={"turn_step": None}))


def test_the_cSVR_weights_ship_with_the_package():
    # the default method needs them; a missing file is a packaging defect, never a reason to skip
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size > 10_000
    assert DEFAULT_WEIGHTS.resolve().is_relative_to(Path(slice2vol.__file__).resolve().parent)


def test_csvr_options_are_checked(tmp_path, capsys, make_stack):
    s = str(make_stack("a.nii.gz"))
    out = str(tmp_path / "o.nii.gz")
    assert main(["reconstruct", s, "-o", out, "--refine"]) == 2
    assert main(["reconstruct", s, "-o", out, "--method", "csvr", "--weights", str(tmp_path / "none.pt")]) == 2
    assert main(["reconstruct", s, "-o", out, "--method", "svr", "--weights", str(DEFAULT_WEIGHTS)]) == 2
    assert main(["reconstruct", s, "-o", out, "--method", "csvr", "--psf", "analytic"]) == 2
    assert main(["reconstruct", s, "-o", out, "--method", "csvr", "--csvr-start", "network"]) == 2
    err = capsys.readouterr().err
    assert err.count("slice2vol: error:") == 5
    assert "--csvr-start only applies to --method auto or --method csvr --refine" in err
    assert "--refine only applies to --method csvr" in err
    assert not (tmp_path / "o.nii.gz").exists()
    with pytest.raises(Slice2VolError, match="--iterations must be at least 1 for csvr"):
        reconstruct_csvr(None, CSVRMethodConfig(iterations=0))
    with pytest.raises(Slice2VolError, match="start must be one of auto, network"):
        reconstruct_csvr(None, CSVRMethodConfig(start="stack"))


def test_gaussian_starts_from_the_network_poses(mild_case):
    from slice2vol.methods.gaussian.optimise import GaussianConfig, reconstruct_gaussian

    torch.set_num_threads(1)
    prep = prepare(mild_case.stacks, 1.6, have_stack_masks=True)
    res = reconstruct_gaussian(prep, GaussianConfig(init="csvr", optimise_poses=False, iterations=2, n_init=2000,
                                                    fit_iterations=2, progress=False))
    # poses frozen: the result's poses are exactly the network's start, not the stack-registered ones
    assert torch.allclose(res.poses.double(), network_poses(prep).double(), atol=1e-5)
    assert not torch.allclose(res.poses.double(), prep.slices.poses.double(), atol=1e-2)
    assert torch.isfinite(res.volume.data).all()
