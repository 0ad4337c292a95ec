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


def _errors(R_found, R_true, Q, groups):
    """``groups``: one ``(G, 3, 3)`` group per particle (a list of arrays, possibly shared)."""
    est = R_found @ Q  # (n, 3, 3)
    best = np.full(len(R_found), np.inf)
    for group in {id(g): g for g in groups}.values():
        sel = np.array([g is group for g in groups])
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
        one = np.eye(3)[None] if group is None else np.asarray(group, dtype=np.float64)
        per_particle = [one] * len(R_true)
    else:
        groups = [np.asarray(g, dtype=np.float64) for g in group]
        tc = np.asarray(true_classes, dtype=np.int64)
        if tc.shape != (len(R_true),) or tc.min(initial=1) < 1 or tc.max(initial=1) > len(groups):
            raise ValueError(f"true_classes must be (N,) in 1..{len(groups)} (one group per true class)")
        per_particle = [groups[k - 1] for k in tc]
    out = np.full(len(R_true), np.nan)
    gen = np.random.default_rng(rng)
    for f in np.unique(found_classes):
        idx = np.flatnonzero(found_classes == f)
        cand = idx if len(idx) <= max_candidates else gen.choice(idx, max_candidates, replace=False)
        members = [per_particle[i] for i in idx]
        best_err, best_med = None, np.inf
        for j in cand:
            Q = R_found[j].T @ R_true[j]
            err = _errors(R_found[idx], R_true[idx], Q, members)
            med = np.median(err)
            if med < best_med:
                best_med, best_err = med, err
        out[idx] = best_err
    return out
