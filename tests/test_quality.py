"""The reference-free quality verdict (slice2vol.evaluation.quality, issue 11 part 3) and its CLI integration.

Small cases only (atlases at 1.6 mm, 2 mm pixels, 4 mm slices, SVR trimmed and reconstructed at
1.6 mm: output voxels no larger than the pixels, as in the calibration, where the thresholds
hold; on much coarser grids the slices fit worse): a motion-free case must be ``ok``; stacks simulated from two different atlases (STA23 and
STA33, same geometry frame) cannot be reconciled by any motion, and must be ``failed`` whatever
the slices' fit to their own volume; ``--strict`` turns that into exit status 3 after writing the
outputs.  Skipped without the shared data.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from conftest import _atlas_lowres

from slice2vol.cli.parser import main
from slice2vol.core import preprocess
from slice2vol.evaluation.quality import CRITERIA, Criterion, assess_quality, stack_agreement, verdict_of
from slice2vol.methods import svr
from slice2vol.report.page import _quality_banner
from slice2vol.simulation.simulate import SimulationConfig, save_simulation, simulate_stacks

RESOLUTION = 1.6
FAST = ["--device", "cpu", "--iterations", "1", "--resolution", str(RESOLUTION), "--no-progress"]


@dataclasses.dataclass
class FastConfig(svr.SVRConfig):
    coarse_iterations: int = 0
    reg_iterations: int = 3
    cg_iterations: int = 4
    final_cg_iterations: int = 6
    search_rounds: int = 0  # no global pose search (where svr has one): the verdict is under test
    progress: bool = False


def _fast(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(svr, "SVRConfig", FastConfig)
    mp.setattr(preprocess, "register_stacks",
               functools.partial(preprocess.register_stacks, resolution=3.0, sigmas=(2.0,), iterations=4))


def _sim(atlas, seed: int = 0):
    cfg = SimulationConfig(n_stacks=4, orientations=("axial", "coronal", "sagittal", "axial"), spacing=2.0,
                           thickness=4.0, motion="none", noise=0.02, margin=4.0)
    return simulate_stacks(atlas, atlas.mask, cfg, seed, progress=False)


@pytest.fixture(scope="module")
def two_atlases(shared_data):
    """Stacks 0, 1 simulated from STA23 and 2, 3 from STA33 (same seed: the same geometry frame)."""
    torch.set_num_threads(1)
    root = shared_data / "fetal_atlases" / "crl2017"
    return [_sim(_atlas_lowres(root / a, 1.6, 6.0)) for a in ("STA23", "STA33")]


@pytest.fixture(scope="module")
def mixed_files(two_atlases, tmp_path_factory):
    """The 2 + 2 mixed case written as NIfTI stacks and masks."""
    root = tmp_path_factory.mktemp("mixed")
    for name, sim in zip("ab", two_atlases):
        save_simulation(sim, root / name)
    pick = [("a", 0), ("a", 1), ("b", 2), ("b", 3)]
    stacks = [str(root / d / f"stack_{s:02d}.nii.gz") for d, s in pick]
    masks = [str(root / d / f"mask_{s:02d}.nii.gz") for d, s in pick]
    return root, stacks, masks


def _reconstruct(stacks, masks, out, *extra) -> int:
    with pytest.MonkeyPatch.context() as mp:
        _fast(mp)
        return main(["reconstruct", *stacks, "--stack-masks", *masks, "-o", str(out / "recon.nii.gz"),
                     "--output-transforms", str(out / "transforms.json"), *FAST, *extra])


def test_subscore_ramp_and_verdict():
    c = Criterion(good=1.0, doubtful=0.8, failed=0.6, reason="low {v:.2f}")
    assert c.subscore(1.0) == 1.0 and c.subscore(0.8) == pytest.approx(0.6) and c.subscore(0.6) == pytest.approx(0.3)
    assert c.subscore(0.3) == 0.0 and c.subscore(float("nan")) == 1.0
    assert c.subscore(0.9) > c.subscore(0.7) > c.subscore(0.5)
    lower = Criterion(good=0.0, doubtful=0.2, failed=0.4, reason="{v:.0%} stack {stack}")
    assert lower.subscore(0.0) == 1.0 and lower.subscore(0.4) == pytest.approx(0.3) and lower.subscore(1.0) == 0.0
    crit = {"a": c, "rejected_stack_max": lower}
    v, score, reasons, sub = verdict_of({"a": 0.95, "rejected_stack_max": 0.5, "rejected_stack_worst": 2}, crit)
    assert v == "failed" and score == pytest.approx(sub["rejected_stack_max"]) and reasons == ["50% stack 2"]
    v, score, reasons, _ = verdict_of({"a": 0.75, "rejected_stack_max": 0.0}, crit)
    assert v == "doubtful" and reasons == ["low 0.75"]
    assert verdict_of({"a": 0.99, "rejected_stack_max": 0.05}, crit)[0] == "ok"
    assert set(CRITERIA) >= {"ncc_median", "rejected_stack_max", "agreement_min"}


def test_motion_free_case_is_ok(two_atlases):
    sim = two_atlases[1]
    with pytest.MonkeyPatch.context() as mp:
        _fast(mp)
        prep = preprocess.prepare(sim.stacks[:3], RESOLUTION, have_stack_masks=True)
        result = svr.reconstruct_svr(prep, FastConfig())
    q = assess_quality(prep, result)
    assert q.verdict == "ok", (q.score, q.reasons, q.measures)
    assert q.reasons == [] and 0.6 <= q.score <= 1.0
    assert min(q.measures["agreement_per_stack"]) > 0.8
    assert q.line().startswith("quality: ok (score ")
    # the same stacks with the other atlas's stack swapped in: agreement of that stack collapses
    mixed = preprocess.prepare(sim.stacks[:2] + [two_atlases[0].stacks[2]], RESOLUTION, have_stack_masks=True)
    agree = stack_agreement(mixed, mixed.slices.poses, torch.ones(mixed.slices.n_slices))
    assert agree[2] < min(q.measures["agreement_per_stack"]) - 0.1


def test_two_atlases_fail_and_strict_exits_3(mixed_files, tmp_path, capsys):
    root, stacks, masks = mixed_files
    out = tmp_path / "plain"
    assert _reconstruct(stacks, masks, out) == 0
    err = capsys.readouterr().err
    assert "warning: reconstruction quality failed (score " in err
    rec = json.loads((out / "transforms.json").read_text())
    q = rec["quality"]
    assert q["verdict"] == "failed" and 0.0 <= q["score"] < 0.3
    assert q["reasons"] and any("stack" in r for r in q["reasons"])
    assert isinstance(q["measures"]["agreement_per_stack"], list)
    assert rec["layout"]["planes"] == 3  # axial, coronal, sagittal, axial: three planes
    # --strict: exit 3, and only after every output was written
    strict = tmp_path / "strict"
    assert _reconstruct(stacks, masks, strict, "--strict") == 3
    assert (strict / "recon.nii.gz").is_file()
    assert json.loads((strict / "transforms.json").read_text())["quality"]["verdict"] == "failed"


def test_ok_case_strict_exits_0_and_prints_quality(two_atlases, tmp_path, capsys):
    folder = tmp_path / "stacks"
    save_simulation(two_atlases[1], folder)
    stacks = [str(folder / f"stack_{s:02d}.nii.gz") for s in range(3)]
    masks = [str(folder / f"mask_{s:02d}.nii.gz") for s in range(3)]
    assert _reconstruct(stacks, masks, tmp_path / "out", "--strict") == 0
    assert "\nquality: ok (score " in capsys.readouterr().out
    q = json.loads((tmp_path / "out" / "transforms.json").read_text())["quality"]
    assert q["verdict"] == "ok" and q["reasons"] == []


def test_report_banner_shows_the_verdict_in_colour():
    html = _quality_banner({"verdict": "failed", "score": 0.12, "reasons": ["stack 1 disagrees <b>"]})
    assert 'id="quality"' in html and "failed" in html and "#d62728" in html and "0.12" in html
    assert "stack 1 disagrees &lt;b&gt;" in html  # escaped
    assert "#2ca02c" in _quality_banner({"verdict": "ok", "score": 0.9, "reasons": []})
    assert _quality_banner(None) == "" and _quality_banner({"verdict": "?"}) == ""


def test_large_estimated_motion_alone_does_not_make_a_reconstruction_doubtful():
    """Correct reconstructions of a fetus that moved a lot have large slice-to-slice corrections:
    the motion criterion names a cause when other evidence is bad, but does not set the score."""
    from slice2vol.evaluation.quality import CAUSE_ONLY, CRITERIA, verdict_of

    good = {name: c.good for name, c in CRITERIA.items()}
    assert verdict_of(good)[0] == "ok"
    moving = dict(good, motion_jump_max=40.0, motion_jump_stack_worst=1)
    verdict, score, reasons, sub = verdict_of(moving)
    assert "motion_jump_max" in CAUSE_ONLY
    assert sub["motion_jump_max"] < 0.3  # the criterion itself is far out...
    assert verdict == "ok" and reasons == []  # ...but on its own it is no evidence of failure
    # with bad evidence elsewhere, the verdict fails and the motion is named as a likely cause
    bad = dict(moving, heldout_ncc_min=0.0, heldout_stack_worst=1)
    verdict, _, reasons, _ = verdict_of(bad)
    assert verdict == "failed"
    assert any("slice-to-slice motion" in r for r in reasons)


@pytest.fixture(scope="module")
def parallel_pair(two_atlases):
    """Motion-free STA33 stacks: axial, the second axial, coronal (two parallel stacks and one
    crossing them), prepared at the test resolution."""
    sim = two_atlases[1]
    return preprocess.prepare([sim.stacks[0], sim.stacks[3], sim.stacks[1]], RESOLUTION, have_stack_masks=True)


def _moved(prep, poses: torch.Tensor, stack: int, degrees: float = 12.0, shift=(4.0, -3.0, 0.0)) -> torch.Tensor:
    """``poses`` with every slice of ``stack`` turned by ``degrees`` about S (through the ROI
    centre) and shifted by ``shift`` mm."""
    import math

    import numpy as np

    ss = prep.slices
    centre = prep.affine[:3, :3] @ torch.nonzero(prep.roi).double().mean(0).numpy() + prep.affine[:3, 3]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    W = np.eye(4)
    W[:3, :3] = R
    W[:3, 3] = centre - R @ centre + np.asarray(shift)
    out = poses.clone()
    lo, hi = ss.stack_slices[stack], ss.stack_slices[stack + 1]
    out[lo:hi] = torch.as_tensor(W, dtype=poses.dtype) @ poses[lo:hi]
    return out


def test_predictors_are_the_crossing_stacks(parallel_pair):
    from slice2vol.evaluation.quality import predictors

    assert predictors(parallel_pair) == [[2], [2], [0, 1]]  # the axial twins are not each other's witness
    assert predictors(parallel_pair, cross_angle=0.0) == [[1, 2], [0, 2], [0, 1]]
    twins = dataclasses.replace(parallel_pair, stacks=parallel_pair.stacks[:2])
    assert predictors(twins) == [[1], [0]]  # nothing crosses: the parallel stack is all there is


def test_heldout_prediction_ignores_a_parallel_stack(parallel_pair):
    """Moving the parallel twin changes what an all-others prediction says of stack 0, not what the
    crossing prediction (the default) says; moving the crossing stack changes it."""
    from slice2vol.evaluation.quality import CROSS_ANGLE

    prep = parallel_pair
    cross = {"heldout": True, "cross_angle": CROSS_ANGLE}
    P = prep.slices.poses.clone()
    ones = torch.ones(prep.slices.n_slices)
    _, held = stack_agreement(prep, P, ones, **cross)
    _, held_all = stack_agreement(prep, P, ones, heldout=True, cross_angle=0.0)
    assert min(held) > 0.8 and min(held_all) > 0.8  # motion-free: every stack is predicted well
    twin_moved = _moved(prep, P, 1)
    _, held_tm = stack_agreement(prep, twin_moved, ones, **cross)
    _, held_all_tm = stack_agreement(prep, twin_moved, ones, heldout=True, cross_angle=0.0)
    # equal up to the coverage threshold, which follows the densest sampling of all stacks together
    assert held_tm[0] == pytest.approx(held[0], abs=2e-3)
    assert held_all_tm[0] < held_all[0] - 0.05
    _, held_cm = stack_agreement(prep, _moved(prep, P, 2), ones, **cross)
    assert held_cm[0] < held[0] - 0.2


def test_crossing_rule_changes_nothing_for_orthogonal_stacks(two_atlases):
    sim = two_atlases[1]
    prep = preprocess.prepare(sim.stacks[:3], RESOLUTION, have_stack_masks=True)
    P, ones = prep.slices.poses, torch.ones(prep.slices.n_slices)
    assert stack_agreement(prep, P, ones, heldout=True) == stack_agreement(prep, P, ones, heldout=True, cross_angle=0.0)


def test_rejected_slices_of_the_crossing_stack_are_no_evidence(parallel_pair):
    """The middle third of the crossing (coronal) stack rejected: its average has a gap there that
    reads as disagreement unless the pixels it reaches are left out; a moved stack is still found."""
    prep = parallel_pair
    ss = prep.slices
    P, ones = ss.poses.clone(), torch.ones(ss.n_slices)
    lo, hi = ss.stack_slices[2], ss.stack_slices[3]
    third = (hi - lo) // 3
    slice_w = torch.ones(ss.n_slices, dtype=ss.values.dtype)
    slice_w[lo + third:hi - third] = 0.0
    w = slice_w[ss.slice_id]
    _, kept = stack_agreement(prep, P, ones, w, heldout=True)
    _, counted = stack_agreement(prep, P, ones, w, heldout=True, rejection_gaps=False)
    assert max(counted[:2]) < 0.25  # the gap costs the axial stacks their prediction...
    assert min(kept[:2]) > max(counted[:2]) + 0.3  # ...unless it is left out
    _, moved = stack_agreement(prep, _moved(prep, P, 2), ones, w, heldout=True)
    assert moved[0] < kept[0] - 0.2
