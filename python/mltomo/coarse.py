"""Coarse-to-fine rotational search (issue 13): a cheap first pass picks each particle's fine rotations.

An iteration of a global search first scores every particle, class and shift on a grid
``COARSE_FACTOR`` times coarser than the fine one, over the working set only to the radius
``r_c = COARSE_RADIUS / θ_c`` (``θ_c`` the coarse step in radians; the shifts stay those of the
fine search), without accumulating anything. Let ``L_i(c) = log Σ_{k,t} p(k, c, t | X_i)`` be
the coarse pass's log posterior of coarse rotation ``c`` (summed over classes and shifts) and
``L_i* = max_c L_i(c)``. Particle ``i`` then searches the fine rotations within ``d_child`` of
the coarse rotations inside its window,

    F_i = { r : dist(r, c) ≤ d_child for some c with L_i(c) ≥ L_i* − Δ },

where ``d_child`` is 1.15 times the coarse grid's covering radius of the fine grid (every fine
rotation lies within ``d_child`` of at least one coarse rotation). The fine E-step over ``F_i``
is the exhaustive one restricted to ``F_i``; its log-likelihood keeps the global prior ``1/R``
(like a narrowed search, :mod:`mltomo.narrowing`), so it equals the exhaustive one less the
posterior mass outside ``F_i``.

The window ``Δ`` (nats, ``Config.coarse_window``) is checked every iteration, not assumed: a few
particles (``AUDIT_FRACTION``, at least ``AUDIT_MIN`` and at most ``AUDIT_MAX``, since each
costs a whole grid, 5–8× a windowed particle) picked at random by ``(seed, iteration)`` are
searched exhaustively, and for each the mass its window would have missed,
``m_i = −log Σ_{r ∈ F_i} p(r | X_i)`` (nats), is measured. The audit also measures the window
each audited particle needed: with ``e_i(r) = L_i* − max_{c : dist(c, r) ≤ d_child} L_i(c)`` the
window at which fine rotation ``r`` enters ``F_i`` (the coarse pass scores the audited
particles a second time without pruning, so every ``L_i(c)`` is known),

    Δ_i = min { Δ : Σ_{r : e_i(r) ≤ Δ} p(r | X_i) ≥ exp(−NEED_NATS) },

the narrowest window that would have held all but ``NEED_NATS`` of its exhaustive posterior.
With ``Δ_need = NEED_MARGIN · max_i Δ_i`` the next iteration's window is

    Δ' = max(Δ·WIDEN, Δ_need)                         if any m_i > AUDIT_TOLERANCE,
    Δ' = max(Δ_config, Δ·RELAX, min(Δ, Δ_need))       otherwise:

it jumps to what the audit measured instead of widening one step an iteration (at 64³ the
posterior differences are about 8× those at 32³, and the needed window with them), and after
clean audits it relaxes toward the configured window but not below what the audit needed.
Each iteration logs (and the model file records) the window, the coarse and fine rotations per
particle and the audit's mean miss. When the windows hold more than ``USEFUL_FRACTION`` of the
fine grid (noisy data, broad posteriors) the coarse pass only adds work: the next
``SKIP_ITERATIONS`` iterations search every rotation, then the coarse pass is tried again.

The coarse pass is at a low radius because the fine posterior is sharper than the coarse grid:
on near-symmetric particles (GroEL in C1) the best fine rotation can lie near a symmetry copy
that the coarse grid happens to sample badly (README, "Coarse-to-fine search").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from mltomo.estep import estep
from mltomo.model import Config

COARSE_FACTOR = 2.0  # coarse step / fine step
COARSE_RADIUS = 3.0  # r_c = COARSE_RADIUS / θ_c (θ_c in radians), at least MIN_RADIUS
MIN_RADIUS = 4.0
CHILD_MARGIN = 1.15  # d_child = CHILD_MARGIN × covering radius of the fine grid by the coarse
MIN_SAVING = 4  # a fine grid with fewer than MIN_SAVING × coarse rotations is searched exhaustively
AUDIT_FRACTION = 0.05
AUDIT_MIN = 8
AUDIT_MAX = 40
AUDIT_TOLERANCE = 1.0  # nats an audited particle may miss
WIDEN = 1.5
RELAX = 0.9
NEED_NATS = 0.01  # the audit measures the window that holds all but this of the posterior ...
NEED_MARGIN = 1.25  # ... and the next window is at least this times the largest measured
USEFUL_FRACTION = 0.5  # windows holding more of the fine grid than this make the coarse pass a loss ...
SKIP_ITERATIONS = 2  # ... and the next this many iterations search every rotation


@dataclass(frozen=True)
class CoarseResult:
    """What the coarse pass gives the fine E-step."""

    rot_mask: np.ndarray  # (N, R_fine) uint8, audited particles all ones
    audit: np.ndarray  # (N,) bool: searched exhaustively to check the window
    would_mask: np.ndarray  # (n_audit, R_fine) bool: the audited particles' windows
    audit_log_mass: np.ndarray  # (n_audit, R_coarse): the audited particles' L_i(c), unpruned
    parents: np.ndarray  # (R_fine, P) int: each fine rotation's coarse parents, R_coarse = none
    n_coarse: int
    samples: int  # the coarse pass's (particle, class, rotation, shift) samples


def applies(config: Config, rot_mask, seeded: bool, n_fine: int) -> bool:
    """Whether an iteration's search goes coarse to fine: a global ML search of a grid fine
    enough for the coarse pass to save work."""
    if not config.coarse_to_fine or config.mode == "cc" or seeded or rot_mask is not None:
        return False
    if config.rotations is not None or config.no_align or config.no_rotate or config.angular_range_deg:
        return False
    from mltomo.geometry import so3_grid_size

    return n_fine >= MIN_SAVING * so3_grid_size(COARSE_FACTOR * config.angular_sampling_deg)


def coarse_radius(sampling, config: Config) -> float:
    """The coarse pass's working radius (index units): ``COARSE_RADIUS / θ_c``, within
    ``[MIN_RADIUS, sampling.radius]``."""
    theta = math.radians(COARSE_FACTOR * config.angular_sampling_deg)
    return float(min(sampling.radius, max(MIN_RADIUS, COARSE_RADIUS / theta)))


def coarse_sampling(sampling, config: Config):
    """``sampling`` with the working set cut to :func:`coarse_radius` (same box and shifts)."""
    from mltomo import _core

    rc = coarse_radius(sampling, config)
    if rc >= sampling.radius:
        return sampling
    ws = _core.working_set(sampling.n_w, rc)
    return replace(sampling, radius=rc, J=float(ws["hweight"].sum()), ws_index=ws["index"],
                   ws_hweight=ws["hweight"].astype(np.float64))


def _traces(A: np.ndarray, B: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``(len(A), len(B))`` max over the symmetry group of tr(A_aᵀ B_b g): a larger trace is a
    smaller angle, ``angle = acos((tr − 1)/2)``."""
    a = A.reshape(len(A), 9)
    out = None
    for g in group:
        t = a @ (B @ g).reshape(len(B), 9).T
        out = t if out is None else np.maximum(out, t)
    return out


def adjacency(coarse: np.ndarray, fine: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``(R_coarse, R_fine)`` bool: fine rotation within ``d_child`` of coarse rotation."""
    tr = _traces(coarse, fine, group)
    nearest = np.clip((tr.max(axis=0) - 1.0) / 2.0, -1.0, 1.0)  # cos of each fine rotation's distance
    cover = math.degrees(math.acos(float(nearest.min())))
    d_child = min(180.0, CHILD_MARGIN * cover)
    return tr >= 1.0 + 2.0 * math.cos(math.radians(d_child)) - 1e-12


def windows(log_mass: np.ndarray, window: float) -> np.ndarray:
    """``(N, R_coarse)`` bool: the coarse rotations within ``window`` nats of each particle's best
    (``log_mass``: log posterior mass per coarse rotation; a particle with no mass anywhere keeps
    every one)."""
    best = log_mass.max(axis=1, keepdims=True)
    keep = log_mass >= best - window
    keep[~np.isfinite(best[:, 0])] = True
    return keep


def parents(adj: np.ndarray) -> np.ndarray:
    """``(R_fine, P)`` int: the coarse rotations adjacent to each fine rotation (``adj`` of
    :func:`adjacency`), padded with ``R_coarse``."""
    width = max(1, int(adj.sum(axis=0).max()))
    first = np.argsort(~adj, axis=0, kind="stable")[:width].T  # each column's adjacent rows first
    return np.where(np.take_along_axis(adj.T, first, axis=1), first, adj.shape[0]).astype(np.int64)


def needed_windows(fine_log_mass: np.ndarray, coarse_log_mass: np.ndarray, parent: np.ndarray,
                   nats: float = NEED_NATS) -> np.ndarray:
    """``(n,)`` the narrowest window (nats) whose fine rotations would hold all but ``nats`` of
    each particle's exhaustive posterior (``fine_log_mass`` ``(n, R_fine)``, normalised), from its
    coarse log masses ``(n, R_coarse)`` and each fine rotation's coarse ``parent`` list."""
    n = len(fine_log_mass)
    out = np.zeros(n)
    if n == 0:
        return out
    ext = np.concatenate([coarse_log_mass, np.full((n, 1), -np.inf)], axis=1)
    with np.errstate(invalid="ignore"):
        entry = ext.max(axis=1, keepdims=True) - ext[:, parent].max(axis=2)  # (n, R_fine)
    entry[~np.isfinite(entry)] = np.inf
    for i in range(n):
        order = np.argsort(entry[i], kind="stable")
        inside = np.cumsum(np.exp(fine_log_mass[i][order]))
        k = min(int(np.searchsorted(inside, math.exp(-nats) * inside[-1])), len(order) - 1)
        out[i] = entry[i][order[k]]
    return out


def audit_set(config: Config, iteration: int, indices: np.ndarray, n_total: int) -> np.ndarray:
    """``(N,)`` bool: this process's particles among the iteration's audited ones (the same
    particles however they are split over processes)."""
    n_audit = min(n_total, max(AUDIT_MIN, min(AUDIT_MAX, math.ceil(AUDIT_FRACTION * n_total))))
    chosen = np.random.default_rng([config.seed, iteration, 7]).permutation(n_total)[:n_audit]
    return np.isin(np.asarray(indices), chosen)


def plan(Fref, sampling, config: Config, data, masks, groups, coarse_rotations, fine_rotations, group,
         log_prior_shift, log_alpha, sigma2, window: float, audit: np.ndarray) -> CoarseResult:
    """Run the coarse pass (a scores-only :func:`mltomo.estep.estep`) and return each
    particle's fine rotations; ``audit`` particles search all of them, and are scored a second
    time without pruning so that the audit can measure the window they needed."""
    cs = coarse_sampling(sampling, config)
    args = (log_prior_shift, log_alpha, sigma2)
    opts = dict(accumulate=False, rot_mass=True, nthreads=config.threads, kernel=config.kernel)
    _, scores, counters = estep(Fref, cs.pad, data, masks, groups, cs.radius, coarse_rotations, cs.shifts, *args,
                                log_prune=-(window + 1.0 + math.log(Fref.shape[0] * len(cs.shifts))),
                                memory_budget_bytes=config.memory_budget_bytes, **opts)
    samples = int(counters["samples"])
    audit_log_mass = np.zeros((0, len(coarse_rotations)))
    idx = np.flatnonzero(audit)
    if len(idx):
        _, unpruned, c2 = estep(Fref, cs.pad, np.ascontiguousarray(data[idx]), masks, np.asarray(groups)[idx],
                                cs.radius, coarse_rotations, cs.shifts, *args, prune=0.0, **opts)
        audit_log_mass, samples = unpruned.rot_log_mass, samples + int(c2["samples"])
    keep = windows(scores.rot_log_mass, window)
    adj = adjacency(coarse_rotations, fine_rotations, group)
    fine = (keep.astype(np.float32) @ adj.astype(np.float32)) > 0
    rot_mask = fine.astype(np.uint8)
    rot_mask[audit] = 1
    return CoarseResult(rot_mask=np.ascontiguousarray(rot_mask), audit=audit, would_mask=fine[audit],
                        audit_log_mass=audit_log_mass, parents=parents(adj), n_coarse=len(coarse_rotations),
                        samples=samples)


def missed_nats(rot_log_mass: np.ndarray, result: CoarseResult) -> np.ndarray:
    """``(n_audit,)`` −log of the exhaustive posterior mass inside each audited particle's window."""
    inside = np.where(result.would_mask, rot_log_mass[result.audit], -np.inf)
    if not len(inside):
        return np.zeros(0)
    return np.clip(-np.logaddexp.reduce(inside, axis=1), 0.0, -math.log(1e-300))  # nothing inside: 690.8


def next_window(window: float, configured: float, n_failed: float, needed: float = 0.0) -> float:
    """The next iteration's window: after an audit in which ``n_failed`` particles missed more
    than ``AUDIT_TOLERANCE`` nats, ``WIDEN`` times wider or the measured ``needed`` window
    (``NEED_MARGIN`` × the largest audited particle's), whichever is wider; else relaxing toward
    the configured one, but not below what the audit needed."""
    need = NEED_MARGIN * needed if math.isfinite(needed) else 0.0  # no measurement: the old rule
    if n_failed > 0:
        return max(window * WIDEN, need)
    return max(configured, window * RELAX, min(window, need))
