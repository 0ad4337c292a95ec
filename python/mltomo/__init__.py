"""mltomo: maximum-likelihood alignment and classification of subtomograms with missing regions.

Scheres, Melero, Valle & Carazo (2009), Structure 17:1563. See README.md for usage and
``mltomo.geometry`` for the conventions.
"""

__version__ = "0.1.0"


def fftw_version() -> str:
    """Which FFTW the compiled core was linked against: ``"system 3.x.y"`` or ``"pylib-fftw3f ..."``."""
    from mltomo import _core

    return _core.fftw_version()


def refine(particles, **kwargs):
    """Run a refinement from Python: see :func:`mltomo.api.refine`."""
    from mltomo.api import refine as _refine

    return _refine(particles, **kwargs)
