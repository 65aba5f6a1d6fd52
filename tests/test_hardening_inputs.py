"""Issue 12 (hardening), items 4-8 and 13: the --mask frame, suspicious stack files, the thickness
used, hostile pose records and integer options, output locations and interrupted runs, and what
--verbose shows.

Most tests run ``slice2vol.cli.parser.main`` on tiny synthetic stacks written into ``tmp_path``; where a
refusal must come before any work, ``run_reconstruction`` is replaced by a function that fails.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_checks import refused as _refused  # shared with the other CLI tests

from slice2vol import io
from slice2vol.cli import commands
from slice2vol.cli.parser import main
from slice2vol.cli import parser as cli
from slice2vol.core.image import SliceSet, Volume
from slice2vol.core.runtime import setup_logging
from slice2vol.errors import Slice2VolError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--iterations", "1", "--resolution", "2", "--no-progress"]


def _rot(axis: int, deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def _world_stack(path: Path, rotation=np.eye(3), shape=(20, 20, 8), spacing=(1.5, 1.5, 3.0), shift=(0.0, 0.0, 0.0),
                 noise: float = 1.0, seed: int = 0, writer=None) -> Path:
    """A stack through one world-space blob 'brain' (centred on the stack unless shifted)."""
    A = np.eye(4)
    A[:3, :3] = rotation * np.asarray(spacing)
    A[:3, 3] = -A[:3, :3] @ ((np.asarray(shape) - 1) / 2) + np.asarray(shift)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    w = ijk @ A[:3, :3].T + A[:3, 3] - np.asarray(shift)
    r2 = ((w / [12.0, 10.0, 9.0]) ** 2).sum(1)
    d = np.where(r2 < 1, 100 * (1.2 - r2) + 20 * np.sin(w[:, 0] / 3), 0).reshape(shape)
    d = np.clip(d + np.random.default_rng(seed).normal(0, noise, shape), 0, None).astype(np.float32)
    writer(path, d, A)
    return path


@pytest.fixture
def tiny(tmp_path, nifti_writer) -> list[Path]:
    """Three orthogonal tiny stacks of one blob (a real run at 2 mm takes about half a second)."""
    return [_world_stack(tmp_path / f"{n}.nii.gz", R, seed=i, writer=nifti_writer)
            for i, (n, R) in enumerate([("a", np.eye(3)), ("b", _rot(0, 90)), ("c", _rot(1, 90))])]


class _WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """``run_reconstruction`` raises :class:`_WorkStarted`: a refusal must come before it."""
    def refuse(*a, **k):
        raise _WorkStarted("the reconstruction started")
    monkeypatch.setattr(commands, "run_reconstruction", refuse)




@contextlib.contextmanager
def shell_logging():
    """Logging as a shell run sees it: the root logger without pytest's capture handlers, so that
    ``setup_logging`` configures it and log lines go to (captured) stderr; restored afterwards."""
    root, pkg = logging.getLogger(), logging.getLogger("slice2vol")
    saved = root.handlers[:], root.level, pkg.level
    root.handlers = []
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        pkg.setLevel(saved[2])


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# ------------------------------------------------------------------ 4. --mask and the template


def _mask_like(stack: Path, out: Path, writer) -> Path:
    img = nib.load(stack)
    writer(out, (np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine)
    return out


def _prepare(paths, mask_path):
    from slice2vol.core.preprocess import prepare

    stacks = io.load_stacks(paths)
    mask = Volume(torch.from_numpy(io.load_mask(mask_path)), io.load_nifti(mask_path, "mask")[1])
    return prepare(stacks, 2.0, mask=mask, register=False)


def test_mask_drawn_on_a_stack_makes_that_stack_the_template(tmp_path, nifti_writer, capsys):
    clean = _world_stack(tmp_path / "clean.nii.gz", _rot(2, 30), noise=1.0, writer=nifti_writer)
    noisy = _world_stack(tmp_path / "noisy.nii.gz", noise=40.0, seed=1, writer=nifti_writer)
    mask = _mask_like(noisy, tmp_path / "mask.nii.gz", nifti_writer)
    # the automatic choice alone prefers the clean (rotated) stack
    from slice2vol.core.preprocess import choose_template
    assert choose_template(io.load_stacks([clean, noisy])) == 0
    with shell_logging():
        setup_logging(False)
        capsys.readouterr()
        prep = _prepare([clean, noisy], mask)
        err = capsys.readouterr().err
    assert prep.template == 1
    # shown at normal verbosity, and no 'assumed' warning: the mask's grid identified the stack
    assert re.search(r"^slice2vol: template stack 1 \(noisy.nii.gz\).*--mask", err, re.M), err
    assert "assumed" not in err


def test_mask_on_no_stack_grid_falls_back_with_one_warning(tmp_path, nifti_writer, caplog):
    clean = _world_stack(tmp_path / "clean.nii.gz", _rot(2, 30), writer=nifti_writer)
    noisy = _world_stack(tmp_path / "noisy.nii.gz", noise=40.0, seed=1, writer=nifti_writer)
    world = _world_stack(tmp_path / "world.nii.gz", shape=(30, 26, 24), spacing=(1.0, 1.0, 1.0), writer=nifti_writer)
    mask = _mask_like(world, tmp_path / "mask.nii.gz", nifti_writer)
    prep = _prepare([clean, noisy], mask)
    assert prep.template == 0
    lines = _warnings(caplog, "--mask")
    assert len(lines) == 1 and re.search(r"matches no stack's voxel grid.*assumed to be in the frame of "
                                         r"stack 0 \(clean.nii.gz\)", lines[0]), lines


# ------------------------------------------------------------------ 5. suspicious stack files


def _patched_nifti(path: Path, *, pixdim3=None, sform_code=0) -> Path:
    """An uncompressed NIfTI whose header's slice pixdim is overwritten after nibabel wrote it."""
    import struct

    img = nib.Nifti1Image(np.random.default_rng(0).random((12, 10, 5)).astype(np.float32) + 1, None)
    img.set_qform(np.diag([1.5, 1.5, 3.0, 1.0]), code=1)
    img.set_sform(np.diag([1.5, 1.5, 3.0, 1.0]), code=sform_code)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    raw[76 + 12:76 + 16] = struct.pack("<f", pixdim3)  # pixdim[3]
    path.write_bytes(bytes(raw))
    return path


def test_complex_stack_is_refused(tmp_path, nifti_writer):
    d = np.random.default_rng(0).random((12, 10, 5)) + 1
    path = nifti_writer(tmp_path / "complex.nii.gz", (d + 1j * d).astype(np.complex64), np.diag([1.5, 1.5, 3, 1.0]))
    with pytest.raises(Slice2VolError, match=r"complex.nii.gz: complex-valued voxels \(complex64\)") as info:
        io.load_stack(path)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # nibabel's qform of an inf pixdim
@pytest.mark.parametrize("pixdim3", [0.0, float("nan"), float("inf")])
def test_zero_or_non_finite_voxel_size_is_refused(tmp_path, pixdim3):
    path = _patched_nifti(tmp_path / "p.nii", pixdim3=pixdim3)
    with pytest.raises(Slice2VolError, match=r"p.nii: .*(voxel size|affine is not a finite)"):
        io.load_stack(path)
    # the same voxel size in a header whose geometry is a valid sform is also refused (pixdim says 0)
    if pixdim3 == 0.0:
        with pytest.raises(Slice2VolError, match=r"voxel size"):
            io.load_stack(_patched_nifti(tmp_path / "s.nii", pixdim3=0.0, sform_code=1))


def test_the_same_stack_given_twice_is_refused(tiny, tmp_path, capsys, no_work):
    a = tiny[0]
    copy, link = tmp_path / "copy_of_a.nii.gz", tmp_path / "link.nii.gz"
    copy.write_bytes(a.read_bytes())
    link.symlink_to(a)
    out = tmp_path / "r.nii.gz"
    _refused(["reconstruct", a, tiny[1], a, "-o", out, *FAST], capsys, r"stack .*/a.nii.gz is given twice$")
    _refused(["reconstruct", a, tiny[1], f"{tmp_path}/./a.nii.gz", "-o", out, *FAST], capsys, r"given twice")
    _refused(["reconstruct", a, tiny[1], link, "-o", out, *FAST], capsys,
             r"stack .*link.nii.gz is given twice \(the same file as .*/a.nii.gz\)")
    _refused(["reconstruct", a, tiny[1], copy, "-o", out, *FAST], capsys,
             r"stacks .*/a.nii.gz and .*copy_of_a.nii.gz have identical voxel data and geometry")


def test_a_stack_far_from_the_others_gives_one_warning(tiny, tmp_path, nifti_writer, no_work, caplog):
    far = _world_stack(tmp_path / "far.nii.gz", _rot(1, 90), shift=(0.0, 140.0, 0.0), writer=nifti_writer)
    with pytest.raises(_WorkStarted):
        main([str(a) for a in ["reconstruct", tiny[0], tiny[1], far, "-o", tmp_path / "r.nii.gz", *FAST]])
    lines = _warnings(caplog, "median centre")
    assert len(lines) == 1 and re.search(r"far.nii.gz: centre 1[34]\d mm from the median centre", lines[0]), lines
    caplog.clear()
    with pytest.raises(_WorkStarted):
        main([str(a) for a in ["reconstruct", *tiny, "-o", tmp_path / "r.nii.gz", *FAST]])
    assert _warnings(caplog, "median centre") == []


# ------------------------------------------------------------------ 6. thickness used


def test_thickness_used_is_shown_at_normal_verbosity(tiny, capsys):
    with shell_logging():
        setup_logging(False)
        capsys.readouterr()
        io.load_stacks(tiny[:2])
        io.load_stacks(tiny[2:], [2.5])
        err = capsys.readouterr().err
    assert "slice2vol: a.nii.gz: thickness 3.0 mm (slice spacing; give --thickness to change)" in err.splitlines()
    assert "slice2vol: b.nii.gz: thickness 3.0 mm (slice spacing; give --thickness to change)" in err.splitlines()
    assert "slice2vol: c.nii.gz: thickness 2.5 mm (given)" in err.splitlines()


def test_thickness_differing_from_the_sidecar_is_warned(tiny, tmp_path, caplog):
    a, b, c = tiny
    (tmp_path / "a.json").write_text(json.dumps({"SliceThickness": 2.0, "RepetitionTime": 1.2}))
    (tmp_path / "b.json").write_text(json.dumps({"SliceThickness": 3.0}))
    (tmp_path / "c.json").write_text("[" * 100_000 + "]" * 100_000)  # too deep for json: ignored
    stacks = io.load_stacks(tiny)
    assert [s.thickness for s in stacks] == [3.0, 3.0, 3.0]
    lines = _warnings(caplog, "SliceThickness")
    assert len(lines) == 2, lines
    assert re.search(r"a.nii.gz: thickness 3.0 mm \(slice spacing\) differs from SliceThickness 2.0 mm in "
                     r".*a.json", lines[0]), lines
    assert re.search(r"sidecar .*c.json: not read \(nested too deeply\); SliceThickness and SliceTiming not used", lines[1]), lines
    caplog.clear()
    io.load_stacks([a], [2.0])
    assert _warnings(caplog, "SliceThickness") == []


# ------------------------------------------------------------------ 7. hostile pose records, integer options


def _poses_record(pose=None, index=0, **extra) -> dict:
    P = np.eye(4).tolist() if pose is None else pose
    return {"convention": io.POSES_CONVENTION, "stacks": [{"name": "s", "slices": [{"index": index, "pose": P}]}],
            **extra}


def _with(P, i, j, v):
    P = np.eye(4).tolist()
    P[i][j] = v
    return P


HOSTILE_POSES = {
    "translation_1e308": (json.dumps(_poses_record(_with(None, 0, 3, 1e308))), r"slice 0: pose is not a slice-to"),
    "rotation_1e308": (json.dumps(_poses_record(_with(None, 0, 0, -1e308))), r"slice 0: pose is not a slice-to"),
    "last_row": (json.dumps(_poses_record(_with(None, 3, 0, 1.0))), r"last row 0 0 0 1"),
    "inf": ('{"stacks": [{"slices": [{"index": 0, "pose": [[1e999, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], '
            '[0, 0, 0, 1]]}]}]}', r"pose is not a finite 4x4"),
    "nan": (json.dumps(_poses_record(_with(None, 2, 3, float("nan")))), r"pose is not a finite 4x4"),
    "index_1e30": (json.dumps(_poses_record(index=1e30)), r"index must be an integer"),
    "index_10_30": (json.dumps(_poses_record(index=10**30)), r"index 10{30} is out of range"),
    "index_negative": (json.dumps(_poses_record(index=-1)), r"index -1 is out of range"),
    "index_bool": (json.dumps(_poses_record(index=True)), r"index must be an integer"),
    "nested": ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
    "no_stacks": ('{"convention": "x"}', r"missing key 'stacks'"),
    "no_pose": ('{"stacks": [{"slices": [{"index": 0}]}]}', r"missing key 'pose'"),
    "stacks_not_list": ('{"stacks": {"a": 1}}', r"'stacks' must be a list"),
    "slices_not_list": ('{"stacks": [{"slices": 5}]}', r"'slices' must be a list"),
    "pose_3x4": (json.dumps(_poses_record(np.eye(4)[:3].tolist())), r"pose is not a finite 4x4"),
    "pose_ragged": (json.dumps(_poses_record([[1, 0, 0, 0], [0, 1], [0, 0, 1, 0], [0, 0, 0, 1]])),
                    r"pose is not a finite 4x4"),
    "pose_text": (json.dumps(_poses_record("eye")), r"pose is not a finite 4x4"),
    "top_list": ("[1, 2]", r"not a poses record"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_POSES))
def test_hostile_poses_json_is_one_line(tmp_path, kind):
    text, pattern = HOSTILE_POSES[kind]
    path = tmp_path / "poses.json"
    path.write_text(text)
    with pytest.raises(Slice2VolError, match=r"^poses file .*poses.json: ") as info:
        io.load_poses_json(path)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_evaluate_and_report_refuse_hostile_poses(tmp_path, nifti_writer, capsys):
    vol = _world_stack(tmp_path / "recon.nii.gz", shape=(10, 10, 10), spacing=(2, 2, 2), writer=nifti_writer)
    good, bad = tmp_path / "gt.json", tmp_path / "est.json"
    good.write_text(json.dumps(_poses_record()))
    bad.write_text(json.dumps(_poses_record(_with(None, 0, 3, 1e308))))
    _refused(["evaluate", vol, "--poses", bad, "--gt-poses", good], capsys, r"est.json: .*pose is not a slice-to-world")
    _refused(["evaluate", vol, "--poses", good, "--gt-poses", bad], capsys, r"est.json: .*pose is not a slice-to-world")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "transforms.json").write_text(json.dumps(_poses_record(index=1e30, output=str(vol))))
    _refused(["report", folder], capsys, r"transforms.json: .*index must be an integer")


@pytest.mark.parametrize("option, value, pattern", [
    ("--iterations", "-2", r"argument --iterations: must be a non-negative integer: '-2'"),
    ("--iterations", "1.5", r"argument --iterations: not an integer: '1.5'"),
    ("--seed", "1e23", r"argument --seed: not an integer: '1e23'"),
    ("--seed", "-1", r"argument --seed: must be a non-negative integer"),
    ("--seed", str(10**30), r"argument --seed: .* at most 2\*\*63 - 1"),
])
def test_integer_options_are_checked_by_the_parser(tiny, tmp_path, option, value, pattern, capsys, no_work):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in ["reconstruct", *tiny, "-o", tmp_path / "r.nii.gz", *FAST, option, value]])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(pattern, err[-1]), err


def test_iterations_zero_and_a_large_seed_are_accepted(tiny, tmp_path, no_work):
    with pytest.raises(_WorkStarted):
        main([str(a) for a in ["reconstruct", *tiny, "-o", tmp_path / "r.nii.gz", *FAST, "--iterations", "0",
                               "--seed", str(2**63 - 1)]])


# ------------------------------------------------------------------ 8. output locations, interrupted runs


@pytest.mark.parametrize("option", ["-o", "--output-transforms", "--report", "--output-simulated"])
def test_an_output_under_a_file_is_refused_before_the_work(tiny, tmp_path, option, capsys, no_work):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    target = {"-o": "sub/r.nii.gz", "--output-transforms": "p.json", "--report": "rep", "--output-simulated": "sim"}
    argv = ["reconstruct", *tiny, "-o", tmp_path / "r.nii.gz", *FAST, option, blocker / target[option]]
    _refused(argv, capsys, r"cannot create folder .*blocker: it is a file|blocker is not a directory")


@pytest.mark.parametrize("option", ["-o", "--output-transforms", "--report"])
def test_an_output_in_a_read_only_folder_is_refused_before_the_work(tiny, tmp_path, option, capsys, no_work,
                                                                     monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root may write anywhere: make os.access answer as for a normal user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    target = {"-o": ro / "r.nii.gz", "--output-transforms": ro / "new" / "p.json", "--report": ro / "rep"}[option]
    try:
        _refused(["reconstruct", *tiny, "-o", tmp_path / "r.nii.gz", *FAST, option, target], capsys,
                 r"folder .*ro is not writable")
    finally:
        ro.chmod(0o755)


def _tiny_run(path: Path):
    """A prepared run and a result for :func:`commands._write_results` (one stack, identity grid)."""
    st = io.load_stack(path)
    ss = SliceSet.from_stacks([st])
    roi = torch.ones(4, 4, 4, dtype=torch.bool)
    prep = SimpleNamespace(roi=roi, affine=np.eye(4), slices=ss, stacks=[st], template=0)
    result = SimpleNamespace(volume=Volume(torch.ones(4, 4, 4), np.eye(4)), poses=ss.poses,
                             slice_weights=torch.ones(ss.n_slices), scales=torch.ones(ss.n_slices), simulated=ss.values)
    return prep, result


def _args(out: Path) -> argparse.Namespace:
    return argparse.Namespace(output=str(out / "r.nii.gz"), output_transforms=str(out / "poses.json"),
                              output_simulated=str(out / "sim"))


def test_the_volume_is_written_first(tiny, tmp_path, monkeypatch):
    prep, result = _tiny_run(tiny[0])
    order = []
    real = io.atomic_write
    monkeypatch.setattr(io, "atomic_write", lambda path, *a, **k: order.append(Path(path).name) or real(path, *a, **k))
    out = tmp_path / "out"
    commands._write_results(_args(out), prep, result, [], {})
    assert order == ["r.nii.gz", "poses.json", "simulated_a.nii.gz"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), Slice2VolError("cannot write output sim: disk full")])
def test_a_late_failure_removes_the_outputs_of_the_run(tiny, tmp_path, monkeypatch, exc):
    prep, result = _tiny_run(tiny[0])

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(io, "save_stack", fail)  # the last output (simulated slices) fails
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        commands._write_results(_args(out), prep, result, [], {})
    assert not out.exists() or list(out.rglob("*")) == []


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt(), 130), (Slice2VolError("report: no space left"), 2)])
def test_a_failed_report_leaves_no_volume_or_poses(tiny, tmp_path, monkeypatch, capsys, exc, code):
    from slice2vol import report

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(report, "write_report", fail)
    out = tmp_path / "out"
    rc = main([str(a) for a in ["reconstruct", *tiny, "-o", out / "r.nii.gz", "--output-transforms", out / "p.json",
                                "--report", out / "report", *FAST]])
    assert rc == code, capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == []


def test_sigterm_is_an_interrupt_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "out" / "r.json"
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from slice2vol.cli import parser as cli
        from slice2vol import io
        def dispatch(args):
            def write(tmp):
                open(tmp, "w").write("partial")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(20)
            io.atomic_write({str(out)!r}, write)
            return 0
        cli._dispatch = dispatch
        sys.exit(cli.main(["demo", "-o", "x"]))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "slice2vol: terminated (SIGTERM)", proc.stderr
    assert list(out.parent.iterdir()) == []


def test_the_sigterm_handler_is_restored(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    monkeypatch.setattr(cli, "_dispatch", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    assert main(["demo", "-o", "x"]) == 0
    assert seen[0] not in (signal.SIG_DFL, signal.SIG_IGN, before)
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------ 13. --verbose


def test_verbose_shows_slice2vol_details_but_no_third_party_debug(capsys):
    for verbose in (True, False):
        with shell_logging():
            setup_logging(verbose)
            capsys.readouterr()
            logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR' 16 13")
            logging.getLogger("matplotlib.font_manager").debug("findfont: score(FontEntry) = 10.05")
            logging.getLogger("matplotlib").info("matplotlib data path")
            logging.getLogger("slice2vol.core.preprocess").info("template scores (neighbour NCC): 0.9")
            logging.getLogger("slice2vol.methods.svr").debug("svr details")
            logging.getLogger("some.library").warning("a third-party warning")
            err = capsys.readouterr().err
        assert "STREAM" not in err and "findfont" not in err and "data path" not in err, err
        assert "a third-party warning" in err
        assert ("template scores" in err and "svr details" in err) == verbose, err


def test_report_refuses_a_deeply_nested_record_in_one_line(tmp_path, capsys):
    from slice2vol.cli.parser import main

    (tmp_path / "transforms.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("slice2vol: error:") == 1 and "nested too deeply" in err
