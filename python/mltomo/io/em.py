"""TOM/AV3 ``.em`` volumes (the EM format of Hegerl 1996).

Layout (512-byte header, then the voxels with ``x`` fastest, i.e. C order ``[z, y, x]``)::

    byte  0        machine code: 6 = PC (little-endian); 0 = OS-9, 3 = SGI, 5 = Mac (big-endian)
    byte  1        general purpose (0)
    byte  2        unused (0)
    byte  3        data type: 1 int8, 2 int16, 4 int32, 5 float32, 8 complex64, 9 float64
    bytes 4-15     int32 nx, ny, nz
    bytes 16-95    80-byte comment
    bytes 96-255   40 int32 parameters ``emdata``
    bytes 256-511  256 bytes of user data

Voxel size: TOM keeps the object pixel size in ``emdata[6]`` (the 7th parameter,
``Header.Objectpixelsize`` in ``tom_emread``) multiplied by 1000, as an integer. mltomo reads
``emdata[6] / 1000`` as the voxel size in Å (0.0 when unset) and writes
``round(voxel_size_angstrom · 1000)`` there, so voxel sizes survive to 0.001 Å.

Machine codes 1 (VAX) and 2 (Convex) use non-IEEE floats and are refused, as are complex data.
The writer always writes little-endian float32 (machine code 6, type 5), atomically.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from mltomo.io.atomic import atomic_path

__all__ = ["read_em", "write_em"]

HEADER_BYTES = 512
VOXEL_PARAM = 6  # emdata index of the object pixel size (x 1000)

_DTYPES = {1: "i1", 2: "i2", 4: "i4", 5: "f4", 8: "c8", 9: "f8"}
_ENDIAN = {6: "<", 0: ">", 3: ">", 5: ">"}


def _error(path, problem: str):
    from mltomo.io import FileFormatError

    return FileFormatError(f"{path}: {problem}")


def read_em_header(path) -> dict:
    """The parsed header: machine, dtype (numpy, with byte order), shape ``(nz, ny, nx)``,
    comment, ``emdata`` (40 ints) and the voxel size in Å."""
    path = Path(path)
    if not path.exists():
        raise _error(path, "no such file")
    if path.is_dir():
        raise _error(path, "is a directory, not an EM file")
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(head) < HEADER_BYTES:
        raise _error(path, f"not an EM file (only {len(head)} bytes, the header alone is 512)")
    machine, dtype_code = head[0], head[3]
    if machine not in _ENDIAN:
        if machine in (1, 2):
            raise _error(path, f"EM machine code {machine} (VAX/Convex floats) is not supported")
        raise _error(path, f"not an EM file (machine code byte is {machine}, expected 0, 3, 5 or 6)")
    if dtype_code not in _DTYPES:
        raise _error(path, f"not an EM file (data type code {dtype_code} is not one of 1, 2, 4, 5, 8, 9)")
    e = _ENDIAN[machine]
    nx, ny, nz = struct.unpack(e + "3i", head[4:16])
    if min(nx, ny, nz) < 1:
        raise _error(path, f"not an EM file (dimensions {nx} x {ny} x {nz})")
    emdata = struct.unpack(e + "40i", head[96:256])
    comment = head[16:96].split(b"\x00", 1)[0].decode("latin-1").rstrip()
    vs = emdata[VOXEL_PARAM] / 1000.0
    return {
        "machine": machine,
        "dtype": np.dtype(e + _DTYPES[dtype_code]),
        "shape": (nz, ny, nx),
        "comment": comment,
        "emdata": emdata,
        "voxel_size_angstrom": vs if vs > 0 else 0.0,
    }


def read_em(path) -> tuple[np.ndarray, float]:
    """One cubic volume from an ``.em`` file: ``(vol float32 [z, y, x], voxel_size_angstrom)``."""
    path = Path(path)
    h = read_em_header(path)
    dtype, shape = h["dtype"], h["shape"]
    count = int(np.prod(shape))
    need = HEADER_BYTES + count * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise _error(path, f"EM file is truncated ({size} bytes, header says {need})")
    if dtype.kind == "c":
        raise _error(path, "EM file holds complex values, expected a real density")
    nz, ny, nx = shape
    if not nx == ny == nz:
        raise _error(path, f"volume is not cubic (nx={nx}, ny={ny}, nz={nz})")
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        data = np.fromfile(f, dtype=dtype, count=count)
    vol = data.astype(np.float32).reshape(shape)  # (nz, ny, nx), native order
    if not np.all(np.isfinite(vol)):
        bad = int(np.count_nonzero(~np.isfinite(vol)))
        raise _error(path, f"volume contains {bad} NaN or infinite voxels")
    return vol, h["voxel_size_angstrom"]


def write_em(path, vol, voxel_size_angstrom: float, comment: str = "mltomo", big_endian: bool = False) -> None:
    """Write a cubic, finite volume ``[z, y, x]`` as float32 ``.em``, atomically.

    ``big_endian=True`` writes machine code 5 (Mac, big-endian); it exists to test readers.
    """
    path = Path(path)
    arr = np.asarray(vol)
    if arr.ndim != 3 or len(set(arr.shape)) != 1:
        raise _error(path, f"volume must be 3-D and cubic, got shape {arr.shape}")
    if np.iscomplexobj(arr) or not np.all(np.isfinite(arr)):
        raise _error(path, "volume must be real and finite")
    v = float(voxel_size_angstrom)
    if not np.isfinite(v) or v < 0 or v * 1000.0 > 2**31 - 1:
        raise ValueError(f"voxel size must be finite, >= 0 and < 2e6 Å, got {voxel_size_angstrom!r}")
    e = ">" if big_endian else "<"
    nz, ny, nx = arr.shape
    emdata = [0] * 40
    emdata[VOXEL_PARAM] = round(v * 1000.0)
    text = comment.encode("latin-1", errors="replace")[:80].ljust(80, b"\x00")
    header = (
        bytes([5 if big_endian else 6, 0, 0, 5])
        + struct.pack(e + "3i", nx, ny, nz)
        + text
        + struct.pack(e + "40i", *emdata)
        + bytes(256)
    )
    assert len(header) == HEADER_BYTES
    data = np.ascontiguousarray(arr, dtype=np.dtype(e + "f4"))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(data.tobytes())
