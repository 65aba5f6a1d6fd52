"""NIfTI loading and writing: real SVRTK stacks, every refused input, atomic outputs, poses JSON."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from slice2vol import io
from slice2vol.errors import Slice2VolError

SVRTK_STACKS = [f"simulated-stack-d{i}.nii.gz" for i in range(6)]


def stack_as_file_array(stack) -> np.ndarray:
    """A loaded stack's data back in the file's ``(i, j, k)`` layout (undoing the i-flip)."""
    arr = np.moveaxis(stack.slices.numpy(), 0, 2)
    return arr[::-1] if stack.meta["flipped_i"] else arr


def mask_as_file_array(stack) -> np.ndarray:
    arr = np.moveaxis(stack.mask.numpy(), 0, 2)
    return arr[::-1] if stack.meta["flipped_i"] else arr


# --- the SVRTK phantom: real, oblique, int16 with scl_slope 0.1 -------------------------------

@pytest.fixture(scope="module")
def svrtk(shared_data) -> Path:
    folder = shared_data / "svrtk_phantom" / "stacks"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


def test_svrtk_stacks_all_load_exactly(svrtk):
    paths = [svrtk / name for name in SVRTK_STACKS]
    stacks = io.load_stacks(paths, thicknesses=[2.5])
    assert len(stacks) == 6
    for path, stack in zip(paths, stacks):
        img = nib.load(path)
        assert stack.thickness == 2.5 and stack.name == path.name
        assert stack.spacing == pytest.approx((1.25, 1.25), abs=1e-5)
        data = img.get_fdata().astype(np.float32)
        np.testing.assert_array_equal(stack_as_file_array(stack), data)
        np.testing.assert_array_equal(mask_as_file_array(stack), data > 0)
        assert np.linalg.det(stack.affine[:3, :3]) > 0
        np.testing.assert_array_equal(stack.index, np.arange(img.shape[2]))


def test_svrtk_mask_for_stack_2(svrtk):
    mask_path = svrtk / "mask-for-stack-2.nii.gz"
    stack = io.load_stack(svrtk / "simulated-stack-d2.nii.gz", 2.5, mask=mask_path)
    data = nib.load(svrtk / "simulated-stack-d2.nii.gz").get_fdata()
    expected = (nib.load(mask_path).get_fdata() > 0) & (data > 0)
    np.testing.assert_array_equal(mask_as_file_array(stack), expected)
    assert 0 < expected.sum() < (data > 0).sum()


def test_svrtk_mask_refused_for_another_stack(svrtk):
    with pytest.raises(Slice2VolError, match="does not match"):
        io.load_stacks([svrtk / "simulated-stack-d0.nii.gz"], [2.5], [svrtk / "mask-for-stack-2.nii.gz"])


# --- refused inputs ---------------------------------------------------------------------------

def test_bad_stack_is_refused_with_one_clear_line(bad_stack):
    path, message = bad_stack
    with pytest.raises(Slice2VolError, match=message) as info:
        io.load_stack(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_bad_stack_mask_is_refused(bad_stack_mask):
    stack, mask, message = bad_stack_mask
    with pytest.raises(Slice2VolError, match=message):
        io.load_stack(stack, mask=mask)


def test_mask_stored_as_qform_only_still_fits(make_stack):
    stack = make_stack("s.nii.gz")
    affine = nib.load(stack).affine
    mask = make_stack("m.nii.gz", data=np.ones((12, 10, 5), np.uint8), affine=affine, sform_code=0)
    assert not np.array_equal(nib.load(mask).affine, affine)  # quaternion rounding
    io.load_stack(stack, mask=mask)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan"), float("inf"), "thick"])
def test_bad_thickness_is_refused(make_stack, bad):
    with pytest.raises(Slice2VolError, match="thickness"):
        io.load_stack(make_stack(), thickness=bad)


def test_non_nifti_image_format_is_refused(tmp_path):
    path = tmp_path / "analyze.img"
    nib.save(nib.AnalyzeImage(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    with pytest.raises(Slice2VolError, match="not a NIfTI image"):
        io.load_stack(path)


def test_tiny_slices_are_refused(make_stack):
    with pytest.raises(Slice2VolError, match="too small"):
        io.load_stack(make_stack(data=np.ones((1, 10, 5), np.float32)))


# --- which pixels a stack uses ----------------------------------------------------------------

def test_nan_and_inf_pixels_are_excluded_with_a_warning(make_stack, blob, caplog):
    data = blob((12, 10, 5))
    inside = np.argwhere(data > 0)[:3]
    for (i, j, k), bad in zip(inside, (np.nan, np.inf, -np.inf)):
        data[i, j, k] = bad
    with caplog.at_level(logging.WARNING, logger="slice2vol"):
        stack = io.load_stack(make_stack(data=data))
    assert "3 NaN/Inf voxels" in caplog.text
    values, used = stack_as_file_array(stack), mask_as_file_array(stack)
    assert np.all(np.isfinite(values))
    for i, j, k in inside:
        assert not used[i, j, k] and values[i, j, k] == 0
    np.testing.assert_array_equal(used, np.isfinite(data) & (data > 0))


def test_non_positive_pixels_are_background(make_stack, blob):
    data = blob((12, 10, 5)) - 10.0
    stack = io.load_stack(make_stack(data=data))
    np.testing.assert_array_equal(mask_as_file_array(stack), data > 0)


def test_stack_mask_follows_the_i_flip_of_left_handed_stacks(make_stack, make_affine):
    shape = (12, 10, 5)
    A = make_affine(np.diag([-1.0, 1.0, 1.0]), (1.0, 1.2, 3.0))  # LAS, as many scanners write
    data = np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)
    mask = np.zeros(shape, np.uint8)
    mask[:4, 2:7, 1:4] = 1  # asymmetric along i, so a missed flip shows
    stack = io.load_stack(make_stack(data=data, affine=A), mask=make_stack("m.nii.gz", data=mask, affine=A))
    assert stack.meta["flipped_i"]
    # unique values: the pixels used are exactly the file's masked voxels
    used_values = np.sort(stack.slices.numpy()[stack.mask.numpy()])
    np.testing.assert_array_equal(used_values, np.sort(data[mask > 0]))


# --- several stacks ---------------------------------------------------------------------------

def test_load_stacks_thickness_counts(make_stack):
    paths = [make_stack(f"s{i}.nii.gz") for i in range(3)]
    assert [s.thickness for s in io.load_stacks(paths)] == pytest.approx([3.0] * 3)
    assert [s.thickness for s in io.load_stacks(paths, [2.0])] == [2.0] * 3
    assert [s.thickness for s in io.load_stacks(paths, [2.0, 2.5, 4.0])] == [2.0, 2.5, 4.0]
    with pytest.raises(Slice2VolError, match="^2 thickness values for 3 stacks"):
        io.load_stacks(paths, [2.0, 2.5])
    with pytest.raises(Slice2VolError, match="^4 thickness values for 3 stacks"):
        io.load_stacks(paths, [2.0] * 4)


def test_load_stacks_mask_counts(make_stack):
    paths = [make_stack(f"s{i}.nii.gz") for i in range(2)]
    mask = make_stack("m.nii.gz", data=np.ones((12, 10, 5), np.uint8))
    stacks = io.load_stacks(paths, masks=[mask, None])
    assert stacks[0].mask.sum() <= stacks[1].mask.sum()
    with pytest.raises(Slice2VolError, match="^1 stack mask for 2 stacks"):
        io.load_stacks(paths, masks=[mask])
    with pytest.raises(Slice2VolError, match="^3 stack masks for 2 stacks"):
        io.load_stacks(paths, masks=[mask] * 3)


def test_load_stacks_needs_a_stack():
    with pytest.raises(Slice2VolError, match="no input stacks"):
        io.load_stacks([])


def test_load_stacks_accepts_a_lone_path(make_stack):
    assert len(io.load_stacks(str(make_stack()))) == 1


# --- volumes and masks ------------------------------------------------------------------------

def test_load_volume_with_mask(make_stack, blob):
    vol = io.load_volume(make_stack("v.nii.gz"), mask=make_stack("m.nii.gz", data=(blob((12, 10, 5)) > 0).astype(np.uint8)))
    assert vol.shape == (12, 10, 5) and vol.mask.dtype == torch.bool
    torch.testing.assert_close(vol.mask, vol.data > 0)


def test_load_volume_refuses_all_zero(make_stack):
    with pytest.raises(Slice2VolError, match="all voxels are zero"):
        io.load_volume(make_stack(data=np.zeros((4, 4, 4), np.float32)))


# --- writing ----------------------------------------------------------------------------------

def test_save_volume_round_trip(tmp_path, make_affine, blob):
    A = make_affine(np.diag([-1.0, 1.0, 1.0]), (0.8, 0.8, 0.8), (10, -20, 30))
    data = blob((6, 7, 8))
    out = io.save_volume(data, tmp_path / "sub" / "v.nii.gz", A)
    img = nib.load(out)
    np.testing.assert_array_equal(img.get_fdata(), data)
    np.testing.assert_allclose(img.affine, A, atol=1e-6)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), A, atol=1e-5)


def test_save_stack_round_trip(tmp_path, make_stack, make_affine):
    src = make_stack(affine=make_affine(np.diag([-1.0, 1.0, 1.0]), (1.0, 1.0, 3.0)))
    stack = io.load_stack(src)
    again = io.load_stack(io.save_stack(stack, tmp_path / "again.nii.gz"))
    torch.testing.assert_close(again.slices, stack.slices)
    np.testing.assert_allclose(again.poses, stack.poses, atol=1e-5)


def test_outputs_get_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        out = io.write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"previous result")

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half written")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError):
        io.atomic_write(out, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    assert out.read_bytes() == b"previous result"


def test_os_error_while_writing_becomes_one_line(tmp_path):
    def full_disk(tmp: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(Slice2VolError, match="cannot write output .*No space left"):
        io.atomic_write(tmp_path / "x.json", full_disk)
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_an_input(tmp_path, make_stack):
    src = make_stack("input.nii.gz")
    before = src.read_bytes()
    link = tmp_path / "link.nii.gz"
    link.symlink_to(src)
    for spelling in (src, tmp_path / "sub" / ".." / "input.nii.gz", link, os.path.relpath(src)):
        with pytest.raises(Slice2VolError, match="would overwrite the input"):
            io.save_volume(np.zeros((2, 2, 2)), spelling, np.eye(4), protect=[src])
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.nii.gz", "link.nii.gz"]


def test_output_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(Slice2VolError, match="is a directory"):
        io.write_json({}, tmp_path)


def test_save_volume_needs_a_nifti_name(tmp_path):
    with pytest.raises(Slice2VolError, match=r"\.nii"):
        io.save_volume(np.zeros((2, 2, 2)), tmp_path / "out.png", np.eye(4))
    assert list(tmp_path.iterdir()) == []


# --- poses JSON -------------------------------------------------------------------------------

def test_poses_json_round_trip(tmp_path, make_stack):
    stacks = [io.load_stack(make_stack(f"s{i}.nii.gz")) for i in range(2)]
    stacks[1].order = np.array([4, 2, 0, 3, 1])
    stacks[1] = stacks[1].select(np.array([True, False, True, True, False]))
    rng = np.random.default_rng(3)
    poses = [st.poses + rng.normal(size=st.poses.shape) * [[1], [1], [1], [0]] for st in stacks]
    io.write_json(io.poses_to_json(stacks, poses, extra={"method": "svr"}), tmp_path / "poses.json")
    back = io.load_poses_json(tmp_path / "poses.json")
    assert [b["name"] for b in back] == ["s0.nii.gz", "s1.nii.gz"]
    for st, P, b in zip(stacks, poses, back):
        np.testing.assert_array_equal(b["poses"], P)  # JSON floats round-trip exactly
        np.testing.assert_array_equal(b["index"], st.index)
    assert back[0]["order"] is None
    np.testing.assert_array_equal(back[1]["order"], [4, 0, 3])
    np.testing.assert_array_equal(back[1]["index"], [0, 2, 3])


@pytest.mark.parametrize(
    "text",
    ["not json", "[]", '{"stacks": [{"slices": [{"index": 0, "pose": [[1, 0, 0], [0, 1, 0]]}]}]}',
     '{"stacks": [{"slices": [{"index": 0}]}]}', '{"stacks": [3]}'],
)
def test_malformed_poses_json_is_refused(tmp_path, text):
    path = tmp_path / "poses.json"
    path.write_text(text)
    with pytest.raises(Slice2VolError, match="poses file"):
        io.load_poses_json(path)


def test_missing_poses_json_is_refused(tmp_path):
    with pytest.raises(Slice2VolError, match="poses file"):
        io.load_poses_json(tmp_path / "nope.json")
