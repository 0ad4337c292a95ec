"""Particle spectra that do not fit in memory (issue 13, item 4): a memory-mapped cache on disk.

A run holds each particle's half spectrum once, ``(N_local, n, n, n//2+1)`` complex64
(10,000 particles of 64³: 10.8 GB). With a memory budget (``--memory-budget``) smaller than
that, :func:`allocate` puts the array in a temporary file instead (``--cache-dir``, default the
output directory; the file is unlinked as soon as it is created, so nothing is left behind,
even after a kill) and maps it. Everything that reads the spectra then reads it as an array,
and the operating system's page cache keeps what it can of the file in otherwise free memory.

Only what the process holds counts against the budget: the E-step copies one chunk of
particles at a time (``memory_budget_bytes`` of :func:`mltomo.estep.estep`), and after each
chunk :func:`release` drops the chunk's pages from the process's resident set (they stay in
the page cache, from which the next iteration reads them back without touching the disk when
memory allows). Derived data sets (the known shifts of a local search undone, each noise
group's intensity scale divided out) are :class:`Rows`: computed per chunk, never for all
particles at once.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

RELEASE_ROWS = 64  # rows written or read between two releases while a loop walks the cache


def spectra_nbytes(n_rows: int, box: int) -> int:
    return int(n_rows) * box * box * (box // 2 + 1) * np.dtype(np.complex64).itemsize


def allocate(n_rows: int, box: int, budget_bytes: float | None = None, cache_dir=None) -> np.ndarray:
    """An uninitialised ``(n_rows, box, box, box//2+1)`` complex64 array: in memory, or (when a
    budget is given and the array exceeds it) mapped from an unlinked file in ``cache_dir``."""
    shape = (int(n_rows), box, box, box // 2 + 1)
    if budget_bytes is None or spectra_nbytes(n_rows, box) <= budget_bytes or n_rows == 0:
        return np.empty(shape, np.complex64)
    directory = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    if not directory.is_dir():
        raise ValueError(f"{directory}: cache directory does not exist")
    nbytes = spectra_nbytes(n_rows, box)
    fh = tempfile.TemporaryFile(dir=directory, prefix="mltomo_spectra_")  # unlinked at creation
    try:
        _reserve(fh.fileno(), nbytes)  # a full disk fails here, not as SIGBUS on a later write
        return np.memmap(fh, dtype=np.complex64, mode="w+", shape=shape)
    except OSError as e:
        raise ValueError(f"{directory}: cannot hold a {nbytes / 1e9:.3g} GB spectra cache "
                         f"({e.strerror or e})") from None
    finally:
        fh.close()  # the mapping keeps the (nameless) file


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate the file's blocks now (where the file system can), so that running out of space
    is an error here and not a SIGBUS when a mapped page is first written."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def is_cached(a) -> bool:
    """Whether ``a`` (or the array under a :class:`Rows`) is a memory-mapped cache."""
    return isinstance(_base(a), np.memmap)


def release(a, rows) -> None:
    """Drop the pages of ``rows`` (a slice or indices) of a cached array from this process's
    resident set (a no-op for an in-memory array). Their contents stay in the file."""
    base = _base(a)
    if not isinstance(base, np.memmap) or base._mmap is None or len(base) == 0:
        return
    if isinstance(rows, slice):
        r0, r1, _ = rows.indices(len(base))
    else:
        idx = np.asarray(rows)
        if idx.size == 0:
            return
        r0, r1 = int(idx.min()), int(idx.max()) + 1
    row = base.strides[0]
    page = mmap.PAGESIZE
    start = (base.offset + r0 * row) // page * page
    stop = min(base.offset + r1 * row, len(base._mmap))
    if stop > start:
        base._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)


def after_row(a, i: int) -> None:
    """In a loop over the rows of ``a``, after row ``i``: release the last :data:`RELEASE_ROWS`
    rows when ``i`` completes a block of them (a no-op for an in-memory array)."""
    if i % RELEASE_ROWS == RELEASE_ROWS - 1:
        release(a, slice(i + 1 - RELEASE_ROWS, i + 1))


def _base(a):
    return a.base_array if isinstance(a, Rows) else a


class Rows:
    """``transform(base[sel], sel)`` row block by row block: a data set derived from the spectra
    (e.g. with the known shifts undone) that is never formed for all particles at once. Indexing
    returns an ndarray (an integer: one row; a slice or an index array: those rows)."""

    def __init__(self, base, transform):
        self.base_array = base
        self._transform = transform
        self.shape = base.shape
        self.dtype = base.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sel):
        if isinstance(sel, (int, np.integer)):
            i = int(sel)
            return self._transform(np.asarray(self.base_array[i : i + 1]), np.array([i]))[0]
        if isinstance(sel, slice):
            idx = np.arange(*sel.indices(len(self)))
        else:
            idx = np.asarray(sel)
        return self._transform(np.asarray(self.base_array[idx]), idx)


def scaled(spectra, factor: np.ndarray):
    """``spectra * factor[i]`` per row: an array for in-memory spectra, :class:`Rows` for a cache."""
    factor = np.asarray(factor, dtype=np.float32)
    if not is_cached(spectra):
        return spectra * factor[:, None, None, None]
    return Rows(spectra, lambda x, idx: x * factor[idx][:, None, None, None])


def shifted(spectra, apply_shifts, shifts_voxels: np.ndarray):
    """``apply_shifts(spectra, shifts)`` (:meth:`mltomo.sampling.Sampling.apply_shifts`): an array
    for in-memory spectra, :class:`Rows` for a cache."""
    if not is_cached(spectra):
        return apply_shifts(spectra, shifts_voxels)
    shifts_voxels = np.asarray(shifts_voxels)
    return Rows(spectra, lambda x, idx: apply_shifts(x, shifts_voxels[idx]))


def cropped(spectra, crop, n_w: int, budget_bytes: float | None, cache_dir=None):
    """``crop(spectra)`` (to a working box of ``n_w``), into another cache when ``spectra`` is one
    (block by block), else in memory."""
    if not is_cached(spectra):
        return crop(spectra)
    if spectra.shape[1] == n_w:
        return spectra
    out = allocate(len(spectra), n_w, 0 if budget_bytes is None else budget_bytes, cache_dir)
    for a in range(0, len(spectra), RELEASE_ROWS):
        sel = slice(a, min(len(spectra), a + RELEASE_ROWS))
        out[sel] = crop(np.asarray(spectra[sel]))
        release(spectra, sel)
        release(out, sel)
    return out
