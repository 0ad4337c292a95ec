"""MRC/CCP4 volumes and stacks of volumes (via ``mrcfile``).

Volumes are returned as float32 arrays indexed ``[z, y, x]`` together with the voxel size in
Å read from the header (``cella / mx``; 0.0 when the header does not set it). A volume must
be cubic and finite: anything else raises :class:`~mltomo.io.FileFormatError` with a one-line
message naming the file.

Stacks of volumes (``.mrcs``)
    A stack of ``N`` volumes of ``n³`` is stored as MRC2014 prescribes for volume stacks:
    ``nx = ny = n``, ``nz = N·n`` sections, ``mz = n`` and space group ``ispg = 401``
    (this is what ``mrcfile`` writes for a 4-D array). The volume ``i`` (1-based, RELION's
    ``i@stack.mrcs``) is sections ``(i-1)·n … i·n-1``. For files written by other programs
    that did not set ``ispg = 401``, any MRC with ``nx = ny = n`` and ``nz = N·n`` (``N > 1``)
    is read as a stack of ``N`` cubic volumes when it is addressed as ``i@file``.
    A single volume may be addressed as ``1@file.mrc``.

Compressed files (``.mrc.gz``, ``.map.bz2``) are read transparently (``mrcfile.open``
detects the compression); writers always write uncompressed files.

Writers are atomic (see :mod:`mltomo.io.atomic`), write mode 2 (float32), set the voxel size
in the header, and refuse arrays they could not read back (non-cubic, NaN/inf).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mltomo.io.atomic import atomic_path

__all__ = ["read_stack_item", "read_volume", "stack_length", "write_stack", "write_volume"]


def _error(path, problem: str):
    from mltomo.io import FileFormatError

    return FileFormatError(f"{path}: {problem}")


def _open(path, mmap: bool = False):
    import mrcfile

    path = Path(path)
    if not path.exists():
        raise _error(path, "no such file")
    if path.is_dir():
        raise _error(path, "is a directory, not an MRC file")
    try:
        if mmap and path.suffix.lower() not in (".gz", ".bz2"):
            return mrcfile.mmap(path, mode="r", permissive=False)
        return mrcfile.open(path, mode="r", permissive=False)
    except (ValueError, EOFError) as exc:
        raise _error(path, f"not a readable MRC file ({_first_line(exc)})") from None
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from None


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _voxel_size(mrc) -> float:
    vs = mrc.voxel_size
    v = float(vs.x)
    return v if np.isfinite(v) and v > 0 else 0.0


def _as_volume(path, data, what: str = "volume", cubic: bool = True) -> np.ndarray:
    if np.iscomplexobj(data):
        raise _error(path, f"{what} holds complex values, expected a real density")
    vol = np.array(data, dtype=np.float32, copy=True, order="C")  # (n, n, n) own buffer
    if vol.ndim != 3:
        raise _error(path, f"{what} is {vol.ndim}-D with shape {vol.shape}, expected 3-D")
    if cubic and len(set(vol.shape)) != 1:
        nz, ny, nx = vol.shape
        hint = ""
        if nx == ny and nz > nx and nz % nx == 0:
            hint = f"; if it is a stack of {nz // nx} volumes, name one as i@{Path(path).name}"
        raise _error(path, f"{what} is not cubic (nx={nx}, ny={ny}, nz={nz}){hint}")
    if not np.all(np.isfinite(vol)):
        bad = int(np.count_nonzero(~np.isfinite(vol)))
        raise _error(path, f"{what} contains {bad} NaN or infinite voxels")
    return vol


def read_volume(path, cubic: bool = True) -> tuple[np.ndarray, float]:
    """One cubic volume: ``(vol float32 [z, y, x], voxel_size_angstrom)``.

    A volume stack holding exactly one volume is accepted; a longer stack raises an error
    asking for ``i@file``. ``cubic=False`` accepts any 3-D shape (weight volumes).
    """
    path = Path(path)
    with _open(path) as mrc:
        data = mrc.data
        if data is None:
            raise _error(path, "holds no data")
        if data.ndim == 4:
            if data.shape[0] != 1:
                raise _error(path, f"is a stack of {data.shape[0]} volumes; name one as i@{path.name}")
            data = data[0]
        vol = _as_volume(path, data, cubic=cubic)
        return vol, _voxel_size(mrc)


def _stack_view(path, mrc):
    """The file's data as ``(N, n, n, n)`` (a view) or an error."""
    data = mrc.data
    if data is None:
        raise _error(path, "holds no data")
    if data.ndim == 4:
        return data
    if data.ndim == 3:
        nz, ny, nx = data.shape
        if nx == ny and nz % nx == 0:
            return data.reshape(nz // nx, nx, nx, nx)
        raise _error(path, f"is not a stack of cubic volumes (nx={nx}, ny={ny}, nz={nz})")
    raise _error(path, f"is {data.ndim}-D, not a stack of volumes")


def stack_length(path) -> int:
    """Number of cubic volumes in an MRC (volume) stack."""
    path = Path(path)
    with _open(path, mmap=True) as mrc:
        return int(_stack_view(path, mrc).shape[0])


def read_stack_item(path, index1: int) -> tuple[np.ndarray, float]:
    """Volume ``index1`` (1-based, as in RELION's ``index1@stack.mrcs``) of a volume stack.

    The file is memory-mapped, so only the requested volume is read.
    """
    path = Path(path)
    i = int(index1)
    if i != index1 or i < 1:
        raise _error(path, f"stack index {index1!r} must be an integer >= 1 (1-based)")
    with _open(path, mmap=True) as mrc:
        stack = _stack_view(path, mrc)
        if i > stack.shape[0]:
            raise _error(path, f"asked for volume {i} but the stack holds {stack.shape[0]}")
        vol = _as_volume(path, stack[i - 1], what=f"volume {i}")
        return vol, _voxel_size(mrc)


def _check_writable(path: Path) -> None:
    if path.suffix.lower() in (".gz", ".bz2"):
        raise _error(path, "writing compressed MRC files is not supported; drop the " + path.suffix)


def _check_voxel(voxel_size_angstrom) -> float:
    v = float(voxel_size_angstrom)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"voxel size must be a finite number >= 0 Å, got {voxel_size_angstrom!r}")
    return v


def write_volume(path, vol, voxel_size_angstrom: float) -> None:
    """Write one cubic, finite volume ``[z, y, x]`` as float32 MRC, atomically."""
    import mrcfile

    path = Path(path)
    _check_writable(path)
    arr = _as_volume(path, np.asarray(vol))
    v = _check_voxel(voxel_size_angstrom)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(arr)
        mrc.voxel_size = v
        mrc.update_header_stats()


def write_stack(path, vols, voxel_size_angstrom: float) -> None:
    """Write ``N`` cubic volumes (array ``(N, n, n, n)`` or a list) as an MRC volume stack.

    The file is an MRC2014 volume stack (``ispg = 401``, ``nz = N·n``, ``mz = n``); volume
    ``i`` is then addressed as ``i@path`` (1-based).
    """
    import mrcfile

    path = Path(path)
    _check_writable(path)
    if isinstance(vols, np.ndarray):
        arrs = [vols[i] for i in range(vols.shape[0])] if vols.ndim == 4 else None
        if arrs is None:
            raise _error(path, f"write_stack needs (N, n, n, n) volumes, got shape {vols.shape}")
    else:
        arrs = list(vols)
    if not arrs:
        raise _error(path, "write_stack needs at least one volume")
    checked = [_as_volume(path, np.asarray(a), what=f"volume {i + 1}") for i, a in enumerate(arrs)]
    if len({a.shape for a in checked}) != 1:
        raise _error(path, "volumes of a stack must all have the same size")
    stack = np.stack(checked)  # (N, n, n, n)
    v = _check_voxel(voxel_size_angstrom)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(stack)
        mrc.voxel_size = v
        mrc.update_header_stats()


def is_mrc(path) -> bool:
    """True if ``path`` starts like an MRC2014 file (map ID ``MAP `` at byte 208)."""
    try:
        with open(path, "rb") as f:
            f.seek(208)
            return f.read(4) in (b"MAP ", b"MAP\x00")
    except OSError:
        return False

