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
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "rotation_x",
    "rotation_y",
    "rotation_z",
    "random_rotations",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
]


# ----------------------------------------------------------------------------------------
# Euler angles and axis rotations
# ----------------------------------------------------------------------------------------


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's ``Euler_angles2matrix``: ZYZ angles in degrees -> rotation matrices.

    Scalars or arrays that broadcast together; returns float64 of shape ``(..., 3, 3)``.
    """
    a, b, g = np.broadcast_arrays(*(np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi)))
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
                [0.25 * r, (s[:, 2, 1] - s[:, 1, 2]) / r, (s[:, 0, 2] - s[:, 2, 0]) / r, (s[:, 1, 0] - s[:, 0, 1]) / r],
                axis=1,
            )
        elif k == 1:
            r = np.sqrt(np.maximum(1.0 + s[:, 0, 0] - s[:, 1, 1] - s[:, 2, 2], 0.0)) * 2.0  # 4x
            q[sel] = np.stack(
                [(s[:, 2, 1] - s[:, 1, 2]) / r, 0.25 * r, (s[:, 0, 1] + s[:, 1, 0]) / r, (s[:, 0, 2] + s[:, 2, 0]) / r],
                axis=1,
            )
        elif k == 2:
            r = np.sqrt(np.maximum(1.0 + s[:, 1, 1] - s[:, 0, 0] - s[:, 2, 2], 0.0)) * 2.0  # 4y
            q[sel] = np.stack(
                [(s[:, 0, 2] - s[:, 2, 0]) / r, (s[:, 0, 1] + s[:, 1, 0]) / r, 0.25 * r, (s[:, 1, 2] + s[:, 2, 1]) / r],
                axis=1,
            )
        else:
            r = np.sqrt(np.maximum(1.0 + s[:, 2, 2] - s[:, 0, 0] - s[:, 1, 1], 0.0)) * 2.0  # 4z
            q[sel] = np.stack(
                [(s[:, 1, 0] - s[:, 0, 1]) / r, (s[:, 0, 2] + s[:, 2, 0]) / r, (s[:, 1, 2] + s[:, 2, 1]) / r, 0.25 * r],
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
