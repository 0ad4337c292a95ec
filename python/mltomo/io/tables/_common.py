"""What every format shares: the particle record, ZXZ Euler angles, image-name templates,
the RELION table (conventions in :mod:`mltomo.io.tables`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from mltomo.geometry.rotations import matrix_to_euler, rotation_x, rotation_z


class TableFormatError(ValueError):
    """A particle table that cannot be read: the message is one line naming the file."""


def is_number(text: str) -> bool:
    """Whether ``text`` parses as a float."""
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ParticlePoses:
    """Particles of another program's table, already in mltomo's convention.

    A particle is the reference rotated actively by ``matrices[i]`` and then shifted by
    ``shifts_voxels[i]``: ``x_i(r) = a(Rᵀ(r − t))`` (see :mod:`mltomo.geometry`).
    """

    matrices: np.ndarray  # (N, 3, 3)
    shifts_voxels: np.ndarray  # (N, 3), (x, y, z)
    tags: np.ndarray  # (N,) int: the program's particle number (Dynamo tag, motl row 4, ...)
    coordinates: np.ndarray | None = None  # (N, 3) voxels in the tomogram, (x, y, z)
    tomograms: tuple | None = None  # (N,) str: tomogram number or name
    classes: np.ndarray | None = None  # (N,) int
    image_names: tuple | None = None  # (N,) str, when the table names its volumes
    missing_regions: tuple | None = None  # (N,) str in mltomo's syntax, "" where unknown

    def __len__(self) -> int:
        return int(self.matrices.shape[0])


# ----------------------------------------------------------------------------------------
# ZXZ Euler angles
# ----------------------------------------------------------------------------------------


def zxz_matrix(a, b, c) -> np.ndarray:
    """``Rz(a) Rx(b) Rz(c)`` with active right-handed axis rotations, degrees -> ``(..., 3, 3)``."""
    return rotation_z(a) @ rotation_x(b) @ rotation_z(c)


def zxz_angles(M) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`zxz_matrix`: ``(a, b, c)`` in degrees with ``M = Rz(a) Rx(b) Rz(c)``.

    ``b`` in [0, 180]; ``a``, ``c`` in (-180, 180]. ``c`` is read from the third row
    ``(sin b sin c, sin b cos c, cos b)``, then ``a`` and ``b`` from ``M Rz(c)ᵀ = Rz(a) Rx(b)``,
    which is well conditioned for every ``b``; at gimbal lock (``b`` = 0 or 180) ``c = 0``.
    """
    M = np.asarray(M, dtype=np.float64)
    m20, m21 = M[..., 2, 0], M[..., 2, 1]
    c = np.where(np.hypot(m20, m21) < 1e-12, 0.0, np.arctan2(m20, m21))
    cc, sc = np.cos(c), np.sin(c)
    # N = M Rz(c)^T = [[ca, -sa cb, sa sb], [sa, ca cb, -ca sb], [0, sb, cb]]
    n00 = M[..., 0, 0] * cc - M[..., 0, 1] * sc
    n10 = M[..., 1, 0] * cc - M[..., 1, 1] * sc
    n21 = M[..., 2, 0] * sc + M[..., 2, 1] * cc
    a = np.arctan2(n10, n00)
    b = np.arctan2(np.abs(n21), M[..., 2, 2])
    return _wrap(np.rad2deg(a)), np.rad2deg(b), _wrap(np.rad2deg(c))


def _wrap(deg: np.ndarray) -> np.ndarray:
    out = np.mod(deg + 180.0, 360.0) - 180.0
    return np.where(out <= -180.0, out + 360.0, out)


# ----------------------------------------------------------------------------------------
# Image names
# ----------------------------------------------------------------------------------------

_PRINTF = re.compile(r"%(?:0?\d+)?d")


def check_template(template: str) -> str:
    """A volume-name template: one printf integer field (``particle_%05d.em``, the particle
    number) or Python fields ``{tag}``, ``{index}`` (1-based row), ``{tomo}``."""
    if "{" in template:
        try:
            template.format(tag=1, index=1, tomo="1")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"--images {template!r}: fields must be {{tag}}, {{index}} or {{tomo}} ({exc})") from None
        return template
    fields = re.findall(r"%.", template.replace("%%", ""))
    if len(fields) != 1 or not _PRINTF.search(template):
        raise ValueError(f"--images {template!r}: needs one integer field such as %05d or {{tag}}")
    return template


def format_names(template: str, poses: ParticlePoses) -> list[str]:
    tomos = poses.tomograms or ("",) * len(poses)
    if "{" in template:
        return [template.format(tag=int(t), index=i + 1, tomo=tomos[i]) for i, t in enumerate(poses.tags)]
    return [template % int(t) for t in poses.tags]


# ----------------------------------------------------------------------------------------
# The RELION table
# ----------------------------------------------------------------------------------------


def to_dataframe(poses: ParticlePoses, voxel_size_angstrom: float | None, image_names: list[str],
                 tomo_names: dict | None = None):
    """The RELION/mltomo columns of the particles (``rlnOriginX/Y/ZAngst = t · voxel``)."""
    import pandas as pd

    rot, tilt, psi = matrix_to_euler(poses.matrices)
    t = np.asarray(poses.shifts_voxels, dtype=np.float64)
    vs = 1.0 if voxel_size_angstrom is None else float(voxel_size_angstrom)
    cols = {"rlnImageName": list(image_names)}
    if poses.tomograms is not None:
        names = tomo_names or {}
        cols["rlnTomoName"] = [names.get(k, k) for k in poses.tomograms]
    if poses.coordinates is not None:
        for j, ax in enumerate("XYZ"):
            cols[f"rlnCoordinate{ax}"] = poses.coordinates[:, j].astype(np.float64)
    cols.update(rlnAngleRot=np.atleast_1d(rot), rlnAngleTilt=np.atleast_1d(tilt), rlnAnglePsi=np.atleast_1d(psi))
    for j, ax in enumerate("XYZ"):
        cols[f"rlnOrigin{ax}Angst"] = t[:, j] * vs
    if poses.classes is not None:
        cols["rlnClassNumber"] = np.asarray(poses.classes, dtype=np.int64)
    if poses.missing_regions is not None and any(poses.missing_regions):
        cols["mltomoMissingRegion"] = list(poses.missing_regions)
    return pd.DataFrame(cols)


def from_dataframe(df, voxel_size_angstrom: float) -> ParticlePoses:
    """The inverse of :func:`to_dataframe` (for writers fed a RELION table); tags are the
    1-based row numbers."""
    from mltomo.geometry.rotations import euler_to_matrix

    A = euler_to_matrix(df["rlnAngleRot"].to_numpy(float), df["rlnAngleTilt"].to_numpy(float),
                        df["rlnAnglePsi"].to_numpy(float))
    t = df[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(float) / float(voxel_size_angstrom)
    coords = (df[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(float)
              if "rlnCoordinateX" in df.columns else None)
    return ParticlePoses(
        matrices=A, shifts_voxels=t, tags=np.arange(1, len(df) + 1), coordinates=coords,
        tomograms=tuple(df["rlnTomoName"].astype(str)) if "rlnTomoName" in df.columns else None,
        classes=df["rlnClassNumber"].to_numpy(np.int64) if "rlnClassNumber" in df.columns else None,
        image_names=tuple(df["rlnImageName"].astype(str)),
        missing_regions=(tuple(df["mltomoMissingRegion"].astype(str)) if "mltomoMissingRegion" in df.columns
                         else None),
    )


def check_finite(path, what: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if np.any(bad):
        row = int(np.argwhere(bad)[0][0]) + 1
        raise TableFormatError(f"{path}: particle {row}: {what} is not a finite number")


def region_string(kind: str, lo: float, hi: float) -> str:
    return f"{kind}:{lo:g}:{hi:g}"


def parse_region(text: str):
    """``(kind, lo, hi)`` of ``wedge_y:lo:hi`` / ``wedge_x:lo:hi``, ``("none", ...)``, or None."""
    fields = [f for f in re.split(r"[:\s]+", str(text).strip()) if f]
    if not fields:
        return None
    if fields[0].lower() == "none":
        return ("none", -90.0, 90.0)
    if fields[0].lower() in ("wedge_y", "wedge_x") and len(fields) == 3:
        try:
            return (fields[0].lower(), float(fields[1]), float(fields[2]))
        except ValueError:
            return None
    return None
