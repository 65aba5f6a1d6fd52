"""The CLI refuses bad input with one line, writes nothing and leaves its inputs untouched.

Only ``reconstruct`` is exercised for bad input here (``simulate``/``evaluate`` are tested with
their own modules); every subcommand's ``--help`` is checked.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from slice2vol.cli.parser import build_parser, main

# Cheap settings so that, should a command not check its outputs before working, the run that
# precedes the refusal is still short.
FAST = ["--device", "cpu", "--iterations", "1", "--resolution", "3", "--no-progress"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its content ('dir' for folders)."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def assert_refused(argv: list, folder: Path, capsys, message: str | None = None) -> None:
    """Run the CLI and check: non-zero exit, one error line last on stderr, no traceback, and
    ``folder`` (inputs and the place of the outputs) exactly as before."""
    before = snapshot(folder)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc != 0, err
    errors = [line for line in err.splitlines() if line.startswith("slice2vol: error:")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err, err
    if message is not None:
        assert re.search(message, errors[0]), errors[0]
    assert snapshot(folder) == before


@pytest.fixture
def stacks(make_stack) -> list[Path]:
    return [make_stack(f"stack{i}.nii.gz") for i in range(2)]


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "results" / "recon.nii.gz"


def test_bad_stack_file(bad_stack, stacks, out, tmp_path, capsys):
    path, message = bad_stack
    assert_refused(["reconstruct", stacks[0], path, "-o", out, *FAST], tmp_path, capsys, message)


def test_bad_stack_mask(bad_stack_mask, out, tmp_path, capsys):
    stack, mask, message = bad_stack_mask
    assert_refused(["reconstruct", stack, "--stack-masks", mask, "-o", out, *FAST], tmp_path, capsys, message)


def test_missing_stack_mask(stacks, out, tmp_path, capsys):
    argv = ["reconstruct", *stacks, "--stack-masks", tmp_path / "no.nii.gz", stacks[0], "-o", out, *FAST]
    assert_refused(argv, tmp_path, capsys, "file not found")


def test_empty_world_mask(stacks, make_stack, out, tmp_path, capsys):
    empty = make_stack("empty-mask.nii.gz", data=np.zeros((12, 10, 5), np.uint8))
    assert_refused(["reconstruct", *stacks, "--mask", empty, "-o", out, *FAST], tmp_path, capsys, "empty")


def test_wrong_number_of_thickness_values(stacks, out, tmp_path, capsys):
    argv = ["reconstruct", *stacks, "--thickness", "2", "3", "4", "-o", out, *FAST]
    assert_refused(argv, tmp_path, capsys, "3 thickness values for 2 stacks")


def test_wrong_number_of_stack_masks(stacks, make_stack, out, tmp_path, capsys):
    mask = make_stack("mask.nii.gz", data=np.ones((12, 10, 5), np.uint8))
    argv = ["reconstruct", *stacks, "--stack-masks", mask, "-o", out, *FAST]
    assert_refused(argv, tmp_path, capsys, "1 stack mask for 2 stacks")


def test_output_would_overwrite_an_input(stacks, tmp_path, capsys):
    assert_refused(["reconstruct", *stacks, "-o", stacks[1], *FAST], tmp_path, capsys, "overwrite")


def test_transforms_output_would_overwrite_an_input(stacks, out, tmp_path, capsys):
    argv = ["reconstruct", *stacks, "-o", out, "--output-transforms", stacks[0], *FAST]
    assert_refused(argv, tmp_path, capsys, "overwrite")


def test_output_is_a_directory(stacks, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert_refused(["reconstruct", *stacks, "-o", tmp_path / "folder", *FAST], tmp_path, capsys, "directory")


def test_output_is_not_a_nifti_name(stacks, tmp_path, capsys):
    assert_refused(["reconstruct", *stacks, "-o", tmp_path / "recon.png", *FAST], tmp_path, capsys, r"\.nii")


@pytest.mark.parametrize("argv", [["reconstruct", "-o", "x.nii.gz"], ["reconstruct", "s.nii.gz", "-o", "x.nii.gz",
                                                                       "--thickness", "-1"]])
def test_argument_errors_exit_2_with_usage(argv, capsys):
    """No stack at all, or a non-positive thickness, are caught by the parser itself."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and err.strip().splitlines()[-1].startswith("slice2vol reconstruct: error:")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_subcommand_help_mentions_every_option(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for action in subcommands()[name]._actions:
        for word in action.option_strings or [action.metavar or action.dest]:
            assert word in text, f"{name} --help does not mention {word}"


def test_top_level_help_and_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in subcommands())
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("slice2vol ")
