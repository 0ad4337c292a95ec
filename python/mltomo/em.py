"""The EM schedule: ``run_em`` drives E-steps (C++), MPI reductions and M-steps (NumPy).

One iteration:

1. the search space (:mod:`mltomo.sampling`): the rotation grid (perturbed by a random
   rotation seeded by (seed, iteration)), reduced to the symmetry's asymmetric unit, or
   per-particle subsets for local searches;
2. references -> padded transforms, cropped to the working resolution (:mod:`mltomo.reference`);
3. E-step on this process's particles (:mod:`mltomo.estep`); sums all-reduced over processes;
4. M-step (:mod:`mltomo.mstep`): references (imputation, weighted averaging, regularisation),
   α, ξ, σ; symmetrisation, spherical and focused masks, low-pass to the working resolution;
5. per-particle results gathered to rank 0, which writes the files.

How a run starts (initial references and σ, the seeded first iteration) is
:mod:`mltomo.initial`; in the adaptive scheme a reference-free run first aligns with one class
(the tied iterations) and then splits once along the residuals' principal components
(:mod:`mltomo.split`), the next iteration keeping each particle in its group. The driver reads
no files: the focused mask arrives as an array.

Every random choice is seeded by ``(seed, iteration)`` and every sum is reduced in a fixed
order, so a run is reproducible for a given seed, thread count and rank count, and a run
continued from its last written iteration ends where an uninterrupted one does.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import numpy as np

from mltomo import coarse as coarse_search
from mltomo import convergence, geometry, spectra_cache
from mltomo.estep import KERNELS, estep
from mltomo.initial import (
    estep_seeded,
    initial_references,
    initial_sigma2,
    reference_scale,
    seed_classes,
    uses_prior_classes,
)
from mltomo.model import Config, IterationStats, Model, ParticleResults, RefineResult, Sums
from mltomo.mstep import MStepInputs, mstep
from mltomo.narrowing import decide, local_range_deg
from mltomo.noise import NoiseModel, estimate, map_shell_sums, noise_groups, scale_full_weights, warn_if_flat
from mltomo.parallel import SerialComm
from mltomo.reference import (
    DEFAULT_MASK_MARGIN_VOXELS,
    Constraints,
    lowpass,
    particle_diameter,
    reference_transforms,
    soft_sphere,
)
from mltomo.resolution import score_radius
from mltomo.sampling import Sampling, rotation_grid, same_rotations_every_iteration, search_space
from mltomo.split import one_class, pca_split, replicate
from mltomo.ssnr import effective_components, half_sets, self_fit_offsets

log = logging.getLogger("mltomo")


def check_inputs(particles, config: Config, comm=None, *, focus=None) -> None:
    """Raise ``ValueError`` (one line naming the option or file) for what :func:`run_em` cannot
    use: mode, symmetry, more classes than particles, a focused mask (array) of the wrong box, a
    particle whose missing region leaves nothing observed inside the working resolution.
    Collective (every rank raises) and cheap: call it before creating any output; ``run_em``
    calls it first."""
    comm = comm or SerialComm()
    if config.mode not in ("ml", "ml-wa", "cc"):
        raise ValueError(f"unknown mode {config.mode!r}: use ml, ml-wa or cc")
    if config.noise not in ("auto", "white", "shell"):
        raise ValueError(f"unknown noise model {config.noise!r}: use auto, white or shell")
    if config.scheme not in ("adaptive", "paper"):
        raise ValueError(f"unknown scheme {config.scheme!r}: use adaptive or paper")
    if config.search not in ("global", "auto"):
        raise ValueError(f"unknown search {config.search!r}: use global or auto")
    if not config.coarse_window > 0:
        raise ValueError(f"coarse_window must be positive (nats), got {config.coarse_window}")
    convergence.applies(config)  # raises for an unknown --auto-stop
    if config.kernel not in KERNELS:
        raise ValueError(f"unknown E-step kernel {config.kernel!r}: use {', '.join(KERNELS)}")
    geometry.symmetry_group(config.sym)
    n = particles.box
    K = config.n_classes
    N = particles.n_total
    if K > N:
        raise ValueError(f"{K} classes for {N} particles: need at least one particle per class")
    if config.mask and focus is None:
        raise ValueError(f"{config.mask}: read the focused mask and pass it as focus= (run_em reads no files)")
    if focus is not None and np.shape(focus) != (n, n, n):
        raise ValueError(f"{config.mask or 'focused mask'}: mask is {np.shape(focus)[0]}³, particles are {n}³")
    sampling = Sampling.create(n, particles.voxel_size_angstrom, config)
    n_obs = _observed_counts(particles, sampling)
    err = None
    if np.any(n_obs <= 1):
        bad = int(np.argmin(n_obs))
        err = (f"{particles.names[bad]}: missing region {particles.region_labels[particles.groups[bad]]} leaves no "
               f"observed components inside the working resolution")
    comm.check(err)


def _observed_counts(particles, sampling: Sampling) -> np.ndarray:
    """``(N_local,)`` J_i^o: observed components of each particle inside the working set."""
    masks_w = sampling.crop(particles.masks)
    n_obs_group = np.array([sampling.working_sum((m > 0).astype(np.float64)) for m in masks_w])
    return n_obs_group[particles.groups]


def _start(particles, config: Config, sampling: Sampling, constraints: Constraints, refs, spectra_w, masks_w,
           comm) -> Model:
    """The model of iteration 0: ``refs`` (low-passed with ``--initial-lowpass``) or references
    from the data, constrained; σ² from the data (or fixed), ξ² = ξ0², α uniform."""
    n, voxel, K = particles.box, particles.voxel_size_angstrom, config.n_classes
    if refs is None:
        refs_now = initial_references(particles, sampling, config, comm, spectra_w)
    else:
        refs_now = np.asarray(refs, dtype=np.float64)
        if refs_now.shape != (K, n, n, n):
            raise ValueError(f"initial references have shape {refs_now.shape}, expected {(K, n, n, n)}")
        if config.initial_lowpass_angstrom:
            r = n * voxel / config.initial_lowpass_angstrom
            refs_now = np.stack([lowpass(a, r) for a in refs_now])
    refs_now = constraints.apply(refs_now)
    if refs is not None and config.scale_correction:
        s = reference_scale(refs_now, particles, spectra_w, masks_w, sampling, config, comm)
        if comm.rank == 0:
            log.info(f"initial references scaled by {s:.4g} to the particles' intensities")
        refs_now = refs_now * s
    if config.fix_sigma:
        sigma2 = config.fix_sigma**2
    else:
        sigma2 = initial_sigma2(spectra_w, masks_w, particles.groups, sampling, comm)
    return Model(refs=refs_now, alpha=np.full(K, 1.0 / K), sigma2=sigma2, xi2_voxels=config.xi0_voxels**2,
                 iteration=0)


def _reference_transforms(model: Model, sampling: Sampling, config: Config) -> np.ndarray:
    """``(K, P_w, P_w, P_w//2+1)`` complex64 padded transforms of the references."""
    return reference_transforms(model.refs, sampling.pad, sampling.P_w, config.gridding)


def _log_alpha(model: Model) -> np.ndarray:
    """``(K,)`` log class fractions (``-inf`` for an empty class)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(model.alpha, dtype=np.float64))


def _log_class_priors(log_alpha: np.ndarray, offsets):
    """The E-step's log class priors: ``log α`` ``(K,)``, or per particle ``(N, K)`` with the
    self-fit ``offsets``."""
    return log_alpha if offsets is None else log_alpha[None, :] + offsets


def _estep_iteration(model, Fref, sampling, config, data_w, masks_w, groups, rotations, rot_mask, seeds, bar,
                     halves=None, offsets=None, rot_mass=False, score_radius=None):
    """One E-step on this process's particles (``Fref``: the model's reference transforms):
    ``(sums, half_sums, scores, counters)``.

    With ``seeds`` (first iteration of a reference-free start) each particle stays in its
    random subset. With ``halves`` (the adaptive scheme) each half set's sums are kept apart
    (``half_sums``, two :class:`Sums`; ``sums`` is then None until they are reduced);
    ``offsets`` ``(N, K)`` are added to every particle's log class priors (self-fit correction);
    ``score_radius`` is the resolution schedule's (:mod:`mltomo.resolution`).
    """
    log_alpha = _log_alpha(model)
    lp = sampling.log_prior_shift(model.xi2_voxels)
    kwargs = dict(mode="cc" if config.mode == "cc" else "ml", prune=config.prune, nthreads=config.threads,
                  memory_budget_bytes=config.memory_budget_bytes, kernel=config.kernel,
                  progress=bar.update if bar else None, score_radius=score_radius)

    if seeds is not None:
        sums, scores, counters = estep_seeded(seeds, Fref, sampling, data_w, masks_w, groups, rotations, lp,
                                              log_alpha, model.sigma2, rot_mask, kwargs, halves=halves)
    else:
        sums, scores, counters = estep(Fref, sampling.pad, data_w, masks_w, groups, sampling.radius, rotations,
                                       sampling.shifts, lp, _log_class_priors(log_alpha, offsets), model.sigma2,
                                       rot_mask=rot_mask, halves=halves, rot_mass=rot_mass, **kwargs)
    if halves is None:
        return sums, None, scores, counters
    return None, sums, scores, counters


def _reduce(sums, half_sums, counters, comm):
    """``(sums, [samples, kept])`` over all processes (collective); with half sets, each half's
    sums are reduced in place and ``sums`` is their total."""
    if half_sums is None:
        comm.allreduce_sum(sums.buffers())
    else:
        sums = Sums.zeros(*half_sums[0].S.shape[:2])
        for hs in half_sums:
            comm.allreduce_sum(hs.buffers())
            sums.add(hs)
    counts = np.array([counters["samples"], counters["kept"]], dtype=np.float64)
    comm.allreduce_sum([counts])
    return sums, counts


def _log_likelihoods(scores, rot_mask, n_rotations, model: Model, config: Config, corrected: bool) -> np.ndarray:
    """Per-particle log-likelihood contributions (SPEC §3); the best CC in ``cc`` mode.

    When the E-step's class priors carried the self-fit correction (``corrected``), the
    likelihood is formed from the per-class sums with the model's own ``log α_k``, so every
    iteration reports the same quantity."""
    if config.mode == "cc":
        return scores.log_sum.copy()
    log_sum = scores.log_sum
    if corrected:
        m, ok, e = _class_terms(scores, model)
        log_sum = np.where(ok, m + np.log(np.sum(e, axis=1)), log_sum)
    n_rot = rot_mask.sum(1) if rot_mask is not None else np.full(len(log_sum), n_rotations)
    return log_sum - np.log(n_rot) - 0.5 * scores.n_observed * np.log(2 * np.pi * model.sigma2)


def run_em(particles, config: Config, *, refs=None, focus=None, comm=None, out_dir=None, callback=None,
           start_model: Model | None = None, start_results: ParticleResults | None = None,
           progress=None) -> RefineResult:
    """Refine ``config.n_classes`` references against ``particles``.

    Args:
        particles: this process's :class:`~mltomo.model.Particles`.
        refs: optional initial references ``(K, n, n, n)``; default: reference-free start.
        focus: optional focused mask ``(n, n, n)`` applied to the references (``config.mask``
            names its file; the caller reads it).
        comm: a communicator from :mod:`mltomo.parallel` (serial by default).
        out_dir: if given, rank 0 writes ``run_itNNN_*`` files there after every iteration.
        callback: called on every rank as ``callback(stats, model, results)`` per iteration.
        start_model, start_results: continue after ``start_model.iteration``.
        progress: optional factory ``progress(total, desc) -> object with update(n), close()``.
    """
    comm = comm or SerialComm()
    check_inputs(particles, config, comm, focus=focus)
    config = _mode_for_weights(particles, config, comm)
    config = convergence.resolve(config, given_refs=refs is not None)
    voxel = particles.voxel_size_angstrom
    sampling = Sampling.create(particles.box, voxel, config)
    group = geometry.symmetry_group(config.sym)
    N = particles.n_total
    spectra_w = spectra_cache.cropped(particles.spectra, sampling.crop, sampling.n_w, config.spectra_budget_bytes,
                                      config.cache_dir)
    masks_w = sampling.crop(particles.masks).astype(np.float32)
    sphere = None
    diameter = particle_diameter(config, particles.box, voxel)
    if diameter:
        sphere = soft_sphere(particles.box, 0.5 * diameter / voxel)
        if config.particle_diameter_angstrom is None and comm.rank == 0:
            log.debug(f"references masked by a soft sphere of {diameter:g} Å "
                      f"(box - {DEFAULT_MASK_MARGIN_VOXELS} voxels, the default; "
                      "--particle-diameter sets it, 0 turns it off)")
    constraints = Constraints(group, sampling.radius, sampling.pad, sphere, focus)
    sum_observed = comm.sum(float(_observed_counts(particles, sampling).sum()))
    inputs = MStepInputs(N, sampling.J, N * sampling.J - sum_observed, sum_observed)
    model = start_model
    if model is None:
        model = _start(particles, config, sampling, constraints, refs, spectra_w, masks_w, comm)
    adaptive = config.scheme == "adaptive"
    auto_stop, track_convergence = convergence.applies(config), convergence.tracked(config)
    self_fit = adaptive and config.mode != "cc" and same_rotations_every_iteration(config)
    tied_until, seeds, seed_it = _schedule(particles, config, refs, start_model, start_results, comm)
    halves = half_sets(config.seed, N)[np.asarray(particles.indices)] if adaptive else None
    ngroups = noise_groups(particles, comm)
    noise = model.noise
    if noise is None or len(noise.scale) != len(ngroups.labels):
        noise = NoiseModel.white(ngroups.labels, particles.box)
    noise = replace(noise, labels=ngroups.labels)
    flat_checked = False
    history = []
    results = start_results
    for it in range(model.iteration + 1, config.iterations + 1):
        t_start = time.perf_counter()
        it_sampling = sampling.for_xi(config, model.xi2_voxels)  # the shift range follows ξ
        if it_sampling.max_shift_w != sampling.max_shift_w and comm.rank == 0:
            log.info(f"iteration {it}: shifts searched to ±{it_sampling.max_shift_w * it_sampling.scale:g} voxels "
                     f"(3ξ, ξ = {math.sqrt(model.xi2_voxels):.2f} voxels; --max-shift fixes the range)")
        sampling = it_sampling
        local = bool(model.search_local) and config.search == "auto" and results is not None
        it_config = replace(config, angular_range_deg=local_range_deg(config)) if local else config
        rotations, rot_mask, pre_shift = search_space(it_config, it, group, particles, results)
        prev_results, prev_ll, prev_noise = results, model.log_likelihood, model.search_noise
        prev_gain = (model.best_resolution_shell, model.iterations_without_gain)
        data_w = spectra_w if pre_shift is None else spectra_cache.shifted(spectra_w, sampling.apply_shifts, pre_shift)
        bar = progress(len(particles), f"iteration {it}") if progress else None
        tied = it <= tied_until
        seeded = seeds is not None and it == seed_it
        work = one_class(model) if tied else model
        offsets = None
        if self_fit and not (tied or seeded) and results is not None:
            offsets = constraints.noise_fraction * _self_fit_offsets(model, results, particles, masks_w, sampling, N)
        masks_e, groups_e = noise.masks(masks_w, sampling.n_w, particles.groups, ngroups)
        Fref = _reference_transforms(work, sampling, config)  # the E-step's, and the noise estimate's
        r_score = score_radius(work, sampling, config, noise)
        data_e = noise.data(data_w, ngroups)
        window = model.coarse_window or config.coarse_window
        coarse, skip = None, model.coarse_skip
        use_coarse = coarse_search.applies(it_config, rot_mask, seeded, len(rotations))
        if use_coarse and skip > 0:
            skip -= 1  # the last coarse pass kept most rotations: this iteration searches them all
        elif use_coarse:
            coarse = _coarse_pass(work, Fref, sampling, config, data_e, masks_e, groups_e, it, group, rotations,
                                  offsets, window, particles, N)
            rot_mask = coarse.rot_mask
        sums, half_sums, scores, counters = _estep_iteration(
            work, Fref, sampling, config, data_e, masks_e, groups_e, rotations, rot_mask,
            seeds if seeded else None, bar, halves=halves, offsets=offsets, rot_mass=coarse is not None,
            score_radius=r_score)
        if bar:
            bar.close()
        t_e = time.perf_counter()
        next_window, missed, needed = 0.0, float("nan"), float("nan")
        if coarse is not None:
            counters["samples"] += coarse.samples
            next_window, missed, needed, skip = _audit(coarse, scores, window, config, comm, it, len(rotations))
        sums, counts = _reduce(sums, half_sums, counters, comm)
        for s in [sums] + (half_sums or []):
            s.Mfull = scale_full_weights(s.Mfull, noise, ngroups.counts, sampling.pad)
        if not flat_checked:
            flat_checked = True
            warn_if_flat(scores, comm, counts[0] / max(N, 1), it)
        split_seeded = seeded and tied_until > 0
        if split_seeded and scores.class_log_sum is not None:  # equal references: the same sum for every class
            scores.class_log_sum[:] = np.max(scores.class_log_sum, axis=1, keepdims=True)
        # a local search of --search auto keeps the global grid's prior 1/R (mltomo.narrowing)
        ll_i = _log_likelihoods(scores, None if local or coarse is not None else rot_mask, len(rotations), work, config,
                                corrected=offsets is not None or split_seeded)
        ll_i = ll_i + (0.0 if config.mode == "cc" else noise.log_normaliser(masks_w, sampling, ngroups))
        ll = comm.sum(float(ll_i.sum()))
        mstep_config = replace(config, n_classes=1) if tied else config
        model = mstep(sums, work, mstep_config, sampling, constraints, inputs, iteration=it, log_likelihood=ll,
                      half_sums=half_sums)
        if tied:
            model = replicate(model, config.n_classes)
        posteriors = None
        if not tied and config.mode != "cc":
            posteriors = _class_posteriors(scores, work, offsets, seeds if seeded else None)
        results = _particle_results(particles, scores, rotations, sampling, ll_i, pre_shift, posteriors)
        noise = _next_noise(noise, Fref, results, particles, spectra_w, masks_w, sampling, config, ngroups, comm)
        free = not (tied or seeded) and it - 1 > tied_until and it - 1 != seed_it
        decision = decide(config, was_local=local, prev=prev_results, results=results, log_likelihood=ll,
                          prev_log_likelihood=prev_ll, n_total=N, group=group, comm=comm, eligible=free,
                          noise=prev_noise)
        if decision.message and comm.rank == 0:
            log.info(f"iteration {it}: {decision.message}")
        model = replace(model, noise=noise, search_local=decision.local, search_noise=decision.noise,
                        coarse_window=next_window if coarse is not None else window,  # mstep's Model has none
                        coarse_skip=skip)
        stop = None
        if track_convergence:
            model, stop = convergence.step(model, prev_gain, prev_results, results, config, group, N, comm,
                                           eligible=free)
        if it == tied_until:  # the first split: the next E-step keeps every particle in its part
            masks_e, groups_e = noise.masks(masks_w, sampling.n_w, particles.groups, ngroups)
            seeds, model, results = _first_split(model, results, particles, noise.data(spectra_w, ngroups), masks_e,
                                                 groups_e, sampling, config, comm)
            seed_it = it + 1
        t_m = time.perf_counter()
        stats = IterationStats(
            iteration=it, log_likelihood=ll, sigma=math.sqrt(model.sigma2), xi_voxels=math.sqrt(model.xi2_voxels),
            alpha=tuple(float(a) for a in model.alpha), changes=tuple(float(c) for c in model.changes),
            samples=int(counts[0]), kept=int(counts[1]), n_rotations=len(rotations), n_shifts=len(sampling.shifts),
            seconds_estep=t_e - t_start, seconds_mstep=t_m - t_e, seconds_total=time.perf_counter() - t_start,
            resolution_angstrom=(model.shells.resolution_angstrom(particles.box, voxel) if model.shells is not None
                                 else float("nan")),
            search=("coarse-to-fine" if coarse is not None else
                    "local" if rot_mask is not None and not (config.no_align or config.no_rotate) else "global"),
            rotations_searched=(comm.sum(float(rot_mask.sum())) / max(N, 1) if rot_mask is not None
                                else float(len(rotations))),
            coarse_rotations=coarse.n_coarse if coarse is not None else 0,
            coarse_window=window if coarse is not None else float("nan"), coarse_missed=missed,
            coarse_needed=needed,
            score_radius=float(sampling.radius if r_score is None else r_score),
            converged=stop is not None,
        )
        history.append(stats)
        _write(comm, results, out_dir, model, particles, config, sampling, stats)
        if callback is not None:
            callback(stats, model, results)
        if stop and auto_stop:
            if comm.rank == 0:
                log.info(f"iteration {it}: {stop}")
            break
        if config.eps and it > 1 and np.all(model.changes < config.eps):
            log.info(f"converged: every class changed by less than eps={config.eps:g}")
            break
    gathered = comm.gather(results) if results is not None else None  # collective: every rank calls it
    final = _concat_results(gathered) if comm.rank == 0 and gathered is not None else results
    if comm.rank == 0 and final is not None:
        _warn_small_classes(final.classes, config.n_classes)
    return RefineResult(model=model, particles=final, history=tuple(history), out_dir=out_dir)


def _schedule(particles, config: Config, refs, start_model, start_results, comm):
    """How a run starts: ``(tied_until, seeds, seed_it)``. A reference-free adaptive run aligns
    with one class for ``tied_until`` iterations, then splits (:func:`_first_split`); a
    reference-free run of the paper's scheme keeps each particle in its random subset (0-based
    ``seeds``) in iteration ``seed_it`` = 1. A run continued right after the split takes the
    split from ``start_results``."""
    free = refs is None and config.n_classes > 1 and not config.no_align \
        and not uses_prior_classes(particles, config, comm)
    tied_until = _tied_iterations(config) if config.scheme == "adaptive" and free else 0
    if tied_until and config.iterations <= tied_until and comm.rank == 0:
        log.warning(f"{config.iterations} iterations: the classes split after iteration {tied_until}, so every class "
                    f"ends with the same reference (use --iter {tied_until + 10} or more, or a smaller --reg-steps)")
    if free and start_model is None and not tied_until:
        return 0, seed_classes(config, particles.n_total)[np.asarray(particles.indices)], 1
    if tied_until and start_model is not None and start_model.iteration == tied_until:
        return tied_until, np.asarray(start_results.classes, dtype=np.int64) - 1, tied_until + 1
    return tied_until, None, 0


def _first_split(model: Model, results: ParticleResults, particles, spectra_w, masks_w, groups, sampling: Sampling,
                 config: Config, comm):
    """``(seeds, model, results)`` after the last tied iteration: each particle's group along
    the residuals' principal components (:mod:`mltomo.split`, collective), α and W_k the
    groups' shares, and the results holding the groups as classes (with one-hot posteriors)."""
    K, N = config.n_classes, particles.n_total
    seeds = pca_split(spectra_w, masks_w, groups, results, particles.voxel_size_angstrom, sampling,
                      model.shells, K, comm, seed=config.seed)
    W = np.bincount(seeds, minlength=K).astype(np.float64)
    comm.allreduce_sum([W])
    model = replace(model, alpha=W / N, class_weights=W)
    results = replace(results, classes=seeds + 1, class_posteriors=np.eye(K)[seeds])
    return seeds, model, results


def _coarse_pass(work: Model, Fref, sampling: Sampling, config: Config, data_e, masks_e, groups_e, it: int, group,
                 rotations, offsets, window: float, particles, N: int):
    """The coarse pass of a coarse-to-fine iteration (:mod:`mltomo.coarse`): each particle's fine
    rotations, and the particles audited with an exhaustive search."""
    coarse_rotations = rotation_grid(replace(config, angular_sampling_deg=coarse_search.COARSE_FACTOR *
                                             config.angular_sampling_deg), it, group)
    audit = coarse_search.audit_set(config, it, particles.indices, N)
    return coarse_search.plan(Fref, sampling, config, data_e, masks_e, groups_e, coarse_rotations, rotations, group,
                              sampling.log_prior_shift(work.xi2_voxels), _log_class_priors(_log_alpha(work), offsets),
                              work.sigma2, window, audit)


def _audit(coarse, scores, window: float, config: Config, comm, it: int, n_fine: int):
    """``(next window, mean nats missed, widest window needed, iterations to search every
    rotation)`` from the audited particles' exhaustive posteriors and the share of the grid the
    windows held."""
    missed = coarse_search.missed_nats(scores.rot_log_mass, coarse)
    needed = coarse_search.needed_windows(scores.rot_log_mass[coarse.audit], coarse.audit_log_mass, coarse.parents)
    n_audit = comm.sum(float(len(missed)))
    n_failed = comm.sum(float((missed > coarse_search.AUDIT_TOLERANCE).sum()))
    mean_missed = comm.sum(float(missed.sum())) / max(n_audit, 1.0)
    most = comm.gather(float(needed.max()) if len(needed) else 0.0)
    most_needed = comm.bcast(max(most) if comm.rank == 0 else None)
    rot_per = comm.sum(float(coarse.rot_mask[~coarse.audit].sum())) / max(comm.sum(float((~coarse.audit).sum())), 1.0)
    nxt = coarse_search.next_window(window, config.coarse_window, n_failed, most_needed)
    if comm.rank == 0:
        msg = (f"iteration {it}: coarse-to-fine, {coarse.n_coarse} coarse rotations, window {window:.0f} nats, "
               f"{rot_per:.0f} fine rotations per particle; audit of {n_audit:.0f}: mean {mean_missed:.3g} nats "
               f"missed, window needed {most_needed:.0f}")
        if n_failed:
            msg += f", {n_failed:.0f} missed > {coarse_search.AUDIT_TOLERANCE:g}: window {nxt:.0f} next"
        (log.info if n_failed else log.debug)(msg)
    skip = 0
    if rot_per > coarse_search.USEFUL_FRACTION * n_fine:
        skip = coarse_search.SKIP_ITERATIONS
        if comm.rank == 0:
            log.debug(f"iteration {it}: the coarse pass kept {rot_per / n_fine:.0%} of the rotations; the next "
                     f"{skip} iterations search every rotation")
    return nxt, mean_missed, most_needed, skip


def _mode_for_weights(particles, config: Config, comm) -> Config:
    """What continuous weights (CTF², tilt-stack weights: real data) change. ``--noise auto``
    is ``shell`` with them, else ``white`` (the paper's model for its binary masks; on the 40 real
    RELION 5 particles the shell model's global search gave 10.7/10.8/9.8/14.3° over iterations
    1–4 against 10.7/12.5/10.9/15.8° white). ``ml`` runs as ``ml-wa``: the paper's imputation
    ``A ← A + (S − M A)/M_full`` reads ``w`` as the fraction of a component observed, which a
    CTF² weight is not (same particles, local search: the log-likelihood fell every iteration
    and the median error grew from 6.8° to 10.1°, against 6.8° → 8.0° with rising
    log-likelihood for weighted averaging, whose fixed point ``Σ w X / Σ w`` both share).
    Collective."""
    m = np.asarray(particles.masks)
    local = float(np.any((m > 1e-6) & (m < 1 - 1e-6))) if m.size else 0.0
    continuous = comm.sum(local) > 0
    if config.noise == "auto":
        config = replace(config, noise="shell" if continuous else "white")
    if config.mode != "ml" or not continuous:
        return config
    if comm.rank == 0:
        log.info("continuous weights: the M-step averages with them (--mode ml-wa); the E-step is ML")
    return replace(config, mode="ml-wa")


def _next_noise(noise: NoiseModel, Fref, results, particles, spectra_w, masks_w, sampling: Sampling,
                config: Config, ngroups, comm) -> NoiseModel:
    """The scale and noise shape for the next E-step (:mod:`mltomo.noise`), estimated at the
    most probable poses of this one (``Fref``: its reference transforms); the same model when
    neither is estimated (collective)."""
    coloured = config.noise == "shell"
    scale = config.scale_correction and len(ngroups.labels) > 1
    if not (coloured or scale):
        return noise
    sums = list(map_shell_sums(spectra_w, masks_w, particles.groups, results, Fref, sampling,
                               particles.voxel_size_angstrom, of=ngroups.of, n_groups=len(ngroups.labels)))
    comm.allreduce_sum(sums)
    return estimate(sums, noise, ngroups.counts, coloured=coloured, scale=scale)


def _tied_iterations(config: Config) -> int:
    """How many first iterations a reference-free adaptive run aligns with one class: those the
    paper regularises (``reg_steps``), at least 1 (:mod:`mltomo.split`). Not a function of
    ``iterations``, so a run continued with a larger ``--iter`` keeps its schedule."""
    return max(1, config.reg_steps)


def _self_fit_offsets(model: Model, results: ParticleResults, particles, masks_w, sampling: Sampling,
                      n_total: int) -> np.ndarray:
    """``(N_local, K)`` self-fit corrections of the class priors (:mod:`mltomo.ssnr`): each
    particle's noise is part of every class with the posterior the last E-step gave it there
    (the class it was in, where the results hold no posteriors)."""
    K = len(model.refs)
    filt = model.shells.filter if model.shells is not None else np.ones(particles.box // 2 + 1)
    j_eff = effective_components(filt, masks_w, sampling.radius)
    post = results.class_posteriors
    if post is None or np.shape(post) != (len(results.classes), K):
        prev = np.asarray(results.classes, dtype=np.int64) - 1
        ok = (prev >= 0) & (prev < K)
        post = np.zeros((len(prev), K))
        post[np.flatnonzero(ok), prev[ok]] = 1.0
    return self_fit_offsets(post, np.asarray(particles.groups), j_eff, model.weights(n_total))


def _warn_small_classes(classes, K: int) -> None:
    """Say so when a class ends empty or nearly so (under 2 % of the particles): the data
    support fewer classes than ``--classes``, or a class holds rare particles worth a look."""
    sizes = np.bincount(np.asarray(classes) - 1, minlength=K)
    N = int(sizes.sum())
    for k, s in enumerate(sizes):
        if s < max(2, 0.02 * N):
            log.warning(f"class {k + 1} ends with {s} of {N} particles: the data may hold fewer than {K} classes")


def _write(comm, results, out_dir, model, particles, config, sampling, stats) -> None:
    """Gather the iteration's per-particle results to rank 0, which writes the files and logs."""
    gathered = comm.gather(results)
    if comm.rank == 0:
        all_results = _concat_results(gathered)
        if out_dir is not None:
            from mltomo.outputs import write_iteration

            write_iteration(out_dir, model, all_results, particles, config, sampling, stats)
        log.info(format_stats(stats))


def format_stats(s: IterationStats) -> str:
    alpha = " ".join(f"{a:.3f}" for a in s.alpha)
    ch = " ".join(f"{c:.2e}" for c in s.changes)
    return (f"it {s.iteration:3d}  logL {s.log_likelihood:.6e}  sigma {s.sigma:.4g}  xi {s.xi_voxels:.3g} vox  "
            f"alpha [{alpha}]  change [{ch}]  "
            + (f"res {s.resolution_angstrom:.1f} Å  " if math.isfinite(s.resolution_angstrom) else "")
            + (f"scored to |k| {s.score_radius:g}  " if math.isfinite(s.score_radius) else "")
            + f"R={s.n_rotations}" + (f" (local, {s.rotations_searched:.0f} each)" if s.search == "local" else "")
            + f" T={s.n_shifts}  "
            f"pruned {100 * s.pruned_fraction:.1f}%  {s.seconds_total:.1f} s "
            f"(E {s.seconds_estep:.1f}, M {s.seconds_mstep:.1f})")


def _class_posteriors(scores, model: Model, offsets, seeds) -> np.ndarray | None:
    """``(N, K)`` each particle's class posterior, marginal over poses, as the E-step weighed it
    (its class priors with the self-fit offsets; one-hot in a seeded iteration)."""
    K = len(model.refs)
    if seeds is not None:
        return np.eye(K)[np.asarray(seeds, dtype=np.int64)]
    if scores.class_log_sum is None:
        return None
    _, ok, p = _class_terms(scores, model, offsets)
    s = p.sum(1, keepdims=True)
    return np.where(ok[:, None] & (s > 0), p / np.where(s > 0, s, 1.0), 1.0 / K)


def _class_terms(scores, model: Model, offsets=None):
    """``(m (N,), ok (N,), e (N, K))`` of each particle's per-class terms
    ``t_k = log α_k + log Σ_{r,t}(…)_k (+ offsets)``: their maximum ``m``, whether it is finite,
    and ``e_k = exp(t_k − m)`` (``exp(t_k)`` where it is not), so that
    ``log Σ_k exp t_k = m + log Σ_k e_k`` and ``P_k = e_k / Σ_k e_k``."""
    t = _log_class_priors(_log_alpha(model), offsets) + scores.class_log_sum
    m = np.max(t, axis=1)
    ok = np.isfinite(m)
    return m, ok, np.exp(t - np.where(ok, m, 0.0)[:, None])


def _particle_results(particles, scores, rotations, geo, ll_i, pre_shift, posteriors=None):
    N = len(particles)
    ok = scores.best_rot >= 0
    R = np.where(ok[:, None, None], rotations[np.clip(scores.best_rot, 0, None)], np.eye(3))
    rot, tilt, psi = geometry.matrix_to_euler(R)
    t = geo.shifts[np.clip(scores.best_shift, 0, None)].astype(np.float64) * geo.scale
    if pre_shift is not None:
        t = t + pre_shift
    return ParticleResults(
        indices=np.asarray(particles.indices),
        classes=scores.best_class.astype(np.int64) + 1,
        angles=np.stack([rot, tilt, psi], 1).reshape(N, 3),
        shifts_angstrom=t * particles.voxel_size_angstrom,
        max_post=scores.max_post.copy(),
        n_significant=scores.n_significant.copy(),
        log_likelihood=ll_i.copy(),
        class_posteriors=posteriors,
    )


def _concat_results(parts):
    parts = [p for p in parts if p is not None]
    post = None
    if all(p.class_posteriors is not None for p in parts):
        post = np.concatenate([p.class_posteriors for p in parts])
    return ParticleResults(*[np.concatenate([getattr(p, f) for p in parts]) for f in
                             ("indices", "classes", "angles", "shifts_angstrom", "max_post",
                              "n_significant", "log_likelihood")], class_posteriors=post)
