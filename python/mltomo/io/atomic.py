"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every writer in :mod:`mltomo.io` writes to a temporary file in the destination's own directory
(so the final ``os.replace`` is a rename within one file system, which POSIX makes atomic) and
renames it over the destination only after the data were written, flushed and fsync'ed. If
anything fails, the temporary file is removed and the destination is left as it was.

Temporary files are named ``.<name>.<random>.tmp`` next to the destination and are created
with mode ``0o666`` minus the umask, so the final file has ordinary permissions.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_path(path):
    """Context manager yielding a temporary path to write; renamed onto ``path`` on success.

    The temporary file exists (empty) when the block starts, so libraries that open by name
    (``mrcfile.new(tmp, overwrite=True)``) can use it. On an exception in the block the
    temporary file is deleted and ``path`` is untouched. ``path`` must not be a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, cannot write a file there")
    for _ in range(16):
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
    else:  # pragma: no cover
        raise FileExistsError(f"{path}: could not create a unique temporary file")
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, str(tmp)):
            # A full disk or a file-size limit: name the file the user asked for, not the
            # temporary one (or none, as a failed write() does).
            raise type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))
