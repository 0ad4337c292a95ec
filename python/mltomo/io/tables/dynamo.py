"""Dynamo ``.tbl`` tables (whitespace text, one particle a line; conventions and sources in
:mod:`mltomo.io.tables`).

Columns used (1-based, Dynamo's ``dthelp``): 1 tag, 4-6 dx dy dz (voxels), 7-9 tdrot tilt
narot (degrees), 13 ftype, 14-15 ymintilt ymaxtilt, 16-17 xmintilt xmaxtilt, 20 tomo,
22 class, 24-26 x y z.
"""

from __future__ import annotations

import numpy as np

from mltomo.io.tables._common import (
    ParticlePoses,
    TableFormatError,
    check_finite,
    is_number,
    parse_region,
    region_string,
    zxz_angles,
    zxz_matrix,
)

MIN_COLUMNS = 26
WRITE_COLUMNS = 35
DEFAULT_IMAGES = "particle_%05d.em"  # Dynamo's data folder: particle_00001.em, by tag


def dynamo_matrix(tdrot, tilt, narot) -> np.ndarray:
    """The active rotation template -> particle of Dynamo's angles: ``Rz(-tdrot) Rx(-tilt) Rz(-narot)``,
    i.e. the transpose of ``dynamo_euler2matrix([tdrot, tilt, narot]) = Rz(narot) Rx(tilt) Rz(tdrot)``."""
    return zxz_matrix(-np.asarray(tdrot, float), -np.asarray(tilt, float), -np.asarray(narot, float))


def dynamo_angles(A) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`dynamo_matrix`: ``(tdrot, tilt, narot)``."""
    narot, tilt, tdrot = zxz_angles(np.swapaxes(np.asarray(A, float), -1, -2))
    return tdrot, tilt, narot


def _parse(path, text: str) -> np.ndarray:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith(("#", "%")):
            continue
        if len(fields) < MIN_COLUMNS:
            raise TableFormatError(f"{path}: line {lineno} has {len(fields)} columns, a Dynamo table row "
                                   f"needs at least {MIN_COLUMNS} (tag ... x y z)")
        try:
            rows.append([float(f) for f in fields[:MIN_COLUMNS]])
        except ValueError:
            bad = next(i for i, f in enumerate(fields[:MIN_COLUMNS]) if not is_number(f))
            raise TableFormatError(f"{path}: line {lineno}, column {bad + 1}: {fields[bad]!r} "
                                   "is not a number") from None
    if not rows:
        raise TableFormatError(f"{path}: no particles (an empty Dynamo table)")
    return np.asarray(rows, dtype=np.float64)  # (N, 26)


def _region(ftype: float, ymin: float, ymax: float) -> str:
    if ftype == 0:
        return "none"
    if ftype == 1:
        return region_string("wedge_y", ymin, ymax)
    return ""  # other Fourier sampling types: not translated (the command line's --missing applies)


def read_dynamo(path, text: str | None = None) -> ParticlePoses:
    """The particles of a Dynamo table."""
    if text is None:
        text = read_text(path)
    t = _parse(path, text)
    col = lambda k: t[:, k - 1]  # noqa: E731 - 1-based, as Dynamo documents them
    check_finite(path, "an Euler angle (columns 7-9)", t[:, 6:9])
    check_finite(path, "a shift (columns 4-6)", t[:, 3:6])
    tags = col(1)
    if np.any(tags != np.round(tags)):
        raise TableFormatError(f"{path}: column 1 (tag) must hold integers")
    return ParticlePoses(
        matrices=dynamo_matrix(col(7), col(8), col(9)),
        shifts_voxels=t[:, 3:6].copy(),
        tags=tags.astype(np.int64),
        coordinates=t[:, 23:26].copy(),
        tomograms=tuple(f"{v:g}" for v in col(20)),
        classes=np.round(col(22)).astype(np.int64),
        missing_regions=tuple(_region(f, a, b) for f, a, b in zip(col(13), col(14), col(15))),
    )


def read_text(path) -> str:
    """A text file's content; a missing, unreadable or binary file is a :class:`TableFormatError`."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise TableFormatError(f"{p}: no such file" if not p.exists() else f"{p}: is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TableFormatError(f"{p}: not a text table (binary content)") from None
    except OSError as exc:
        raise TableFormatError(f"{p}: cannot be read ({exc.strerror or exc})") from None


def _tomo_numbers(poses: ParticlePoses) -> np.ndarray:
    if poses.tomograms is None:
        return np.ones(len(poses))
    try:
        return np.array([float(k) for k in poses.tomograms])
    except ValueError:
        order = {k: i + 1 for i, k in enumerate(dict.fromkeys(poses.tomograms))}
        return np.array([order[k] for k in poses.tomograms], dtype=float)


def write_dynamo(path, poses: ParticlePoses) -> None:
    """Write a 35-column Dynamo table (aligned and averaged flags set), atomically."""
    from mltomo.io.atomic import atomic_write_text

    n = len(poses)
    t = np.zeros((n, WRITE_COLUMNS))  # (N, 35)
    tdrot, tilt, narot = dynamo_angles(poses.matrices)
    t[:, 0] = poses.tags
    t[:, 1:3] = 1
    t[:, 3:6] = poses.shifts_voxels
    t[:, 6], t[:, 7], t[:, 8] = tdrot, tilt, narot
    t[:, 13:17] = (-90, 90, -90, 90)
    for i, text in enumerate(poses.missing_regions or ("",) * n):
        region = parse_region(text)
        if region is not None and region[0] == "wedge_y":
            t[i, 12], t[i, 13], t[i, 14] = 1, region[1], region[2]
    t[:, 19] = _tomo_numbers(poses)
    t[:, 21] = 1 if poses.classes is None else poses.classes
    if poses.coordinates is not None:
        t[:, 23:26] = poses.coordinates
    lines = [" ".join(f"{v:.10g}" for v in row) for row in t]
    atomic_write_text(path, "\n".join(lines) + "\n")
