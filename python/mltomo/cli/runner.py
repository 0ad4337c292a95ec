"""The runner of ``mltomo refine`` (and ``demo``): files in, files out, serial or under
``mpiexec``; bad input becomes one :class:`~mltomo.cli.UserError` line, a failure on one rank
of several aborts them all."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from mltomo.model import RefineResult

log = logging.getLogger("mltomo")


class _Progress:
    """A tqdm bar over particles with an ETA (only when attached to a terminal)."""

    def __init__(self, total, desc):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="particle", leave=False, file=sys.stderr)

    def update(self, n):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def _read_refs(paths, config, particles):
    """The ``--ref`` maps (MRC or TOM ``.em``, as the particles) as ``(K, n, n, n)``."""
    from mltomo.io import read_volume

    if len(paths) != config.n_classes:
        raise ValueError(f"--ref gives {len(paths)} maps for {config.n_classes} classes")
    n, voxel = particles.box, particles.voxel_size_angstrom
    refs = []
    for p in paths:
        vol, vs = read_volume(p)
        if vol.shape != (n, n, n):
            raise ValueError(f"{p}: reference is {'x'.join(map(str, vol.shape))}, particles are {n}³")
        if vs and abs(vs - voxel) > 1e-3 * voxel:
            raise ValueError(f"{p}: voxel size {vs:g} Å differs from the particles' {voxel:g} Å")
        refs.append(vol)
    return np.stack(refs)


def refine_files(star, out, config, *, refs=None, continue_dir=None, iterations=None, threads=None,
                 progress=False) -> RefineResult | None:
    """``mltomo refine``: files in, files out, serial or under ``mpiexec``.

    A bad input raises :class:`mltomo.cli.UserError` on every rank (printed once), before any
    output is written. An unexpected failure on one rank of several aborts all of them with that
    rank's message, so a run never hangs.
    """
    from mltomo.cli import UserError
    from mltomo.io import FileFormatError
    from mltomo.parallel import RankError, get_comm
    from mltomo.particles import ParticleTableError

    try:
        comm = get_comm()
    except RankError as exc:  # mpi4py and the launcher disagree: each process is alone
        raise UserError(str(exc)) from exc
    # OSError: a full disk, a quota or a file-size limit while writing (named by io.atomic).
    expected = (ParticleTableError, FileFormatError, OSError, ValueError, RankError)
    try:
        return _refine(comm, star, out, config, refs, continue_dir, iterations, threads, progress)
    except expected as exc:
        msg = str(exc)
        if isinstance(exc, FileNotFoundError) and exc.filename:
            msg = f"{exc.filename}: no such file"
        elif isinstance(exc, OSError) and exc.filename and exc.strerror:
            msg = f"{exc.filename}: {exc.strerror}"
        err = UserError(msg)
        err.quiet = comm.rank != 0 and isinstance(exc, RankError)
        if comm.size > 1 and not isinstance(exc, RankError):
            # Raised on this rank alone: the others may be waiting in a collective.
            print(f"mltomo refine: error on rank {comm.rank}: {msg}", file=sys.stderr)
            comm.abort(2)
        raise err from exc
    except Exception as exc:  # noqa: BLE001 - anything else on one rank must not hang the others
        if comm.size > 1:
            print(f"mltomo refine: error on rank {comm.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
            comm.abort(3)
        raise


def _continued_config(continue_dir, iterations, threads):
    """``(star, config)`` of the run in ``continue_dir``, with a new ``--iter``/``--threads``."""
    from mltomo.outputs import read_run_config

    star, config, _ = read_run_config(continue_dir)
    changes = {}
    if iterations:
        changes["iterations"] = iterations
    if threads:
        changes["threads"] = threads
    return star, dataclasses.replace(config, **changes)


def _refine(comm, star, out, config, refs, continue_dir, iterations, threads, progress):
    from mltomo import convergence
    from mltomo.api import read_focus
    from mltomo.em import check_inputs, run_em
    from mltomo.outputs import last_complete_iteration, read_iteration, remove_incomplete, write_run_config
    from mltomo.particles import read_particles

    start_model = start_results = None
    if continue_dir:
        out = continue_dir
        star, config = _continued_config(continue_dir, iterations, threads)
    else:
        err = None
        if comm.rank == 0 and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
            err = f"{out}: output directory exists and is not empty (use a new one, or --continue {out})"
        comm.check(err)
    particles = read_particles(star, missing=config.missing, weight_threshold=config.weight_threshold,
                               weight_layout=config.weight_layout, weight_kind=config.weight_kind,
                               tomograms=config.tomograms, comm=comm,
                               memory_budget_bytes=config.spectra_budget_bytes, cache_dir=config.cache_dir)
    if particles.n_total < config.n_classes:
        raise ValueError(f"{star}: {particles.n_total} particles for {config.n_classes} classes")
    _log_storage(particles, config, comm)
    init = None
    if refs:
        init = _read_refs(refs, config, particles)
    focus = read_focus(config)
    check_inputs(particles, config, comm, focus=focus)  # before anything is written
    if continue_dir:
        last = last_complete_iteration(out)
        if last == 0:
            raise ValueError(f"{out}: no complete iteration to continue from")
        start_model, start_results = read_iteration(out, last, particles.indices)
        comm.barrier()
        if comm.rank == 0:
            remove_incomplete(out, last)
        if last >= config.iterations:
            log.info(f"{out}: iteration {last} already done (--iter {config.iterations})")
            return None
    else:
        config = convergence.resolve(config, given_refs=bool(refs))  # recorded, so --continue stops alike
    if not continue_dir and comm.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_run_config(out, str(Path(star).resolve()), config,
                         extra={"refs": [str(Path(r).resolve()) for r in refs] if refs else None})
    comm.barrier()
    factory = _Progress if (progress and comm.rank == 0) else None
    return run_em(particles, config, refs=init, focus=focus, comm=comm, out_dir=out if comm.rank == 0 else None,
                  start_model=start_model, start_results=start_results, progress=factory)


def _log_storage(particles, config, comm) -> None:
    """Say where the spectra are held when --memory-budget sent any rank's to a cache (collective)."""
    from mltomo import spectra_cache

    cached = comm.sum(float(particles.spectra.nbytes) if spectra_cache.is_cached(particles.spectra) else 0.0)
    if cached and comm.rank == 0:
        where = config.cache_dir or "the system's temporary directory"
        log.info(f"{cached / 1e9:.3g} GB of spectra stream from memory-mapped caches in {where} "
                 f"(--memory-budget {config.spectra_budget_bytes / 1e9:g} GB per process)")
