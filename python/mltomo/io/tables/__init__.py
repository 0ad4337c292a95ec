"""Other programs' particle tables -> mltomo's RELION-style STAR table, and back.

Every reader returns a :class:`ParticlePoses` in mltomo's convention (:mod:`mltomo.geometry`):
a particle is the reference rotated actively by ``A`` and then shifted by ``t`` voxels,
``x(r) = a(Aᵀ(r − t))``; the STAR table gets ``rlnAngleRot/Tilt/Psi = matrix_to_euler(A)``
(RELION's ZYZ) and ``rlnOriginX/Y/ZAngst = t · voxel size``. Active axis rotations
``Rz(θ)``, ``Rx(θ)`` are right-handed (``Rz(90°)`` takes x to y). Volumes are read in the same
axes by every program here (x fastest in the file).

Dynamo ``.tbl`` (``tdrot tilt narot`` in columns 7-9, ``dx dy dz`` in 4-6)
    ``A = Rz(−tdrot) Rx(−tilt) Rz(−narot)``, the transpose of
    ``dynamo_euler2matrix = Rz(narot) Rx(tilt) Rz(tdrot)``; ``t = (dx, dy, dz)``.
    Sources: the Dynamo wiki "Euler angles convention" (ZXZ; tdrot, tilt, narot turn the
    template *clockwise* about z, the new x, the new z, "the rotation that we need to operate
    on the template in order to align it with the particle") and "Table convention" (columns;
    "x shift from center"); the matrix of ``dynamo_euler2matrix.m`` as transcribed in several
    public converters; teamtomo ``eulerangles`` (``tests/test_conversions.py``: Dynamo
    ``(-47.273, 1.1777, -132.3)`` = RELION ``(137.7, 1.1777, 42.727)``) and ``dynamo2m``
    (``tests/test_dynamo2warp.py``, checked against Warp): RELION ``rot = narot − 90``,
    ``psi = tdrot + 90``; STOPGAP's ``sg_motl_dynamo_to_stopgap.m`` (after Dynamo's
    ``dynamo__motl2table.m``) and cryoCAT's ``DynamoMotl``: ``phi = −narot``, ``psi = −tdrot``,
    ``theta = −tilt`` with the TOM convention below -- all the same ``A``. The tilt range is
    column 14-15 (ymintilt, ymaxtilt) when column 13 (ftype) is 1 (``wedge_y``), ``none`` for
    ftype 0; other ftypes are not translated.

TOM / AV3 / STOPGAP / PyTom (``phi, psi, theta``)
    ``A = Rz(psi) Rx(theta) Rz(phi)``, ``t`` = the motive list's shift (rows 11-13, "shift
    in subvolume AFTER rotation of template"). Sources: ``tom_rotatec.c`` (TOM toolbox) states
    this matrix and resamples ``out(r) = in(Aᵀ r)``, an active rotation by ``A``;
    ``av3_average_exact.m`` and STOPGAP's ``parallel_average.m`` align a particle with
    ``rotate(shift(particle, −t), [−psi, −phi, −theta])``, the inverse of rotating the template
    by ``[phi, psi, theta]`` and shifting by ``t``; STOPGAP's ``sg_euler2matrix.m`` writes the
    same product explicitly; cryoCAT's ``RelionMotl`` converts to RELION with the same ``A``.
    PyTom's ``ParticleList.fromMOTL/toMOTL`` map ``Rotation Z1, Z2, X`` to motl rows 17, 18,
    19 (phi, psi, theta) and ``Shift`` to rows 11-13 unchanged, and its ``average`` undoes a
    particle with ``[−Z2, −Z1, −X]`` after ``−Shift``, so PyTom is the TOM convention.

Coordinates (``rlnCoordinateX/Y/Z``) are copied (TOM, Dynamo, STOPGAP count from 1); PyTom's
``PickPosition`` counts from 0 (``fromMOTL`` subtracts 1), so 1 is added. PyTom's
``SingleTiltWedge Angle1/Angle2`` are the half-openings of the missing wedge: the tilt range is
``−(90 − Angle1) .. 90 − Angle2`` (which of the two angles is the negative side is not stated
by PyTom; symmetric ranges are unaffected). The sign of an asymmetric Dynamo tilt range is
taken as written.

Note: mltomo's ``rlnOriginX/Y/ZAngst`` is ``+t`` (SPEC §1); cryoCAT documents RELION's own
origin as the opposite sign (``shift_x = −rlnOriginX``).
"""

from __future__ import annotations

from pathlib import Path

from mltomo.io.tables._common import (
    ParticlePoses,
    TableFormatError,
    check_template,
    format_names,
    from_dataframe,
    is_number,
    to_dataframe,
    zxz_angles,
    zxz_matrix,
)

__all__ = [
    "FORMATS",
    "ParticlePoses",
    "TableFormatError",
    "check_template",
    "default_images",
    "detect_format",
    "format_names",
    "from_dataframe",
    "read_table",
    "to_dataframe",
    "write_table",
    "zxz_angles",
    "zxz_matrix",
]

FORMATS = ("dynamo", "motl", "stopgap", "pytom")


def detect_format(path) -> str:
    """``dynamo`` (``.tbl``), ``motl`` (``.em``), ``pytom`` (``.xml``), ``stopgap`` (a ``.star``
    with ``data_stopgap_motivelist``); other names by their content."""
    path = Path(path)
    if not path.exists():
        raise TableFormatError(f"{path}: no such file")
    if not path.is_file():
        raise TableFormatError(f"{path}: is not a file")
    ext = path.suffix.lower()
    if ext in (".tbl", ".em", ".xml"):
        return {".tbl": "dynamo", ".em": "motl", ".xml": "pytom"}[ext]
    with path.open("rb") as f:
        head = f.read(4096)
    if ext == ".star" or b"data_" in head:
        from mltomo.io.tables.motl import is_stopgap_star

        if is_stopgap_star(path.read_text(encoding="utf-8", errors="replace")):
            return "stopgap"
        raise TableFormatError(f"{path}: a STAR file without data_stopgap_motivelist (a RELION table needs no "
                               "import: give it to mltomo refine directly)")
    if head[:1] in (b"\x00", b"\x03", b"\x05", b"\x06") and len(head) >= 4 and head[3] in (1, 2, 4, 5, 9):
        return "motl"
    if head.lstrip().startswith(b"<"):
        return "pytom"
    first = next((ln for ln in head.decode("utf-8", "replace").splitlines() if ln.strip()), "")
    if first and all(is_number(f) for f in first.split()):
        return "dynamo"
    raise TableFormatError(f"{path}: unknown table format (expected a Dynamo .tbl, a TOM/AV3 .em motive list, "
                           "a STOPGAP .star or a PyTom .xml; or give --format)")


def read_table(path, fmt: str = "auto") -> ParticlePoses:
    """Read a particle table of format ``fmt`` (``auto``: :func:`detect_format`)."""
    from mltomo.io.tables import dynamo, motl, pytom

    if fmt == "auto":
        fmt = detect_format(path)
    readers = {"dynamo": dynamo.read_dynamo, "motl": motl.read_motl_em, "stopgap": motl.read_stopgap,
               "pytom": pytom.read_pytom}
    if fmt not in readers:
        raise ValueError(f"unknown table format {fmt!r} (one of {', '.join(FORMATS)})")
    return readers[fmt](path)


def write_table(path, fmt: str, poses: ParticlePoses) -> None:
    """Write ``poses`` as format ``fmt`` (used to test the readers and to export)."""
    from mltomo.io.tables import dynamo, motl, pytom

    writers = {"dynamo": dynamo.write_dynamo, "motl": motl.write_motl_em, "stopgap": motl.write_stopgap,
               "pytom": pytom.write_pytom}
    if fmt not in writers:
        raise ValueError(f"unknown table format {fmt!r} (one of {', '.join(FORMATS)})")
    writers[fmt](path, poses)


def default_images(fmt: str) -> str | None:
    """The volume names a format implies when the table does not name its volumes."""
    from mltomo.io.tables import dynamo, motl

    return {"dynamo": dynamo.DEFAULT_IMAGES, "motl": motl.DEFAULT_EM_IMAGES,
            "stopgap": motl.DEFAULT_STOPGAP_IMAGES, "pytom": "particle_%d.em"}[fmt]
