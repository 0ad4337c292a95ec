"""Scoring a refinement against a known truth (simulated data).

* **Class purity**: the fraction of particles in the majority true class of their found
  class, summed over found classes (1.0 = every found class is pure; empty classes count 0).
* **Angular error**: a reference-free class average lives in a frame of its own, ``Q_k``:
  the average of class ``k`` is the truth rotated by ``Q_kᵀ``, so a particle's true rotation
  relates to the found one by ``R_true = R_found Q_k`` (modulo the phantom's symmetry ``g``:
  ``R_true g``). For every found class, ``Q_k`` is the candidate ``R_foundᵀ R_true`` (over the
  class's particles) that minimises the class's median error; the error of a particle is then
  ``min_g ∠(R_found Q_k, R_true g)`` in degrees. Each true class may have a group of its
  own (GroEL14 is D7, GroEL14-GroES7 only C7): the error of a particle is then taken modulo
  the group of its true class.
"""

from __future__ import annotations

import numpy as np

from mltomo.geometry import geodesic_distance_deg


def class_purity(true_classes, found_classes) -> float:
    true_classes = np.asarray(true_classes)
    found_classes = np.asarray(found_classes)
    total = 0
    for f in np.unique(found_classes):
        members = true_classes[found_classes == f]
        total += np.bincount(members - members.min()).max() if len(members) else 0
    return total / len(true_classes)


def _errors(R_found, R_true, Q, groups, gid):
    """Errors of particles whose point group is ``groups[gid[i]]``."""
    est = R_found @ Q  # (n, 3, 3)
    best = np.full(len(R_found), np.inf)
    for k, group in enumerate(groups):
        sel = gid == k
        for g in group:
            best[sel] = np.minimum(best[sel], geodesic_distance_deg(est[sel], R_true[sel] @ g))
    return best


def angular_errors(R_true, R_found, found_classes, group=None, max_candidates=200, rng=0,
                   true_classes=None) -> np.ndarray:
    """Per-particle angular error (degrees) modulo each found class's frame and the symmetry.

    ``group``: one point group ``(G, 3, 3)`` for every particle (default the identity), or,
    with ``true_classes`` (1-based), a sequence of groups, one per true class.
    """
    R_true = np.asarray(R_true, dtype=np.float64)
    R_found = np.asarray(R_found, dtype=np.float64)
    found_classes = np.asarray(found_classes)
    if true_classes is None:
        groups = [np.eye(3)[None] if group is None else np.asarray(group, dtype=np.float64)]
        gid = np.zeros(len(R_true), np.int64)
    else:
        groups = [np.asarray(g, dtype=np.float64) for g in group]
        gid = np.asarray(true_classes, dtype=np.int64) - 1
        if gid.shape != (len(R_true),) or gid.min(initial=0) < 0 or gid.max(initial=0) >= len(groups):
            raise ValueError(f"true_classes must be (N,) in 1..{len(groups)} (one group per true class)")
    out = np.full(len(R_true), np.nan)
    gen = np.random.default_rng(rng)
    for f in np.unique(found_classes):
        idx = np.flatnonzero(found_classes == f)
        cand = idx if len(idx) <= max_candidates else gen.choice(idx, max_candidates, replace=False)
        best_err, best_med = None, np.inf
        for j in cand:
            Q = R_found[j].T @ R_true[j]
            err = _errors(R_found[idx], R_true[idx], Q, groups, gid[idx])
            med = np.median(err)
            if med < best_med:
                best_med, best_err = med, err
        out[idx] = best_err
    return out
