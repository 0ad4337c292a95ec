"""The EM schedule: ``run_em`` drives E-steps (C++), MPI reductions and M-steps (NumPy).

One iteration:

1. the rotation grid (perturbed by a random rotation seeded by (seed, iteration)), reduced to
   the symmetry's asymmetric unit, or per-particle subsets for local searches;
2. references -> padded transforms, cropped to the working resolution;
3. E-step on this process's particles; sums all-reduced over processes;
4. M-step: references (imputation, weighted averaging, regularisation), α, ξ, σ;
   symmetrisation, spherical and focused masks, low-pass to the working resolution;
5. per-particle results gathered to rank 0, which writes the files.

Every random choice is seeded by ``(seed, iteration)`` and every sum is reduced in a fixed
order, so a run is reproducible for a given seed, thread count and rank count, and a run
continued from its last written iteration ends where an uninterrupted one does.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from mltomo import geometry
from mltomo.estep import ParticleScores, Sums, estep
from mltomo.model import Config, IterationStats, Model, ParticleResults, RefineResult
from mltomo.mstep import MStepInputs, update_fractions, update_references, update_sigma2, update_xi2
from mltomo.parallel import SerialComm
from mltomo.reference import crop_padded, padded_size, padded_transform

log = logging.getLogger("mltomo")


# --------------------------------------------------------------------------- geometry of a run


class Geometry:
    """Derived, fixed quantities of a run: boxes, working set, shifts.

    Shifts are integer vectors of the working box with every component within ±max_shift
    (a cube, like the simulator's and the paper's uniform shifts), weighted by the Gaussian
    prior N(0, ξ²I); the zero shift comes first.
    """

    def __init__(self, n: int, voxel_size: float, config: Config):
        from mltomo import _core
        from mltomo.fourier import working_box, working_radius

        self.n = n
        self.voxel_size = voxel_size
        self.radius = float(working_radius(n, voxel_size, config.max_resolution_angstrom))
        self.n_w = int(working_box(n, self.radius))
        self.pad = float(config.padding)
        self.P = padded_size(n, self.pad)
        self.P_w = padded_size(self.n_w, self.pad)
        self.scale = n / self.n_w  # original voxels per working voxel
        ws = _core.working_set(self.n_w, self.radius)
        self.J = float(ws["hweight"].sum())
        self.ws_index = ws["index"]
        self.ws_hweight = ws["hweight"].astype(np.float64)
        if config.no_align:
            max_shift_w = 0
        else:
            ms = config.max_shift_voxels
            if ms is None:
                ms = min(n / 4.0, math.ceil(3.0 * config.xi0_voxels))
            max_shift_w = int(math.floor(ms / self.scale + 1e-9))
            max_shift_w = min(max_shift_w, self.n_w // 2 - 1)
        self.max_shift_w = max_shift_w
        r = np.arange(-max_shift_w, max_shift_w + 1)
        tz, ty, tx = np.meshgrid(r, r, r, indexing="ij")
        t = np.stack([tx.ravel(), ty.ravel(), tz.ravel()], 1)  # every component within ±max_shift
        order = np.lexsort((t[:, 0], t[:, 1], t[:, 2], (t**2).sum(1)))
        self.shifts = np.ascontiguousarray(t[order], dtype=np.int32)  # (T, 3) x, y, z, 0 first
        self.t2 = (self.shifts.astype(np.float64) ** 2).sum(1)

    def log_prior_shift(self, xi2_voxels: float) -> np.ndarray:
        xi2_w = max(xi2_voxels / self.scale**2, 1e-6)
        lp = -self.t2 / (2.0 * xi2_w)
        return lp - (lp.max() + np.log(np.exp(lp - lp.max()).sum()))

    def working_sum(self, half: np.ndarray) -> float:
        """Full-spectrum sum over the working set of a (n_w, n_w, n_w//2+1) real array."""
        return float(np.dot(self.ws_hweight, half.ravel()[self.ws_index]))


def _crop(half: np.ndarray, n_w: int) -> np.ndarray:
    """Fourier-crop half spectra (..., n, n, n//2+1) to the working box (values unchanged)."""
    return np.ascontiguousarray(crop_padded(half, n_w))


# ------------------------------------------------------------------------ reference operations


def soft_sphere(n: int, radius_voxels: float, edge_voxels: float = 3.0) -> np.ndarray:
    """A spherical mask of the given radius with a raised-cosine edge, centred at n//2."""
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    m = np.clip((radius_voxels + edge_voxels - r) / edge_voxels, 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * m)


def lowpass(vol: np.ndarray, radius: float) -> np.ndarray:
    """Zero the Fourier components of a volume beyond ``radius`` (frequency index units)."""
    n = vol.shape[0]
    F = np.fft.rfftn(vol)
    f = np.fft.fftfreq(n) * n
    k2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + np.arange(n // 2 + 1)[None, None, :] ** 2
    F[k2 > radius**2 + 1e-9] = 0
    return np.fft.irfftn(F, s=vol.shape, axes=(0, 1, 2))


def rotate_volume(vol: np.ndarray, R: np.ndarray, pad: float = 2.0) -> np.ndarray:
    """``vol`` rotated actively by ``R`` (x'(r) = x(Rᵀr)), by Fourier interpolation."""
    from mltomo import _core

    n = vol.shape[0]
    F = padded_transform(vol, pad, gridding=True)
    H = _core.rotate_forward(F, pad, np.ascontiguousarray(R, dtype=np.float64), n, n / 2 - 1)
    return np.fft.fftshift(np.fft.irfftn(H, s=(n, n, n), axes=(0, 1, 2), norm="ortho"))


def symmetrize(vol: np.ndarray, group: np.ndarray, pad: float = 2.0) -> np.ndarray:
    """Average of the volume over the point group's rotations."""
    if len(group) <= 1:
        return vol
    return np.mean([rotate_volume(vol, g, pad) for g in group], axis=0)


# --------------------------------------------------------------------------- initialisation


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


def initial_references(particles, geo: Geometry, config: Config, comm) -> np.ndarray:
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
      particle in a uniformly random orientation.
    """
    from mltomo import _core

    K = config.n_classes
    spectra = _crop(particles.spectra, geo.n_w)
    masks = _crop(particles.masks, geo.n_w)
    local = np.asarray(particles.indices)
    prior_classes = uses_prior_classes(particles, config, comm)
    fixed_poses = (config.no_rotate or config.no_align) and particles.prior_angles is not None
    if prior_classes:
        subset_local = particles.prior_classes.astype(np.int64) - 1
    else:
        subset_local = seed_classes(config, particles.n_total)[local]
    if prior_classes or fixed_poses:
        rots_local = geometry.euler_to_matrix(*np.asarray(particles.prior_angles, dtype=np.float64).T)
        if particles.prior_shifts_angstrom is not None:
            spectra = _apply_shifts(spectra, particles.prior_shifts_angstrom / particles.voxel_size_angstrom, geo)
    else:
        rots_local = geometry.random_rotations(particles.n_total, np.random.default_rng([config.seed, 0, 8]))[local]
    S = np.zeros((K, geo.P_w, geo.P_w, geo.P_w // 2 + 1), np.complex128)
    M = np.zeros(S.shape)
    F = np.zeros(S.shape)
    for j in range(len(local)):
        k = subset_local[j]
        w = masks[particles.groups[j]]
        R = np.ascontiguousarray(rots_local[j], dtype=np.float64)
        _core.rotate_back(np.ascontiguousarray(spectra[j] * w), w, geo.pad, R, geo.radius, S[k], M[k], F[k])
    W = np.bincount(subset_local, minlength=K).astype(np.float64)
    comm.allreduce_sum([S, M, F, W])
    sums = Sums(W, S, M, F, np.zeros(2))
    refs0 = np.zeros((K, geo.n, geo.n, geo.n))
    refs = update_references(refs0, sums, mode="ml-wa", pad=geo.pad, gridding=config.gridding,
                             wa_threshold=config.wa_threshold)
    res = config.initial_lowpass_angstrom or 8.0 * geo.voxel_size
    r = geo.n * geo.voxel_size / res
    return np.stack([lowpass(a, r) for a in refs])


def initial_sigma2(spectra_w, masks_w, groups, geo: Geometry, comm) -> float:
    """Mean power per observed degree of freedom of the data (signal + noise: a generous start)."""
    num = den = 0.0
    hw_w = np.zeros(geo.n_w * geo.n_w * (geo.n_w // 2 + 1))
    hw_w[geo.ws_index] = geo.ws_hweight
    hw_w = hw_w.reshape(geo.n_w, geo.n_w, geo.n_w // 2 + 1)
    for j in range(len(spectra_w)):
        w = masks_w[groups[j]]
        num += float(np.sum(hw_w * w * np.abs(spectra_w[j]) ** 2))
        den += float(np.sum(hw_w * (w > 0)))
    num, den = comm.sum(num), comm.sum(den)
    return num / max(den, 1.0)


# ------------------------------------------------------------------------------- iterations


def regularisation(config: Config, iteration: int, n_total: int) -> float:
    """θ(it) = reg(it)·N/K², reg linear from reg0 (it=1) to regF at it = reg_steps + 1."""
    if config.reg_steps <= 0:
        reg = config.regF
    else:
        f = min(1.0, (iteration - 1) / config.reg_steps)
        reg = config.reg0 + (config.regF - config.reg0) * f
    return reg * n_total / config.n_classes**2


def rotation_grid(config: Config, iteration: int, group: np.ndarray) -> np.ndarray:
    if config.rotations is not None:
        return np.ascontiguousarray(config.rotations, dtype=np.float64)
    grid = geometry.so3_grid(config.angular_sampling_deg)
    if config.perturb:
        rng = np.random.default_rng([config.seed, iteration, 1])
        grid = geometry.perturb(grid, config.angular_sampling_deg, rng)
    if len(group) > 1:
        grid = grid[geometry.asymmetric_unit(grid, group)]
    return np.ascontiguousarray(grid, dtype=np.float64)


def _reg_energy(refs, geo: Geometry) -> float:
    """Σ_{k<l} ‖A_k − A_l‖² over the working set (full-spectrum, unitary)."""
    K = len(refs)
    if K < 2:
        return 0.0
    F = [_crop(np.fft.rfftn(np.fft.ifftshift(a), norm="ortho"), geo.n_w) for a in refs]
    e = 0.0
    for k in range(K):
        for l in range(k + 1, K):
            e += geo.working_sum(np.abs(F[k] - F[l]) ** 2)
    return e


def check_inputs(particles, config: Config, comm=None) -> None:
    """Raise ``ValueError`` (one line naming the option or file) for what :func:`run_em` cannot
    use: mode, symmetry, more classes than particles, a focused mask of the wrong box, a particle
    whose missing region leaves nothing observed inside the working resolution. Collective (every
    rank raises) and cheap: call it before creating any output; ``run_em`` calls it first."""
    comm = comm or SerialComm()
    if config.mode not in ("ml", "ml-wa", "cc"):
        raise ValueError(f"unknown mode {config.mode!r}: use ml, ml-wa or cc")
    geometry.symmetry_group(config.sym)
    n = particles.box
    K = config.n_classes
    N = particles.n_total
    if K > N:
        raise ValueError(f"{K} classes for {N} particles: need at least one particle per class")
    if config.mask:
        from mltomo.io import read_volume

        focus, _ = read_volume(config.mask)
        if focus.shape != (n, n, n):
            raise ValueError(f"{config.mask}: mask is {focus.shape[0]}³, particles are {n}³")
    geo = Geometry(n, particles.voxel_size_angstrom, config)
    masks_w = _crop(particles.masks, geo.n_w)
    n_obs_group = np.array([geo.working_sum((m > 0).astype(np.float64)) for m in masks_w])
    n_obs = n_obs_group[particles.groups]
    err = None
    if np.any(n_obs <= 1):
        bad = int(np.argmin(n_obs))
        err = (f"{particles.names[bad]}: missing region {particles.region_labels[particles.groups[bad]]} leaves no "
               f"observed components inside the working resolution")
    comm.check(err)


def run_em(particles, config: Config, *, refs=None, comm=None, out_dir=None, callback=None,
           start_model: Model | None = None, start_results: ParticleResults | None = None,
           progress=None) -> RefineResult:
    """Refine ``config.n_classes`` references against ``particles``.

    Args:
        particles: this process's :class:`~mltomo.model.Particles`.
        refs: optional initial references ``(K, n, n, n)``; default: reference-free start.
        comm: a communicator from :mod:`mltomo.parallel` (serial by default).
        out_dir: if given, rank 0 writes ``run_itNNN_*`` files there after every iteration.
        callback: called on every rank as ``callback(stats, model, results)`` per iteration.
        start_model, start_results: continue after ``start_model.iteration``.
        progress: optional factory ``progress(total, desc) -> object with update(n), close()``.
    """
    comm = comm or SerialComm()
    check_inputs(particles, config, comm)
    n = particles.box
    voxel = particles.voxel_size_angstrom
    geo = Geometry(n, voxel, config)
    group = geometry.symmetry_group(config.sym)
    K = config.n_classes
    N = particles.n_total
    spectra_w = _crop(particles.spectra, geo.n_w)
    masks_w = _crop(particles.masks, geo.n_w).astype(np.float32)
    sphere = None
    if config.particle_diameter_angstrom:
        sphere = soft_sphere(n, 0.5 * config.particle_diameter_angstrom / voxel)
    focus = None
    if config.mask:
        from mltomo.io import read_volume

        focus, _ = read_volume(config.mask)

    # Per-particle missing-region statistics over the working set.
    n_obs = np.array([geo.working_sum((masks_w[g] > 0).astype(np.float64)) for g in particles.groups])
    sum_observed = comm.sum(float(n_obs.sum()))

    if start_model is not None:
        model = start_model
        refs_now = np.asarray(model.refs, dtype=np.float32)
        it0 = model.iteration
    else:
        if refs is None:
            refs_now = initial_references(particles, geo, config, comm)
        else:
            refs_now = np.asarray(refs, dtype=np.float64)
            if refs_now.shape != (K, n, n, n):
                raise ValueError(f"initial references have shape {refs_now.shape}, expected {(K, n, n, n)}")
            if config.initial_lowpass_angstrom:
                r = n * voxel / config.initial_lowpass_angstrom
                refs_now = np.stack([lowpass(a, r) for a in refs_now])
        refs_now = _finish_refs(refs_now, geo, group, sphere, focus, config)
        sigma2 = config.fix_sigma**2 if config.fix_sigma else initial_sigma2(spectra_w, masks_w, particles.groups, geo, comm)
        xi2 = config.xi0_voxels**2
        model = Model(refs=refs_now, alpha=np.full(K, 1.0 / K), sigma2=sigma2, xi2_voxels=xi2, iteration=0)
        it0 = 0

    prev = start_results
    history = []
    seeds = None
    if start_model is None and refs is None and K > 1 and not config.no_align \
            and not uses_prior_classes(particles, config, comm):
        seeds = seed_classes(config, N)[np.asarray(particles.indices)]
    results = start_results
    for it in range(it0 + 1, config.iterations + 1):
        t_start = time.perf_counter()
        rotations, rot_mask, pre_shift = _search_space(config, it, group, particles, prev, geo)
        data_w = spectra_w if pre_shift is None else _apply_shifts(spectra_w, pre_shift, geo)
        Fref = np.stack([
            crop_padded(padded_transform(a, geo.pad, gridding=config.gridding), geo.P_w) for a in model.refs
        ])
        Fref = np.ascontiguousarray(Fref, dtype=np.complex64)
        with np.errstate(divide="ignore"):
            log_alpha = np.log(np.asarray(model.alpha, dtype=np.float64))
        lp = geo.log_prior_shift(model.xi2_voxels)
        bar = progress(len(particles), f"iteration {it}") if progress else None
        kwargs = dict(mode="cc" if config.mode == "cc" else "ml", prune=config.prune, nthreads=config.threads,
                      memory_budget_bytes=config.memory_budget_bytes, progress=bar.update if bar else None)
        if it == 1 and seeds is not None:
            sums, scores, counters = _estep_seeded(seeds, Fref, geo, data_w, masks_w, particles.groups, rotations, lp,
                                                   model.sigma2, rot_mask, kwargs)
        else:
            sums, scores, counters = estep(Fref, geo.pad, data_w, masks_w, particles.groups, geo.radius, rotations,
                                           geo.shifts, lp, log_alpha, model.sigma2, rot_mask=rot_mask, **kwargs)
        if bar:
            bar.close()
        t_e = time.perf_counter()
        comm.allreduce_sum(sums.buffers())
        counts = np.array([counters["samples"], counters["kept"]], dtype=np.float64)
        comm.allreduce_sum([counts])

        # Per-particle log-likelihood contributions (SPEC §3).
        n_rot = rot_mask.sum(1) if rot_mask is not None else np.full(len(particles), len(rotations))
        if config.mode == "cc":
            ll_i = scores.log_sum.copy()
        else:
            ll_i = scores.log_sum - np.log(n_rot) - 0.5 * scores.n_observed * np.log(2 * np.pi * model.sigma2)
        ll = comm.sum(float(ll_i.sum()))

        # M-step (identical on every rank).
        theta = regularisation(config, it, N)
        new_refs = update_references(model.refs, sums, mode=config.mode, pad=geo.pad, gridding=config.gridding,
                                     impute_iter=config.impute_iter, wa_threshold=config.wa_threshold, theta=theta)
        new_refs = _finish_refs(new_refs, geo, group, sphere, focus, config)
        inputs = MStepInputs(N, geo.J, N * geo.J - sum_observed, sum_observed)
        if config.fix_sigma:
            sigma2 = config.fix_sigma**2
        else:
            sigma2 = update_sigma2(sums, new_refs, inputs, model.sigma2, mode=config.mode,
                                   impute_iter=config.impute_iter, theta=theta,
                                   reg_energy=_reg_energy(new_refs, geo) if theta > 0 else 0.0)
        xi2 = model.xi2_voxels if (config.fix_xi or config.no_align) else max(
            update_xi2(sums, N) * geo.scale**2, 1e-4)
        alpha = model.alpha if config.fix_fractions else update_fractions(sums, N)
        old = np.asarray(model.refs, dtype=np.float64)
        changes = np.array([
            float(np.sum((new_refs[k] - old[k]) ** 2) / max(np.sum(old[k] ** 2), 1e-30)) for k in range(K)
        ])
        model = Model(refs=new_refs, alpha=np.asarray(alpha, dtype=np.float64), sigma2=float(sigma2),
                      xi2_voxels=float(xi2), iteration=it, log_likelihood=ll, changes=changes)
        t_m = time.perf_counter()

        results = _particle_results(particles, scores, rotations, geo, ll_i, pre_shift)
        prev = results
        stats = IterationStats(
            iteration=it, log_likelihood=ll, sigma=math.sqrt(model.sigma2), xi_voxels=math.sqrt(model.xi2_voxels),
            alpha=tuple(float(a) for a in model.alpha), changes=tuple(float(c) for c in changes),
            samples=int(counts[0]), kept=int(counts[1]), n_rotations=len(rotations), n_shifts=len(geo.shifts),
            seconds_estep=t_e - t_start, seconds_mstep=t_m - t_e, seconds_total=time.perf_counter() - t_start,
        )
        history.append(stats)
        gathered = comm.gather(results)
        if comm.rank == 0:
            all_results = _concat_results(gathered)
            if out_dir is not None:
                from mltomo.outputs import write_iteration

                write_iteration(out_dir, model, all_results, particles, config, geo, stats)
            log.info(format_stats(stats))
        if callback is not None:
            callback(stats, model, results)
        if config.eps and it > 1 and np.all(changes < config.eps):
            log.info(f"converged: every class changed by less than eps={config.eps:g}")
            break
    gathered = comm.gather(results) if results is not None else None  # collective: every rank calls it
    final = _concat_results(gathered) if comm.rank == 0 and gathered is not None else results
    return RefineResult(model=model, particles=final, history=tuple(history), out_dir=out_dir)


def _estep_seeded(seeds, Fref, geo, data_w, masks_w, groups, rotations, lp, sigma2, rot_mask, kwargs):
    """First iteration of a reference-free start: every particle stays in its random subset
    (only its pose is searched), so the classes start as aligned averages of random halves
    instead of a winner-takes-all split between two noisy blobs (RELION seeds classes alike)."""
    K = len(Fref)
    P = Fref.shape[1]
    sums = Sums.zeros(K, P)
    scores = ParticleScores.empty(len(data_w))
    counters = None
    for k in range(K):
        idx = np.flatnonzero(seeds == k)
        if len(idx) == 0:
            continue
        s, sc, c = estep(Fref[k : k + 1], geo.pad, np.ascontiguousarray(data_w[idx]), masks_w, groups[idx],
                         geo.radius, rotations, geo.shifts, lp, np.zeros(1), sigma2,
                         rot_mask=None if rot_mask is None else np.ascontiguousarray(rot_mask[idx]), **kwargs)
        sums.W[k] += s.W[0]
        sums.S[k] += s.S[0]
        sums.M[k] += s.M[0]
        sums.Mfull[k] += s.Mfull[0]
        sums.scalars += s.scalars
        for name in ("best_rot", "best_shift", "max_post", "n_significant", "log_sum", "x_norm", "n_observed"):
            getattr(scores, name)[idx] = getattr(sc, name)
        scores.best_class[idx] = k
        counters = c if counters is None else {key: counters[key] + c[key] for key in c}
    return sums, scores, counters


def format_stats(s: IterationStats) -> str:
    alpha = " ".join(f"{a:.3f}" for a in s.alpha)
    ch = " ".join(f"{c:.2e}" for c in s.changes)
    return (f"it {s.iteration:3d}  logL {s.log_likelihood:.6e}  sigma {s.sigma:.4g}  xi {s.xi_voxels:.3g} vox  "
            f"alpha [{alpha}]  change [{ch}]  R={s.n_rotations} T={s.n_shifts}  "
            f"pruned {100 * s.pruned_fraction:.1f}%  {s.seconds_total:.1f} s "
            f"(E {s.seconds_estep:.1f}, M {s.seconds_mstep:.1f})")


def _finish_refs(refs, geo, group, sphere, focus, config):
    out = []
    for a in refs:
        a = np.asarray(a, dtype=np.float64)
        if len(group) > 1:
            a = symmetrize(a, group, geo.pad)
        if sphere is not None:
            a = a * sphere
        if focus is not None:
            a = a * focus
        a = lowpass(a, geo.radius)
        out.append(a)
    return np.stack(out).astype(np.float32)


def _search_space(config, it, group, particles, prev, geo):
    """Rotations, optional per-particle rotation mask, optional known shifts to undo."""
    N = len(particles)
    prior_R = None
    prior_t = None
    if prev is not None:
        prior_R = geometry.euler_to_matrix(*prev.angles.T)
        prior_t = prev.shifts_angstrom / particles.voxel_size_angstrom
    elif particles.prior_angles is not None:
        prior_R = geometry.euler_to_matrix(*particles.prior_angles.T)
        if particles.prior_shifts_angstrom is not None:
            prior_t = particles.prior_shifts_angstrom / particles.voxel_size_angstrom
    if config.no_rotate or config.no_align:
        if prior_R is None:
            prior_R = np.broadcast_to(np.eye(3), (N, 3, 3))
        if N == 0:
            return np.eye(3)[None].copy(), None, None
        rotations = np.ascontiguousarray(prior_R, dtype=np.float64)
        mask = np.ascontiguousarray(np.eye(N, dtype=np.uint8))
        pre = None
        if config.no_align:
            pre = prior_t if prior_t is not None else np.zeros((N, 3))
        return rotations, mask, pre
    rotations = rotation_grid(config, it, group)
    if config.angular_range_deg is None:
        return rotations, None, None
    if prior_R is None:
        if it == 1:
            return rotations, None, None  # a first global pass gives the poses to search around
        raise ValueError("local search needs prior angles")
    mask = np.zeros((N, len(rotations)), np.uint8)
    for i in range(N):
        d = geometry.symmetry_min_distance_deg(rotations, prior_R[i], group) if len(group) > 1 else \
            geometry.geodesic_distance_deg(rotations, prior_R[i])
        sel = d <= config.angular_range_deg
        if not sel.any():
            sel[np.argmin(d)] = True
        mask[i] = sel
    return rotations, mask, None


def _apply_shifts(spectra_w, shifts_voxels, geo):
    """Undo known shifts t (original voxels): X ← e^{+2πik·t} X, on the working box."""
    n_w = geo.n_w
    f = np.fft.fftfreq(n_w) * n_w
    kz, ky, kx = np.meshgrid(f, f, np.arange(n_w // 2 + 1), indexing="ij")
    out = np.empty_like(spectra_w)
    for i, t in enumerate(np.asarray(shifts_voxels) / geo.scale):
        ph = np.exp(2j * np.pi * (kx * t[0] + ky * t[1] + kz * t[2]) / n_w)
        out[i] = spectra_w[i] * ph
    return out


def _particle_results(particles, scores, rotations, geo, ll_i, pre_shift):
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
    )


def _concat_results(parts):
    parts = [p for p in parts if p is not None]
    return ParticleResults(*[np.concatenate([getattr(p, f) for p in parts]) for f in
                             ("indices", "classes", "angles", "shifts_angstrom", "max_post",
                              "n_significant", "log_likelihood")])
