"""The Python entry point for scripts: ``mltomo.refine`` (the CLI's runner is
:mod:`mltomo.cli.runner`)."""

from __future__ import annotations

import os
from pathlib import Path

from mltomo.model import Config, RefineResult


def refine(particles, *, out=None, refs=None, comm=None, callback=None, **options) -> RefineResult:
    """Refine references against particles and return a :class:`~mltomo.model.RefineResult`.

    ``particles`` is a STAR file path or a :class:`~mltomo.model.Particles`; ``options`` are
    :class:`~mltomo.model.Config` fields (``n_classes=2, iterations=25, angular_sampling_deg=15,
    missing="wedge_y:-60:60", ...``). With ``out``, the per-iteration files are written there.
    """
    from mltomo.em import check_inputs, run_em
    from mltomo.particles import read_particles

    config = Config(**options)
    if isinstance(particles, (str, os.PathLike)):
        particles = read_particles(particles, missing=config.missing, weight_threshold=config.weight_threshold,
                                   weight_layout=config.weight_layout, weight_kind=config.weight_kind,
                                   tomograms=config.tomograms, comm=comm,
                                   memory_budget_bytes=config.spectra_budget_bytes, cache_dir=config.cache_dir)
    focus = read_focus(config)
    check_inputs(particles, config, comm, focus=focus)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    return run_em(particles, config, refs=refs, focus=focus, comm=comm, out_dir=out, callback=callback)


def read_focus(config: Config):
    """The focused mask ``config.mask`` names, as an ``(n, n, n)`` array (None without one)."""
    if not config.mask:
        return None
    from mltomo.io import read_volume

    focus, _ = read_volume(config.mask)
    return focus


