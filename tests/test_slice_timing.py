"""Acquisition order from the files (:mod:`slice2vol.io.timing`) and its use by the package search:
DICOM acquisition times, a BIDS sidecar's SliceTiming, the NIfTI header's slice timing; what
leaves the order unknown; packages from a known order; ``--packages`` overriding the files."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset
from test_dicom import philips_enhanced_folder, write_test_series

from slice2vol import io
from slice2vol.core.pose_search import package_groups, packages_from_order
from slice2vol.io import timing
from slice2vol.simulation.simulate import interleaved_order


def _stack_file(tmp_path: Path, n: int = 7, name: str = "stack.nii.gz") -> Path:
    rng = np.random.default_rng(0)
    data = (rng.random((12, 10, n)) * 100 + 1).astype(np.float32)
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    p = tmp_path / name
    nib.save(nib.Nifti1Image(data, aff), p)
    return p


def _ranks(times) -> list[int]:
    return np.argsort(np.argsort(times, kind="stable"), kind="stable").tolist()


# ---------------------------------------------------------------------------------- times


@pytest.mark.filterwarnings("ignore:Invalid value for VR TM")  # pydicom on the old form and on garbage
def test_dicom_time_formats_parse_to_seconds():
    ds = Dataset()
    ds.AcquisitionTime = "101502.250000"
    assert timing.dicom_seconds(ds) == (pytest.approx(10 * 3600 + 15 * 60 + 2.25), "AcquisitionTime")
    ds.AcquisitionDate = "20260102"
    t2, tag = timing.dicom_seconds(ds)
    ds.AcquisitionDate = "20260101"
    t1, _ = timing.dicom_seconds(ds)
    assert tag == "AcquisitionDate/Time" and t2 - t1 == pytest.approx(86400.0)  # midnight does not go back
    ds = Dataset()
    ds.AcquisitionTime = "10:15:02.5"  # the old ACR-NEMA form
    assert timing.dicom_seconds(ds)[0] == pytest.approx(36902.5)
    ds = Dataset()
    ds.AcquisitionDateTime = "20260101101502.25+0100"
    ds.AcquisitionTime = "000000"  # the DateTime wins
    assert timing.dicom_seconds(ds) == (pytest.approx(timing._da_days("20260101") * 86400.0 + 36902.25),
                                       "AcquisitionDateTime")
    ds = Dataset()
    ds.AcquisitionTime = "garbage"
    assert timing.dicom_seconds(ds) == (None, "")


def test_order_is_unknown_for_shared_or_missing_times():
    assert timing.order_from_times([2.0, 0.5, 1.0])[0].tolist() == [2, 0, 1]
    assert timing.order_from_times([1.0, 1.0, 2.0])[0] is None
    assert timing.order_from_times([1.0, float("nan")])[0] is None
    heads = [Dataset() for _ in range(3)]
    for ds, t in zip(heads, ("100000", "100004", "100002")):
        ds.AcquisitionTime = t
    assert timing.dicom_order(heads, "x") == (pytest.approx([0, 2, 1]), "DICOM AcquisitionTime")
    del heads[1].AcquisitionTime
    assert timing.dicom_order(heads, "x") == (None, "")


# ---------------------------------------------------------------------------------- DICOM


def test_dicom_series_acquisition_times_give_the_stack_order(tmp_path):
    """An interleaved series (3 packages) written in shuffled files: the order follows the
    acquisition times, not the file names or InstanceNumber; equal times leave it unknown."""
    n = 8
    rng = np.random.default_rng(1)
    data = (rng.random((10, 9, n)) * 100 + 10).astype(np.float32)
    from scipy.spatial.transform import Rotation

    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_rotvec([0.2, -0.3, 0.1]).as_matrix() @ np.diag([0.9, 0.9, 2.9])  # oblique
    aff[:3, 3] = [-5.0, 3.0, 7.0]
    when = interleaved_order(n, 3)  # time index of slice k

    def timed(k, ds):
        ds.AcquisitionTime = f"1200{int(when[k]) * 2:02d}.500000"

    st = io.load_stack(write_test_series(tmp_path / "s", data, aff, edit=timed))
    assert st.order is not None and st.meta["order_source"] == "DICOM AcquisitionTime"
    assert st.order.tolist() == when.tolist()
    assert packages_from_order(st.index, st.order).tolist() == (np.arange(n) % 3).tolist()

    def stamped(k, ds):  # one time for the whole series, as some exports write it
        ds.AcquisitionTime = "120000"

    st = io.load_stack(write_test_series(tmp_path / "t", data, aff, edit=stamped))
    assert st.order is None and "order_source" not in st.meta


def test_a_3d_enhanced_file_whose_frames_share_one_time_has_no_order(tmp_path):
    """nibabel's Philips Enhanced MR test file: 176 frames with one FrameAcquisitionDateTime."""
    ref = io.dicom.find_series(philips_enhanced_folder(tmp_path))[0]
    assert all(ds.get("FrameAcquisitionDateTime") for _, ds in ref.files)  # read from the frames' groups
    assert io.dicom.read_series(ref).order is None


# ---------------------------------------------------------------------------------- NIfTI


def test_sidecar_slice_timing_gives_the_order(tmp_path):
    p = _stack_file(tmp_path)
    times = [0.0, 1.6, 0.4, 2.0, 0.8, 2.4, 1.2]  # interleaved, 2 packages, in seconds (dcm2niix's form)
    (tmp_path / "stack.json").write_text(json.dumps({"SliceTiming": times, "SliceThickness": 3.0}))
    st = io.load_stack(p)
    assert st.order.tolist() == _ranks(times)
    assert st.meta["order_source"] == "SliceTiming in stack.json"
    (tmp_path / "stack.json").write_text(json.dumps({"SliceTiming": times, "SliceEncodingDirection": "k-"}))
    assert io.load_stack(p).order.tolist() == _ranks(times[::-1])


@pytest.mark.parametrize("sidecar, message", [
    ({"SliceTiming": [0.0, 0.5, 1.0]}, "not one number per slice"),
    ({"SliceTiming": [0, 1, 2, 3, 4, 5, "x"]}, "not one number per slice"),
    ({"SliceTiming": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "SliceEncodingDirection": "j"}, "not the stack's slice axis"),
])
def test_unusable_slice_timing_is_ignored_with_a_warning(tmp_path, caplog, sidecar, message):
    p = _stack_file(tmp_path)
    (tmp_path / "stack.json").write_text(json.dumps(sidecar))
    with caplog.at_level(logging.WARNING, logger="slice2vol"):
        st = io.load_stack(p)
    assert st.order is None and message in caplog.text


def test_multiband_slice_timing_leaves_the_order_unknown(tmp_path, caplog):
    p = _stack_file(tmp_path, n=6)
    (tmp_path / "stack.json").write_text(json.dumps({"SliceTiming": [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]}))
    with caplog.at_level(logging.INFO, logger="slice2vol"):
        assert io.load_stack(p).order is None
    assert "share one time" in caplog.text


def test_nifti_header_slice_timing_gives_the_order(tmp_path):
    n = 7
    img = nib.Nifti1Image(np.ones((6, 5, n), np.float32) * 3, np.diag([1.0, 1.0, 3.0, 1.0]))
    hdr = img.header
    hdr.set_dim_info(slice=2)
    hdr.set_slice_duration(0.5)
    hdr["slice_code"] = 3  # "alternating increasing": 0, 2, 4, 6, then 1, 3, 5
    nib.save(img, tmp_path / "h.nii.gz")
    st = io.load_stack(tmp_path / "h.nii.gz")
    assert st.order.tolist() == _ranks(hdr.get_slice_times())
    assert packages_from_order(st.index, st.order).tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert st.meta["order_source"] == "NIfTI header slice timing"


# ---------------------------------------------------------------------------------- packages


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("descending", [False, True])
def test_packages_from_a_known_order_are_the_acquired_packages(p, descending):
    n = 13
    when = interleaved_order(n, p)
    k = np.arange(n)
    if descending:  # the same packages acquired from the last slice down
        k = k[::-1].copy()
    pkg = packages_from_order(k, when)
    assert pkg.tolist() == (np.arange(n) % p).tolist()
    # halves split each package by time, not by file index
    h = package_groups([k], [2], halves=True, orders=[when]).numpy()
    for j in range(p):
        sel = np.nonzero(pkg == j)[0]
        by_time = sel[np.argsort(when[sel])]
        first = by_time[: (len(by_time) + 1) // 2]
        assert len(set(h[first])) == 1 and not set(h[first]) & set(h[np.setdiff1d(by_time, first)])


def test_package_groups_mix_known_and_assumed_orders():
    g = package_groups([np.arange(4), np.arange(4)], [2, 2], orders=[np.arange(4), None]).numpy()
    assert g.tolist() == [0, 0, 0, 0, 1, 2, 1, 2]  # sequential stack: one package; the other k % 2
    with pytest.raises(ValueError, match="acquisition order"):
        package_groups([np.arange(4)], [2], orders=[np.arange(3)])


def test_the_search_takes_packages_from_file_orders_only(tmp_path):
    """``search_groups``: a stack whose files gave its order is grouped by it, one simulated in
    memory (its order recorded but not read from a file) by ``k % p``; ``packages_from_order=False``
    (the CLI's ``--packages``) ignores the files."""
    from slice2vol.core.preprocess import prepare
    from slice2vol.methods.svr import SVRConfig, search_groups
    from slice2vol.simulation.simulate import SimulationConfig, simulate_stacks
    from test_report import _phantom

    sim = simulate_stacks(_phantom(), None, SimulationConfig(n_stacks=2, motion="none", interleave=3),
                          np.random.default_rng(0), progress=False)
    stacks = list(sim.stacks)
    stacks[0].meta["order_source"] = "SliceTiming in test.json"  # as io.load_stack records it
    prep = prepare(stacks, 2.0)
    sid = prep.slices.stack_id.cpu().numpy()
    g = search_groups(prep, SVRConfig())["package"].numpy()
    k0, k1 = np.asarray(prep.stacks[0].index), np.asarray(prep.stacks[1].index)
    assert len(set(g[sid == 0])) == 3  # the 3 packages acquired
    assert [len(set(g[sid == 0][k0 % 3 == j])) for j in range(3)] == [1, 1, 1]
    assert [len(set(g[sid == 1][k1 % 2 == j])) for j in range(2)] == [1, 1] and len(set(g[sid == 1])) == 2
    g = search_groups(prep, SVRConfig(packages_from_order=False))["package"].numpy()
    assert len(set(g[sid == 0])) == 2
    assert "package" not in search_groups(prep, SVRConfig(packages=None))


def test_cli_packages_override_the_files():
    from slice2vol.cli.commands import _method_options
    from slice2vol.cli.parser import build_parser

    args = build_parser().parse_args(["reconstruct", "a.nii.gz", "b.nii.gz", "-o", "out.nii.gz", "--packages", "3"])
    opts = _method_options(args)
    assert opts["packages"] == (3,) and opts["packages_from_order"] is False
    args = build_parser().parse_args(["reconstruct", "a.nii.gz", "b.nii.gz", "-o", "out.nii.gz"])
    assert "packages_from_order" not in _method_options(args)
