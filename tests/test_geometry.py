"""Tests for mltomo.geometry: Euler convention, quaternions, grids, symmetry."""

import numpy as np
import pytest

from mltomo import geometry as geo


def rz_passive(a):
    c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])


def ry_passive(b):
    c, s = np.cos(np.deg2rad(b)), np.sin(np.deg2rad(b))
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def test_euler_hand_computed():
    np.testing.assert_allclose(
        geo.euler_to_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15
    )
    np.testing.assert_allclose(
        geo.euler_to_matrix(0, 90, 0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15
    )
    np.testing.assert_allclose(
        geo.euler_to_matrix(0, 0, 90), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15
    )


@pytest.mark.parametrize("angles", [(10.0, 20.0, 30.0), (-123.0, 151.0, 77.0), (179.0, 3.0, -45.0)])
def test_euler_is_relion_passive_product(angles):
    rot, tilt, psi = angles
    expected = rz_passive(psi) @ ry_passive(tilt) @ rz_passive(rot)
    np.testing.assert_allclose(geo.euler_to_matrix(rot, tilt, psi), expected, atol=1e-14)
    # and the same product in terms of the active axis rotations
    active = geo.rotation_z(-psi) @ geo.rotation_y(-tilt) @ geo.rotation_z(-rot)
    np.testing.assert_allclose(geo.euler_to_matrix(rot, tilt, psi), active, atol=1e-14)


def test_euler_broadcasts():
    A = geo.euler_to_matrix(np.zeros((4, 1)), np.arange(5.0), 0.0)
    assert A.shape == (4, 5, 3, 3) and A.dtype == np.float64


def test_axis_rotations_active_right_handed():
    t = 30.0
    s, c = np.sin(np.deg2rad(t)), np.cos(np.deg2rad(t))
    np.testing.assert_allclose(geo.rotation_y(t) @ [0, 0, 1], [s, 0, c], atol=1e-15)
    np.testing.assert_allclose(geo.rotation_z(t) @ [1, 0, 0], [c, s, 0], atol=1e-15)
    np.testing.assert_allclose(geo.rotation_x(t) @ [0, 1, 0], [0, c, s], atol=1e-15)


def test_random_rotations_orthonormal_and_uniform():
    R = geo.random_rotations(20000, np.random.default_rng(1))
    assert R.shape == (20000, 3, 3)
    np.testing.assert_allclose(R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # Haar measure: E[R] = 0, E[R_ij^2] = 1/3; 5 sigma with sigma = sqrt(1/3 / n)
    assert np.abs(R.mean(axis=0)).max() < 5 * np.sqrt(1 / 3 / 20000)
    np.testing.assert_allclose((R**2).mean(axis=0), 1 / 3, atol=0.02)
    # rotation angle density (1 - cos θ)/π: E[cos θ] = -1/2 ... E[trace] = 0
    assert abs(np.trace(R, axis1=1, axis2=2).mean()) < 0.05


def test_euler_round_trip_random():
    R = geo.random_rotations(5000, 2)
    rot, tilt, psi = geo.matrix_to_euler(R)
    assert tilt.min() >= 0 and tilt.max() <= 180
    assert rot.min() > -180 and rot.max() <= 180 and psi.min() > -180 and psi.max() <= 180
    np.testing.assert_allclose(geo.euler_to_matrix(rot, tilt, psi), R, atol=1e-12)


@pytest.mark.parametrize("tilt", [0.0, 180.0, 1e-9, 180 - 1e-9, 1e-5, 90.0])
def test_euler_round_trip_gimbal_lock(tilt):
    A = geo.euler_to_matrix(30.0, tilt, 50.0)
    rot, t, psi = geo.matrix_to_euler(A)
    np.testing.assert_allclose(geo.euler_to_matrix(rot, t, psi), A, atol=1e-13)
    assert 0 <= t <= 180
    if tilt in (0.0, 180.0):
        assert rot == 0.0
        assert psi == pytest.approx(80.0 if tilt == 0 else 20.0, abs=1e-12)
    else:
        assert (rot, t, psi) == pytest.approx((30.0, tilt, 50.0), abs=1e-9)


def test_euler_ranges_wrap():
    rot, tilt, psi = geo.matrix_to_euler(geo.euler_to_matrix(180.0, 40.0, -180.0))
    assert (rot, tilt, psi) == pytest.approx((180.0, 40.0, 180.0), abs=1e-12)
    # a negative tilt is the same rotation as (rot+180, -tilt, psi+180)
    rot, tilt, psi = geo.matrix_to_euler(geo.euler_to_matrix(10.0, -40.0, 20.0))
    assert (rot, tilt, psi) == pytest.approx((-170.0, 40.0, -160.0), abs=1e-12)


def test_quaternion_round_trip():
    R = geo.random_rotations(3000, 3)
    q = geo.matrix_to_quaternion(R)
    assert q.shape == (3000, 4)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-14)
    assert (q[:, 0] >= 0).all()
    np.testing.assert_allclose(geo.quaternion_to_matrix(q), R, atol=1e-13)
    # half-turns (w = 0) are the hard case for the trace formula
    for R180 in (geo.rotation_x(180), geo.rotation_y(180), geo.rotation_z(180), geo.euler_to_matrix(30, 90, 180)):
        np.testing.assert_allclose(geo.quaternion_to_matrix(geo.matrix_to_quaternion(R180)), R180, atol=1e-14)
    # the quaternion of a rotation by θ about the unit axis u is (cos θ/2, sin θ/2 u)
    np.testing.assert_allclose(
        geo.matrix_to_quaternion(geo.rotation_z(60.0)), [np.cos(np.pi / 6), 0, 0, np.sin(np.pi / 6)], atol=1e-15
    )
