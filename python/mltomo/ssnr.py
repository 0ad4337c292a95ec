"""What the classes' signal supports: half-set FSC, the per-shell Wiener filter and the self-fit
correction of the ``adaptive`` classification scheme (README, "Classification").

The paper's EM classifies by the full likelihood at every frequency of the working box. Two
things make it stick in splits the data do not support, or empty a class, on data it was not
tuned on:

* **Noise-only frequencies.** Beyond the resolution the class averages reach, a reference is
  the average noise of its members; comparing particles with it there adds noise to every
  posterior and nothing else.
* **Self-fit.** Particle ``i``'s own noise is part of the average of the class it is in, with
  weight ``1/W_k`` per observed component. Its expected squared distance to that class is
  lower by ``2σ²/W_k`` per component, so the class it is in is favoured by
  ``J_i/W_k`` nats (``J_i`` its observed components) whatever the signal says — about as much
  as the class difference near the SNRs users have, which freezes the first split.

The scheme answers both with the data's own resolution measure:

1. The particles are split once into two random half sets (seeded); the E-step adds each
   half's sufficient statistics separately, and the M-step forms each class's two half-set
   weighted averages ``A_k^(1), A_k^(2)``.
2. Their Fourier shell correlation per class, ``FSC_k(s)``, averaged over classes with weights
   ``W_k`` (one filter for every class: a per-class filter blurs the smaller class more, which
   then loses more particles, and the run empties a class), gives the spectral SNR of the
   full-set average ``SSNR(s) = 2 FSC/(1 − FSC)`` and the Wiener (MAP) filter
   ``f(s) = SSNR/(1 + SSNR) = 2 FSC/(1 + FSC)``, set to 0 from the first shell whose FSC falls
   below 0.143. ``A_k ← f ⊙ A_k`` after each M-step: it is the MAP estimate of each shell under
   a Gaussian prior of signal power ``τ²(s) = SSNR(s)·σ²/W`` (Scheres 2012), with ``τ²`` measured
   on independent halves instead of on the (self-fitted) class averages.
3. With the filtered references a particle's noise carries weight ``P_ik f_j/W_k`` in class
   ``k`` (``P_ik`` its class posterior in the E-step that made the average), so the self-fit
   advantage is ``P_ik J_i^f/W_k`` nats with ``J_i^f = Σ_j w_ij f(s_j)`` over the working set
   (full spectrum). The E-step subtracts it: the class prior of particle ``i`` for class ``k``
   is ``log α_k − μ P_ik J_i^f/W_k`` (a leave-one-out correction; twice the value over-corrects
   and splits classes at random; with the full correction on the MAP class only, a particle
   near the boundary is pushed out of whichever class it is in and changes class every
   iteration). ``μ = mean(m)`` is the fraction of the noise that the real-space masks on the
   references (the soft sphere, a focused mask: their product ``m``) keep: masking convolves
   the spectrum with ``F(m)``, so component ``j``'s noise stays in component ``j`` with weight
   ``F(m)_0 = mean(m)`` (:attr:`mltomo.reference.Constraints.noise_fraction`; 1 without masks).
   Without ``μ`` the correction over-corrects by ``1/μ`` (1.7× for the default sphere of a
   24³ box, ``μ`` = 0.58) and fixed-pose classification from random subsets stays at chance (0.54
   against 1.00, README tutorial data, SNR 0.03).

   The correction applies only when every iteration scores the particles at the rotations of
   the last (fixed poses, or an unperturbed grid). With the paper's perturbed grid the
   particle's noise was added to the reference at rotations the next iteration no longer
   searches, and the noise decorrelates above the lowest shells (a rotation by θ moves
   frequency ``s`` by ``sθ`` grid units). Measured by leave-one-out (the references rebuilt
   without particle ``i``, the next E-step's class log-sums compared; GroEL 32³, SNR 0.05,
   30°, iteration 12, 9 particles): with the grid unperturbed 19–27 nats against
   ``P J^f/W`` = 22–26; with it perturbed 0–5 nats against 23–27, where the correction moves
   borderline particles out of their class at random (purity 0.93–1.00 from iteration to
   iteration instead of 1.00 without it).

The reported log-likelihood never includes the correction (see :func:`mltomo.em`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mltomo.fourier import fsc, half_weights, irfft_unitary, rfft_unitary, shells_half

FSC_THRESHOLD = 0.143


@dataclass(frozen=True)
class ShellStats:
    """Per-shell statistics of one M-step (shells ``s = 0 … n//2`` of the ``n³`` box)."""

    fsc_classes: np.ndarray  # (K, n//2+1) FSC of each class's half-set averages
    fsc: np.ndarray  # (n//2+1,) their W-weighted mean, shell 0 set to 1
    filter: np.ndarray  # (n//2+1,) 2 FSC/(1 + FSC) up to the resolution shell, then 0
    resolution_shell: int  # last shell with FSC ≥ 0.143 (the filter is 0 beyond it)

    @property
    def ssnr(self) -> np.ndarray:
        """Spectral SNR of the full-set average, ``2 FSC/(1 − FSC)`` (FSC clipped to [0, 0.999])."""
        c = np.clip(self.fsc, 0.0, 0.999)
        return 2.0 * c / (1.0 - c)

    def resolution_angstrom(self, n: int, voxel_size: float) -> float:
        return float(n * voxel_size / max(self.resolution_shell, 1))


def half_sets(seed: int, n_total: int) -> np.ndarray:
    """``(N,)`` int64 0/1: the half set of every row of the table (balanced, seeded)."""
    rng = np.random.default_rng([seed, 0, 9])
    return (rng.permutation(n_total) % 2).astype(np.int64)


def shell_stats(half_a: np.ndarray, half_b: np.ndarray, weights: np.ndarray, limit_shell: float,
                threshold: float = FSC_THRESHOLD) -> ShellStats:
    """FSC of the half-set averages ``(K, n, n, n)`` of every class, their mean weighted by the
    class weights ``W_k``, and the Wiener filter (0 beyond the FSC-``threshold`` shell and beyond
    ``limit_shell``, the working radius)."""
    K, n = half_a.shape[0], half_a.shape[1]
    per_class = np.stack([fsc(rfft_unitary(half_a[k]), rfft_unitary(half_b[k]), n) for k in range(K)])
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(K, 1.0 / K)
    common = np.clip(w @ per_class, 0.0, 0.999)
    common[0] = 1.0
    shells = np.arange(len(common))
    below = np.flatnonzero((common < threshold) & (shells > 0))
    res = int(below[0] - 1) if len(below) else len(common) - 1
    res = int(min(res, np.floor(limit_shell + 1e-9)))
    filt = np.where(shells <= res, 2.0 * common / (1.0 + common), 0.0)
    filt[0] = 1.0
    return ShellStats(fsc_classes=per_class, fsc=common, filter=filt, resolution_shell=max(res, 1))


def apply_filter(refs: np.ndarray, filt: np.ndarray) -> np.ndarray:
    """References ``(K, n, n, n)`` with each Fourier shell ``s`` multiplied by ``filt[s]``
    (corners beyond ``n//2`` by 0)."""
    refs = np.asarray(refs, dtype=np.float64)
    n = refs.shape[1]
    f = _per_component(filt, n)
    return np.stack([irfft_unitary(rfft_unitary(a) * f, n) for a in refs])


def _per_component(filt: np.ndarray, n: int) -> np.ndarray:
    """The per-shell ``filt`` on the ``n³`` half spectrum (0 beyond its last shell)."""
    f = np.concatenate([np.asarray(filt, dtype=np.float64), [0.0]])
    return f[np.minimum(shells_half(n), len(f) - 1)]


def effective_components(filt: np.ndarray, masks_w: np.ndarray, radius: float) -> np.ndarray:
    """``(G,)`` ``J^f = Σ_j w_j f(s_j)`` over the working set ``|k| ≤ radius`` of each missing-region
    mask of the working box ``(G, n_w, n_w, n_w//2+1)`` (full-spectrum count)."""
    n_w = masks_w.shape[1]
    from mltomo.fourier import radius_half

    f = _per_component(filt, n_w) * half_weights(n_w) * (radius_half(n_w) <= radius + 1e-9)
    return np.array([float(np.sum(f * m)) for m in masks_w])


def self_fit_offsets(posteriors: np.ndarray, groups: np.ndarray, j_eff: np.ndarray, weights: np.ndarray,
                     ) -> np.ndarray:
    """``(N, K)`` log class-prior offsets ``−P_ik J^f_{g(i)}/W_k``: particle ``i``'s noise is in
    class ``k``'s average with weight ``P_ik/W_k`` (``posteriors`` ``(N, K)``, the previous
    E-step's class posteriors; one-hot rows give the hard leave-one-out, zero rows no offset)."""
    P = np.asarray(posteriors, dtype=np.float64)
    W = np.maximum(np.asarray(weights, dtype=np.float64), 1e-9)
    return -P * np.asarray(j_eff, dtype=np.float64)[np.asarray(groups)][:, None] / W[None, :]
