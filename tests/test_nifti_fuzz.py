"""Property-based fuzzing of the NIfTI loader (issue 12 item 14).

Any header a file may carry -- mutated dimensions, data types, voxel sizes, scale factors,
qform/sform codes and matrices, offsets, magic -- gives either a usable result (finite affine
without shear, finite float32 data of the header's shape) or exactly one
:class:`~slice2vol.errors.Slice2VolError` with a one-line message.  Never another exception, a
traceback, a NaN geometry, or a gigabyte allocation.  The header is mutated as raw bytes, so
values nibabel would never write are covered too.
"""
from __future__ import annotations

import struct

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slice2vol import io
from slice2vol.errors import Slice2VolError

# offset, struct format of each NIfTI-1 header field the loader reads
FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim0": (40, "<h"), "dim1": (42, "<h"), "dim2": (44, "<h"), "dim3": (46, "<h"),
    "dim4": (48, "<h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "qfac": (76, "<f"), "pixdim1": (80, "<f"),
    "pixdim2": (84, "<f"), "pixdim3": (88, "<f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"), "xyzt_units": (123, "<b"), "qform_code": (252, "<h"), "sform_code": (254, "<h"),
    "quatern_b": (256, "<f"), "quatern_c": (260, "<f"), "quatern_d": (264, "<f"), "qoffset_x": (268, "<f"),
    "srow_x0": (280, "<f"), "srow_x1": (284, "<f"), "srow_x3": (292, "<f"), "srow_y1": (300, "<f"),
    "srow_z2": (320, "<f"), "srow_z3": (324, "<f"), "magic": (344, "<i"),
}
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 3.0, 1e-30, 1e30, 3.4e38, float("nan"),
                                    float("inf"), float("-inf")]),
                   st.floats(-1e6, 1e6, width=32))
INTS = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 4, 7, 8, 16, 32, 64, 128, 256, 512, 768, 1792, 2048, 32767, -32768]),
                 st.integers(-32768, 32767))


def _value(fmt: str):
    if fmt == "<f":
        return FLOATS
    if fmt == "<b":
        return st.integers(-128, 127)
    if fmt == "<i":
        return st.one_of(st.sampled_from([0, 348, 540, -1]), st.integers(-2**31, 2**31 - 1))
    return INTS


MUTATION = st.sampled_from(sorted(FIELDS)).flatmap(lambda k: st.tuples(st.just(k), _value(FIELDS[k][1])))


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(0)
    A = np.array([[0.9, -0.1, 0.0, -20.0], [0.1, 0.9, 0.0, -25.0], [0.0, 0.0, 3.0, -30.0], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image((rng.random((12, 10, 6)) * 100 + 1).astype(np.float32), A)
    img.header.set_qform(A, 1)
    img.header.set_sform(A, 1)
    p = tmp_path_factory.mktemp("fuzz") / "good.nii"
    nib.save(img, p)
    return p.read_bytes()


def _check(load, path):
    try:
        out = load(path)
    except Slice2VolError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 500, msg
        return None
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_any_header_gives_a_result_or_one_clear_error(good_bytes, tmp_path_factory, mutations):
    raw = bytearray(good_bytes)
    for name, value in mutations:
        off, fmt = FIELDS[name]
        struct.pack_into(fmt, raw, off, value)
    path = tmp_path_factory.mktemp("case") / "stack.nii"
    path.write_bytes(bytes(raw))

    vol = _check(io.load_volume, path)
    if vol is not None:
        assert np.isfinite(vol.affine).all() and vol.data.dtype.is_floating_point
        assert bool(vol.data.isfinite().all()) and vol.data.ndim == 3
        assert abs(np.linalg.det(vol.affine[:3, :3])) > 0
    stack = _check(lambda p: io.load_stack(p), path)
    if stack is not None:
        assert np.isfinite(stack.poses).all() and np.isfinite(stack.thickness) and stack.thickness > 0
        assert bool(stack.slices.isfinite().all()) and stack.slices.shape[0] == stack.poses.shape[0]
        assert min(stack.spacing) > 0
