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
    np.testing.assert_allclose(
        R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-12
    )
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
    for R180 in (
        geo.rotation_x(180),
        geo.rotation_y(180),
        geo.rotation_z(180),
        geo.euler_to_matrix(30, 90, 180),
    ):
        np.testing.assert_allclose(
            geo.quaternion_to_matrix(geo.matrix_to_quaternion(R180)), R180, atol=1e-14
        )
    # the quaternion of a rotation by θ about the unit axis u is (cos θ/2, sin θ/2 u)
    np.testing.assert_allclose(
        geo.matrix_to_quaternion(geo.rotation_z(60.0)),
        [np.cos(np.pi / 6), 0, 0, np.sin(np.pi / 6)],
        atol=1e-15,
    )


def test_active_convention_on_rotated_phantom():
    """A blob at p in the reference appears at R p + t in the particle: x(r) = a(Rᵀ(r - t))."""
    ndimage = pytest.importorskip("scipy.ndimage")
    n = 32
    c = n // 2
    p = np.array([6.0, -3.0, 8.0])  # (x, y, z) from the box centre
    z, y, x = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    a = np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * 1.2**2))  # [z, y, x]

    R = geo.euler_to_matrix(70.0, 40.0, 10.0)
    flip = np.eye(3)[::-1]  # (x, y, z) <-> [z, y, x]
    M = flip @ R.T @ flip  # output index o reads input index c + M (o - c)
    centre = np.full(3, float(c))
    rotated = ndimage.affine_transform(a, M, offset=centre - M @ centre, order=3)
    t = np.array([2, -1, 3])  # (x, y, z) voxels
    particle = np.roll(rotated, shift=tuple(t[::-1]), axis=(0, 1, 2))

    w = np.clip(particle, 0, None)
    centroid = np.array([(w * x).sum(), (w * y).sum(), (w * z).sum()]) / w.sum()
    np.testing.assert_allclose(centroid, R @ p + t, atol=0.05)
    # and the other reading of the matrix puts it somewhere else
    assert np.linalg.norm(centroid - (R.T @ p + t)) > 15


def test_geodesic_distance_and_min_distance():
    rng = np.random.default_rng(4)
    R1 = geo.random_rotations(200, rng)
    ang = rng.uniform(0, 180, 200)
    axis = rng.standard_normal((200, 3))
    D = geo.axis_angle_to_matrix(axis, ang)
    np.testing.assert_allclose(geo.geodesic_distance_deg(R1, R1 @ D), ang, atol=1e-6)
    np.testing.assert_allclose(geo.geodesic_distance_deg(R1, D @ R1), ang, atol=1e-6)
    assert geo.geodesic_distance_deg(R1[:, None], R1[None, :5]).shape == (200, 5)
    np.testing.assert_allclose(
        geo.geodesic_distance_deg(np.eye(3), geo.rotation_x(37.0)), 37.0, atol=1e-9
    )

    grid = geo.random_rotations(500, rng)
    d, idx = geo.min_distance_deg(R1, grid, return_index=True)
    brute = geo.geodesic_distance_deg(R1[:, None], grid[None])  # (200, 500)
    np.testing.assert_allclose(d, brute.min(axis=1), atol=1e-5)
    np.testing.assert_array_equal(idx, brute.argmin(axis=1))
    assert float(geo.min_distance_deg(grid[7], grid)) < 1e-5


def test_healpix_pixels():
    for nside in (1, 2, 3, 5):
        theta, phi = geo.healpix_pix2ang(nside)
        assert theta.shape == phi.shape == (12 * nside**2,)
        assert ((theta > 0) & (theta < np.pi) & (phi >= 0) & (phi < 2 * np.pi)).all()
        # distinct centres
        v = np.stack(
            [np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=1
        )
        d = v @ v.T
        assert (d - 2 * np.eye(len(v)) < 1 - 1e-9).all()
        # equal area: the fraction of pixels above z0 tracks the area fraction (1 - z0) / 2,
        # to within one ring of pixels
        z = np.cos(theta)
        for z0 in (-0.6, -0.1, 0.3, 0.8):
            assert abs((z > z0).mean() - (1 - z0) / 2) <= 1.0 / (nside + 1)
        # mirror symmetric about the equator
        np.testing.assert_allclose(np.sort(z), -np.sort(z)[::-1], atol=1e-12)
    # nside = 1: the 12 base pixels
    theta, phi = geo.healpix_pix2ang(1)
    np.testing.assert_allclose(np.cos(theta[:4]), 2 / 3)
    np.testing.assert_allclose(np.rad2deg(phi[:8]), [45, 135, 225, 315, 0, 90, 180, 270])
    # ring-scheme pixel 0 for nside = 2: z = 1 - 1/12, phi = 45°
    theta, phi = geo.healpix_pix2ang(2)
    assert np.cos(theta[0]) == pytest.approx(1 - 1 / 12) and np.rad2deg(phi[0]) == pytest.approx(45)


def test_healpix_grid_matches_relion_layout():
    R = geo.healpix_grid(2, 30.0)
    assert R.shape == (48 * 12, 3, 3)
    rot, tilt, psi = geo.matrix_to_euler(R[:12])
    theta, phi = geo.healpix_pix2ang(2)
    np.testing.assert_allclose(tilt, np.rad2deg(theta[0]), atol=1e-9)
    np.testing.assert_allclose(rot, np.rad2deg(phi[0]), atol=1e-9)
    np.testing.assert_allclose(np.sort(np.mod(psi, 360)), np.arange(12) * 30.0, atol=1e-9)


def test_so3_grid_size_rule_and_report():
    for step in (30.0, 15.0, 10.0, 5.0):
        assert geo.so3_grid_size(step) == 60 * int(
            np.ceil(0.7 * 8 * np.pi**2 / np.deg2rad(step) ** 3 / 60)
        )
    for step in (30.0, 15.0):
        R = geo.so3_grid(step)
        assert R.shape == (geo.so3_grid_size(step), 3, 3)
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_array_equal(geo.so3_grid(20.0), geo.so3_grid(20.0))  # deterministic
    rep = geo.grid_report(geo.so3_grid(20.0))
    assert rep["size"] == geo.so3_grid_size(20.0) == 1320
    # covering radius about 0.9 x step, like RELION's grid of the same step
    assert 0.8 * 20 < rep["covering_radius_deg"] < 0.95 * 20
    # covering density N (ρ - sin ρ) / π: HEALPix grids and plain super-Fibonacci spirals
    # reach 2.6-3.6 at these sizes
    rho = np.deg2rad(rep["covering_radius_deg"])
    assert rep["size"] * (rho - np.sin(rho)) / np.pi < 2.4


def test_so3_grid_is_icosahedrally_symmetric():
    R = geo.so3_grid(30.0)
    G = geo.symmetry_group("I")
    np.testing.assert_allclose(R.reshape(-1, 60, 3, 3), R[::60, None] @ G[None], atol=1e-12)
    # no two grid rotations coincide
    q = geo.matrix_to_quaternion(R)
    d = np.abs(q @ q.T) - 2 * np.eye(len(q))
    assert d.max() < np.cos(np.deg2rad(5.0) / 2)
    # the grid is closed under right multiplication by I, so the reduction is exact
    assert len(geo.asymmetric_unit(R, G)) == len(R) // 60


def test_covering_radius_estimate():
    # the 24 rotations of O: the refined estimate from 5000 samples reaches what 200000
    # plain samples find
    G = geo.symmetry_group("O")
    est = geo.covering_radius_deg(G, n_samples=5000, rng=1)
    dense = geo.min_distance_deg(geo.random_rotations(200000, 2), G).max()
    assert est >= dense - 0.5
    assert est <= 180.0
    # fresh random rotations do not find a point much farther from the grid
    g = geo.so3_grid(30.0)
    assert (
        geo.min_distance_deg(geo.random_rotations(20000, 3), g).max()
        <= geo.covering_radius_deg(g) + 0.3
    )


def _smallest_healpix_covering(radius_deg, size_limit):
    """Smallest healpix_grid(nside, 360/m) whose covering radius estimate is <= radius_deg.

    Scans nside and the number m of psi values in order of size. A 2000-sample estimate
    with the same seed and no refinement never exceeds the full estimate, so it rules a
    candidate out exactly when the full estimate would.
    """
    # the estimator's first 2000 samples; a rotation is at least as far from the grid as its
    # third row is from the nearest HEALPix direction, which rules out a whole nside
    S = geo.quaternion_to_matrix(np.random.default_rng(0).standard_normal((2000, 4)))
    best = None
    for nside in range(1, 9):
        ndir = 12 * nside**2
        if ndir > size_limit or (best is not None and ndir >= best):
            break
        theta, phi = geo.healpix_pix2ang(nside)
        v = np.stack(
            [np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=1
        )
        if np.rad2deg(np.arccos(np.clip((S[:, 2] @ v.T).max(axis=1), -1, 1))).max() > radius_deg:
            continue
        for m in range(1, size_limit // ndir + 1):
            size = ndir * m
            if best is not None and size >= best:
                break
            H = geo.healpix_grid(nside, 360.0 / m)
            if geo.covering_radius_deg(H, n_samples=2000, rng=0, n_refine=0) > radius_deg:
                continue
            if geo.covering_radius_deg(H, n_samples=20000, rng=0) <= radius_deg:
                best = size
                break
    return best


@pytest.mark.parametrize("step", [30.0, 20.0])
def test_so3_grid_not_more_than_1p3_times_healpix(step):
    """SPEC §5: at most 1.3x the rotations of a HEALPix grid of equal covering radius."""
    R = geo.so3_grid(step)
    c = geo.covering_radius_deg(R, n_samples=20000, rng=0)
    best = _smallest_healpix_covering(c, size_limit=2 * R.shape[0])
    assert best is not None
    assert R.shape[0] <= 1.3 * best


def test_perturb_is_a_rigid_small_rotation():
    rng = np.random.default_rng(5)
    grid = geo.so3_grid(30.0)
    for _ in range(5):
        moved = geo.perturb(grid, 10.0, rng)
        assert moved.shape == grid.shape and not np.allclose(moved, grid)
        shift = geo.geodesic_distance_deg(grid, moved)
        assert shift.max() <= 5.0 + 1e-9
        np.testing.assert_allclose(shift, shift[0], atol=1e-5)  # one rotation moves all equally
        i = rng.integers(0, len(grid), 50)
        j = rng.integers(0, len(grid), 50)
        np.testing.assert_allclose(
            geo.geodesic_distance_deg(moved[i], moved[j]),
            geo.geodesic_distance_deg(grid[i], grid[j]),
            atol=1e-6,
        )
    angles = [
        geo.geodesic_distance_deg(grid[0], geo.perturb(grid[:1], 10.0, k)[0]) for k in range(300)
    ]
    assert max(angles) <= 5.0 + 1e-9 and np.mean(angles) == pytest.approx(
        2.5, abs=0.3
    )  # uniform on [0, 5]


@pytest.mark.parametrize("sym", ["C1", "C4", "D3", "O"])
def test_local_subset_matches_brute_force(sym):
    G = geo.symmetry_group(sym)
    grid = geo.so3_grid(20.0)
    R0 = geo.euler_to_matrix(40.0, 70.0, -20.0)
    idx = geo.local_subset(grid, R0, 35.0, group=None if sym == "C1" else G)
    brute = [
        i
        for i in range(len(grid))
        if min(geo.geodesic_distance_deg(grid[i], R0 @ g) for g in G) <= 35.0
    ]
    np.testing.assert_array_equal(idx, brute)
    assert len(idx) > 0
    if sym == "C1":  # the ball of radius 35° holds (θ - sin θ)/π of SO(3)
        t = np.deg2rad(35.0)
        assert len(idx) == pytest.approx(len(grid) * (t - np.sin(t)) / np.pi, rel=0.2)


def test_symmetry_groups():
    for name, order in [
        ("C1", 1),
        ("C2", 2),
        ("C7", 7),
        ("D1", 2),
        ("D7", 14),
        ("T", 12),
        ("O", 24),
        ("I", 60),
    ]:
        G = geo.symmetry_group(name)
        assert G.shape == (order, 3, 3) and G.dtype == np.float64
        np.testing.assert_allclose(G[0], np.eye(3), atol=1e-15)
        np.testing.assert_allclose(np.linalg.det(G), 1.0, atol=1e-12)
        np.testing.assert_allclose(
            G @ np.swapaxes(G, 1, 2), np.broadcast_to(np.eye(3), G.shape), atol=1e-12
        )
        # closed under multiplication, and every product appears exactly once per row
        P = np.matmul(G[:, None], G[None])  # (G, G, 3, 3)
        match = np.abs(P[:, :, None] - G[None, None]).max(axis=(3, 4)) < 1e-9  # (G, G, G)
        assert (match.sum(axis=2) == 1).all()
        assert (match.sum(axis=1) == 1).all()
    assert geo.symmetry_group("c7").shape == (7, 3, 3)


def _axes_of_order(G, n):
    q = geo.matrix_to_quaternion(G)
    angle = 2 * np.rad2deg(np.arccos(np.clip(q[:, 0], -1, 1)))
    sel = np.isclose(angle, 360.0 / n, atol=1e-6)
    return q[sel, 1:] / np.linalg.norm(q[sel, 1:], axis=1, keepdims=True)


def _has_axis(axes, v):
    v = np.asarray(v, dtype=float) / np.linalg.norm(v)
    return bool((np.abs(axes @ v) > 1 - 1e-9).any())


def test_symmetry_group_orientations():
    assert _has_axis(_axes_of_order(geo.symmetry_group("C5"), 5), [0, 0, 1])
    D = geo.symmetry_group("D5")
    assert _has_axis(_axes_of_order(D, 5), [0, 0, 1]) and _has_axis(_axes_of_order(D, 2), [1, 0, 0])
    T = geo.symmetry_group("T")
    for v in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert _has_axis(_axes_of_order(T, 2), v)
    assert _has_axis(_axes_of_order(T, 3), [1, 1, 1])
    O = geo.symmetry_group("O")
    for v in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert _has_axis(_axes_of_order(O, 4), v)
    I = geo.symmetry_group("I")
    phi = (1 + np.sqrt(5)) / 2
    for v in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert _has_axis(_axes_of_order(I, 2), v)
    assert _has_axis(_axes_of_order(I, 5), [1, 0, phi])  # RELION/Xmipp I2
    assert not _has_axis(_axes_of_order(I, 5), [0, 1, phi])
    assert _has_axis(_axes_of_order(geo.symmetry_group("I1"), 5), [0, 1, phi])
    np.testing.assert_array_equal(geo.symmetry_group("I2"), I)


@pytest.mark.parametrize("bad", ["C0", "X", "D", "Cx", "I5", "", "T2"])
def test_symmetry_group_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="unknown symmetry .*: use C1, Cn, Dn, T, O or I"):
        geo.symmetry_group(bad)


def test_symmetry_min_distance():
    G = geo.symmetry_group("D3")
    R = geo.random_rotations(50, 6)
    k = np.arange(50) % len(G)
    np.testing.assert_allclose(geo.symmetry_min_distance_deg(R, R @ G[k], G), 0.0, atol=1e-5)
    S = geo.random_rotations(50, 7)
    brute = geo.geodesic_distance_deg(R[:, None], S[:, None] @ G[None]).min(axis=1)
    np.testing.assert_allclose(geo.symmetry_min_distance_deg(R, S, G), brute, atol=1e-6)
    np.testing.assert_allclose(geo.symmetry_min_distance_deg(R, S), geo.geodesic_distance_deg(R, S))


@pytest.fixture(scope="module")
def grid15():
    grid = geo.so3_grid(15.0)
    return grid, geo.covering_radius_deg(grid)


@pytest.mark.parametrize("sym", ["C7", "D7", "T", "O", "I"])
def test_asymmetric_unit(sym, grid15):
    grid, cr = grid15
    G = geo.symmetry_group(sym)
    idx = geo.asymmetric_unit(grid, G)
    assert len(idx) == pytest.approx(len(grid) / len(G), rel=0.1)
    # each kept rotation is the closest to the identity among its symmetry mates
    ang = geo.geodesic_distance_deg(np.eye(3), grid[idx][:, None] @ G[None])  # (A, G)
    assert (ang[:, 0] <= ang.min(axis=1) + 1e-6).all()
    # of a rotation and its mates exactly one is kept
    mates = grid[idx[:20]][:, None] @ G[None]  # (20, G, 3, 3)
    kept = [len(geo.asymmetric_unit(m, G)) for m in mates]
    assert kept == [1] * 20
    # the reduced grid composed with the group still covers the full grid: exactly for
    # subgroups of the grid's icosahedral symmetry, else seams between symmetry-related
    # cells add up to ~30% to the covering radius, which a margin of cr/3 removes
    cover = (grid[idx][:, None] @ G[None]).reshape(-1, 3, 3)
    d = geo.min_distance_deg(grid, cover).max()
    if sym in ("T", "I"):
        assert d < 1e-4
    else:
        assert d <= 1.35 * cr
        wide = geo.asymmetric_unit(grid, G, margin_deg=cr / 3)
        assert np.isin(idx, wide).all() and len(wide) <= 1.7 * len(idx)
        cover = (grid[wide][:, None] @ G[None]).reshape(-1, 3, 3)
        assert geo.min_distance_deg(grid, cover).max() <= cr
    np.testing.assert_array_equal(
        geo.asymmetric_unit(grid, geo.symmetry_group("C1")), np.arange(len(grid))
    )


def test_no_print(capsys):
    geo.grid_report(geo.so3_grid(30.0))
    geo.symmetry_group("I")
    assert capsys.readouterr().out == ""
