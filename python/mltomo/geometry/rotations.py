"""Rotations: Euler angles, axis rotations, quaternions, random rotations, distances
(conventions in :mod:`mltomo.geometry`)."""

from __future__ import annotations

import numpy as np

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


def axis_angle_to_matrix(axis, angle_deg) -> np.ndarray:
    """Active right-handed rotation by ``angle_deg`` about ``axis`` (..., 3) -> (..., 3, 3)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis, axis=-1, keepdims=True)
    half = 0.5 * np.deg2rad(np.asarray(angle_deg, dtype=np.float64))[..., None]
    return quaternion_to_matrix(np.concatenate([np.cos(half), np.sin(half) * axis], axis=-1))
