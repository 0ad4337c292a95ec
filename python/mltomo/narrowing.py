"""Automatic narrowing of the rotational search once the poses have converged (``--search auto``).

A global search scores every particle at every rotation of the grid in every iteration, though
after the first iterations almost all of a particle's posterior lies within a step or two of its
last pose. With ``search="auto"`` the run searches globally until the poses have settled, then
only the rotations within ``RANGE_STEPS`` angular steps of each particle's last pose (modulo the
symmetry), and goes back to the global search when the local one stops being trustworthy:

* **Narrow** after a global iteration (not a tied or seeded one) in which at most
  ``MOVED_FRACTION`` of the particles moved their best rotation farther than the edge of the
  local region would allow (``RANGE_STEPS − ½`` angular steps, after taking out each class's
  common change of frame, see :func:`_moved`) and at most ``CLASS_FRACTION`` changed class.
* **Widen** after a local iteration in which more than ``EDGE_FRACTION`` of the particles found
  their best rotation at the edge of their local region (that far from its centre: the
  posterior may lie outside), or the log-likelihood fell by more than its
  iteration-to-iteration noise: ``NOISE_FACTOR`` times the change between the two global
  iterations that led to the narrowing (on a perturbed grid the log-likelihood of converged
  poses moves by several nats per particle from one grid to the next), and at least
  ``DROP_PER_PARTICLE`` nats per particle.

A local iteration keeps the global grid's uniform prior ``1/R`` over rotations: its
log-likelihood ``Σ_i log Σ_{local} …`` omits only the posterior mass outside each particle's
region, so it stays comparable with the global iterations' (a lower bound of the global value,
equal to it when the mass outside is negligible). The decision for the next iteration is kept in
the model (``Model.search_local``) and its file (``mltomoNextSearchLocal``), so a continued run
searches as the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mltomo import geometry

RANGE_STEPS = 2.0  # local search radius, in angular steps
EDGE_STEPS = RANGE_STEPS - 0.5  # a best rotation this many steps from the centre is at the edge
MOVED_FRACTION = 0.05  # narrow when at most this share of particles moved that far
CLASS_FRACTION = 0.01  # ... and at most this share changed class
EDGE_FRACTION = 0.10  # widen when more than this share of particles is at the edge
DROP_PER_PARTICLE = 1.0  # widen when the log-likelihood falls by more than this, nats per particle,
NOISE_FACTOR = 3.0  # ... and by more than this many times its change when the search narrowed


def local_range_deg(config) -> float:
    """The local search radius of ``search="auto"``: ``RANGE_STEPS`` angular steps."""
    return RANGE_STEPS * float(config.angular_sampling_deg)


@dataclass(frozen=True)
class Decision:
    local: bool  # the next iteration searches locally
    message: str | None = None  # what changed, for the log (None: nothing)
    noise: float = 0.0  # the log-likelihood drop that widens the search again


def _nearest_rotation(M: np.ndarray) -> np.ndarray:
    """The rotation nearest ``M`` (3 × 3) in the Frobenius norm."""
    U, _, Vt = np.linalg.svd(M)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt)) or 1.0])
    return U @ D @ Vt


def _moved(prev, results, group, n_classes: int, comm) -> np.ndarray:
    """``(N,)`` angle in degrees between each particle's best rotation in ``prev`` and in
    ``results`` (modulo the symmetry ``group``), after one common change of frame per class.

    A reference without a fixed frame may turn between iterations as a whole: a reference-free
    run of a (pseudo-)symmetric particle refined in C1 moves every pose by the same symmetry
    operation when the perturbed grid favours another copy (GroEL: 51°, a seventh of a turn).
    That is no change of the particles' relative poses, so each class's common rotation ``Q``
    (``R_new ≈ R_prev Q``, the rotation nearest ``Σ R_prevᵀ R_new``, summed over the ranks) is
    taken out first (collective)."""
    R0 = geometry.euler_to_matrix(*np.asarray(prev.angles, dtype=np.float64).reshape(-1, 3).T).reshape(-1, 3, 3)
    R1 = geometry.euler_to_matrix(*np.asarray(results.angles, dtype=np.float64).reshape(-1, 3).T).reshape(-1, 3, 3)
    classes = np.asarray(results.classes)
    sums = np.zeros((n_classes, 3, 3))
    for k in range(n_classes):
        sel = classes == k + 1
        if sel.any():
            sums[k] = np.einsum("nji,njk->ik", R0[sel], R1[sel])  # Σ R0ᵀ R1
    comm.allreduce_sum([sums])
    Q = np.stack([_nearest_rotation(s) if np.any(s) else np.eye(3) for s in sums])
    if len(R0) == 0:
        return np.zeros(0)
    R0q = np.matmul(R0, Q[classes - 1])
    return geometry.symmetry_min_distance_deg(R0q, R1, group if len(group) > 1 else None)


def moved_fraction(prev, results, group, config, n_total: int, comm, steps: float) -> float:
    """The share of all ``n_total`` particles whose best rotation moved by more than ``steps``
    angular steps between ``prev`` and ``results`` (each class's common change of frame taken
    out, :func:`_moved`; collective). ``--search auto`` narrows on it, ``--auto-stop``
    (:mod:`mltomo.convergence`) stops on it."""
    d = _moved(prev, results, group, config.n_classes, comm)
    return comm.sum(float(np.sum(d > steps * float(config.angular_sampling_deg)))) / max(int(n_total), 1)


def decide(config, *, was_local: bool, prev, results, log_likelihood: float, prev_log_likelihood: float,
           n_total: int, group, comm, eligible: bool, noise: float = 0.0) -> Decision:
    """Whether the iteration after this one searches locally (collective: every rank calls it).

    ``prev``, ``results``: this process's particles' :class:`~mltomo.model.ParticleResults` of
    the previous and this iteration (``prev`` None: no comparison, stay global); ``eligible``:
    False in tied and seeded iterations and right after them (their poses and classes are not
    the free EM's); ``noise``: the drop that widens (the last decision's)."""
    if config.search != "auto" or config.angular_range_deg is not None or config.no_align or config.no_rotate:
        return Decision(False)
    if prev is None or not eligible:
        return Decision(False, "search widened: the classes were re-seeded" if was_local else None)
    step = float(config.angular_sampling_deg)
    N = max(int(n_total), 1)
    moved = moved_fraction(prev, results, group, config, N, comm, EDGE_STEPS)  # beyond what a local search reaches
    if was_local:
        drop = prev_log_likelihood - log_likelihood
        if moved > EDGE_FRACTION:
            return Decision(False, f"search widened: {100 * moved:.1f}% of the particles found their best rotation "
                                   f"at the edge of the ±{local_range_deg(config):g}° local search")
        if drop > noise:
            return Decision(False, f"search widened: the log-likelihood fell by {drop:.4g} "
                                   f"({drop / N:.2f} per particle; more than {noise:.4g})")
        return Decision(True, noise=noise)
    changed = comm.sum(float(np.sum(np.asarray(prev.classes) != np.asarray(results.classes)))) / N
    if moved <= MOVED_FRACTION and changed <= CLASS_FRACTION:
        noise = max(DROP_PER_PARTICLE * N, NOISE_FACTOR * abs(log_likelihood - prev_log_likelihood))
        return Decision(True, noise=noise,
                        message=f"search narrowed to ±{local_range_deg(config):g}° around each particle's pose "
                                f"({100 * moved:.1f}% moved more than {EDGE_STEPS * step:g}°, "
                                f"{100 * changed:.1f}% changed class)")
    return Decision(False)
