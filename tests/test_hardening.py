"""Issue 12 (hardening): untrusted files, sizes checked before allocation, no non-finite output,
and every command the README shows is wired into the CLI.

Each test exercises one refusal end to end where that is cheap (``slice2vol.cli.parser.main`` on the
bundled demo stacks, refused before any registration) and as a unit otherwise.
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_checks import refused as _refused  # shared with the other CLI tests

from slice2vol.cli.parser import main
from slice2vol.cli import parser as cli
from slice2vol.core import acquisition as acq
from slice2vol.core import budget
from slice2vol.core.image import Volume
from slice2vol.errors import Slice2VolError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slice2vol" / "data" / "demo"
DEMO_ARGS = [*(DEMO / f"stack_0{i}.nii.gz" for i in range(3)), "--stack-masks",
             *(DEMO / f"mask_0{i}.nii.gz" for i in range(3)), "--device", "cpu", "--iterations", "1", "--no-progress"]


class _MakesMarker:
    """Unpickling this calls ``open(marker, 'w')``: a stand-in for a pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))




# ------------------------------------------------------------------ 1. weights and checkpoints


def test_crafted_weights_are_refused_and_the_shipped_ones_load(tmp_path):
    from slice2vol.methods.csvr.infer import DEFAULT_WEIGHTS, load_model

    marker = tmp_path / "marker"
    zipped = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": {"w": _MakesMarker(marker)}}, zipped)
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"config": _MakesMarker(marker)}, protocol=2))
    for path in (zipped, legacy):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol of the legacy file
            with pytest.raises(Slice2VolError, match=r"not a slice2vol cSVR weights file \(refused: only tensors"):
                load_model(path)
    assert not marker.exists()
    net = load_model()  # the packaged weights are tensors and plain data
    assert isinstance(torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)["config"], dict)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_weights_of_the_wrong_structure_are_one_line(tmp_path):
    from slice2vol.methods.csvr.infer import DEFAULT_WEIGHTS, load_model

    good = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    cases = {
        "list.pt": ([1, 2], "not a slice2vol cSVR weights file"),
        "no_config.pt": ({"state_dict": good["state_dict"]}, "needs a 'config' dict"),
        "shapes.pt": ({"config": good["config"], "state_dict": {k: torch.zeros(1) for k in good["state_dict"]}},
                      "does not fit the cSVR network .*size mismatch"),
    }
    for name, (obj, pattern) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(Slice2VolError, match=pattern) as info:
            load_model(tmp_path / name)
        assert "\n" not in str(info.value)
    (tmp_path / "text.pt").write_text("not a torch file\n")
    with pytest.raises(Slice2VolError, match=r"text.pt: not a (readable torch file|slice2vol cSVR weights file)"):
        load_model(tmp_path / "text.pt")


def test_training_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    from slice2vol.training.csvr import _rng_state, _set_rng_state

    rng = np.random.default_rng(5)
    np.random.seed(3)
    random.seed(4)
    torch.manual_seed(6)
    rng.random(3)
    np.random.standard_normal(3)  # leaves a cached Gaussian in numpy's legacy state
    torch.save({"rng": _rng_state(rng)}, tmp_path / "ck.pt")
    draws = (rng.random(), np.random.random(), np.random.standard_normal(), random.random(), float(torch.rand(1)))
    other = np.random.default_rng(0)
    _set_rng_state(other, torch.load(tmp_path / "ck.pt", weights_only=True)["rng"])
    assert (other.random(), np.random.random(), np.random.standard_normal(), random.random(),
            float(torch.rand(1))) == draws


def _tiny_training_data(root: Path) -> Path:
    """A blob 'atlas' for training and for validation (as in test_csvr)."""
    n, res = 20, 2.0
    ax = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * res
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    r2 = (x / 16) ** 2 + (y / 13) ** 2 + (z / 11) ** 2
    data = torch.where(r2 < 1, 100.0 - 40 * r2, torch.zeros(())) + 60 * ((((x - 4) / 5) ** 2 + ((y + 3) / 4) ** 2) < 1)
    A = np.diag([res, res, res, 1.0])
    A[:3, 3] = -(n - 1) / 2 * res
    for folder in (root / "fetal_atlases/crl2017/BLOB", root / "fetal_atlases/spina_bifida2021/GA22_notoperated"):
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data.numpy(), A), folder / "t2.nii.gz")
        nib.save(nib.Nifti1Image((r2 < 1).numpy().astype(np.uint8), A), folder / "mask.nii.gz")
    return root


def test_train_csvr_resumes_from_its_checkpoint_and_refuses_a_crafted_one(tmp_path, capsys, caplog):
    from slice2vol.methods.csvr.network import CSVRConfig, CSVRNet
    from slice2vol.training.csvr import export_weights

    data = _tiny_training_data(tmp_path / "data")
    torch.manual_seed(0)
    tiny = CSVRConfig(channels=(4, 6, 8), hidden=(6, 8, 8), spacing=2.0, fov=48.0, iterations=(1, 1, 1))
    init = export_weights(CSVRNet(tiny), tmp_path / "init.pt", {})
    run = ["train-csvr", "--output", tmp_path / "run", "--data", data, "--init-weights", init, "--motion", "mild",
           "--atlas-resolution", "2.0", "--val-every", "1000"]
    threads = torch.get_num_threads()
    try:
        assert main([str(a) for a in run + ["--steps", "1"]]) == 0
        assert main([str(a) for a in run + ["--steps", "2"]]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "resumed from" in caplog.text
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2

    marker = tmp_path / "marker"
    evil = tmp_path / "evil_run"
    evil.mkdir()
    torch.save({"config": {}, "model": _MakesMarker(marker)}, evil / "checkpoint.pt")
    _refused(["train-csvr", "--output", evil, "--data", data], capsys,
             r"training checkpoint .*checkpoint.pt: not a slice2vol train-csvr checkpoint \(refused")
    assert not marker.exists()


# ------------------------------------------------------------------ 2. sizes before allocation


def test_absurdly_fine_resolution_is_refused_with_figures(tmp_path, capsys):
    line = _refused(["reconstruct", *DEMO_ARGS, "-o", tmp_path / "r.nii.gz", "--resolution", "0.001"], capsys,
                    r"output grid \d+x\d+x\d+ at 0.001 mm would need about [\d.]+ [PT]B .*use --resolution >= [\d.]+$")
    assert float(line.rsplit(">= ", 1)[1]) > 0.01
    assert not (tmp_path / "r.nii.gz").exists()


def test_memory_limit_is_respected_with_a_suggested_resolution(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLICE2VOL_MEMORY_LIMIT", str(50 * 10**6))
    line = _refused(["reconstruct", *DEMO_ARGS, "-o", tmp_path / "r.nii.gz"], capsys,
                    r"output grid \d+x\d+x\d+ at 0.8 mm would need about [\d.]+ MB .*50 MB is available; "
                    r"use --resolution >= [\d.]+$")
    assert float(line.rsplit(">= ", 1)[1]) > 0.8


def test_absurdly_coarse_resolution_is_refused(tmp_path, capsys):
    _refused(["reconstruct", *DEMO_ARGS, "-o", tmp_path / "r.nii.gz", "--resolution", "1e6"], capsys,
             r"--resolution 1e\+06 mm gives a [12]x[12]x[12] grid over the \d+ x \d+ x \d+ mm brain region")


def test_absurd_thickness_is_refused_with_the_psf_size(tmp_path, capsys):
    _refused(["reconstruct", *DEMO_ARGS, "-o", tmp_path / "r.nii.gz", "--thickness", "1e6"], capsys,
             r"slice thickness 1e\+06 mm at --resolution 0.8 mm would need \d+ PSF samples per pixel")


def test_psf_samples_are_bounded_and_unchanged_at_the_defaults():
    D = torch.float64
    sp, th = torch.tensor([[1.0, 1.0]], dtype=D), torch.tensor([3.0], dtype=D)
    psf = acq.psf_kernel(sp, th, 0.8)
    # today's kernel at the defaults, written out: the in-plane sigma (FWHM 1.2 mm) goes to the
    # volume prefilter, one in-plane node, 7 through-plane nodes to +-2 of what is left of sigma_z
    vs = 1.2 * acq.FWHM_TO_SIGMA
    assert psf.volume_sigma == pytest.approx(vs, rel=1e-12)
    sigma = math.sqrt((3.0 * acq.FWHM_TO_SIGMA) ** 2 - vs ** 2)
    z = torch.linspace(-2 * sigma, 2 * sigma, 7, dtype=D)
    w = torch.exp(-0.5 * (z / sigma) ** 2)
    torch.testing.assert_close(psf.offsets[0, :, 2], z, rtol=0, atol=1e-12)
    assert not psf.offsets[0, :, :2].any()
    torch.testing.assert_close(psf.weights[0], w / w.sum(), rtol=0, atol=1e-12)
    # at 0.5 mm nothing is left in-plane either (the 3 x 3 rule, 117 nodes, ran there before the prefilter)
    assert acq.psf_kernel(sp, th, 0.5).n_samples == 11
    for res, thick in ((0.1, 3.0), (0.8, 1e6)):
        k = acq.psf_kernel(sp, torch.tensor([thick], dtype=D), res)
        assert k.n_samples <= acq.MAX_PSF_SAMPLES["normal"]
        assert float(k.weights.sum()) == pytest.approx(1.0)
    # budget's count is the kernel's, before and after the cap
    for dx, dy, t, r in [(1, 1, 3, 0.8), (1, 1, 3, 0.5), (0.8, 1.2, 4.5, 0.6), (1.5, 2, 6, 0.3), (1, 1, 3, 0.1)]:
        k = acq.psf_kernel(torch.tensor([[dx, dy]], dtype=D), torch.tensor([t], dtype=D), r).n_samples
        assert budget.psf_samples((dx, dy), t, r, capped=True) == k
        assert budget.psf_samples((dx, dy), t, r) >= k


def test_nifti_header_size_is_checked_before_reading(tmp_path, monkeypatch, make_stack):
    from slice2vol import io

    huge = tmp_path / "huge.nii"
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((4096, 4096, 4096))  # 69 billion voxels promised, 8 stored
    hdr.set_data_offset(352)
    hdr.set_sform(np.eye(4), code=1)
    huge.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 16)
    with pytest.raises(Slice2VolError, match=r"header says 4096x4096x4096 = \d+ voxels .*limit of \d+ voxels"):
        io.load_stack(huge)
    # a small compressed file promising many voxels (a 'gzip bomb'), with the limit lowered to fit the test
    bomb = make_stack("bomb.nii.gz", data=np.zeros((60, 60, 60), np.uint8))
    assert bomb.stat().st_size < 2000
    monkeypatch.setenv("SLICE2VOL_MAX_VOXELS", "100000")
    with pytest.raises(Slice2VolError, match=r"60x60x60 = 216000 voxels .*SLICE2VOL_MAX_VOXELS"):
        io.load_stack(bomb)
    monkeypatch.delenv("SLICE2VOL_MAX_VOXELS")
    monkeypatch.setattr(budget, "available_memory", lambda device=None: 10**6)
    with pytest.raises(Slice2VolError, match=r"would need 3.0 MB to read; about 1.0 MB of memory is available"):
        io.load_stack(bomb)


def test_allocator_errors_are_one_line(monkeypatch, capsys):
    def fail(exc):
        def dispatch(args):
            raise exc
        return dispatch

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                       "you tried to allocate 3298534883328 bytes.")
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB.")
    for exc, pattern in ((cpu, r"out of memory: data. DefaultCPUAllocator: not enough memory"),
                         (gpu, r"out of memory: CUDA out of memory")):
        monkeypatch.setattr(cli, "_dispatch", fail(exc))
        _refused(["demo", "-o", "x"], capsys, pattern, code=1)
    monkeypatch.setattr(cli, "_dispatch", fail(RuntimeError("an ordinary bug")))
    with pytest.raises(RuntimeError, match="an ordinary bug"):
        main(["demo", "-o", "x"])


# ------------------------------------------------------------------ 3. no non-finite output


def test_a_non_finite_volume_is_never_written(tmp_path):
    from slice2vol.cli.commands import _write_results

    roi = torch.ones(4, 4, 4, dtype=torch.bool)
    data = torch.ones(4, 4, 4)
    data[1, 2, 3] = float("nan")
    prep = SimpleNamespace(roi=roi, affine=np.eye(4))
    result = SimpleNamespace(volume=Volume(data, np.eye(4)))
    args = argparse.Namespace(output=str(tmp_path / "out.nii.gz"), output_transforms=None, output_simulated=None)
    with pytest.raises(Slice2VolError, match=r"non-finite values \(1 of 64 voxels .*nothing was written"):
        _write_results(args, prep, result, [], {})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 4. the README's commands


def _readme_commands() -> dict[str, str]:
    """``{command: usage}`` for every README line starting with ``    slice2vol `` (with its
    continuation lines after a trailing backslash; comments after ``#`` dropped)."""
    out: dict[str, str] = {}
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("    slice2vol "):
            usage = line
            while usage.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                usage = usage.rstrip()[:-1] + " " + lines[i]
            out.setdefault(line.split()[1], usage.split("#")[0])
    return out


def test_every_command_in_the_readme_has_a_help_listing_its_options(capsys, monkeypatch):
    commands = _readme_commands()
    assert {"reconstruct", "train-csvr"} <= set(commands)
    monkeypatch.setenv("COLUMNS", "200")
    for name, usage in commands.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0, name
        text = capsys.readouterr().out
        for option in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage):
            assert option in text, f"README shows {name} {option}, which {name} --help does not list"
