"""Intensity scale and coloured noise: the data model of real subtomograms (README, "Noise and scale").

SPEC §2's model is ``X_i = e^{−2πik·t} (R A_k)(k) + n`` with white noise of variance σ² per real
degree of freedom, seen through the weights ``w_i`` of the particle's missing region. Real
particles are on their own intensity scale and their noise is not white (CTF, dose weighting,
binning, masking). mltomo's general model, per noise group ``g`` (the particles of one optics
group, ``rlnOpticsGroup``, or where the table has none, of one missing region or weight volume:
:func:`noise_groups`):

    X_i(k) = s_g · e^{−2πik·t} (R A_k)(k) + n_i(k),   E|n_i(k)|² = σ² c_g(|k|) / w_i(k),

with a scale ``s_g`` and a noise shape ``c_g(shell)`` (σ²_g(shell) = σ² c_g(shell)). Its
log-likelihood term is ``−Σ_k w |X − s·(…)|² / (2σ² c_g)``, which is the E-step of SPEC §3 run
on ``X' = X / s_g`` with the effective weights

    w'_g(k) = w_g(k) · s_g² / c_g(|k|),

so the C++ core, the sums and the weighted-averaging M-step are unchanged: ``S = Σ P R⁻¹[w' X']``
and ``M = Σ P R⁻¹[w']`` give the generalised least-squares average ``Σ s w X / c ÷ Σ s² w / c``.
The imputation M-step (``ml``) divides by ``Mfull = Σ P R⁻¹[1]``; it needs ``Σ P R⁻¹[s²/c]``,
which :func:`scale_full_weights` forms from ``Mfull`` with the particle-weighted mean of
``s_g²/c_g`` at each grid point's radius (exact for one group).

After every E-step the parameters are re-estimated at each particle's most probable pose
``(k_i, R_i, t_i)`` with ``P_i = R_i A_{k_i}`` (shift undone in ``X_i``), per shell ``s``:

    a_g(s) = Σ_{i∈g} Σ_{k∈s} h w Re(X̄_i P_i),   b_g(s) = Σ h w |P_i|²,   e_g(s) = Σ h w |X_i|²,

    s_g = Σ_s a_g/c_g ÷ Σ_s b_g/c_g   (then divided by their particle-weighted mean, so the
    references keep the data's scale: ``s`` and ``A`` are only defined up to a common factor),

    σ²_g(s) = (e − 2 s a + s² b) / Σ_{i∈g} Σ_{k∈s} h [w > 0],

and ``c_g = σ²_g / σ̄²``, ``σ̄²`` the observed-component-weighted mean of ``σ²_g`` (σ² itself,
the overall level, stays the M-step's posterior-weighted estimate). Shells with fewer than
``MIN_COMPONENTS`` observed components take their neighbour's value. With one mask group the
scale is 1 by construction; ``white`` noise keeps ``c = 1`` (the paper's model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mltomo import spectra_cache
from mltomo.fourier import radius_half

log = logging.getLogger("mltomo")

MIN_COMPONENTS = 24  # observed components a shell needs for its own σ² estimate


@dataclass(frozen=True)
class NoiseGroups:
    """The noise groups of this process's particles: ``of[i]`` the (global) noise group of
    particle ``i``, ``labels`` every group's name (all ranks), ``counts`` their particles (all
    ranks); ``pairs`` the (mask group, noise group) combinations this process holds and
    ``pair_of[i]`` particle ``i``'s: each pair gets its own effective weights."""

    of: np.ndarray  # (N_local,) int64
    labels: tuple  # (Q,)
    counts: np.ndarray  # (Q,) float64
    pairs: np.ndarray  # (E, 2) int64: mask group, noise group
    pair_of: np.ndarray  # (N_local,) int32


def noise_groups(particles, comm) -> NoiseGroups:
    """Noise groups by ``rlnOpticsGroup`` where the particle table has it, else by the mask
    group's region label (collective: every rank gets the same labels)."""
    table = particles.table
    rows = np.asarray(particles.indices, dtype=np.int64)
    if table is not None and hasattr(table, "columns") and "rlnOpticsGroup" in table.columns:
        keys = [f"optics group {v}" for v in table["rlnOpticsGroup"].astype(str).to_numpy()[rows]]
    else:
        keys = [str(particles.region_labels[g]) for g in np.asarray(particles.groups)]
    labels = tuple(sorted({k for part in comm.bcast(comm.gather(sorted(set(keys)))) for k in part}))
    index = {k: q for q, k in enumerate(labels)}
    of = np.array([index[k] for k in keys], dtype=np.int64)
    counts = np.bincount(of, minlength=len(labels)).astype(np.float64)
    comm.allreduce_sum([counts])
    pairs, pair_of = np.unique(np.stack([np.asarray(particles.groups, np.int64), of], 1).reshape(-1, 2),
                               axis=0, return_inverse=True)
    return NoiseGroups(of=of, labels=labels, counts=counts, pairs=pairs.reshape(-1, 2),
                       pair_of=np.asarray(pair_of, dtype=np.int32).reshape(-1))


@dataclass(frozen=True)
class NoiseModel:
    """Per noise group ``g``: the intensity scale ``scale[g]`` and the noise shape
    ``shape[g, s]`` (mean 1 over the observed components) of shells ``s = 0 .. n//2``."""

    scale: np.ndarray  # (Q,) s_g
    shape: np.ndarray  # (Q, n//2+1) c_g(s)
    labels: tuple = ()  # (Q,) the groups' names (NoiseGroups.labels)

    @classmethod
    def white(cls, labels: tuple, n: int) -> NoiseModel:
        return cls(np.ones(len(labels)), np.ones((len(labels), n // 2 + 1)), tuple(labels))

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.scale == 1.0) and np.all(self.shape == 1.0))

    def masks(self, masks_w: np.ndarray, n_w: int, groups: np.ndarray, ng: NoiseGroups):
        """``(effective weights, their group of each particle)``: ``w' = w s_g² / c_g(|k|)`` on the
        working box (float32), one per (mask group, noise group) pair; the masks and groups
        themselves when the model is the identity."""
        if self.is_identity:
            return masks_w, groups
        shells = _shell_index(n_w, self.shape.shape[1])
        factor = (self.scale[:, None] ** 2 / self.shape)[:, shells]  # (Q, n_w, n_w, n_w//2+1)
        eff = masks_w[ng.pairs[:, 0]] * factor[ng.pairs[:, 1]]
        return np.ascontiguousarray(eff, dtype=np.float32), ng.pair_of

    def data(self, spectra_w: np.ndarray, ng: NoiseGroups) -> np.ndarray:
        """``X' = X / s_g`` (the input itself when every scale is 1; computed per block of
        particles when the input is a memory-mapped cache, :mod:`mltomo.spectra_cache`)."""
        if np.all(self.scale == 1.0):
            return spectra_w
        return spectra_cache.scaled(spectra_w, 1.0 / self.scale[ng.of])

    def log_normaliser(self, masks_w: np.ndarray, sampling, ng: NoiseGroups) -> np.ndarray:
        """``(N_local,)`` ``−½ Σ_k h [w > 0] log c_g(|k|)`` over each particle's observed working
        set: the part of the log-likelihood's normaliser ``−½ Σ log(2π σ² c_g)`` that σ² alone
        misses (0 for white noise), so the log-likelihood stays comparable as ``c`` changes."""
        if np.all(self.shape == 1.0):
            return np.zeros(len(ng.of))
        shells = _shell_index(sampling.n_w, self.shape.shape[1])
        logc = np.log(self.shape)[:, shells]
        per_pair = np.array([-0.5 * sampling.working_sum((masks_w[g] > 0) * logc[q]) for g, q in ng.pairs])
        return per_pair[ng.pair_of] if len(per_pair) else np.zeros(0)

    def sigma2_shells(self, sigma2: float) -> np.ndarray:
        """``(G, n//2+1)`` the noise power σ²_g(s) = σ² c_g(s) per real degree of freedom."""
        return float(sigma2) * self.shape


def _shell_index(n_w: int, n_shells: int) -> np.ndarray:
    """Shell of every component of the working box's half spectrum (clipped to the table)."""
    return np.minimum(np.rint(radius_half(n_w)).astype(np.int64), n_shells - 1)


def scale_full_weights(Mfull: np.ndarray, noise: NoiseModel, group_counts: np.ndarray, pad: float) -> np.ndarray:
    """``Mfull`` of the imputation M-step under the model's scale and noise shape: each padded
    grid point ``q`` times the particle-weighted mean of ``s_g² / c_g(|q| / pad)``."""
    if noise.is_identity:
        return Mfull
    P = Mfull.shape[1]
    counts = np.asarray(group_counts, dtype=np.float64)
    mean = (counts[:, None] * noise.scale[:, None] ** 2 / noise.shape).sum(0) / max(counts.sum(), 1.0)
    s = radius_half(P) / pad
    lo = np.clip(np.floor(s).astype(np.int64), 0, len(mean) - 1)
    hi = np.clip(lo + 1, 0, len(mean) - 1)
    f = np.clip(s - lo, 0.0, 1.0)
    return Mfull * ((1 - f) * mean[lo] + f * mean[hi])[None]


def map_shell_sums(spectra_w, masks_w, groups, results, Fref, sampling, voxel_size, of=None, n_groups=None):
    """``(a, b, e, m)`` each ``(Q, n//2+1)``: the per-shell sums of the module docstring over this
    process's particles at their most probable poses (``results``: their
    :class:`~mltomo.model.ParticleResults`; ``Fref`` the E-step's padded reference transforms),
    particle ``i`` seen through ``masks_w[groups[i]]`` and summed into noise group ``of[i]``
    (default: its mask group)."""
    from mltomo import _core, geometry

    n_w = sampling.n_w
    of = np.asarray(groups if of is None else of, dtype=np.int64)
    G = masks_w.shape[0] if n_groups is None else int(n_groups)
    S = sampling.n // 2 + 1
    shells = _shell_index(n_w, S).ravel()
    hw = sampling.working_weights().ravel()
    a, b, e, m = (np.zeros((G, S)) for _ in range(4))
    if len(spectra_w) == 0:
        return a, b, e, m
    shifts = np.asarray(results.shifts_angstrom) / voxel_size
    R = geometry.euler_to_matrix(*np.asarray(results.angles, dtype=np.float64).T).reshape(-1, 3, 3)
    classes = np.asarray(results.classes, dtype=np.int64) - 1
    for i in range(len(spectra_w)):
        g, q = int(groups[i]), int(of[i])
        pred = _core.rotate_forward(Fref[classes[i]], sampling.pad, np.ascontiguousarray(R[i]), n_w,
                                    sampling.radius).ravel()
        x = sampling.apply_shifts(np.asarray(spectra_w[i : i + 1]), shifts[i : i + 1])[0].ravel()  # one at a time
        spectra_cache.after_row(spectra_w, i)
        hwi = hw * masks_w[g].ravel()
        a[q] += np.bincount(shells, hwi * (x.conj() * pred).real, S)
        b[q] += np.bincount(shells, hwi * np.abs(pred) ** 2, S)
        e[q] += np.bincount(shells, hwi * np.abs(x) ** 2, S)
        m[q] += np.bincount(shells, hw * (masks_w[g].ravel() > 0), S)
    return a, b, e, m


def estimate(sums, noise: NoiseModel, group_counts, *, coloured: bool, scale: bool) -> NoiseModel:
    """The next :class:`NoiseModel` from the all-reduced :func:`map_shell_sums` ``(a, b, e, m)``."""
    a, b, e, m = sums
    G = a.shape[0]
    counts = np.asarray(group_counts, dtype=np.float64)
    s = np.ones(G)
    if scale and G > 1:
        num = (a / noise.shape).sum(1)
        den = (b / noise.shape).sum(1)
        ok = (den > 0) & (num > 0) & (counts > 0)
        s = np.where(ok, num / np.where(ok, den, 1.0), 1.0)
        mean = float((counts * s).sum() / max(counts.sum(), 1.0))
        s = s / mean if mean > 0 else np.ones(G)
    shape = noise.shape
    if coloured:
        sig = np.where(m > 0, (e - 2 * s[:, None] * a + s[:, None] ** 2 * b) / np.where(m > 0, m, 1.0), 0.0)
        sig = np.array([_fill_sparse(sig[g], m[g]) for g in range(G)])
        total = float((sig * m).sum() / max(m.sum(), 1.0))
        if total > 0:
            shape = np.where(sig > 0, sig / total, 1.0)
    return NoiseModel(scale=s, shape=shape, labels=noise.labels)


def _fill_sparse(sig: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Shells with too few observed components (or none) take the nearest well-sampled one's value."""
    good = np.flatnonzero((m >= MIN_COMPONENTS) & (sig > 0))
    if len(good) == 0:
        return np.ones_like(sig)
    near = good[np.argmin(np.abs(np.arange(len(sig))[:, None] - good[None, :]), axis=1)]
    return np.where((m >= MIN_COMPONENTS) & (sig > 0), sig, sig[near])


def warn_if_flat(scores, comm, n_samples: float, iteration: int) -> bool:
    """Warn (rank 0) when the posteriors are flat: the median particle's largest posterior is
    under 1e-3 and it keeps over 1000 samples. Returns whether it warned."""
    mp = comm.gather(np.asarray(scores.max_post))
    ns = comm.gather(np.asarray(scores.n_significant))
    flat = False
    if comm.rank == 0:
        mp, ns = np.concatenate(mp), np.concatenate(ns)
        if len(mp) and np.median(mp) < 1e-3 and np.median(ns) > 1000:
            flat = True
            log.warning(f"iteration {iteration}: the posteriors are flat (median max posterior {np.median(mp):.1e}, "
                        f"median {np.median(ns):.0f} significant samples of {n_samples:.0f} a particle): "
                        f"the reference may be on another intensity scale than the particles or far from them, "
                        f"or the particles too noisy for this search")
    return bool(comm.bcast(flat))
