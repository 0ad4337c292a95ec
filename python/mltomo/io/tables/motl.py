"""Motive lists: the TOM/AV3 ``.em`` matrix (also written by PyTom, cryoCAT, STOPGAP) and
STOPGAP's ``.star`` motive list (conventions and sources in :mod:`mltomo.io.tables`).

The ``.em`` motive list is a 20 x N float matrix (``nx = 20`` values per particle, ``ny = N``,
``nz = 1``); rows used (1-based, ``av3_createmotl.m``): 1 CC, 4 particle number, 5 tomogram
number, 8-10 x y z, 11-13 x/y/z shift after rotation, 17 phi, 18 psi, 19 theta, 20 class.

STOPGAP's motive list is the STAR block ``data_stopgap_motivelist`` with the columns of
``sg_get_motl_fields.m``: motl_idx, tomo_num, object, subtomo_num, halfset, orig_x/y/z,
score, x_shift/y_shift/z_shift, phi, psi, the, class.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from mltomo.io.tables._common import ParticlePoses, TableFormatError, check_finite, zxz_angles, zxz_matrix

MOTL_ROWS = 20
DEFAULT_EM_IMAGES = "particle_%d.em"  # AV3: '<particlefilename>_<row 4>.em'
DEFAULT_STOPGAP_IMAGES = "subtomo_%d.mrc"  # STOPGAP: subtomograms/<subtomo_name>_<subtomo_num>.mrc
STOPGAP_BLOCK = "stopgap_motivelist"
STOPGAP_COLUMNS = ("motl_idx", "tomo_num", "object", "subtomo_num", "halfset", "orig_x", "orig_y", "orig_z",
                   "score", "x_shift", "y_shift", "z_shift", "phi", "psi", "the", "class")
_STOPGAP_INTS = ("motl_idx", "tomo_num", "object", "subtomo_num", "class")


def tom_matrix(phi, psi, theta) -> np.ndarray:
    """The active rotation template -> particle of TOM/AV3/STOPGAP/PyTom angles:
    ``Rz(psi) Rx(theta) Rz(phi)`` (``tom_rotatec.c``, ``sg_euler2matrix.m``)."""
    return zxz_matrix(psi, theta, phi)


def tom_angles(A) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`tom_matrix`: ``(phi, psi, theta)``."""
    psi, theta, phi = zxz_angles(A)
    return phi, psi, theta


def _poses(path, tags, tomos, xyz, shifts, phi, psi, theta, classes) -> ParticlePoses:
    check_finite(path, "an Euler angle", np.stack([phi, psi, theta], axis=1))
    check_finite(path, "a shift", shifts)
    tomo_keys = tuple(f"{v:g}" for v in tomos)
    return ParticlePoses(
        matrices=tom_matrix(phi, psi, theta), shifts_voxels=np.asarray(shifts, float),
        tags=np.round(tags).astype(np.int64), coordinates=np.asarray(xyz, float), tomograms=tomo_keys,
        classes=np.round(classes).astype(np.int64),
    )


# ----------------------------------------------------------------------------------------
# TOM/AV3 .em
# ----------------------------------------------------------------------------------------


def read_motl_em(path) -> ParticlePoses:
    """The particles of a TOM/AV3 ``.em`` motive list."""
    from mltomo.io.em import HEADER_BYTES, read_em_header

    path = Path(path)
    try:
        h = read_em_header(path)
    except ValueError as exc:
        raise TableFormatError(str(exc)) from None
    nz, ny, nx = h["shape"]
    if nx != MOTL_ROWS or nz != 1:
        raise TableFormatError(f"{path}: a motive list is a {MOTL_ROWS} x N matrix (20 values per particle), "
                               f"this EM file is {nx} x {ny} x {nz}")
    if h["dtype"].kind == "c":
        raise TableFormatError(f"{path}: EM file holds complex values, not a motive list")
    need = HEADER_BYTES + nx * ny * h["dtype"].itemsize
    if path.stat().st_size < need:
        raise TableFormatError(f"{path}: EM file is truncated ({path.stat().st_size} bytes, header says {need})")
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        m = np.fromfile(f, dtype=h["dtype"], count=nx * ny).astype(np.float64).reshape(ny, nx)  # (N, 20)
    row = lambda k: m[:, k - 1]  # noqa: E731 - 1-based rows, as TOM documents them
    return _poses(path, row(4), row(5), m[:, 7:10], m[:, 10:13], row(17), row(18), row(19), row(20))


def write_motl_em(path, poses: ParticlePoses, scores=None) -> None:
    """Write a 20 x N float32 TOM ``.em`` motive list (little-endian), atomically."""
    from mltomo.io.atomic import atomic_path

    n = len(poses)
    m = np.zeros((n, MOTL_ROWS), dtype=np.float32)  # (N, 20): x (fastest) is the motl row
    phi, psi, theta = tom_angles(poses.matrices)
    m[:, 0] = 0 if scores is None else scores
    m[:, 3] = poses.tags
    m[:, 4] = _numbers(poses.tomograms, n)
    if poses.coordinates is not None:
        m[:, 7:10] = poses.coordinates
    m[:, 10:13] = poses.shifts_voxels
    m[:, 16], m[:, 17], m[:, 18] = phi, psi, theta
    m[:, 19] = 1 if poses.classes is None else poses.classes
    header = (bytes([6, 0, 0, 5]) + struct.pack("<3i", MOTL_ROWS, n, 1) + b"mltomo motive list".ljust(80, b"\x00")
              + bytes(160) + bytes(256))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(m.astype("<f4").tobytes())


def _numbers(keys, n: int) -> np.ndarray:
    if keys is None:
        return np.ones(n)
    try:
        return np.array([float(k) for k in keys])
    except ValueError:
        order = {k: i + 1 for i, k in enumerate(dict.fromkeys(keys))}
        return np.array([order[k] for k in keys], dtype=float)


# ----------------------------------------------------------------------------------------
# STOPGAP .star
# ----------------------------------------------------------------------------------------


def is_stopgap_star(text: str) -> bool:
    return any(line.strip().startswith(f"data_{STOPGAP_BLOCK}") for line in text.splitlines())


def read_stopgap(path) -> ParticlePoses:
    """The particles of a STOPGAP ``.star`` motive list."""
    from mltomo.io.star import read_star

    path = Path(path)
    try:
        blocks = read_star(path)
    except ValueError as exc:
        raise TableFormatError(str(exc)) from None
    df = blocks.get(STOPGAP_BLOCK)
    if df is None or not hasattr(df, "columns"):
        raise TableFormatError(f"{path}: no data_{STOPGAP_BLOCK} loop (not a STOPGAP motive list)")
    need = ("subtomo_num", "x_shift", "y_shift", "z_shift", "phi", "psi", "the")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TableFormatError(f"{path}: STOPGAP motive list lacks column(s) {', '.join('_' + c for c in missing)}")
    if len(df) == 0:
        raise TableFormatError(f"{path}: no particles (an empty STOPGAP motive list)")

    def num(name, default=0.0):
        if name not in df.columns:
            return np.full(len(df), default)
        try:
            return df[name].to_numpy(np.float64)
        except (TypeError, ValueError):
            raise TableFormatError(f"{path}: column _{name} holds non-numbers") from None

    xyz = np.stack([num("orig_x"), num("orig_y"), num("orig_z")], axis=1)
    shifts = np.stack([num("x_shift"), num("y_shift"), num("z_shift")], axis=1)
    return _poses(path, num("subtomo_num"), num("tomo_num", 1.0), xyz, shifts, num("phi"), num("psi"),
                  num("the"), num("class", 1.0))


def write_stopgap(path, poses: ParticlePoses) -> None:
    """Write a STOPGAP motive list as ``stopgap_star_write.m`` does (bare column names, a blank
    line before the rows), atomically."""
    from mltomo.io.atomic import atomic_write_text

    n = len(poses)
    phi, psi, theta = tom_angles(poses.matrices)
    xyz = poses.coordinates if poses.coordinates is not None else np.zeros((n, 3))
    cols = {
        "motl_idx": np.arange(1, n + 1), "tomo_num": _numbers(poses.tomograms, n), "object": np.ones(n),
        "subtomo_num": poses.tags, "halfset": ["A" if int(t) % 2 else "B" for t in poses.tags],
        "orig_x": xyz[:, 0], "orig_y": xyz[:, 1], "orig_z": xyz[:, 2], "score": np.zeros(n),
        "x_shift": poses.shifts_voxels[:, 0], "y_shift": poses.shifts_voxels[:, 1],
        "z_shift": poses.shifts_voxels[:, 2], "phi": phi, "psi": psi, "the": theta,
        "class": np.ones(n) if poses.classes is None else poses.classes,
    }
    lines = ["", f"data_{STOPGAP_BLOCK}", "", "loop_", *(f"_{c}" for c in STOPGAP_COLUMNS), ""]
    for i in range(n):
        row = []
        for c in STOPGAP_COLUMNS:
            v = cols[c][i]
            row.append(v if c == "halfset" else f"{int(round(float(v)))}" if c in _STOPGAP_INTS else f"{float(v):.10g}")
        lines.append(" ".join(row))
    atomic_write_text(path, "\n".join(lines) + "\n")
