"""Processes: a tiny communicator protocol with a serial default and an MPI one (mpi4py).

The whole MPI layer is ``Allreduce(MPI.IN_PLACE, buf, MPI.SUM)`` on the sufficient statistics
(buffer-based, upper-case mpi4py methods), a gather of per-particle results to rank 0 and a
collective error check. mpi4py is imported only when the process was started by an MPI
launcher with more than one rank, so serial runs never touch MPI.

Particles are split into contiguous, deterministic blocks (:func:`split_range`); every rank
runs the same M-step on the same reduced sums, so every rank holds the same model.
"""

from __future__ import annotations

import os
import sys

import numpy as np

# World size as set by MPICH/Intel MPI (hydra, srun --mpi=pmi2), Open MPI, PMIx launchers.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


class RankError(Exception):
    """An error on some rank, reported identically on every rank."""


class SerialComm:
    rank = 0
    size = 1

    def allreduce_sum(self, arrays):
        return arrays

    def sum(self, value):
        return value

    def gather(self, obj):
        return [obj]

    def bcast(self, obj):
        return obj

    def check(self, error: str | None):
        """Collective: raise RankError on every rank if any rank passed an error message."""
        if error:
            raise RankError(error)

    def abort(self, code: int = 2):
        sys.exit(code)

    def barrier(self):
        pass


class MPIComm:
    def __init__(self, comm=None):
        from mpi4py import MPI  # lazy: only under an MPI launcher

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allreduce_sum(self, arrays):
        """In-place sum over ranks of each C-contiguous numpy array (float64 or complex128)."""
        for a in arrays:
            if not a.flags.c_contiguous:
                raise ValueError("allreduce needs C-contiguous arrays")
            self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return arrays

    def sum(self, value):
        buf = np.array([value], dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return float(buf[0])

    def gather(self, obj):
        return self.comm.gather(obj, root=0)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def check(self, error: str | None):
        errors = self.comm.allgather(error)
        for rank, e in enumerate(errors):
            if e:
                raise RankError(e if self.size == 1 else f"{e} (rank {rank})")

    def abort(self, code: int = 2):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def barrier(self):
        self.comm.Barrier()


def launcher_size() -> int:
    """How many processes an MPI launcher says it started (1 when there is no launcher)."""
    for var in _LAUNCHER_SIZE_VARS:
        v = os.environ.get(var)
        if v is not None:
            try:
                return max(1, int(v))
            except ValueError:
                return 1
    return 1


def launched_with_mpi() -> bool:
    """True when an MPI launcher started this process as one of several ranks."""
    return launcher_size() > 1


def get_comm():
    """MPIComm under ``mpiexec -n P`` (P > 1), else SerialComm.

    Raises :class:`RankError` if MPI sees another number of ranks than the launcher started:
    mpi4py is then built against another MPI, and every process would run the whole
    refinement alone, writing the same files.
    """
    size = launcher_size()
    if size <= 1:
        return SerialComm()
    try:
        comm = MPIComm()
    except ImportError as exc:
        raise RankError(f"the MPI launcher started {size} processes but mpi4py cannot be imported ({exc}): "
                        "pip install 'mltomo[mpi]', or build mpi4py against the site MPI") from exc
    if comm.size != size:
        raise RankError(
            f"the MPI launcher started {size} processes but MPI sees {comm.size}: mpi4py is linked "
            "to another MPI than this mpiexec (`python -m mpi4py --mpi-library` names it; use the "
            "matching mpiexec, or srun --mpi=pmi2)"
        )
    return comm


def split_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous block ``[a, b)`` of ``n`` items that ``rank`` of ``size`` owns."""
    base, extra = divmod(n, size)
    a = rank * base + min(rank, extra)
    return a, a + base + (1 if rank < extra else 0)
