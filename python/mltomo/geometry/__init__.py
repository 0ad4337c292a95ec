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

from mltomo.geometry.grids import (
    covering_radius_deg,
    grid_report,
    healpix_grid,
    healpix_pix2ang,
    local_subset,
    perturb,
    so3_grid,
    so3_grid_size,
    super_fibonacci_quaternions,
)
from mltomo.geometry.rotations import (
    axis_angle_to_matrix,
    euler_to_matrix,
    geodesic_distance_deg,
    matrix_to_euler,
    matrix_to_quaternion,
    min_distance_deg,
    quaternion_to_matrix,
    random_rotations,
    rotation_x,
    rotation_y,
    rotation_z,
)
from mltomo.geometry.symmetry import asymmetric_unit, symmetry_group, symmetry_min_distance_deg

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
