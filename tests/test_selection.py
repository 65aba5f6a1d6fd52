"""Stack assessment and selection (slice2vol.methods.selection, ``slice2vol assess``, reconstruct's
default selection; issue 14 item 3).

Small cases: three orthogonal stacks simulated from the CRL STA30 atlas at 1.6 mm (2 mm pixels,
4 mm slices, mild motion, stack masks) plus one bad axial stack: pure noise in a real stack's
geometry and mask, or a stack simulated from STA23 (7 weeks younger) moved to the same brain
centre.  Reconstructions use a trimmed SVR at 1.6 mm (as tests/test_quality.py).  Skipped without
the shared data.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _atlas_lowres

from slice2vol import io
from slice2vol.cli.parser import main
from slice2vol.core import preprocess
from slice2vol.errors import Slice2VolError
from slice2vol.methods import svr
from slice2vol.methods.selection import assess_stacks, decide
from slice2vol.simulation.simulate import SimulationConfig, save_simulation, simulate_stacks

RESOLUTION = 1.6
FAST = ["--device", "cpu", "--method", "svr", "--iterations", "1", "--resolution", str(RESOLUTION), "--no-progress"]


@dataclasses.dataclass
class FastConfig(svr.SVRConfig):
    coarse_iterations: int = 0
    reg_iterations: int = 2
    cg_iterations: int = 3
    final_cg_iterations: int = 4
    search_rounds: int = 0  # the selection is under test, not the pose search
    progress: bool = False


def _sim(atlas, seed: int, orientations):
    cfg = SimulationConfig(n_stacks=len(orientations), orientations=orientations, spacing=2.0, thickness=4.0,
                           motion="mild", noise=0.02, margin=4.0)
    return simulate_stacks(atlas, atlas.mask, cfg, seed, progress=False)


def _centre(volume) -> np.ndarray:
    idx = torch.nonzero(volume.mask).double().numpy()
    return idx.mean(0) @ volume.affine[:3, :3].T + volume.affine[:3, 3]


@pytest.fixture(scope="module")
def case(shared_data, tmp_path_factory):
    """Files: ``good`` (3 stacks + masks), ``noise`` and ``other`` (the bad 4th stack + mask)."""
    torch.set_num_threads(1)
    root = shared_data / "fetal_atlases" / "crl2017"
    atlas, younger = (_atlas_lowres(root / a, 1.6, 6.0) for a in ("STA30", "STA23"))
    folder = tmp_path_factory.mktemp("selection")
    good = _sim(atlas, 0, ("axial", "coronal", "sagittal"))
    save_simulation(good, folder / "good")
    extra = _sim(atlas, 1, ("axial",))
    g = torch.Generator().manual_seed(3)
    st = extra.stacks[0]
    sd = float(st.slices[st.mask].mean())
    noise = dataclasses.replace(st, slices=(torch.randn(st.slices.shape, generator=g) * sd).abs())
    save_simulation(dataclasses.replace(extra, stacks=[noise]), folder / "noise")
    other = _sim(younger, 2, ("axial",))
    shift = _centre(atlas) - _centre(younger)
    ost = other.stacks[0]
    A, P = ost.affine.copy(), ost.poses.copy()
    A[:3, 3] += shift
    P[:, :3, 3] += shift
    save_simulation(dataclasses.replace(other, stacks=[dataclasses.replace(ost, affine=A, poses=P)]), folder / "other")

    def files(bad: str | None = None):
        stacks = [str(folder / "good" / f"stack_{s:02d}.nii.gz") for s in range(3)]
        masks = [str(folder / "good" / f"mask_{s:02d}.nii.gz") for s in range(3)]
        if bad:
            stacks.append(str(folder / bad / "stack_00.nii.gz"))
            masks.append(str(folder / bad / "mask_00.nii.gz"))
        return stacks, masks

    return files


def _assess(files, **kw):
    stacks, masks = files
    return assess_stacks(io.load_stacks(stacks, None, masks), **kw)


def test_good_stacks_are_all_kept(case):
    sel = _assess(case())
    assert sel.dropped == [] and sel.kept == [0, 1, 2], sel.table()
    assert all(s.reason == "" for s in sel.stacks)
    for s in sel.stacks:  # every measure defined on a good case
        assert 0.3 < s.agreement <= 1 and s.motion_mm > 0 and s.coverage_ml > 10 and s.extent_mm > 0
        assert np.isfinite(s.neighbour_ncc) and np.isfinite(s.interleave_ncc) and np.isfinite(s.score)


def test_a_noise_stack_is_dropped(case):
    sel = _assess(case("noise"))
    assert sel.dropped == [3], sel.table()
    bad = sel.stacks[3]
    assert "disagrees with the other stacks" in bad.reason
    assert abs(bad.agreement) < 0.1 and abs(bad.neighbour_ncc) < 0.1
    assert min(s.agreement for s in sel.stacks[:3]) > bad.agreement + 0.3


def test_a_stack_of_another_atlas_is_dropped(case):
    sel = _assess(case("other"))
    assert sel.dropped == [3], sel.table()
    assert sel.stacks[3].reason  # names why
    assert sel.stacks[3].score < min(s.score for s in sel.stacks[:3])


def test_keep_all_reports_what_would_be_dropped_and_max_stacks_keeps_the_best(case):
    sel = _assess(case("noise"), drop_outliers=False)
    assert sel.dropped == [] and sel.stacks[3].reason.startswith("kept by --keep-all-stacks, else dropped:")
    best = _assess(case("noise"), max_stacks=2)
    assert len(best.kept) == 2 and 3 not in best.kept
    scores = [s.score for s in best.stacks]
    assert sorted(best.kept) == sorted(np.argsort(scores)[::-1][:2].tolist())
    assert all("--max-stacks" in best.stacks[i].reason for i in best.dropped if i != 3)
    # a protected stack (--template) is never dropped, even when it is the bad one
    kept = _assess(case("noise"), protect=[3])
    assert kept.dropped == [] and kept.stacks[3].reason.startswith("kept as the --template stack")
    with pytest.raises(Slice2VolError, match="--max-stacks must be at least 1"):
        _assess(case(), max_stacks=0)


def test_assessment_leaves_the_random_state_alone(case):
    stacks, masks = case("noise")
    loaded = io.load_stacks(stacks, None, masks)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assess_stacks(loaded)
    assert torch.equal(torch.rand(3), expected)


def test_decision_rule_guards():
    good = [0.7, 0.72, 0.68]
    # a clear outlier among 4 is dropped; with 2 stacks nothing is
    keep, reason, _ = decide(good + [0.05], [3.0] * 4, [100.0] * 4)
    assert keep == [True, True, True, False] and "disagrees" in reason[3]
    keep, _, _ = decide([0.7, 0.05], [3.0] * 2, [100.0] * 2)
    assert keep == [True, True]
    # a 2 + 2 split is no consensus: nothing is dropped (at most ceil(S/2) - 1 could go anyway)
    keep, _, _ = decide([0.7, 0.72, 0.1, 0.12], [3.0] * 4, [100.0] * 4)
    assert keep == [True] * 4
    # 2 bad of 5: both go (the 3 kept are a majority); 3 bad of 5: at most 2 go, the worst
    keep, _, _ = decide(good + [0.05, 0.1], [3.0] * 5, [100.0] * 5)
    assert keep == [True, True, True, False, False]
    # motion much larger than the others' with lower agreement: dropped; either alone: kept
    keep, reason, _ = decide(good + [0.55], [3.0, 3.2, 2.9, 6.0], [100.0] * 4)
    assert keep[3] is False and "moved much more" in reason[3]
    assert decide(good + [0.69], [3.0, 3.2, 2.9, 6.0], [100.0] * 4)[0] == [True] * 4
    assert decide(good + [0.55], [3.0, 3.2, 2.9, 3.4], [100.0] * 4)[0] == [True] * 4
    # consistent heavy motion (every stack alike) is not bad data
    assert decide([0.2, 0.25, 0.22, 0.18], [9.0, 11.0, 10.0, 12.0], [100.0] * 4)[0] == [True] * 4
    # a brain mask of another size counts only when the masks are per-stack brain masks
    keep, reason, _ = decide(good + [0.7], [3.0] * 4, [100.0, 105.0, 98.0, 250.0])
    assert keep[3] is False and "brain mask" in reason[3]
    assert decide(good + [0.7], [3.0] * 4, [100.0, 105.0, 98.0, 250.0], brain_masks=False)[0] == [True] * 4
    # no overlap with the others (undefined agreement of a stack with pixels) is a reason
    keep, reason, _ = decide(good + [float("nan")], [3.0] * 3 + [float("nan")], [100.0] * 4)
    assert keep[3] is False and "does not overlap" in reason[3]
    # ... but when no stack overlaps any other there is no consensus to keep: nothing is dropped
    assert decide([float("nan")] * 3, [float("nan")] * 3, [100.0] * 3)[0] == [True] * 3


def test_an_outlier_does_not_widen_its_own_margin():
    """A pure-noise 4th stack seen on a test atlas (agreement 0.01 against 0.45 / 0.47 / 0.60):
    with the MAD over all four its own distance set the margin (0.450, deficit 0.449) and it was
    kept; the spread of the other three puts it far outside."""
    A = [0.450, 0.470, 0.602, 0.011]
    keep, reason, _ = decide(A, [4.2, 6.0, 6.7, 7.9], [54.0, 49.0, 52.0, 51.0])
    assert keep == [True, True, True, False] and "disagrees" in reason[3]
    # the good ones stay inside the others' margin (floor 0.25) though they spread by 0.15
    assert all(0.46 - a < 0.25 for a in A[:3])


def test_a_flagged_stack_is_checked_against_a_second_reference(case, monkeypatch):
    """Measures that depend on the registration reference (scripted): a stack flagged against the
    first reference is dropped only if the second reference's registration does not explain it
    better (a higher median agreement); a flagged reference always defers to the second."""
    from slice2vol.methods import selection as sel_mod

    stacks, masks = case("noise")
    loaded = io.load_stacks(stacks, None, masks)
    measured = {}
    asked: list[int] = []

    def scripted(sts, reference, **kw):
        asked.append(reference)
        a = measured["first"] if len(asked) == 1 else measured["second"]
        return sel_mod.CrossStack(list(a), [3.0] * 4, [0.5] * 4)

    def run(a_first, a_second):
        asked.clear()
        measured.update(first=a_first, second=a_second)
        return assess_stacks(loaded)

    monkeypatch.setattr(sel_mod, "cross_stack_measures", scripted)
    # the first reference is chosen before any cross-stack measure (from the stacks' own motion
    # scores); an unscripted run may end on the second one, so it is read from a scripted run
    run([0.7] * 4, [0.7] * 4)
    first = asked[0]
    bad = next(i for i in range(4) if i != first)
    flagged = [0.5] * 4
    flagged[bad] = 0.05
    # against the first reference `bad` disagrees; the second registers the exam better and
    # explains every stack: nothing is dropped
    sel = run(flagged, [0.7] * 4)
    assert len(asked) == 2 and asked[1] not in (first, bad)
    assert sel.dropped == [] and sel.reference == asked[1]
    # the second reference sees the same outlier: dropped
    confirmed = [0.7] * 4
    confirmed[bad] = 0.1
    sel = run(flagged, confirmed)
    assert sel.dropped == [bad] and "disagrees" in sel.stacks[bad].reason
    # the second reference registers worse (lower median agreement): the first one's verdict stands
    sel = run(flagged, [0.3] * 4)
    assert len(asked) == 2 and sel.dropped == [bad] and sel.reference == first
    # nothing flagged: one measurement only
    assert run([0.7] * 4, [0.3] * 4).dropped == [] and asked == [first]
    # the reference itself flagged: the second measurement is used even if its median is lower
    ref_flagged = [0.7] * 4
    ref_flagged[first] = 0.05
    sel = run(ref_flagged, [0.6] * 4)
    assert sel.reference == asked[1] != first and sel.dropped == []


# ------------------------------------------------------------------------------ CLI


def _run(argv) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(svr, "SVRConfig", FastConfig)
        mp.setattr(preprocess, "register_stacks",
                   functools.partial(preprocess.register_stacks, resolution=3.0, sigmas=(2.0,), iterations=4))
        return main([str(a) for a in argv])


def test_reconstruct_drops_the_noise_stack_with_one_line_and_records_it(case, tmp_path, caplog):
    stacks, masks = case("noise")
    out = tmp_path / "sel"
    with caplog.at_level(logging.WARNING, logger="slice2vol"):
        assert _run(["reconstruct", *stacks, "--stack-masks", *masks, "-o", out / "r.nii.gz",
                     "--output-transforms", out / "t.json", *FAST]) == 0
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1 and "stack 3 (stack_00.nii.gz) left out" in lines[0] and "disagrees" in lines[0]
    rec = json.loads((out / "t.json").read_text())
    sel = rec["stack_selection"]
    assert sel["dropped"] == [3] and sel["kept"] == [0, 1, 2] and len(sel["stacks"]) == 4
    assert sel["stacks"][3]["keep"] is False and sel["stacks"][3]["reason"]
    assert sel["stacks"][3]["path"] == stacks[3]
    assert {"agreement", "motion_mm", "neighbour_ncc", "coverage_ml", "score"} <= set(sel["stacks"][0])
    assert len(rec["stacks"]) == 3  # only the kept stacks were reconstructed
    assert [Path(p).name for p in rec["inputs"]["stacks"]] == [Path(p).name for p in stacks[:3]]
    assert rec["timings_s"]["selection_s"] > 0

    # --keep-all-stacks: all four, and the record says what would have been dropped
    caplog.clear()
    out = tmp_path / "all"
    with caplog.at_level(logging.WARNING, logger="slice2vol"):
        assert _run(["reconstruct", *stacks, "--stack-masks", *masks, "-o", out / "r.nii.gz",
                     "--output-transforms", out / "t.json", "--keep-all-stacks", *FAST]) == 0
    assert not [r for r in caplog.records if "left out" in r.getMessage()]
    rec = json.loads((out / "t.json").read_text())
    assert len(rec["stacks"]) == 4 and rec["stack_selection"]["dropped"] == []
    assert "kept by --keep-all-stacks" in rec["stack_selection"]["stacks"][3]["reason"]


def test_reconstruct_max_stacks_and_per_stack_options_follow_the_kept_stacks(case, tmp_path):
    stacks, masks = case()
    out = tmp_path / "max"
    # per-stack thickness and packages are narrowed with the stacks (3 values for 3 stacks, 2 kept)
    assert _run(["reconstruct", *stacks, "--stack-masks", *masks, "-o", out / "r.nii.gz",
                 "--output-transforms", out / "t.json", "--max-stacks", "2", "--thickness", "4", "4", "4",
                 "--packages", "2", "2", "2", *FAST]) == 0
    rec = json.loads((out / "t.json").read_text())
    assert len(rec["stacks"]) == 2 and len(rec["stack_selection"]["dropped"]) == 1
    assert len(rec["inputs"]["stacks"]) == 2 and len(rec["inputs"]["thickness"]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--max-stacks", "0"], "--max-stacks: must be at least 1"),
    (["--max-stacks", "two"], "--max-stacks: not an integer"),
    (["--max-stacks", "2", "--keep-all-stacks"], "not allowed with argument"),
])
def test_bad_selection_options_are_refused(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["reconstruct", "a.nii.gz", "-o", str(tmp_path / "r.nii.gz"), *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_assess_prints_the_table_and_writes_json(case, tmp_path, capsys):
    stacks, masks = case("noise")
    assert main(["assess", *stacks, "--stack-masks", *masks, "--json", str(tmp_path / "a.json"),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:2].strip().isdigit()]
    assert len(rows) == 4 and all("keep" in r for r in rows[:3]) and "drop: disagrees" in rows[3]
    assert "agree" in out and "motion" in out and "brain mL" in out
    assert "reconstruct would keep 3 of 4 stacks and leave out 3 (stack_00.nii.gz)" in out
    rec = json.loads((tmp_path / "a.json").read_text())
    assert rec["dropped"] == [3] and len(rec["stacks"]) == 4
    # the noise column: the stack of pure noise reads far noisier than the simulated good ones
    assert "noise %" in out
    good = [st["noise"] for st in rec["stacks"][:3]]
    assert all(0 < v < 0.1 for v in good) and rec["stacks"][3]["noise"] > 3 * max(good), rec["stacks"]
    # the output may not replace an input; a missing stack is one error line
    assert main(["assess", *stacks, "--json", stacks[0]]) == 2
    assert "slice2vol: error:" in capsys.readouterr().err
    assert main(["assess", str(tmp_path / "missing.nii.gz")]) == 2
    assert capsys.readouterr().err.startswith("slice2vol: error:")
