"""The E-step: validates arrays, chunks particles and calls the C++ core.

The core computes, for every particle ``i``, class ``k``, rotation ``r`` and shift ``t``,

    d²(i,k,r,t) = Σ_j w_ij |X_ij − e^{−2πi k_j·t/n} (R_r A_k)_j|²      (full-spectrum sum)

over the working set ``|k| ≤ radius`` (the correlation term at the searched shifts comes from one
inverse FFT per (i,k,r), or from a pruned separable transform on the box of searched shifts:
``kernel``),
log-weights ``log α_k + log p(t) − d²/2σ²``, posteriors by log-sum-exp, and adds the sufficient
statistics into :class:`Sums` (SPEC §3–4). Shifts are integers in working-box voxels.
"""

from __future__ import annotations

import numpy as np

from mltomo import spectra_cache
from mltomo.model import ParticleScores, Sums

MODES = {"ml": 0, "cc": 1}
KERNELS = ("auto", "fft", "pruned")
MAX_CHUNK = 4096  # particles in one call of the core
ROTATED_CACHE_BYTES = 256 << 20  # the core keeps every rotated reference if they fit in this


def estep(
    refs: np.ndarray,
    pad: float,
    particles: np.ndarray,
    masks: np.ndarray,
    groups: np.ndarray,
    radius: float,
    rotations: np.ndarray,
    shifts: np.ndarray,
    log_prior_shift: np.ndarray,
    log_alpha: np.ndarray,
    sigma2: float,
    *,
    sums: Sums | None = None,
    rot_mask: np.ndarray | None = None,
    mode: str = "ml",
    prune: float = 1e-8,
    log_prune: float | None = None,
    nthreads: int = 0,
    memory_budget_bytes: int = 1 << 30,
    rot_block: int = 32,
    halves: np.ndarray | None = None,
    progress=None,
    kernel: str = "auto",
    accumulate: bool = True,
    rot_mass: bool = False,
    score_radius: float | None = None,
):
    """Run the E-step on all particles, in chunks that bound the memory of the translation maps.

    Args:
        refs: ``(K, P, P, P//2+1)`` complex64 padded reference transforms.
        particles: ``(N, n, n, n//2+1)`` complex64 unitary half spectra of the working box.
        masks: ``(G, n, n, n//2+1)`` float32 missing-region masks (1 = observed);
            ``groups[i]`` picks particle ``i``'s mask.
        rotations: ``(R, 3, 3)`` float64; shifts: ``(T, 3)`` int32 (x, y, z) in working voxels.
        log_prior_shift: ``(T,)`` log of the normalised translation prior.
        log_alpha: ``(K,)`` log class fractions (``-inf`` switches a class off), or ``(N, K)``
            per-particle log class priors (``log α_k`` plus an offset per particle and class).
        sums: accumulators to add into (new zeros if None); with ``halves`` a pair of them.
        halves: optional ``(N,)`` 0/1 half set of every particle: each half's statistics are
            added into its own :class:`Sums` (one plan serves both).
        rot_mask: optional ``(N, R)`` uint8, the rotations each particle searches.
        progress: optional callable(n_done) called after each chunk.
        accumulate: False scores only (``sums`` stay zero): a coarse pass.
        rot_mass: also return ``scores.rot_log_mass`` ``(N, R)``, the log of each rotation's
            posterior mass summed over classes and shifts (−inf where every sample was pruned; CC:
            0 at the best rotation). Logs, since a coarse window can reach beyond the ~745 nats
            below its maximum where a mass underflows.
        log_prune: the log of the prune factor, replacing ``prune`` (a coarse pass keeps samples
            more nats below the best than a double's exp can hold).
        score_radius: score only the components ``|k| ≤ score_radius`` (``≤ radius``; None: all),
            counting the reference as 0 beyond it (d² adds ``Σ w|X|²`` there); the sums, ``x_norm``
            and ``n_observed`` still cover the whole working set (the resolution schedule,
            :mod:`mltomo.resolution`).
        kernel: how the shifts of one (particle, class, rotation) are scored: ``"fft"`` (one
            inverse FFT of the working box, every shift at once), ``"pruned"`` (a separable
            transform evaluated only on the box of searched shifts; same numbers to float
            precision) or ``"auto"`` (the cheaper by the core's cost model). The counter
            ``maps_pruned_kernel`` says how many maps the pruned kernel scored.

    Returns:
        ``(sums, scores, counters)``; with ``halves``, ``sums`` is the pair ``[Sums, Sums]``.
    """
    from mltomo import _core

    if mode not in MODES:
        raise ValueError(f"unknown E-step mode {mode!r}: use 'ml' or 'cc'")
    if score_radius is not None and mode != "ml":
        raise ValueError("score_radius needs mode 'ml'")
    if kernel not in KERNELS:
        raise ValueError(f"unknown E-step kernel {kernel!r}: use 'auto', 'fft' or 'pruned'")
    K, P = refs.shape[0], refs.shape[1]
    N = particles.shape[0]
    R, T = rotations.shape[0], shifts.shape[0]
    if sums is None:
        sums = Sums.zeros(K, P) if halves is None else [Sums.zeros(K, P), Sums.zeros(K, P)]
    scores = ParticleScores.empty(N, K)
    nthreads = nthreads or _core.max_threads()
    # A chunk holds what its particles' translation maps may take (at worst every map a particle
    # searches: with rot_mask, its row) and their copies. Each chunk rotates the references again
    # unless they all fit the rotated cache, so a windowed search (rot_mask) packs its particles
    # by their own rows, not by the whole grid (at 64³, K = 4: 7 chunks of 2,000 particles, not 34).
    searched = np.full(N, R, np.int64) if rot_mask is None else np.asarray(rot_mask).sum(axis=1, dtype=np.int64)
    cost = K * np.maximum(searched, 1) * T * 4 + (particles[0].nbytes * 2 if N else 0)
    chunks = list(_chunks(cost, memory_budget_bytes, 4 * nthreads, sums, halves))
    counters = {"samples": 0, "kept": 0, "maps_pruned": 0, "maps_pruned_kernel": 0, "seconds_rotate": 0.0,
                "seconds_score": 0.0, "seconds_accumulate": 0.0, "seconds_total": 0.0}
    groups = np.ascontiguousarray(groups, dtype=np.int32)
    offsets = None
    log_alpha = np.asarray(log_alpha, dtype=np.float64)
    if log_alpha.ndim == 2:  # per particle: the plan keeps each class's largest, the chunks the offsets
        if log_alpha.shape != (N, K):
            raise ValueError(f"log_alpha must be ({K},) or ({N}, {K}), got {log_alpha.shape}")
        base = log_alpha.max(axis=0) if N else np.zeros(K)
        finite = np.where(np.isfinite(base), base, 0.0)
        with np.errstate(invalid="ignore"):  # a class off for a particle (-inf) stays off
            offsets = np.ascontiguousarray(np.where(np.isneginf(log_alpha), -np.inf, log_alpha - finite[None, :]))
        log_alpha = finite
    # What is fixed for the call (FFT plan, working set, shift tables, rotated references) is
    # built once; the chunks only bound the memory of the translation maps.
    plan = None if N == 0 else _core.EStepPlan(
        refs=refs, pad=float(pad), masks=masks, radius=float(radius), rotations=rotations,
        shifts=shifts, log_prior_shift=log_prior_shift, log_alpha=log_alpha, sigma2=float(sigma2),
        mode=mode, prune=float(prune), nthreads=int(nthreads), rot_block=int(rot_block), kernel=kernel,
        # with several chunks, every chunk would rotate the references again unless they are kept
        rotated_cache_bytes=float(max(ROTATED_CACHE_BYTES, memory_budget_bytes if len(chunks) > 1 else 0)),
        score_radius=-1.0 if score_radius is None else float(score_radius),
        log_prune=float("nan") if log_prune is None else float(log_prune),
    )
    if rot_mass:
        scores.rot_log_mass = np.full((N, R), -np.inf)
    for target, sel in chunks:
        res = plan.run(particles=_take(particles, sel), groups=_take(groups, sel),
                       sums=target if accumulate else None, rot_mask=_take(rot_mask, sel),
                       class_offsets=_take(offsets, sel), rot_mass=rot_mass)
        for name, values in res["scores"].items():
            getattr(scores, name)[sel] = values
        for key in counters:
            counters[key] += res["counters"][key]
        spectra_cache.release(particles, sel)  # a memory-mapped cache: the chunk's pages leave the resident set
        if progress is not None:
            progress(len(res["scores"]["log_sum"]))
    return sums, scores, counters


def _take(a, sel):
    """Rows ``sel`` (a slice: a view; indices: a contiguous copy) of ``a``, or None."""
    if a is None:
        return None
    return a[sel] if isinstance(sel, slice) else np.ascontiguousarray(a[sel])


def _chunks(cost: np.ndarray, budget: float, min_n: int, sums, halves):
    """``(accumulators, particle selection)`` of every chunk: contiguous slices, or with
    ``halves`` the particles of each half set in order, each half into its own sums; a chunk
    takes particles while their ``cost`` (bytes) stays within ``budget``, at least ``min_n`` and
    at most ``MAX_CHUNK`` of them."""
    N = len(cost)
    if halves is None:
        for a, b in _runs(cost, budget, min_n):
            yield sums, slice(a, b)
        return
    halves = np.asarray(halves)
    if halves.shape != (N,):
        raise ValueError(f"halves must be ({N},), got {halves.shape}")
    for h in (0, 1):
        idx = np.flatnonzero(halves == h)
        for a, b in _runs(cost[idx], budget, min_n):
            yield sums[h], idx[a:b]


def _runs(cost: np.ndarray, budget: float, min_n: int):
    """``(a, b)`` bounds of consecutive runs of ``cost`` summing to at most ``budget``
    (``min_n`` to ``MAX_CHUNK`` items each)."""
    total = np.concatenate([[0], np.cumsum(cost, dtype=np.float64)])
    a, n = 0, len(cost)
    while a < n:
        b = int(np.searchsorted(total, total[a] + budget, side="right")) - 1
        b = min(n, max(b, a + max(min_n, 1)), a + MAX_CHUNK)
        yield a, b
        a = b
