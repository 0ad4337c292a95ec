"""Resolution schedule (issue 13, item 2): the E-step scores only the shells the classes carry.

In the adaptive scheme every M-step multiplies shell ``s`` of each reference by the Wiener filter
``f(s)`` of the half-set FSC, which is 0 beyond the resolution shell ``s_res`` (the last with
FSC ≥ 0.143, :mod:`mltomo.ssnr`). There the next E-step compares each particle with a reference
that is 0, so

    d²(i,k,r,t) = Σ_{|k_j| ≤ r_s} w_ij |X_ij − e^{−2πi k_j·t/n} (R_r A_k)_j|²  +  Σ_{|k_j| > r_s} w_ij |X_ij|²

for any ``r_s`` above ``s_res``: the second sum is the same for every class, rotation and shift
and drops out of every posterior. The E-step therefore rotates the references and scores the
shifts only on ``|k| ≤ r_s = min(radius, s_res + MARGIN)`` (``score_radius`` of
:func:`mltomo.estep.estep`); the core still adds the constant term, over the whole working set,
to each particle's log-likelihood and to the σ² sums, so both keep the same terms as a run
without the schedule. The weighted sums still cover the whole working set: the next M-step's
half-set FSC sees every shell, so the resolution, and with it ``r_s``, grows as soon as the
classes' signal extends.

What the schedule neglects is the rotated reference beyond ``r_s``. The reference transform is
0 there on its own grid, but the E-step interpolates it at rotated positions of the padded grid,
whose values between the original samples ring (the Dirichlet kernel of the box). On the W1
references after 8 iterations (``s_res`` = 9, σ² = 2.05·10⁴) that ringing holds
``Σ |R A|²/2σ²`` = 0.82 nats beyond |k| = 9.5, 0.42 beyond 10.5 and 0.28 beyond 11.5, against
730–810 inside, and varies by under 0.05 nats between rotations. ``MARGIN`` shells keep the
largest part of it (README, "Performance").

A real-space constraint applied after the filter (a spherical or focused mask, symmetry) spreads
some reference power beyond ``s_res``. The schedule therefore measures it: ``r_s`` is the
smallest radius from ``s_res + MARGIN`` on (in steps of one shell) at which every reference's
power beyond it, in likelihood units ``Σ_{|k_j| > r} h_j |A_kj|² s_q²/c_q(s_j) / 2σ²`` (the
noise model's weights, worst noise group ``q``), is at most ``TAIL_NATS``.

The first iterations, before any M-step has measured an FSC, and the paper's scheme (no filter)
score the whole working set. ``Config.resolution_schedule`` switches the schedule off.
"""

from __future__ import annotations

import numpy as np

MARGIN = 2.0  # shells scored beyond the resolution shell
TAIL_NATS = 0.1  # reference power a reference may keep beyond the scored radius (likelihood units)


def score_radius(model, sampling, config, noise=None) -> float | None:
    """The E-step's scoring radius (index units) for ``model``, or None for the whole working set
    (``noise``: the :class:`~mltomo.noise.NoiseModel` whose weights the E-step uses)."""
    shells = getattr(model, "shells", None)
    if (not config.resolution_schedule or config.scheme != "adaptive" or config.mode == "cc"
            or shells is None):
        return None
    r = float(shells.resolution_shell) + MARGIN
    tail = tail_nats(model.refs, model.sigma2, sampling.radius, noise)
    while r < sampling.radius and tail[min(int(np.floor(r + 1e-9)), len(tail) - 1)] > TAIL_NATS:
        r += 1.0
    return None if r >= sampling.radius else r


def tail_nats(refs: np.ndarray, sigma2: float, radius: float, noise=None) -> np.ndarray:
    """``tail[m]``: the largest (over references and noise groups) reference power at
    ``m < |k| ≤ radius`` (the working set),
    ``Σ h |A_k|² s_q²/c_q(s) / 2σ²`` (nats), for ``m = 0 … n//2``."""
    from mltomo.fourier import half_weights, radius_half, rfft_unitary, shells_half

    n = refs.shape[1]
    rr, shells = radius_half(n), shells_half(n)
    h = half_weights(n) * (rr <= radius + 1e-9)
    if noise is None or noise.is_identity:
        factor = np.ones((1, n // 2 + 1))
    else:
        factor = noise.scale[:, None] ** 2 / noise.shape
    shells = np.minimum(shells, factor.shape[1] - 1)
    # bin b holds m < |k| <= m + 1 for m = b, so tail[m] sums the bins from m on (|k| = 0: none)
    bins = np.ceil(rr - 1e-9).astype(np.int64) - 1
    keep = bins >= 0
    worst = np.zeros(n // 2 + 1)
    for a in refs:
        p = h * np.abs(rfft_unitary(np.asarray(a, dtype=np.float64))) ** 2
        for f in factor:
            per_bin = np.bincount(bins[keep], (p * f[shells])[keep], minlength=n)[: n // 2 + 1]
            worst = np.maximum(worst, np.cumsum(per_bin[::-1])[::-1] / (2.0 * sigma2))
    return worst
