"""Rigid transforms: round trips, algebra, Kabsch, gradients and the module's doctests."""
from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slice2vol.core import transforms as tf

D = torch.float64
unit_vectors = st.lists(st.floats(-1, 1), min_size=3, max_size=3).filter(lambda v: np.linalg.norm(v) > 0.1)
translations = st.lists(st.floats(-100, 100), min_size=3, max_size=3)
angles = st.floats(0, math.pi - 1e-3, exclude_max=True)


def rotvec(axis, angle) -> torch.Tensor:
    a = torch.tensor(axis, dtype=D)
    return a / a.norm() * angle


def random_params(n: int, seed: int, max_angle: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=D), dim=-1)
    angle = torch.rand(n, 1, generator=g, dtype=D) * max_angle
    return torch.cat([axis * angle, 50 * torch.randn(n, 3, generator=g, dtype=D)], -1)


def assert_rotation(R: torch.Tensor) -> None:
    eye = torch.eye(3, dtype=R.dtype).expand(R.shape)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=1e-12, rtol=0)


@settings(max_examples=200, deadline=None)
@given(axis=unit_vectors, angle=angles)
def test_axis_angle_round_trip(axis, angle):
    r = rotvec(axis, angle)
    R = tf.axis_angle_to_matrix(r)
    assert_rotation(R)
    torch.testing.assert_close(tf.matrix_to_axis_angle(R), r, atol=1e-9, rtol=0)
    torch.testing.assert_close(tf.rotation_angle(R), torch.tensor(angle, dtype=D), atol=1e-7, rtol=0)


@settings(max_examples=100, deadline=None)
@given(axis=unit_vectors, angle=st.floats(math.pi - 1e-3, math.pi))
def test_matrix_round_trip_near_pi(axis, angle):
    """Near pi the axis-angle is ambiguous in sign, but it must give back the same rotation."""
    R = tf.axis_angle_to_matrix(rotvec(axis, angle))
    r = tf.matrix_to_axis_angle(R)
    assert float(r.norm()) == pytest.approx(angle, abs=1e-6)
    # acos loses half the digits near pi (error ~sqrt(eps)); a sign flip of the axis would be O(1).
    torch.testing.assert_close(tf.axis_angle_to_matrix(r), R, atol=1e-7, rtol=0)


@settings(max_examples=100, deadline=None)
@given(axis=unit_vectors, angle=angles, t=translations)
def test_params_matrix_round_trip(axis, angle, t):
    p = torch.cat([rotvec(axis, angle), torch.tensor(t, dtype=D)])
    T = tf.params_to_matrix(p)
    assert_rotation(T[:3, :3])
    torch.testing.assert_close(T[3], torch.tensor([0, 0, 0, 1], dtype=D))
    torch.testing.assert_close(T[:3, 3], p[3:])
    torch.testing.assert_close(tf.matrix_to_params(T), p, atol=1e-9, rtol=0)


def test_batched_shapes_and_float32():
    p = random_params(24, 0).reshape(2, 3, 4, 6).float()
    T = tf.params_to_matrix(p)
    assert T.shape == (2, 3, 4, 4, 4) and T.dtype == torch.float32
    torch.testing.assert_close(tf.matrix_to_params(T), p, atol=2e-4, rtol=0)


def test_invert():
    T = tf.params_to_matrix(random_params(16, 1))
    eye = torch.eye(4, dtype=D).expand(T.shape)
    torch.testing.assert_close(tf.compose(T, tf.invert(T)), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(tf.compose(tf.invert(T), T), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(tf.invert(T), torch.linalg.inv(T), atol=1e-12, rtol=0)


def test_compose_is_associative_and_applies_right_first():
    A, B, C = (tf.params_to_matrix(random_params(8, s)) for s in (2, 3, 4))
    torch.testing.assert_close(tf.compose(tf.compose(A, B), C), tf.compose(A, tf.compose(B, C)), atol=1e-10, rtol=0)
    x = torch.randn(8, 3, dtype=D)
    torch.testing.assert_close(tf.apply(tf.compose(A, B), x), tf.apply(A, tf.apply(B, x)), atol=1e-10, rtol=0)


def test_apply_broadcasts_points_over_transforms():
    T = tf.params_to_matrix(random_params(5, 5))
    x = torch.randn(7, 1, 3, dtype=D)
    y = tf.apply(T, x)
    assert y.shape == (7, 5, 3)
    torch.testing.assert_close(y[3, 2], T[2, :3, :3] @ x[3, 0] + T[2, :3, 3])


@settings(max_examples=50, deadline=None)
@given(axis=unit_vectors, angle=angles, t=translations, centre=translations)
def test_rotation_about_keeps_centre_fixed(axis, angle, t, centre):
    c = torch.tensor(centre, dtype=D)
    r = rotvec(axis, angle)
    still = tf.rotation_about(torch.cat([r, torch.zeros(3, dtype=D)]), c)
    torch.testing.assert_close(tf.apply(still, c), c, atol=1e-9, rtol=0)
    moved = tf.rotation_about(torch.cat([r, torch.tensor(t, dtype=D)]), c)
    torch.testing.assert_close(tf.apply(moved, c), c + torch.tensor(t, dtype=D), atol=1e-9, rtol=0)
    torch.testing.assert_close(moved[:3, :3], tf.axis_angle_to_matrix(r))


def test_kabsch_recovers_known_transform():
    T = tf.params_to_matrix(random_params(6, 6))
    src = 30 * torch.randn(6, 20, 3, dtype=D)
    dst = tf.apply(T[:, None], src)
    torch.testing.assert_close(tf.kabsch(src, dst), T, atol=1e-9, rtol=0)


def test_kabsch_weights_ignore_outliers():
    T = tf.params_to_matrix(random_params(1, 7))[0]
    src = 30 * torch.randn(30, 3, dtype=D)
    dst = tf.apply(T, src)
    dst[:5] += 40 * torch.randn(5, 3, dtype=D)  # gross outliers...
    w = torch.ones(30, dtype=D)
    w[:5] = 0  # ...given no weight
    torch.testing.assert_close(tf.kabsch(src, dst, w), T, atol=1e-9, rtol=0)
    assert not torch.allclose(tf.kabsch(src, dst), T, atol=1e-3)


def test_kabsch_returns_a_proper_rotation_for_mirrored_points():
    src = torch.randn(20, 3, dtype=D)
    dst = src * torch.tensor([1.0, 1.0, -1.0], dtype=D)
    assert_rotation(tf.kabsch(src, dst)[:3, :3])


@pytest.mark.parametrize("scale", [0.0, 1e-7, 1e-5, 1e-4, 1e-3, 1.0])
def test_params_to_matrix_gradients_finite_and_correct_near_zero(scale):
    p = (scale * random_params(3, 8)).requires_grad_(True)
    assert torch.autograd.gradcheck(tf.params_to_matrix, (p,), eps=1e-7, atol=1e-6)
    tf.params_to_matrix(p).sum().backward()
    assert torch.isfinite(p.grad).all()


def test_matrix_to_params_gradient_finite_at_identity():
    T = torch.eye(4, dtype=D).requires_grad_(True)
    tf.matrix_to_params(T).sum().backward()
    assert torch.isfinite(T.grad).all()


def test_doctests():
    result = doctest.testmod(tf, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0
