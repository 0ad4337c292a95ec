"""Rotations, SO(3) grids and point-group symmetry: the conventions of mltomo.

Every other module follows what is written here.

Volumes and coordinates
    A volume is a numpy array indexed ``[z, y, x]``. Voxel coordinates are measured from the
    box centre ``n // 2`` along each axis (RELION/Xmipp). Vectors are written ``(x, y, z)``;
    a rotation matrix acts on column vectors ``(x, y, z)``.

Euler angles
    ZYZ angles ``(rot, tilt, psi)`` in degrees, turned into a matrix exactly as RELION's
    ``Euler_angles2matrix`` does::

        ca, sa = cos(rot), sin(rot);  cb, sb = cos(tilt), sin(tilt);  cg, sg = cos(psi), sin(psi)
        cc = cb*ca;  cs = cb*sa;  sc = sb*ca;  ss = sb*sa
        A = [[ cg*cc - sg*sa,   cg*cs + sg*ca,  -cg*sb],
             [-sg*cc - cg*sa,  -sg*cs + cg*ca,   sg*sb],
             [ sc,              ss,              cb   ]]

    Written as a product, ``A = Rz(-psi) Ry(-tilt) Rz(-rot)`` with the active, right-handed
    rotations ``rotation_z`` / ``rotation_y`` below. ``matrix_to_euler`` returns RELION's
    ranges: ``tilt`` in [0, 180], ``rot`` and ``psi`` in (-180, 180]; at gimbal lock
    (``tilt`` = 0 or 180) it sets ``rot = 0`` and puts the whole in-plane angle into ``psi``.

Poses
    A particle is the reference rotated *actively* by ``R = A`` and then shifted by ``t``
    voxels::

        x_i(r) = a(Rᵀ (r - t))        so        X_i(k) = exp(-2πi k·t) A(Rᵀ k)

    A feature of the reference at position ``p`` appears in the particle at ``R p + t``.
    The particle table stores ``rlnAngleRot/Tilt/Psi`` = ``matrix_to_euler(R)`` and
    ``rlnOriginX/Y/ZAngst`` = ``t * voxel_size_angstrom``.

Axis rotations
    ``rotation_x/y/z(angle)`` are active and right-handed: ``rotation_y(θ) @ (0, 0, 1) =
    (sin θ, 0, cos θ)``, ``rotation_z(θ) @ (1, 0, 0) = (cos θ, sin θ, 0)``.

Distances
    The distance between two rotations is the angle of ``R1ᵀ R2`` (degrees, in [0, 180]); it
    is invariant under multiplying both from the left or both from the right. With unit
    quaternions ``q1, q2`` it is ``2 acos(|q1·q2|)``. Quaternions are ``(w, x, y, z)``, scalar
    first, and the rotation of ``q`` rotates actively by ``2 acos(w)`` about ``(x, y, z)``.

Symmetry
    A reference with point-group symmetry ``G`` satisfies ``a(gᵀ r) = a(r)`` for every ``g``
    in ``G`` (matrices from ``symmetry_group``), so the poses ``R`` and ``R g`` give the same
    particle: distances between poses are taken modulo right multiplication by ``G``, and a
    search needs only the grid rotations in the asymmetric unit (``asymmetric_unit``).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "asymmetric_unit",
    "axis_angle_to_matrix",
    "covering_radius_deg",
    "euler_to_matrix",
    "geodesic_distance_deg",
    "grid_report",
    "healpix_grid",
    "healpix_pix2ang",
    "local_subset",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "min_distance_deg",
    "perturb",
    "quaternion_to_matrix",
    "random_rotations",
    "rotation_x",
    "rotation_y",
    "rotation_z",
    "so3_grid",
    "so3_grid_size",
    "super_fibonacci_quaternions",
    "symmetry_group",
    "symmetry_min_distance_deg",
]


# ----------------------------------------------------------------------------------------
# Euler angles and axis rotations
# ----------------------------------------------------------------------------------------


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's ``Euler_angles2matrix``: ZYZ angles in degrees -> rotation matrices.

    Scalars or arrays that broadcast together; returns float64 of shape ``(..., 3, 3)``.
    """
    a, b, g = np.broadcast_arrays(
        *(np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
    )
    ca, sa = np.cos(a), np.sin(a)
    cb, sb = np.cos(b), np.sin(b)
    cg, sg = np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty(a.shape + (3, 3), dtype=np.float64)  # (..., 3, 3)
    A[..., 0, 0] = cg * cc - sg * sa
    A[..., 0, 1] = cg * cs + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cc - cg * sa
    A[..., 1, 1] = -sg * cs + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sc
    A[..., 2, 1] = ss
    A[..., 2, 2] = cb
    return A


def _wrap_deg(angle: np.ndarray) -> np.ndarray:
    """Map angles in degrees to (-180, 180]."""
    out = np.mod(angle + 180.0, 360.0) - 180.0
    return np.where(out <= -180.0, out + 360.0, out)


def matrix_to_euler(R) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``euler_to_matrix``: ``(..., 3, 3)`` -> ``(rot, tilt, psi)`` in degrees.

    ``tilt`` in [0, 180], ``rot`` and ``psi`` in (-180, 180]. Robust everywhere, including
    gimbal lock: ``rot`` is read from the third row, then ``psi`` and ``tilt`` from
    ``A Rz'(rot)ᵀ = Rz'(psi) Ry'(tilt)``, whose entries are well conditioned for every tilt.
    When the third row has no in-plane component (tilt 0 or 180 to within 1e-12), ``rot = 0``.
    Returns 0-d arrays for a single matrix.
    """
    A = np.asarray(R, dtype=np.float64)
    if A.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3), got {A.shape}")
    a20, a21 = A[..., 2, 0], A[..., 2, 1]
    locked = np.hypot(a20, a21) < 1e-12
    alpha = np.where(locked, 0.0, np.arctan2(a21, a20))
    ca, sa = np.cos(alpha), np.sin(alpha)
    # M = A Rz'(alpha)^T = [[cg cb, sg, -cg sb], [-sg cb, cg, sg sb], [sb, 0, cb]]
    m20 = a20 * ca + a21 * sa  # = sin(tilt) >= 0 (up to rounding at gimbal lock)
    m01 = A[..., 0, 0] * -sa + A[..., 0, 1] * ca  # = sin(psi)
    m11 = A[..., 1, 0] * -sa + A[..., 1, 1] * ca  # = cos(psi)
    beta = np.arctan2(np.abs(m20), A[..., 2, 2])
    gamma = np.arctan2(m01, m11)
    return (
        _wrap_deg(np.rad2deg(alpha)),
        np.rad2deg(beta),
        _wrap_deg(np.rad2deg(gamma)),
    )


def _axis_rotation(angle_deg, i: int, j: int) -> np.ndarray:
    """Active right-handed rotation in the (i, j) plane: e_i -> cos e_i + sin e_j."""
    t = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    R = np.zeros(t.shape + (3, 3), dtype=np.float64)  # (..., 3, 3)
    k = 3 - i - j
    R[..., k, k] = 1.0
    R[..., i, i] = c
    R[..., j, j] = c
    R[..., j, i] = s
    R[..., i, j] = -s
    return R


def rotation_x(angle_deg) -> np.ndarray:
    """Active right-handed rotation about +x: y -> (0, cos, sin). Shape ``(..., 3, 3)``."""
    return _axis_rotation(angle_deg, 1, 2)


def rotation_y(angle_deg) -> np.ndarray:
    """Active right-handed rotation about +y: z -> (sin, 0, cos). Shape ``(..., 3, 3)``."""
    return _axis_rotation(angle_deg, 2, 0)


def rotation_z(angle_deg) -> np.ndarray:
    """Active right-handed rotation about +z: x -> (cos, sin, 0). Shape ``(..., 3, 3)``."""
    return _axis_rotation(angle_deg, 0, 1)


# ----------------------------------------------------------------------------------------
# Quaternions and random rotations
# ----------------------------------------------------------------------------------------


def quaternion_to_matrix(q) -> np.ndarray:
    """Unit quaternions ``(..., 4)`` as ``(w, x, y, z)`` -> rotation matrices ``(..., 3, 3)``.

    The input is normalised first; ``q`` and ``-q`` give the same matrix.
    """
    q = np.asarray(q, dtype=np.float64)
    if q.shape[-1] != 4:
        raise ValueError(f"q must have shape (..., 4), got {q.shape}")
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    R = np.empty(q.shape[:-1] + (3, 3), dtype=np.float64)  # (..., 3, 3)
    R[..., 0, 0] = 1 - 2 * (y * y + z * z)
    R[..., 0, 1] = 2 * (x * y - w * z)
    R[..., 0, 2] = 2 * (x * z + w * y)
    R[..., 1, 0] = 2 * (x * y + w * z)
    R[..., 1, 1] = 1 - 2 * (x * x + z * z)
    R[..., 1, 2] = 2 * (y * z - w * x)
    R[..., 2, 0] = 2 * (x * z - w * y)
    R[..., 2, 1] = 2 * (y * z + w * x)
    R[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return R


def matrix_to_quaternion(R) -> np.ndarray:
    """Rotation matrices ``(..., 3, 3)`` -> unit quaternions ``(..., 4)`` ``(w, x, y, z)``.

    Shepperd's method (largest of the four squared components first), so it is accurate for
    every rotation. Sign convention: ``w >= 0``; for ``w == 0`` the first nonzero of
    ``(x, y, z)`` is positive.
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3), got {R.shape}")
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    # 4*{w², x², y², z²} up to a common offset; pick the largest to divide by.
    cand = np.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], axis=1)  # (M, 4)
    which = np.argmax(cand, axis=1)
    q = np.empty((m.shape[0], 4), dtype=np.float64)  # (M, 4)
    for k in range(4):
        sel = which == k
        if not np.any(sel):
            continue
        s = m[sel]
        if k == 0:
            r = np.sqrt(np.maximum(1.0 + tr[sel], 0.0)) * 2.0  # 4w
            q[sel] = np.stack(
                [
                    0.25 * r,
                    (s[:, 2, 1] - s[:, 1, 2]) / r,
                    (s[:, 0, 2] - s[:, 2, 0]) / r,
                    (s[:, 1, 0] - s[:, 0, 1]) / r,
                ],
                axis=1,
            )
        elif k == 1:
            r = np.sqrt(np.maximum(1.0 + s[:, 0, 0] - s[:, 1, 1] - s[:, 2, 2], 0.0)) * 2.0  # 4x
            q[sel] = np.stack(
                [
                    (s[:, 2, 1] - s[:, 1, 2]) / r,
                    0.25 * r,
                    (s[:, 0, 1] + s[:, 1, 0]) / r,
                    (s[:, 0, 2] + s[:, 2, 0]) / r,
                ],
                axis=1,
            )
        elif k == 2:
            r = np.sqrt(np.maximum(1.0 + s[:, 1, 1] - s[:, 0, 0] - s[:, 2, 2], 0.0)) * 2.0  # 4y
            q[sel] = np.stack(
                [
                    (s[:, 0, 2] - s[:, 2, 0]) / r,
                    (s[:, 0, 1] + s[:, 1, 0]) / r,
                    0.25 * r,
                    (s[:, 1, 2] + s[:, 2, 1]) / r,
                ],
                axis=1,
            )
        else:
            r = np.sqrt(np.maximum(1.0 + s[:, 2, 2] - s[:, 0, 0] - s[:, 1, 1], 0.0)) * 2.0  # 4z
            q[sel] = np.stack(
                [
                    (s[:, 1, 0] - s[:, 0, 1]) / r,
                    (s[:, 0, 2] + s[:, 2, 0]) / r,
                    (s[:, 1, 2] + s[:, 2, 1]) / r,
                    0.25 * r,
                ],
                axis=1,
            )
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q = _canonical_sign(q)
    return q.reshape(R.shape[:-2] + (4,))


def _canonical_sign(q: np.ndarray) -> np.ndarray:
    """Flip quaternions ``(M, 4)`` so that the first nonzero component is positive."""
    nz = np.abs(q) > 1e-15
    first = np.argmax(nz, axis=1)
    sign = np.sign(q[np.arange(q.shape[0]), first])
    sign[sign == 0] = 1.0
    return q * sign[:, None]


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def random_rotations(n: int, rng=None) -> np.ndarray:
    """``n`` rotations drawn uniformly (Haar measure) from SO(3): ``(n, 3, 3)`` float64.

    Normalised 4-D Gaussian vectors are uniform unit quaternions. ``rng`` is a
    ``numpy.random.Generator`` or a seed.
    """
    q = _as_rng(rng).standard_normal((int(n), 4))  # (n, 4)
    return quaternion_to_matrix(q)


# ----------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------


def geodesic_distance_deg(R1, R2) -> np.ndarray:
    """Angle in degrees of ``R1ᵀ R2`` for matrices ``(..., 3, 3)`` that broadcast together.

    Computed from the trace, ``acos((tr(R1ᵀR2) - 1) / 2)``, clipped to [0, 180].
    """
    R1 = np.asarray(R1, dtype=np.float64)
    R2 = np.asarray(R2, dtype=np.float64)
    tr = np.einsum("...ij,...ij->...", R1, R2)  # tr(R1ᵀ R2) = Σ R1_ij R2_ij
    return _trace_to_deg(tr)


def _trace_to_deg(tr: np.ndarray) -> np.ndarray:
    """Rotation angle in degrees of a rotation with trace ``tr``."""
    return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def _nearest_quaternion(qa: np.ndarray, qb: np.ndarray, chunk_elems: int = 1 << 22):
    """For each row of ``qa`` (M, 4): max over ``qb`` (N, 4) of ``|qa·qb|`` and its index.

    Chunked over ``qa`` so at most ``chunk_elems`` dot products are held at once.
    """
    m = qa.shape[0]
    best = np.empty(m, dtype=np.float64)  # (M,)
    arg = np.empty(m, dtype=np.int64)  # (M,)
    step = max(1, chunk_elems // max(1, qb.shape[0]))
    qbT = np.ascontiguousarray(qb.T)
    for s in range(0, m, step):
        d = np.abs(qa[s : s + step] @ qbT)  # (chunk, N)
        a = np.argmax(d, axis=1)
        arg[s : s + step] = a
        best[s : s + step] = d[np.arange(d.shape[0]), a]
    return best, arg


def _dot_to_deg(absdot: np.ndarray) -> np.ndarray:
    return np.rad2deg(2.0 * np.arccos(np.minimum(1.0, absdot)))


def min_distance_deg(R_query, R_grid, return_index: bool = False):
    """Distance in degrees from each query rotation to its nearest grid rotation.

    ``R_query`` ``(M, 3, 3)`` (or one ``(3, 3)``), ``R_grid`` ``(N, 3, 3)``. Uses
    ``d = 2 acos(min(1, |q1·q2|))`` on quaternions, chunked to bound memory; with
    ``return_index`` also returns the index of the nearest grid rotation.
    """
    Rq = np.asarray(R_query, dtype=np.float64)
    single = Rq.ndim == 2
    qa = matrix_to_quaternion(Rq.reshape(-1, 3, 3))
    qb = matrix_to_quaternion(np.asarray(R_grid, dtype=np.float64).reshape(-1, 3, 3))
    best, arg = _nearest_quaternion(qa, qb)
    dist = _dot_to_deg(best)
    if single:
        dist, arg = dist[0], arg[0]
    return (dist, arg) if return_index else dist


# ----------------------------------------------------------------------------------------
# Grids on SO(3)
# ----------------------------------------------------------------------------------------


def healpix_pix2ang(nside: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the HEALPix ring-scheme pixels: ``(theta, phi)`` in radians, ``12 nside²`` each.

    ``theta`` is the colatitude in [0, π], ``phi`` the longitude in [0, 2π); pixels are
    numbered ring by ring from the north pole, as ``healpy.pix2ang(nside, ipix)``. Any
    positive ``nside`` (not only powers of 2).
    """
    n = int(nside)
    if n < 1:
        raise ValueError(f"nside must be a positive integer, got {nside}")
    npix = 12 * n * n
    ncap = 2 * n * (n - 1)
    p = np.arange(npix, dtype=np.int64)
    z = np.empty(npix, dtype=np.float64)
    phi = np.empty(npix, dtype=np.float64)

    north = p < ncap
    pn = p[north]
    ring = (
        1 + np.floor(np.sqrt(1 + 2 * pn + 0.5)).astype(np.int64)
    ) // 2  # isqrt, exact for these sizes
    iphi = pn + 1 - 2 * ring * (ring - 1)
    z[north] = 1.0 - ring * ring / (3.0 * n * n)
    phi[north] = (iphi - 0.5) * np.pi / (2.0 * ring)

    south = p >= npix - ncap
    ps = npix - p[south]
    ring = (1 + np.floor(np.sqrt(2 * ps - 1 + 0.5)).astype(np.int64)) // 2
    iphi = 4 * ring + 1 - (ps - 2 * ring * (ring - 1))
    z[south] = -1.0 + ring * ring / (3.0 * n * n)
    phi[south] = (iphi - 0.5) * np.pi / (2.0 * ring)

    equator = ~(north | south)
    ip = p[equator] - ncap
    ring = ip // (4 * n) + n
    iphi = ip % (4 * n) + 1
    fodd = np.where((ring + n) % 2 == 1, 1.0, 0.5)
    z[equator] = (2 * n - ring) * 2.0 / (3.0 * n)
    phi[equator] = (iphi - fodd) * np.pi / (2.0 * n)

    return np.arccos(np.clip(z, -1.0, 1.0)), phi


def healpix_grid(nside: int, psi_step_deg: float) -> np.ndarray:
    """RELION-style rotation grid: HEALPix directions times uniform in-plane angles.

    Directions are the ``12 nside²`` ring-scheme pixel centres, used as ``rot = phi``,
    ``tilt = theta``; ``psi`` takes ``m = max(1, round(360 / psi_step_deg))`` values
    ``0, 360/m, ...``. RELION's healpix order ``o`` is ``nside = 2**o`` with
    ``psi_step = 60 / nside``. Returns ``(12 nside² m, 3, 3)``, directions outer, psi inner.
    """
    theta, phi = healpix_pix2ang(nside)
    m = max(1, round(360.0 / float(psi_step_deg)))
    psi = np.arange(m) * (360.0 / m)
    R = euler_to_matrix(
        np.rad2deg(phi)[:, None], np.rad2deg(theta)[:, None], psi[None, :]
    )  # (P, m, 3, 3)
    return R.reshape(-1, 3, 3)


_SF_PHI = np.sqrt(2.0)
_SF_PSI = 1.533751168755204288118041

# so3_grid(step) has N = 60 * ceil(SO3_GRID_DENSITY * 8π² / step_rad³ / 60) rotations (8π² is
# the volume of SO(3) in the angle metric). RELION's grid of the same step (HEALPix nside =
# 60/step, psi step = step) has 1.047 * 8π² / step_rad³, so ours is 1.5 times smaller; the
# constant is calibrated so that both have about the same covering radius, 0.9 x step.
SO3_GRID_DENSITY = 0.7


def super_fibonacci_quaternions(n: int) -> np.ndarray:
    """``n`` unit quaternions on a super-Fibonacci spiral (Alexa 2022), ``(n, 4)``."""
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    s = np.arange(n, dtype=np.float64) + 0.5
    r = np.sqrt(s / n)
    R = np.sqrt(1.0 - s / n)
    alpha = 2.0 * np.pi * s / _SF_PHI
    beta = 2.0 * np.pi * s / _SF_PSI
    return np.stack(
        [r * np.sin(alpha), r * np.cos(alpha), R * np.sin(beta), R * np.cos(beta)], axis=1
    )


def so3_grid_size(step_deg: float) -> int:
    """Number of rotations of ``so3_grid(step_deg)``: ``60 ceil(0.7 * 8π² / step_rad³ / 60)``."""
    step = np.deg2rad(float(step_deg))
    if not step > 0:
        raise ValueError(f"step_deg must be positive, got {step_deg}")
    return 60 * max(1, int(np.ceil(SO3_GRID_DENSITY * 8.0 * np.pi**2 / step**3 / 60.0 - 1e-9)))


def so3_grid(step_deg: float) -> np.ndarray:
    """The rotation grid mltomo searches, ``(N, 3, 3)`` with ``N = so3_grid_size(step_deg)``.

    An icosahedrally symmetric grid whose points are placed to minimise the covering radius:
    ``{p g : p in P, g in I}`` with ``I`` the 60 rotations of ``symmetry_group("I")`` and
    ``P`` a set of ``N / 60`` free rotations. ``P`` starts as the ``N / 60`` of ``N``
    super-Fibonacci points (Alexa 2022) deepest inside the cell of rotations closer to the
    identity than to any other element of ``I``, and is then improved by 60 rounds of a minimax Lloyd iteration: each
    round scatters quasi-random rotations over the cell, finds the nearest grid rotation of
    each, and moves every free point part of the way towards the farthest rotation that
    chose it (the step shrinks as ``0.5 / (1 + 0.1 round)``). Only the cell is sampled, so a
    round costs ``O(N)``. Building takes 0.2 s at 20° (1320 rotations), 0.6 s at 15°
    (3120), 2.7 s at 10° (10440), 16 s at 5° (83220); grids are cached per size. The result
    is deterministic: no random numbers are drawn.

    Measured covering radii (``covering_radius_deg``, seed 0) are 0.86-0.92 x step, like
    RELION's HEALPix grid of the same step, with 1.5 times fewer rotations: the covering
    density ``N (ρ - sin ρ) / π`` is 2.0-2.3 against 2.6-3.5 for HEALPix and 2.7-3.6 for the
    plain super-Fibonacci spiral. Rows are ordered ``p``-major: row ``60 i + j`` is
    ``P[i] @ I[j]``, so the grid is closed under right multiplication by ``I`` and
    ``asymmetric_unit`` is exact for ``I`` and its subgroups.
    """
    n_free = so3_grid_size(step_deg) // 60
    return quaternion_to_matrix(_icosahedral_grid_quaternions(n_free))


def covering_radius_deg(R_grid, n_samples: int = 20000, rng=0, n_refine: int = 30) -> float:
    """Estimate of the covering radius: the largest distance from any rotation to the grid.

    Draw ``n_samples`` uniform rotations and take each one's distance to its nearest grid
    rotation; then, for the 64 worst samples, ``n_refine`` rounds of a random local search
    (random steps of shrinking size, kept when they move farther from the grid) push them
    towards the deep holes. The result is the largest distance found: a lower bound of the
    true covering radius, typically within a few percent of it. Deterministic for a given
    ``rng`` (a seed or a Generator).
    """
    gen = _as_rng(rng)
    qg = matrix_to_quaternion(np.asarray(R_grid, dtype=np.float64).reshape(-1, 3, 3))
    q = gen.standard_normal((int(n_samples), 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dot, _ = _nearest_quaternion(q, qg)
    if n_refine > 0:
        k = min(64, q.shape[0])
        worst = np.argsort(dot)[:k]
        qw, dw = q[worst], dot[worst]
        scale = np.arccos(np.minimum(1.0, dw.max())) * 0.5  # half the radius, S³ radians
        for _ in range(int(n_refine)):
            trial = qw + scale * gen.standard_normal(qw.shape) / 2.0
            trial /= np.linalg.norm(trial, axis=1, keepdims=True)
            dt, _ = _nearest_quaternion(trial, qg)
            better = dt < dw
            qw[better], dw[better] = trial[better], dt[better]
            scale *= 0.85
        dot = np.concatenate([dot, dw])
    return float(_dot_to_deg(dot.min()))


def grid_report(R_grid, n_samples: int = 20000, rng=0) -> dict:
    """``dict(size=N, covering_radius_deg=...)`` for a grid ``(N, 3, 3)``."""
    R_grid = np.asarray(R_grid)
    return {
        "size": int(R_grid.shape[0]),
        "covering_radius_deg": covering_radius_deg(R_grid, n_samples=n_samples, rng=rng),
    }


# ----------------------------------------------------------------------------------------
# Perturbation and local searches
# ----------------------------------------------------------------------------------------


def axis_angle_to_matrix(axis, angle_deg) -> np.ndarray:
    """Active right-handed rotation by ``angle_deg`` about ``axis`` (..., 3) -> (..., 3, 3)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis, axis=-1, keepdims=True)
    half = 0.5 * np.deg2rad(np.asarray(angle_deg, dtype=np.float64))[..., None]
    return quaternion_to_matrix(np.concatenate([np.cos(half), np.sin(half) * axis], axis=-1))


def perturb(R_grid, step_deg: float, rng=None) -> np.ndarray:
    """Re-orient a grid by one small random rotation: ``Q @ R_grid``.

    ``Q`` turns by an angle uniform in ``[0, step_deg / 2]`` about a uniformly random axis.
    Multiplying from the left keeps every distance between grid rotations and the relation
    ``R ~ R g`` used by the symmetry reduction, so a reduced grid stays a reduced grid.
    Returns a new array; ``R_grid`` is not modified.
    """
    gen = _as_rng(rng)
    axis = gen.standard_normal(3)
    angle = gen.uniform(0.0, 0.5 * float(step_deg))
    Q = axis_angle_to_matrix(axis, angle)
    return np.matmul(Q, np.asarray(R_grid, dtype=np.float64))


def local_subset(R_grid, R0, max_dist_deg: float, group=None) -> np.ndarray:
    """Indices of the grid rotations within ``max_dist_deg`` of ``R0`` modulo symmetry.

    The distance is ``min over g in group of dist(R, R0 g)`` (``group`` ``(G, 3, 3)`` from
    ``symmetry_group``; ``None`` is C1). Returns sorted int64 indices into ``R_grid``.
    """
    d = symmetry_min_distance_deg(
        np.asarray(R_grid, dtype=np.float64), np.asarray(R0, dtype=np.float64), group
    )
    return np.flatnonzero(d <= float(max_dist_deg) + 1e-9)


# ----------------------------------------------------------------------------------------
# Point-group symmetry
# ----------------------------------------------------------------------------------------

_GOLDEN = (1.0 + np.sqrt(5.0)) / 2.0


def _closure(generators: list[np.ndarray]) -> np.ndarray:
    """The finite group generated by rotation matrices ``(G, 3, 3)``.

    Products are added until nothing new appears (two matrices are the same when no entry
    differs by more than 1e-8). Order: identity first, then by rotation angle, then by the
    canonical quaternion, so a group always comes out in the same order.
    """
    G = np.concatenate(
        [np.eye(3)[None], np.asarray(generators, dtype=np.float64).reshape(-1, 3, 3)]
    )

    def unique(M: np.ndarray) -> np.ndarray:
        out = []
        for m in M:
            if not out or np.abs(np.asarray(out) - m).max(axis=(1, 2)).min() > 1e-8:
                out.append(m)
        return np.asarray(out)

    G = unique(G)
    while True:
        prods = np.matmul(G[:, None], G[None, :]).reshape(-1, 3, 3)  # (G², 3, 3)
        new = prods[np.abs(prods[:, None] - G[None]).max(axis=(2, 3)).min(axis=1) > 1e-8]
        if new.shape[0] == 0:
            break
        G = np.concatenate([G, unique(new)])
        if G.shape[0] > 1000:
            raise RuntimeError("symmetry generators do not generate a finite group")
    q = np.round(matrix_to_quaternion(G), 9)
    angle = np.round(2.0 * np.arccos(np.clip(q[:, 0], -1.0, 1.0)), 9)
    order = np.lexsort((-q[:, 3], -q[:, 2], -q[:, 1], angle))
    return np.ascontiguousarray(G[order])


def symmetry_group(name: str) -> np.ndarray:
    """Rotation matrices ``(G, 3, 3)`` float64 of a point group; identity is element 0.

    Orientations (those of RELION/Xmipp):

    * ``C1``; ``Cn``: n-fold axis along z.
    * ``Dn``: n-fold axis along z and a 2-fold along x.
    * ``T`` (12): 2-folds along x, y, z; 3-folds along (±1, ±1, ±1).
    * ``O`` (24): 4-folds along x, y, z; 3-folds along (±1, ±1, ±1); 2-folds along (1, ±1, 0)
      and its permutations.
    * ``I`` (60), also accepted as ``I2``: RELION/Xmipp's default ``I2`` (Crowther's 222
      setting): 2-folds along x, y, z; 5-folds along (±1, 0, ±φ), (0, ±φ, ±1), (±φ, ±1, 0)
      with φ the golden ratio, so the 5-folds nearest +z lie in the xz plane; 3-folds along
      (±1, ±1, ±1) and (0, ±1/φ, ±φ) etc. ``I1`` (Heymann's "no-Crowther 222") is the same
      group turned by 90° about z: its 5-folds nearest +z lie in the yz plane.

    Generated by closure from the generators, so the result is closed under multiplication.
    Names are case-insensitive.
    """
    err = ValueError(f"unknown symmetry '{name}': use C1, Cn, Dn, T, O or I")
    if not isinstance(name, str):
        raise err
    s = name.strip().upper()
    if s[:1] in ("C", "D") and s[1:].isdigit() and int(s[1:]) >= 1:
        n = int(s[1:])
        gens = [rotation_z(360.0 / n)]
        if s[0] == "D":
            gens.append(rotation_x(180.0))
        return _closure(gens)
    if s == "T":
        return _closure(
            [rotation_z(180.0), rotation_x(180.0), axis_angle_to_matrix([1, 1, 1], 120.0)]
        )
    if s == "O":
        return _closure([rotation_z(90.0), axis_angle_to_matrix([1, 1, 1], 120.0)])
    if s in ("I", "I1", "I2"):
        gens = [
            rotation_z(180.0),
            rotation_x(180.0),
            axis_angle_to_matrix([1.0, 0.0, _GOLDEN], 72.0),
        ]
        G = _closure(gens)
        if s == "I1":
            Rz = rotation_z(90.0)
            G = _closure(list(Rz @ G @ Rz.T))
        return G
    raise err


def symmetry_min_distance_deg(R1, R2, group=None) -> np.ndarray:
    """``min over g in group of dist(R1, R2 g)`` in degrees; ``R1``, ``R2`` broadcast together.

    Two poses of a reference with symmetry ``group`` that differ by ``R -> R g`` are the same
    particle, so this is the angular error between poses of a symmetric object.
    """
    R1 = np.asarray(R1, dtype=np.float64)
    R2 = np.asarray(R2, dtype=np.float64)
    if group is None:
        return geodesic_distance_deg(R1, R2)
    G = np.asarray(group, dtype=np.float64)
    M = np.matmul(np.swapaxes(R1, -1, -2), R2)  # (..., 3, 3): R1ᵀ R2
    tr = np.einsum("...ij,gji->...g", M, G).max(axis=-1)  # max over g of tr(R1ᵀ R2 g)
    return _trace_to_deg(tr)


# A fixed, generic linear functional on 3x3 matrices: breaks ties between symmetry mates
# that are equally close to the identity, the same way every time.
_TIE_WEIGHTS = (
    np.sqrt(np.array([2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0, 23.0])).reshape(3, 3) % 1.0
)


def asymmetric_unit(R_grid, group, margin_deg: float = 0.0) -> np.ndarray:
    """Indices of the grid rotations that lie in the asymmetric unit of ``group``.

    ``R`` is kept when it is the closest to the identity of its symmetry mates ``{R g}``
    (largest trace; ties within 1e-9 broken by a fixed generic linear functional), i.e. it
    lies in the Dirichlet cell of the identity. A reference with that symmetry has
    ``(R g) A = R A``, so the kept rotations combined with the group stand for the whole
    grid, and about ``N / |G|`` of them are kept.

    Seams: ``so3_grid`` is closed under the icosahedral group, so for its subgroups (C1, C2,
    D2, T, I) the reduction is exact. For other groups the kept rotations on the two sides of
    a cell boundary do not interleave, and the reduced grid with the group reaches the grid's
    rotations only within about 1.1-1.35 x its covering radius (measured at steps 20-10°
    for C3, C4, C7, D5, D7, O). ``margin_deg > 0`` also keeps rotations at most that much
    farther from the identity than their closest mate, which closes the seams at the cost of
    a few duplicate poses: ``margin = covering radius / 3`` brings it to <= 1.0 x with
    1.1-1.7 x the rotations (C7 is the costliest), cheaper than refining the grid.
    Returns sorted int64 indices.
    """
    R = np.asarray(R_grid, dtype=np.float64).reshape(-1, 3, 3)
    G = np.asarray(group, dtype=np.float64)
    not_identity = [g for g in G if not np.allclose(g, np.eye(3), atol=1e-9)]
    tr0 = np.trace(R, axis1=1, axis2=2)
    if margin_deg > 0:
        trs = np.einsum("nij,gji->ng", R, np.asarray(not_identity).reshape(-1, 3, 3))  # (N, G-1)
        best = np.max(trs, axis=1, initial=-1.0)
        return np.flatnonzero(_trace_to_deg(tr0) <= _trace_to_deg(best) + float(margin_deg) + 1e-9)
    keep = np.ones(R.shape[0], dtype=bool)
    key0 = np.einsum("nij,ij->n", R, _TIE_WEIGHTS)
    for g in not_identity:
        Rg = R @ g  # (N, 3, 3)
        tr = np.trace(Rg, axis1=1, axis2=2)
        key = np.einsum("nij,ij->n", Rg, _TIE_WEIGHTS)
        tie = np.abs(tr0 - tr) <= 1e-9
        keep &= np.where(tie, key0 > key, tr0 > tr)
    return np.flatnonzero(keep)


# ----------------------------------------------------------------------------------------
# The optimised icosahedral grid behind so3_grid
# ----------------------------------------------------------------------------------------

_CONJ = np.array([1.0, -1.0, -1.0, -1.0])
_I_CELL_RADIUS = np.deg2rad(44.48)  # farthest rotation from the identity in its cell of I


def _qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of quaternions ``(..., 4)``: ``R(a b) = R(a) R(b)``."""
    w1, x1, y1, z1 = np.moveaxis(a, -1, 0)
    w2, x2, y2, z2 = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        axis=-1,
    )


def _positive_w(q: np.ndarray) -> np.ndarray:
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def _to_identity_cell(q: np.ndarray, qG: np.ndarray) -> np.ndarray:
    """For quaternions ``(M, 4)``: the mate ``q g`` closest to the identity, with ``w >= 0``."""
    W = np.abs(q @ (qG * _CONJ).T)  # (M, G): |w(q g)| = |q · conj(g)|
    return _positive_w(_qmul(q, qG[np.argmax(W, axis=1)]))


def _binned_nearest(S: np.ndarray, C: np.ndarray, h: float):
    """Nearest of the quaternions ``C`` (K, 4) to each of ``S`` (M, 4) by ``|q1·q2|``.

    Both sets have ``w >= 0``. Vector parts are binned in cubes of side ``h`` and each
    sample looks at the 27 cubes around its own, which is exact when its nearest candidate
    lies within chord distance ``h``. Returns (index into C, |dot|).
    """
    lo = np.minimum(S[:, 1:].min(axis=0), C[:, 1:].min(axis=0)) - h
    cs = np.floor((C[:, 1:] - lo) / h).astype(np.int64)
    ss = np.floor((S[:, 1:] - lo) / h).astype(np.int64)
    dims = np.maximum(cs.max(axis=0), ss.max(axis=0)) + 2
    cid = (cs[:, 0] * dims[1] + cs[:, 1]) * dims[2] + cs[:, 2]
    order = np.argsort(cid, kind="stable")
    cid_sorted = cid[order]
    sid = (ss[:, 0] * dims[1] + ss[:, 1]) * dims[2] + ss[:, 2]
    ucell, inv = np.unique(sid, return_inverse=True)
    inv = inv.reshape(-1)
    uc = np.stack(
        [ucell // (dims[1] * dims[2]), (ucell // dims[2]) % dims[1], ucell % dims[2]], axis=1
    )
    starts, counts = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                nb = ((uc[:, 0] + dx) * dims[1] + uc[:, 1] + dy) * dims[2] + uc[:, 2] + dz
                a = np.searchsorted(cid_sorted, nb, side="left")
                starts.append(a)
                counts.append(np.searchsorted(cid_sorted, nb, side="right") - a)
    starts = np.stack(starts, axis=1)  # (U, 27)
    counts = np.stack(counts, axis=1)  # (U, 27)
    pos = np.cumsum(counts, axis=1) - counts
    width = max(1, int(counts.sum(axis=1).max()))
    K = C.shape[0]
    table = np.full((ucell.size, width), K, dtype=np.int64)  # (U, width); K is a zero dummy
    rows = np.arange(ucell.size)
    for o in range(27):
        for j in range(int(counts[:, o].max(initial=0))):
            m = counts[:, o] > j
            table[rows[m], pos[m, o] + j] = order[starts[m, o] + j]
    Cpad = np.vstack([C, np.zeros((1, 4))])
    best = np.empty(S.shape[0], dtype=np.int64)
    dot = np.empty(S.shape[0], dtype=np.float64)
    chunk = max(1, (1 << 20) // width)
    for s0 in range(0, S.shape[0], chunk):
        t = table[inv[s0 : s0 + chunk]]  # (m, width)
        d = np.abs(np.einsum("mk,mlk->ml", S[s0 : s0 + chunk], Cpad[t]))
        a = np.argmax(d, axis=1)
        r = np.arange(t.shape[0])
        best[s0 : s0 + chunk] = t[r, a]
        dot[s0 : s0 + chunk] = d[r, a]
    return best, dot


@functools.lru_cache(maxsize=8)
def _icosahedral_grid_cached(n_free: int, rounds: int, samples_per_point: int) -> np.ndarray:
    qG = matrix_to_quaternion(symmetry_group("I"))  # (60, 4)
    ng = qG.shape[0]
    n = int(n_free)
    # start: the n super-Fibonacci points deepest inside the identity cell of I
    sf = super_fibonacci_quaternions(n * ng)
    W = np.abs(sf @ (qG * _CONJ).T)  # (60n, 60)
    depth = W[:, 0] - np.max(W[:, 1:], axis=1)  # >= 0 inside the cell
    P = _to_identity_cell(sf[np.argsort(-depth, kind="stable")[:n]], qG)  # (n, 4)

    samples = super_fibonacci_quaternions(samples_per_point * n)  # mapped into the cell below
    turns = super_fibonacci_quaternions(max(1, rounds))
    rho = 2.0 * np.cbrt(6.0 * np.pi * 3.0 / (n * ng))  # generous covering radius guess (rad)
    for it in range(rounds):
        S = _to_identity_cell(_qmul(turns[it], samples), qG)  # quasi-random, in the cell
        C = _positive_w(_qmul(P[:, None, :], qG[None]).reshape(-1, 4))  # (60n, 4), p-major
        reach = min(np.pi, _I_CELL_RADIUS + 1.5 * rho)
        cand = np.flatnonzero(C[:, 0] >= np.cos(reach / 2.0))
        h = 2.0 * np.sin(min(np.pi, 1.5 * rho) / 4.0)  # chord of 1.5 rho in the vector part
        idx, absdot = _binned_nearest(S, C[cand], h)
        ci = cand[idx]
        pi, gi = ci // ng, ci % ng
        rho = 2.0 * np.arccos(min(1.0, absdot.min()))
        Sp = _qmul(S, qG[gi] * _CONJ)  # each sample in the frame of its free point: s g⁻¹
        order = np.lexsort((absdot, pi))  # by point, farthest sample first
        first = np.searchsorted(pi[order], np.arange(n))
        has = np.bincount(pi, minlength=n) > 0
        far = Sp[order[np.minimum(first, order.size - 1)]]
        far *= np.where(np.sum(far * P, axis=1) < 0, -1.0, 1.0)[:, None]
        moved = P[has] + (0.5 / (1.0 + 0.1 * it)) * (far[has] - P[has])
        P[has] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    Q = _qmul(P[:, None, :], qG[None]).reshape(-1, 4)  # (60n, 4)
    Q.setflags(write=False)
    return Q


def _icosahedral_grid_quaternions(
    n_free: int, rounds: int = 60, samples_per_point: int = 60
) -> np.ndarray:
    """Quaternions ``(60 n_free, 4)`` of the optimised I-symmetric grid (a fresh copy)."""
    return _icosahedral_grid_cached(int(n_free), int(rounds), int(samples_per_point)).copy()
