"""Geometry conventions end to end: a voxel loaded by slice2vol sits where nibabel puts it."""
from __future__ import annotations

import logging
from itertools import product

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from slice2vol import io
from slice2vol.core.geometry import (
    COUNT_TOL,
    axis_aligned_grid,
    check_affine,
    grid_affine,
    make_right_handed,
    nearest_rotation,
    slice_pixel_coords,
    stack_slice_poses,
    world_to_grid,
)
from slice2vol.errors import Slice2VolError

SHAPE = (5, 4, 3)

# Orientation = a signed permutation of the voxel axes (axial/coronal/sagittal, LAS or RAS...)
# times an arbitrary rotation (oblique); signs make about half of them left-handed.
orientations = st.builds(
    lambda perm, signs, quat, tilt: (
        Rotation.from_quat(quat).as_matrix() if tilt else np.eye(3)
    ) @ (np.eye(3)[list(perm)] * np.where(signs, -1.0, 1.0)),
    st.permutations([0, 1, 2]),
    st.lists(st.booleans(), min_size=3, max_size=3),
    st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1),
    st.booleans(),
)
spacings = st.lists(st.floats(0.3, 5.0), min_size=3, max_size=3)
origins = st.lists(st.floats(-200, 200), min_size=3, max_size=3)


def unique_data(shape=SHAPE) -> np.ndarray:
    """Voxel values 1..n so a voxel can be found again after any reordering of the array."""
    return np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)


def world_of_every_pixel(stack) -> np.ndarray:
    """``(N, H, W, 3)`` world position of every slice pixel through its pose and slice frame."""
    N, H, W = stack.slices.shape
    uvw = slice_pixel_coords(H, W, stack.spacing, dtype=torch.float64).numpy()
    return np.einsum("nab,hwb->nhwa", stack.poses[:, :3, :3], uvw) + stack.poses[:, None, None, :3, 3]


def assert_voxels_where_nibabel_puts_them(stack, path) -> None:
    img = nib.load(path)
    values = stack.slices.numpy().astype(np.int64)
    ijk = np.stack(np.unravel_index(values - 1, img.shape), -1)  # file voxel of every pixel
    expected = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    np.testing.assert_allclose(world_of_every_pixel(stack), expected, atol=1e-4)
    # slice n of the stack is slice k = index[n] of the file
    assert np.all(ijk[..., 2] == stack.index[:, None, None])


@settings(max_examples=40, deadline=None)
@given(rot=orientations, spacing=spacings, origin=origins)
def test_voxel_world_position_matches_nibabel(make_affine, tmp_path_factory, nifti_writer, rot, spacing, origin):
    path = tmp_path_factory.mktemp("geo") / "stack.nii.gz"
    nifti_writer(path, unique_data(), make_affine(rot, spacing, origin))
    stack = io.load_stack(path)
    assert_voxels_where_nibabel_puts_them(stack, path)
    assert stack.meta["flipped_i"] == (np.linalg.det(rot) < 0)


@settings(max_examples=25, deadline=None)
@given(rot=orientations, spacing=spacings)
def test_poses_are_proper_rigid_and_slice_aligned(make_affine, tmp_path_factory, nifti_writer, rot, spacing):
    path = tmp_path_factory.mktemp("geo") / "stack.nii.gz"
    nifti_writer(path, unique_data(), make_affine(rot, spacing))
    stack = io.load_stack(path)
    R = stack.poses[:, :3, :3]
    np.testing.assert_allclose(R.transpose(0, 2, 1) @ R, np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(stack.poses[:, 3], np.broadcast_to([0, 0, 0, 1], (len(R), 4)))
    assert stack.spacing == pytest.approx(spacing[:2], rel=1e-6)
    assert stack.thickness == pytest.approx(spacing[2], rel=1e-6)  # default: the slice spacing


def test_sform_preferred_over_qform(make_affine, tmp_path, nifti_writer):
    s_aff = make_affine(Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix(), (1, 1.2, 3), (5, 6, 7))
    q_aff = make_affine(np.eye(3), (2, 2, 2), (-50, 0, 0))
    path = nifti_writer(tmp_path / "s.nii.gz", unique_data(), s_aff, sform_code=2, qform=q_aff, qform_code=1)
    stack = io.load_stack(path)
    np.testing.assert_allclose(stack.affine, s_aff, atol=1e-5)
    assert_voxels_where_nibabel_puts_them(stack, path)


def test_qform_used_when_sform_unset(make_affine, tmp_path, nifti_writer):
    s_aff = make_affine(np.eye(3), (2, 2, 2), (-50, 0, 0))
    q_aff = make_affine(Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix(), (1, 1.2, 3), (5, 6, 7))
    path = nifti_writer(tmp_path / "q.nii.gz", unique_data(), s_aff, sform_code=0, qform=q_aff, qform_code=1)
    stack = io.load_stack(path)
    np.testing.assert_allclose(stack.affine, q_aff, atol=1e-5)
    assert_voxels_where_nibabel_puts_them(stack, path)


def test_no_orientation_in_header_follows_nibabel_with_warning(make_affine, tmp_path, nifti_writer, caplog):
    aff = make_affine(np.eye(3), (1, 2, 3))
    path = nifti_writer(tmp_path / "none.nii.gz", unique_data(), aff, sform_code=0, qform_code=0)
    with caplog.at_level(logging.WARNING, logger="slice2vol"):
        stack = io.load_stack(path)
    assert "no sform or qform" in caplog.text
    assert_voxels_where_nibabel_puts_them(stack, path)


@pytest.mark.parametrize(
    "dtype, slope, inter",
    [(np.int16, 0.1, 0.0), (np.int16, 0.1, 3.7), (np.uint8, 2.5, -1.0), (np.int32, 0.001, 0.0), (np.float64, None, 0.0)],
)
def test_integer_types_and_scaling_are_exact(make_affine, tmp_path, nifti_writer, dtype, slope, inter):
    rng = np.random.default_rng(0)
    hi = min(np.iinfo(dtype).max, 30000) if np.issubdtype(dtype, np.integer) else 1e4
    raw = rng.integers(1, hi, size=(6, 5, 4)).astype(dtype)
    path = nifti_writer(tmp_path / "int.nii.gz", raw, make_affine(np.eye(3), (1, 1, 2)), slope=slope, inter=inter)
    stack = io.load_stack(path)
    expected = nib.load(path).get_fdata().astype(np.float32)
    np.testing.assert_array_equal(stack.slices.numpy(), np.moveaxis(expected, 2, 0))
    np.testing.assert_allclose(np.moveaxis(stack.slices.numpy(), 0, 2), raw * (slope or 1.0) + inter, rtol=1e-6)


def test_singleton_fourth_dimension_is_dropped(make_affine, tmp_path, nifti_writer):
    data = unique_data()
    path = nifti_writer(tmp_path / "4d.nii.gz", data[..., None], make_affine(np.eye(3), (1, 1, 2)))
    stack = io.load_stack(path)
    np.testing.assert_array_equal(stack.slices.numpy(), np.moveaxis(data, 2, 0))


def test_single_2d_slice_is_a_stack_of_one(make_affine, tmp_path, nifti_writer):
    data = unique_data()[..., 0]
    path = nifti_writer(tmp_path / "2d.nii.gz", data, make_affine(np.eye(3), (1, 1, 2)))
    stack = io.load_stack(path, thickness=3.0)
    assert stack.slices.shape == (1,) + data.shape
    np.testing.assert_array_equal(stack.slices[0].numpy(), data)


@settings(max_examples=30, deadline=None)
@given(rot=orientations, spacing=spacings, origin=origins)
def test_world_to_grid_maps_corner_voxel_centres_to_plus_minus_one(make_affine, rot, spacing, origin):
    shape = (4, 6, 3)
    A = make_affine(rot, spacing, origin)
    for corner in product(*[(0, n - 1) for n in shape]):
        world = torch.tensor(A[:3, :3] @ corner + A[:3, 3], dtype=torch.float64)
        g = world_to_grid(world, torch.from_numpy(A), shape).numpy()
        expected = [2 * corner[axis] / (shape[axis] - 1) - 1 for axis in (2, 1, 0)]  # (k, j, i)
        np.testing.assert_allclose(g, expected, atol=1e-9)


def test_a_box_a_rounding_error_over_a_whole_count_gets_the_same_grid():
    """The same stack read from NIfTI (float32) or DICOM (decimal) spans 31.0 or 31.0000001 voxels."""
    lo = np.array([-10.0, 4.0, 0.5])
    for eps in (-1e-7, 0.0, 1e-7):
        A, shape = axis_aligned_grid(lo, lo + np.array([31.0, 39.5, 26.0]) * 0.8 + eps, 0.8)
        assert shape == (32, 41, 27)
    assert axis_aligned_grid(lo, lo + 31.01 * 0.8, 0.8)[1] == (33, 33, 33)  # a real excess still counts


def test_grid_affine_samples_voxel_values_with_grid_sample(make_affine):
    shape = (4, 5, 3)
    A = make_affine(Rotation.from_euler("zyx", [30, 10, -60], degrees=True).as_matrix(), (1.0, 2.0, 0.5), (3, 4, 5))
    vol = torch.from_numpy(unique_data(shape)).double()
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = torch.from_numpy(ijk @ A[:3, :3].T + A[:3, 3])
    g = world_to_grid(world, torch.from_numpy(A), shape)
    sampled = torch.nn.functional.grid_sample(vol[None, None], g[None, None, None], align_corners=True)
    np.testing.assert_allclose(sampled.reshape(-1).numpy(), vol[tuple(ijk.T)].numpy(), atol=1e-9)
    assert grid_affine(torch.from_numpy(A), shape).dtype == torch.float64


@settings(max_examples=50, deadline=None)
@given(
    lo=st.lists(st.floats(-100, 100), min_size=3, max_size=3),
    size=st.lists(st.floats(0, 50), min_size=3, max_size=3),
    res=st.floats(0.3, 3.0),
)
def test_axis_aligned_grid_covers_the_box(lo, size, res):
    lo, hi = np.array(lo), np.array(lo) + np.array(size)
    A, shape = axis_aligned_grid(lo, hi, res)
    np.testing.assert_allclose(A[:3, :3], res * np.eye(3))
    first, last = A[:3, 3], A[:3, :3] @ (np.array(shape) - 1) + A[:3, 3]
    slack = COUNT_TOL * res / 2 + 1e-9  # a box a hair (COUNT_TOL voxel) over a whole count gets no extra voxel
    assert np.all(first <= lo + slack) and np.all(last >= hi - slack)
    assert np.all((np.array(shape) - 1) * res < hi - lo + res + 1e-9)  # no more than one spare voxel
    np.testing.assert_allclose((first + last) / 2, (lo + hi) / 2, atol=1e-9)


@pytest.mark.parametrize("res", [0.0, -1.0, float("nan")])
def test_axis_aligned_grid_rejects_bad_resolution(res):
    with pytest.raises(Slice2VolError, match="resolution"):
        axis_aligned_grid(np.zeros(3), np.ones(3), res)


@settings(max_examples=30, deadline=None)
@given(rot=orientations, spacing=spacings, shear=st.floats(0.01, 0.5), col=st.integers(0, 2))
def test_check_affine_rejects_shear(make_affine, rot, spacing, shear, col):
    A = make_affine(rot, spacing)
    other = (col + 1) % 3
    A[:3, col] += shear * A[:3, other] / spacing[other] * spacing[col]
    with pytest.raises(Slice2VolError, match="shear"):
        check_affine(A)


@settings(max_examples=30, deadline=None)
@given(rot=orientations, spacing=spacings, origin=origins)
def test_check_affine_accepts_float32_rounded_rigid_affines(make_affine, rot, spacing, origin):
    A = make_affine(rot, spacing, origin).astype(np.float32)
    np.testing.assert_allclose(check_affine(A), spacing, rtol=1e-5)


@pytest.mark.parametrize("bad", ["singular", "nan", "shape"])
def test_check_affine_rejects_degenerate(bad):
    A = np.eye(4)
    if bad == "singular":
        A[:3, 2] = 0
    elif bad == "nan":
        A[0, 3] = np.nan
    else:
        A = A[:3]
    with pytest.raises(Slice2VolError):
        check_affine(A)


def test_shear_in_file_is_refused(make_affine, tmp_path, nifti_writer):
    A = make_affine(np.eye(3), (1, 1, 3))
    A[0, 1] = 0.2
    path = nifti_writer(tmp_path / "shear.nii.gz", unique_data(), A, qform_code=0)
    with pytest.raises(Slice2VolError, match="shear"):
        io.load_stack(path)


@settings(max_examples=30, deadline=None)
@given(rot=orientations, spacing=spacings, origin=origins)
def test_make_right_handed_keeps_every_voxel_in_place(make_affine, rot, spacing, origin):
    A = make_affine(rot, spacing, origin)
    data = unique_data()
    flipped, B, did = make_right_handed(data, A)
    assert np.linalg.det(B[:3, :3]) > 0 and did == (np.linalg.det(A) < 0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    src = np.stack(np.unravel_index(flipped[tuple(ijk.T)].astype(int) - 1, SHAPE), -1)
    np.testing.assert_allclose(ijk @ B[:3, :3].T + B[:3, 3], src @ A[:3, :3].T + A[:3, 3], atol=1e-9)


def test_stack_slice_poses_orthonormalises_nearly_rigid_affine(make_affine):
    A = make_affine(Rotation.from_euler("xyz", [5, 50, -20], degrees=True).as_matrix(), (1.1, 1.1, 2.5))
    A[:3, :3] = A[:3, :3].astype(np.float32)  # header precision: columns orthogonal to ~1e-7 only
    poses, spacing, dz = stack_slice_poses(A, (8, 6, 4))
    R = poses[:, :3, :3]
    np.testing.assert_allclose(R[0].T @ R[0], np.eye(3), atol=1e-14)
    np.testing.assert_allclose(R[0] * np.array([*spacing, dz]), A[:3, :3], atol=1e-6)


def test_nearest_rotation_refuses_reflection():
    with pytest.raises(ValueError):
        nearest_rotation(np.diag([1.0, 1.0, -1.0]))


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)), radius=st.integers(0, 4),
       seed=st.integers(0, 2**16))
def test_max_filter_is_the_cubic_max_pool(shape, radius, seed):
    """The separable box maximum (mask dilation) equals max_pool3d with the full (2r+1)^3 kernel."""
    from slice2vol.core.resample import max_filter

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    want = x if radius == 0 else torch.nn.functional.max_pool3d(x[None, None], 2 * radius + 1, 1, radius)[0, 0]
    assert torch.equal(max_filter(x, radius), want)
