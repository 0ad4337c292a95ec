"""Reading and writing volumes (MRC, TOM ``.em``) and RELION STAR tables.

Every reader returns float32 volumes indexed ``[z, y, x]`` with the voxel size in Å (0.0 when
the file does not say), and raises :class:`FileFormatError` -- a ``ValueError`` whose message is
one line naming the file and the problem -- for a missing file, a file of the wrong format, a
non-cubic volume, NaN/inf voxels, a stack index out of range. Every writer is atomic (a
temporary file in the same directory, then ``os.replace``) and never modifies its inputs.

Dispatch on the name: ``.mrc``, ``.mrcs``, ``.map``, ``.rec``, ``.ccp4`` (optionally ``.gz`` or
``.bz2``) are MRC; ``.em`` is TOM/AV3; ``i@stack.mrcs`` is volume ``i`` (1-based) of a stack
(see :mod:`mltomo.io.mrc` for the stack layout). Other extensions are read as MRC if the file
carries the MRC map ID.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "FileFormatError",
    "read_star",
    "read_volume",
    "read_volume_any",
    "resolve_image_name",
    "write_star",
    "write_volume",
]

MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".rec", ".ccp4", ".st", ".ali")
EM_SUFFIXES = (".em",)


class FileFormatError(ValueError):
    """A file is missing, unreadable or not what it should be; the message names the file."""


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in EM_SUFFIXES:
        return "em"
    if ext in MRC_SUFFIXES:
        return "mrc"
    return "unknown"


def read_volume(path_or_name) -> tuple:
    """Read one volume by file name or ``i@stack`` name: ``(vol float32 [z,y,x], voxel Å)``."""
    return read_volume_any(path_or_name, None)


def read_volume_any(path_or_name, star_dir=None, cubic: bool = True) -> tuple:
    """Read the volume an image name points to, resolved against ``star_dir`` (see
    :func:`mltomo.io.star.resolve_image_name`): ``(vol float32 [z, y, x], voxel Å)``;
    ``cubic=False`` (weight volumes) accepts any 3-D shape of a single MRC volume."""
    from mltomo.io import em, mrc
    from mltomo.io.star import resolve_image_name

    path, index1 = resolve_image_name(path_or_name, star_dir)
    if not path.exists():
        named = str(path_or_name).strip()
        where = f" (image {named} named relative to {star_dir})" if star_dir is not None and named != str(path) else ""
        raise FileFormatError(f"{path}: no such file{where}")
    kind = _kind(path)
    if kind == "unknown":
        if mrc.is_mrc(path):
            kind = "mrc"
        else:
            raise FileFormatError(
                f"{path}: unknown volume format (expected .mrc, .mrcs, .map, .rec or .em)"
            )
    if kind == "em":
        if index1 not in (None, 1):
            raise FileFormatError(f"{path}: .em files hold one volume, cannot read volume {index1}")
        return em.read_em(path)
    if index1 is None:
        return mrc.read_volume(path, cubic=cubic)
    return mrc.read_stack_item(path, index1)


def write_volume(path, vol, voxel_size_angstrom: float) -> None:
    """Write one cubic volume atomically: ``.em`` as TOM/AV3, anything else as MRC."""
    from mltomo.io import em, mrc

    if _kind(Path(path)) == "em":
        em.write_em(path, vol, voxel_size_angstrom)
    else:
        mrc.write_volume(path, vol, voxel_size_angstrom)


def read_star(path) -> dict:
    """All blocks of a STAR file, see :func:`mltomo.io.star.read_star`."""
    from mltomo.io.star import read_star as _read

    return _read(path)


def write_star(path, blocks: dict, float_format: str = "%.10g") -> None:
    """Write STAR blocks atomically, see :func:`mltomo.io.star.write_star`."""
    from mltomo.io.star import write_star as _write

    _write(path, blocks, float_format=float_format)


def resolve_image_name(name, star_dir=None):
    """``(path, index1 or None)``, see :func:`mltomo.io.star.resolve_image_name`."""
    from mltomo.io.star import resolve_image_name as _resolve

    return _resolve(name, star_dir)
