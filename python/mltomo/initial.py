"""How a run starts: random subsets, prior classes, initial references and σ, and the seeded
first iteration of a reference-free start (SPEC §5, "Initial references")."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mltomo import geometry, spectra_cache
from mltomo.estep import estep
from mltomo.model import Config, ParticleScores, Sums
from mltomo.mstep import update_references
from mltomo.reference import lowpass
from mltomo.sampling import Sampling


def seed_classes(config: Config, n_total: int) -> np.ndarray:
    """The random subset (0-based class) of every particle of a reference-free start."""
    rng = np.random.default_rng([config.seed, 0, 7])
    order = rng.permutation(n_total)
    subset = np.empty(n_total, np.int64)
    subset[order] = np.arange(n_total) % config.n_classes
    return subset


def uses_prior_classes(particles, config: Config, comm) -> bool:
    """Whether the table's classes and poses (a previous run's ``_data.star``) start the run:
    every particle (on every rank) has an ``rlnClassNumber`` in 1..K and prior angles."""
    ok = (particles.prior_classes is not None and particles.prior_angles is not None
          and bool(np.all((particles.prior_classes >= 1) & (particles.prior_classes <= config.n_classes))))
    return comm.sum(0.0 if ok else 1.0) == 0.0


def _starting_poses(particles, sampling: Sampling, config: Config, comm, spectra_w=None):
    """``(subset (N,) 0-based, rotations (N, 3, 3), working-box spectra with known shifts
    undone, reference-free)`` of this process's particles for :func:`initial_references`;
    reference-free: neither prior classes nor fixed poses, so the rotations are random.
    ``spectra_w``: the particles already cropped to the working box (else cropped here)."""
    spectra = spectra_w
    if spectra is None:
        spectra = spectra_cache.cropped(particles.spectra, sampling.crop, sampling.n_w, config.spectra_budget_bytes,
                                        config.cache_dir)
    local = np.asarray(particles.indices)
    prior_classes = uses_prior_classes(particles, config, comm)
    fixed_poses = (config.no_rotate or config.no_align) and particles.prior_angles is not None
    if prior_classes:
        subset = particles.prior_classes.astype(np.int64) - 1
    else:
        subset = seed_classes(config, particles.n_total)[local]
    if prior_classes or fixed_poses:
        rots = geometry.euler_to_matrix(*np.asarray(particles.prior_angles, dtype=np.float64).T)
        if particles.prior_shifts_angstrom is not None:
            spectra = spectra_cache.shifted(spectra, sampling.apply_shifts,
                                            particles.prior_shifts_angstrom / particles.voxel_size_angstrom)
    else:
        rots = geometry.random_rotations(particles.n_total, np.random.default_rng([config.seed, 0, 8]))[local]
    return subset, rots, spectra, not (prior_classes or fixed_poses)


def initial_references(particles, sampling: Sampling, config: Config, comm, spectra_w=None) -> np.ndarray:
    """Starting references without ``--ref``, weighted averages (threshold τ) of the particles,
    low-passed (``--initial-lowpass``, default 8 voxels: a random-orientation average holds no
    signal beyond the lowest frequencies, and its noise there would decide the first
    assignments).

    * From a previous run's table (every particle has a class in 1..K and angles): each class
      is the average of its particles in their prior poses (shifts undone).
    * With fixed poses (``no_rotate``/``no_align`` and prior angles, e.g. the true poses of a
      simulation): random subsets (seeded) averaged in those poses (shifts undone); a random
      orientation would leave the references in no particle's frame for the rest of the run.
    * Otherwise reference-free (SPEC §5): shuffle (seeded), split into K subsets and place each
      particle in a uniformly random orientation. In the adaptive scheme every class starts
      from the same average of all the particles so placed: the seeded first iteration then
      aligns every random subset to one reference, and the classes share one frame (from K
      different blobs the subsets align to K unrelated frames, and at iteration 2 the class
      whose frame fits best takes every particle).

    ``spectra_w``: the particles' spectra on the working box, if the caller has them (a run's
    cropped cache is not made twice).
    """
    from mltomo import _core

    K = config.n_classes
    geo = sampling
    subset, rots, spectra, reference_free = _starting_poses(particles, geo, config, comm, spectra_w)
    common = config.scheme == "adaptive" and reference_free
    if common:
        subset = np.zeros_like(subset)
    masks = geo.crop(particles.masks)
    S = np.zeros((K, geo.P_w, geo.P_w, geo.P_w // 2 + 1), np.complex128)
    M = np.zeros(S.shape)
    F = np.zeros(S.shape)
    for j in range(len(subset)):
        k = subset[j]
        w = masks[particles.groups[j]]
        R = np.ascontiguousarray(rots[j], dtype=np.float64)
        _core.rotate_back(np.ascontiguousarray(spectra[j] * w), w, geo.pad, R, geo.radius, S[k], M[k], F[k])
        spectra_cache.after_row(spectra, j)
    W = np.bincount(subset, minlength=K).astype(np.float64)
    comm.allreduce_sum([S, M, F, W])
    sums = Sums(W, S, M, F, np.zeros(2))
    refs0 = np.zeros((K, geo.n, geo.n, geo.n))
    refs = update_references(refs0, sums, mode="ml-wa", pad=geo.pad, gridding=config.gridding,
                             wa_threshold=config.wa_threshold)
    res = config.initial_lowpass_angstrom or 8.0 * geo.voxel_size
    r = geo.n * geo.voxel_size / res
    refs = np.stack([lowpass(a, r) for a in refs])
    return np.repeat(refs[:1], K, axis=0) if common else refs



def initial_sigma2(spectra_w, masks_w, groups, sampling: Sampling, comm) -> float:
    """Mean power per observed degree of freedom of the data (signal + noise: a generous start)."""
    num = den = 0.0
    hw_w = sampling.working_weights()
    for j in range(len(spectra_w)):
        w = masks_w[groups[j]]
        num += float(np.sum(hw_w * w * np.abs(spectra_w[j]) ** 2))
        spectra_cache.after_row(spectra_w, j)
        den += float(np.sum(hw_w * (w > 0)))
    num, den = comm.sum(num), comm.sum(den)
    return num / max(den, 1.0)


def estep_seeded(seeds, Fref, sampling: Sampling, data_w, masks_w, groups, rotations, lp, log_alpha, sigma2,
                 rot_mask, kwargs, halves=None):
    """First iteration of a reference-free start: every particle stays in its random subset
    (only its pose is searched), so the classes start as aligned averages of random halves
    instead of a winner-takes-all split between two noisy blobs (RELION seeds classes alike).

    Each subset's log-likelihood gets its class's ``log α_k``, so a particle's log-likelihood
    ``log Σ_{r,t} α_k p(t) (1/R) exp(−d²/2σ²) − …`` is the later iterations' with the other
    classes' prior set to zero: comparable from the first iteration on. With ``halves`` the
    sums are a pair, one per half set (:func:`mltomo.estep.estep`)."""
    K = len(Fref)
    P = Fref.shape[1]
    sums = Sums.zeros(K, P) if halves is None else [Sums.zeros(K, P), Sums.zeros(K, P)]
    scores = ParticleScores.empty(len(data_w))
    counters = None
    for k in range(K):
        idx = np.flatnonzero(seeds == k)
        if len(idx) == 0:
            continue
        s, sc, c = estep(Fref[k : k + 1], sampling.pad, np.ascontiguousarray(data_w[idx]), masks_w, groups[idx],
                         sampling.radius, rotations, sampling.shifts, lp, np.zeros(1), sigma2,
                         rot_mask=None if rot_mask is None else np.ascontiguousarray(rot_mask[idx]),
                         halves=None if halves is None else halves[idx], **kwargs)
        for total, part in ([(sums, s)] if halves is None else zip(sums, s)):
            total.add(part, k)
        one = sc.class_log_sum
        sc.class_log_sum = np.full((len(idx), K), -np.inf)
        sc.class_log_sum[:, k] = one[:, 0]
        scores.put(idx, sc)
        if kwargs.get("mode", "ml") == "ml":  # log Σ α_k(…) = log α_k + log Σ(…), the core's sums unchanged
            scores.log_sum[idx] += log_alpha[k]
        scores.best_class[idx] = k
        counters = c if counters is None else {key: counters[key] + c[key] for key in c}
    return sums, scores, counters


SCALE_SAMPLING_DEG = 20.0


def reference_scale(refs, particles, spectra_w, masks_w, sampling: Sampling, config: Config, comm) -> float:
    """The least-squares scale ``s = Σ a / Σ b`` (:mod:`mltomo.noise`) that brings given
    references to the particles' intensities, at each particle's best pose by constrained
    cross-correlation (which no scale changes), over the first iteration's search. 1 when the
    fit is undefined (no particle, or no positive correlation). A global search is made at
    ``SCALE_SAMPLING_DEG`` (or the run's sampling, if coarser): poses ~10° off lower the fit by
    a few per cent, and the M-step brings the references to the data's scale from then on."""
    from types import SimpleNamespace

    from mltomo.noise import map_shell_sums
    from mltomo.reference import reference_transforms
    from mltomo.sampling import search_space

    voxel = particles.voxel_size_angstrom
    if config.angular_range_deg is None and config.rotations is None:  # a global search: coarse poses will do
        config = replace(config, angular_sampling_deg=max(config.angular_sampling_deg, SCALE_SAMPLING_DEG))
    rotations, rot_mask, pre_shift = search_space(config, 1, geometry.symmetry_group(config.sym), particles, None)
    data_w = spectra_w if pre_shift is None else spectra_cache.shifted(spectra_w, sampling.apply_shifts, pre_shift)
    Fref = reference_transforms(refs, sampling.pad, sampling.P_w, config.gridding)
    K = len(refs)
    _, scores, _ = estep(Fref, sampling.pad, data_w, masks_w, particles.groups, sampling.radius, rotations,
                         sampling.shifts, sampling.log_prior_shift(config.xi0_voxels**2), np.full(K, -np.log(K)),
                         1.0, rot_mask=rot_mask, mode="cc", nthreads=config.threads,
                         memory_budget_bytes=config.memory_budget_bytes, kernel=config.kernel)
    t = sampling.shifts[np.clip(scores.best_shift, 0, None)].astype(np.float64) * sampling.scale
    if pre_shift is not None:
        t = t + pre_shift
    R = rotations[np.clip(scores.best_rot, 0, None)]
    poses = SimpleNamespace(classes=scores.best_class.astype(np.int64) + 1,
                            angles=np.stack(geometry.matrix_to_euler(R), 1).reshape(-1, 3),
                            shifts_angstrom=t * voxel)
    a, b, _, _ = map_shell_sums(spectra_w, masks_w, particles.groups, poses, Fref, sampling, voxel)
    total = np.array([a.sum(), b.sum()])
    comm.allreduce_sum([total])
    return float(total[0] / total[1]) if total[0] > 0 and total[1] > 0 else 1.0
