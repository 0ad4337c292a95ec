"""The M-step: pure NumPy on the summed sufficient statistics (SPEC §4–5).

Every rank runs it on the same all-reduced sums, so every rank holds the same model.

References live in real space (n³). The sums ``S_k``, ``M_k`` live on the padded Fourier grid
(:mod:`mltomo.reference`), where a trilinear scatter leaves the data convolved with the
interpolation kernel, i.e. the real-space image multiplied by ``g``. The model is therefore
compared with the data on that grid as ``B_k = FT(pad(a_k·g))`` and brought back as
``crop(FT⁻¹ B_k)/g`` (with ``gridding=False``, ``g = 1`` and, for rotations that land on grid
points, the update is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mltomo.reference import (
    crop_padded,
    gridding_kernel,
    padded_size,
    padded_transform,
    uncrop_padded,
    volume_from_padded,
)
from mltomo.ssnr import apply_filter, shell_stats


@dataclass(frozen=True)
class MStepInputs:
    """What the M-step needs besides the sums."""

    n_particles: int  # N (all ranks)
    J: float  # full-spectrum size of the working set
    sum_missing: float  # Σ_i (J − J_i^o)
    sum_observed: float  # Σ_i J_i^o


def _to_grid(vol, pad, Pw, g):
    return crop_padded(padded_transform(vol * g, pad, gridding=False, dtype=np.complex128), Pw)


def _from_grid(B, n, pad, g):
    """``crop(FT⁻¹ B)/g``: the plain inverse (no kernel of its own), then the correction."""
    P = padded_size(n, pad)
    return volume_from_padded(uncrop_padded(B, P), n, pad, gridding=False) / g


def regularised_average(S, M, theta):
    """Weighted averages ``B (K, ...)`` that maximise, at every grid point independently,
    ``−Σ_k (M_k|B_k|² − 2 Re(B̄_k S_k)) − θ Σ_{k<l} |B_k − B_l|²`` (paper eq. 11):
    ``B_k = (S_k + θ Σ_l B_l)/(M_k + Kθ)``, with ``Σ_l B_l = Σ_l (S_l/d_l) / Σ_l (M_l/(K d_l))``,
    ``d_l = M_l + Kθ`` (the usual denominator ``1 − θ Σ 1/d_l`` written without cancellation).
    Where no class observed a point (every ``M_l = 0``, so ``S = 0`` too) the maximiser is not
    unique and every ``B_k`` is 0.

    The one closed form of both M-steps: weighted averaging passes the grid sums ``S_k, M_k``;
    ML passes ``S_k = W_k A_k^unreg``, ``M_k = W_k`` (shape ``(K, 1, 1, 1)``, broadcast), the
    target ``−Σ_k W_k|A_k − A_k^unreg|² − θ Σ_{k<l}|A_k − A_l|²`` up to a constant.
    """
    K = S.shape[0]
    d = M + K * theta
    den = np.sum(M / (K * d), axis=0)
    seen = den > 0
    total = np.where(seen, (S / d).sum(0) / np.where(seen, den, 1.0), 0)
    return (S + theta * total[None]) / d


def update_references(refs, sums, *, mode="ml", pad=2.0, gridding=True, impute_iter=1,
                      wa_threshold=0.1, theta=0.0):
    """New references ``(K, n, n, n)`` float64 from the old ones and the sums.

    ``mode="ml"``: ``A ← A + (S − M⊙A)/Mfull`` repeated ``impute_iter`` times (missing
    components are filled with the current model; on the padded grid the scalar ``W_k`` of the
    SPEC becomes ``Mfull_k``, the weight fully observed particles leave at each grid point, which
    is ``W_k`` for rotations that land on grid points); ``"ml-wa"``/``"cc"``: ``A = S/M`` where
    the number of particles that observed the component, ``M·W/Mfull``, exceeds
    ``wa_threshold``, else 0. With ``theta > 0`` the exact maximiser of
    the regularised target (paper eq. 11) is used: ``A_k = (T_k + θΣ_l A_l)/(W_k + Kθ)``.
    """
    refs = np.asarray(refs, dtype=np.float64)
    K, n = refs.shape[0], refs.shape[1]
    Pw = sums.S.shape[1]
    g = gridding_kernel(n, pad) if gridding else np.ones((n, n, n))
    W = sums.W
    if mode == "ml":
        unreg = refs.copy()
        for k in range(K):
            if W[k] <= 0:
                continue
            B0 = _to_grid(refs[k], pad, Pw, g)
            B = B0
            F = sums.Mfull[k]
            seen = F > 1e-9 * F.max()
            inv = np.where(seen, 1.0 / np.where(seen, F, 1.0), 0.0)
            for _ in range(max(1, int(impute_iter))):
                B = B + (sums.S[k] - sums.M[k] * B) * inv
            unreg[k] = refs[k] + _from_grid(B - B0, n, pad, g)
        if theta <= 0 or K < 2:
            return unreg
        Wb = W[:, None, None, None]
        A = regularised_average(Wb * unreg, Wb, theta)
        return np.where(Wb > 0, A, refs)  # SPEC §4: a class with W_k = 0 keeps its reference
    if mode in ("ml-wa", "cc"):
        scale = float(pad) ** 3  # grid weights are ~1/pad³ of the particle counts
        th = theta / scale
        if th > 0 and K >= 2:
            B = regularised_average(sums.S, sums.M, th)
        else:
            F = sums.Mfull
            counts = sums.M * np.where(F > 0, W[:, None, None, None] / np.where(F > 0, F, 1.0), 0.0)
            ok = counts > wa_threshold
            B = np.where(ok, sums.S / np.where(ok, sums.M, 1.0), 0)
        return np.stack([_from_grid(B[k], n, pad, g) if W[k] > 0 else refs[k] for k in range(K)])
    raise ValueError(f"unknown M-step mode {mode!r}")


def update_sigma2(sums, refs, inputs: MStepInputs, sigma2_old, *, mode="ml", impute_iter=1, theta=0.0,
                  reg_energy=0.0):
    """σ² (per real degree of freedom): SPEC §4. ``reg_energy`` = Σ_{k<l} ‖A_k − A_l‖² over the
    working set (full spectrum)."""
    if mode == "ml":
        s2 = sigma2_old
        for _ in range(max(1, int(impute_iter))):
            s2 = (sums.sum_pd2 + inputs.sum_missing * s2 + theta * reg_energy) / (inputs.n_particles * inputs.J)
        return float(s2)
    return float((sums.sum_pd2 + theta * reg_energy) / max(inputs.sum_observed, 1.0))


def update_xi2(sums, n_particles):
    """ξ² = Σ P |t|² / (3N), in working voxels²."""
    return float(sums.sum_pt2 / (3.0 * n_particles))


def update_fractions(sums, n_particles):
    """α_k = W_k / N."""
    return sums.W / float(n_particles)


def regularisation(config, iteration: int, n_total: int) -> float:
    """θ(it) = reg(it)·N/K², reg linear from reg0 (it=1) to regF at it = reg_steps + 1."""
    if config.reg_steps <= 0:
        reg = config.regF
    else:
        f = min(1.0, (iteration - 1) / config.reg_steps)
        reg = config.reg0 + (config.regF - config.reg0) * f
    return reg * n_total / config.n_classes**2


def reg_energy(refs, sampling) -> float:
    """Σ_{k<l} ‖A_k − A_l‖² over the working set (full-spectrum, unitary)."""
    K = len(refs)
    if K < 2:
        return 0.0
    F = [sampling.crop(np.fft.rfftn(np.fft.ifftshift(a), norm="ortho")) for a in refs]
    e = 0.0
    for k in range(K):
        for l in range(k + 1, K):  # noqa: E741 - the SPEC's index
            e += sampling.working_sum(np.abs(F[k] - F[l]) ** 2)
    return e


def mstep(sums, model, config, sampling, constraints, inputs: MStepInputs, *, iteration: int,
          log_likelihood: float = float("nan"), half_sums=None):
    """The new :class:`~mltomo.model.Model` from the all-reduced sums of iteration ``iteration``
    (SPEC §4–5): references (imputation or weighted averaging, regularised with θ(it)), then
    ``constraints`` (a :class:`~mltomo.reference.Constraints`: symmetry, masks, working
    resolution); σ², ξ², α unless fixed by ``config``; and each class's relative change."""
    from mltomo.model import Model

    N = inputs.n_particles
    theta = regularisation(config, iteration, N)
    refs = update_references(model.refs, sums, mode=config.mode, pad=sampling.pad, gridding=config.gridding,
                             impute_iter=config.impute_iter, wa_threshold=config.wa_threshold, theta=theta)
    shells = None
    if half_sums is not None:  # the adaptive scheme: Wiener filter from the half-set FSC (mltomo.ssnr)
        shells = half_set_shells(model.refs, half_sums, sums.W, config, sampling)
        refs = apply_filter(refs, shells.filter)
    refs = constraints.apply(refs)
    if config.fix_sigma:
        sigma2 = config.fix_sigma**2
    else:
        sigma2 = update_sigma2(sums, refs, inputs, model.sigma2, mode=config.mode, impute_iter=config.impute_iter,
                               theta=theta, reg_energy=reg_energy(refs, sampling) if theta > 0 else 0.0)
    if config.fix_xi or config.no_align:
        xi2 = model.xi2_voxels
    else:
        xi2 = max(update_xi2(sums, N) * sampling.scale**2, 1e-4)
    alpha = model.alpha if config.fix_fractions else update_fractions(sums, N)
    old = np.asarray(model.refs, dtype=np.float64)
    changes = np.array([float(np.sum((refs[k] - old[k]) ** 2) / max(np.sum(old[k] ** 2), 1e-30))
                        for k in range(len(refs))])
    return Model(refs=refs, alpha=np.asarray(alpha, dtype=np.float64), sigma2=float(sigma2),
                 xi2_voxels=float(xi2), iteration=iteration, log_likelihood=log_likelihood, changes=changes,
                 class_weights=np.asarray(sums.W, dtype=np.float64).copy(), shells=shells)


def half_set_shells(refs, half_sums, weights, config, sampling):
    """:class:`~mltomo.ssnr.ShellStats` of the two half sets' weighted averages of every class
    (a class a half set never saw keeps ``refs`` there, and correlates fully)."""
    halves = [update_references(refs, hs, mode="ml-wa", pad=sampling.pad, gridding=config.gridding,
                                wa_threshold=config.wa_threshold) for hs in half_sums]
    return shell_stats(halves[0], halves[1], weights, sampling.radius)
