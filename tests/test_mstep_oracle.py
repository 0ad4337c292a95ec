"""The M-step against a slow, obviously correct NumPy oracle on tiny boxes (SPEC §4–5).

The sums come from the C++ E-step on a few particles (exact cube rotations, ``pad=1``, no
gridding, so the padded grid is the particle's own Fourier grid); a third class has ``α = 0``
and so ``W = 0``. The oracle then does what the SPEC says in the plainest way: the imputation
update per class on full transforms, the regularised maximiser as a ``K × K`` linear solve,
σ² by iterating its fixed-point equation with counts taken from full-spectrum masks, ξ² and α
from the summed posteriors.
"""

import dataclasses

import numpy as np
import pytest

from mltomo.estep import estep
from mltomo.model import Config, Model
from mltomo.mstep import MStepInputs, mstep, update_references, update_sigma2
from mltomo.reference import Constraints, padded_transform
from mltomo.sampling import Sampling

from conftest import blobs, cube_rotations, make_particles

N_BOX = 8
K = 3  # the third class gets no weight


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(5)
    refs = np.stack([blobs(N_BOX, rng, count=3) for _ in range(K)])
    rots = cube_rotations()[:6]
    parts, _, _, _ = make_particles(refs[:2], rots, 10, 0.5, rng, max_shift=1)
    config = Config(n_classes=K, padding=1.0, gridding=False, perturb=False, rotations=rots, max_shift_voxels=1,
                    mode="ml")
    sampling = Sampling.create(N_BOX, parts.voxel_size_angstrom, config)
    start = refs + 0.3 * rng.normal(size=refs.shape)  # the current model: not the truth
    Fref = np.ascontiguousarray([padded_transform(a, 1.0, gridding=False) for a in start], dtype=np.complex64)
    alpha = np.array([0.6, 0.4, 0.0])
    with np.errstate(divide="ignore"):
        log_alpha = np.log(alpha)
    sigma2, xi2 = 0.4, 1.5
    sums, scores, _ = estep(Fref, 1.0, parts.spectra, parts.masks, parts.groups, sampling.radius, rots,
                            sampling.shifts, sampling.log_prior_shift(xi2), log_alpha, sigma2, prune=0.0,
                            nthreads=1)
    assert sums.W[2] == 0 and sums.W[:2].min() > 1
    n_obs = _observed_full(parts.masks[0], sampling.radius)
    inputs = MStepInputs(len(parts), _working_full(sampling.radius), len(parts) * (_working_full(sampling.radius)
                         - n_obs), len(parts) * n_obs)
    model = Model(refs=start.astype(np.float32), alpha=alpha, sigma2=sigma2, xi2_voxels=xi2)
    return dict(sums=sums, scores=scores, model=model, config=config, sampling=sampling, inputs=inputs,
                start=start.astype(np.float32).astype(np.float64), n_parts=len(parts))


# ------------------------------------------------------------------------------ the oracle


def _full_radius(n):
    f = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    return np.sqrt(kx**2 + ky**2 + kz**2)


def _working_full(radius):
    """J: components of the full n³ spectrum inside the working radius."""
    return float(np.sum(_full_radius(N_BOX) <= radius + 1e-9))


def _observed_full(mask_half, radius):
    """J_i^o: observed components of the full spectrum inside the working radius (the half
    mask extended by Hermitian symmetry, one component at a time)."""
    n = N_BOX
    count = 0
    rad = _full_radius(n)
    for z in range(n):
        for y in range(n):
            for x in range(n):
                if rad[z, y, x] > radius + 1e-9:
                    continue
                if x <= n // 2:
                    w = mask_half[z, y, x]
                else:
                    w = mask_half[(-z) % n, (-y) % n, (-x) % n]
                count += w > 0
    return float(count)


def oracle_unregularised(refs, sums, impute_iter):
    """``A_k ← A_k + (S_k − M_k A_k)/Mfull_k`` on the transform, ``impute_iter`` times, where
    Mfull_k > 0; a class with ``W_k = 0`` keeps its reference."""
    out = refs.copy()
    n = refs.shape[1]
    for k in range(len(refs)):
        if sums.W[k] <= 0:
            continue
        B = np.fft.rfftn(np.fft.ifftshift(refs[k]), norm="ortho")
        F = sums.Mfull[k]
        seen = F > 1e-9 * F.max()
        for _ in range(impute_iter):
            B = np.where(seen, B + (sums.S[k] - sums.M[k] * B) / np.where(seen, F, 1.0), B)
        out[k] = np.fft.fftshift(np.fft.irfftn(B, s=(n, n, n), axes=(0, 1, 2), norm="ortho"))
    return out


def oracle_regularised(refs, sums, theta, impute_iter):
    """The maximiser of ``−Σ_k W_k |A_k − U_k|² − θ Σ_{k<l} |A_k − A_l|²`` by a linear solve:
    ``(W_k + Kθ) A_k − θ Σ_l A_l = W_k U_k``; classes with ``W_k = 0`` keep their reference."""
    U = oracle_unregularised(refs, sums, impute_iter)
    W = sums.W
    if theta == 0:
        return U
    L = np.diag(W + len(W) * theta) - theta * np.ones((len(W), len(W)))
    A = np.linalg.solve(L, W[:, None] * U.reshape(len(W), -1)).reshape(U.shape)
    return np.where(W[:, None, None, None] > 0, A, refs)


def oracle_reg_energy(refs, radius):
    F = [np.fft.fftn(np.fft.ifftshift(a), norm="ortho") for a in refs]
    inside = _full_radius(refs.shape[1]) <= radius + 1e-9
    return sum(np.sum(np.abs(F[k] - F[m])[inside] ** 2) for k in range(len(F)) for m in range(k + 1, len(F)))


def oracle_sigma2(sum_pd2, n_parts, J, n_obs_total, sigma2_old, impute_iter, theta=0.0, energy=0.0):
    """Iterate ``σ² ← [Σ P d² + Σ_i (J − J_i^o) σ² + θ E] / (N J)`` ``impute_iter`` times."""
    s2 = sigma2_old
    for _ in range(impute_iter):
        s2 = (sum_pd2 + (n_parts * J - n_obs_total) * s2 + theta * energy) / (n_parts * J)
    return s2


# ------------------------------------------------------------------------------- the tests


def test_ml_regularised_class_without_weight_keeps_its_reference(problem):
    """SPEC §4: a class with ``W_k = 0`` keeps its reference, with θ > 0 too. (The ML branch's
    closed form made it the mean of the other classes: ``(0 + θ Σ_l A_l)/(Kθ)``.)"""
    refs, sums = problem["start"], problem["sums"]
    new = update_references(refs, sums, mode="ml", pad=1.0, gridding=False, theta=50.0)
    np.testing.assert_array_equal(new[2], refs[2])
    assert np.sum((new[0] - refs[0]) ** 2) > 1e-3 * np.sum(refs[0] ** 2)  # the others did move


@pytest.mark.parametrize("impute_iter", [1, 3])
@pytest.mark.parametrize("theta", [0.0, 2.0, 50.0])
def test_ml_update_matches_oracle(problem, impute_iter, theta):
    refs, sums = problem["start"], problem["sums"]
    new = update_references(refs, sums, mode="ml", pad=1.0, gridding=False, impute_iter=impute_iter, theta=theta)
    expect = oracle_regularised(refs, sums, theta, impute_iter)
    np.testing.assert_allclose(new, expect, atol=1e-9 * np.abs(expect).max())


def test_regularised_weighted_average_matches_oracle(problem):
    """``ml-wa`` with θ > 0: at every grid point the maximiser of
    ``−Σ_k (M_k|B_k|² − 2 Re(B̄_k S_k)) − θ Σ_{k<l}|B_k − B_l|²``, solved point by point as
    ``(M_k + Kθ) B_k − θ Σ_l B_l = S_k``; the class without weight keeps its reference."""
    refs, sums = problem["start"], problem["sums"]
    theta = 2.0
    new = update_references(refs, sums, mode="ml-wa", pad=1.0, gridding=False, theta=theta)
    B = np.zeros(sums.S.shape, complex)
    for idx in np.ndindex(*sums.S.shape[1:]):
        m = sums.M[(slice(None), *idx)]
        if not np.any(m > 0):
            continue  # nothing observed this point: the maximiser is not unique, 0
        L = np.diag(m + K * theta) - theta * np.ones((K, K))
        B[(slice(None), *idx)] = np.linalg.solve(L, sums.S[(slice(None), *idx)])
    back = [np.fft.fftshift(np.fft.irfftn(B[k], s=(N_BOX,) * 3, axes=(0, 1, 2), norm="ortho")) for k in range(K)]
    expect = np.stack([back[k] if sums.W[k] > 0 else refs[k] for k in range(K)])
    np.testing.assert_allclose(new, expect, atol=1e-9 * np.abs(expect).max())


@pytest.mark.parametrize("impute_iter", [1, 2, 5])
@pytest.mark.parametrize("theta", [0.0, 3.0])
def test_sigma2_matches_oracle(problem, impute_iter, theta):
    sums, inputs, model = problem["sums"], problem["inputs"], problem["model"]
    refs = problem["start"]
    radius = problem["sampling"].radius
    energy = oracle_reg_energy(refs, radius)
    got = update_sigma2(sums, refs, inputs, model.sigma2, mode="ml", impute_iter=impute_iter, theta=theta,
                        reg_energy=energy)
    expect = oracle_sigma2(sums.sum_pd2, problem["n_parts"], inputs.J, inputs.sum_observed, model.sigma2,
                           impute_iter, theta, energy)
    assert got == pytest.approx(expect, rel=1e-12)
    # Many imputation iterations: the fixed point uses the observed components only (ml-wa's σ²).
    many = update_sigma2(sums, refs, inputs, model.sigma2, mode="ml", impute_iter=2000, theta=theta,
                         reg_energy=energy)
    wa = update_sigma2(sums, refs, inputs, model.sigma2, mode="ml-wa", theta=theta, reg_energy=energy)
    assert many == pytest.approx(wa, rel=1e-6)


def test_mstep_matches_oracle_for_alpha_xi_sigma_and_references(problem):
    """``mstep()`` assembles the update: α = W/N, ξ² = Σ P|t|²/(3N), σ² and the references as
    the oracle, the regularisation energy taken over the working set of the new references."""
    sums, model, sampling, inputs = problem["sums"], problem["model"], problem["sampling"], problem["inputs"]
    config = dataclasses.replace(problem["config"], reg0=4.0, regF=0.0, reg_steps=4)
    constraints = Constraints(np.eye(3)[None], sampling.radius, sampling.pad)
    new = mstep(sums, model, config, sampling, constraints, inputs, iteration=2)
    N = problem["n_parts"]
    theta = (4.0 + (0.0 - 4.0) * 0.25) * N / K**2
    np.testing.assert_allclose(new.alpha, sums.W / N, rtol=1e-12)
    assert new.alpha[2] == 0.0
    assert new.xi2_voxels == pytest.approx(sums.sum_pt2 / (3 * N), rel=1e-12)
    refs = constraints.apply(oracle_regularised(problem["start"], sums, theta, 1))
    np.testing.assert_allclose(new.refs, refs, atol=1e-5 * np.abs(refs).max())
    sigma2 = oracle_sigma2(sums.sum_pd2, N, inputs.J, inputs.sum_observed, model.sigma2, 1, theta,
                           oracle_reg_energy(np.asarray(new.refs, np.float64), sampling.radius))
    assert new.sigma2 == pytest.approx(sigma2, rel=1e-6)  # the energy of float32 maps is summed in float32
    assert new.iteration == 2


def test_xi2_and_alpha_from_posteriors(problem):
    """The summed statistics the M-step reads: W_k = Σ_i P_i(k) (posteriors sum to 1 per particle)
    and Σ P |t|² bounded by the largest searched |t|²."""
    sums, sampling = problem["sums"], problem["sampling"]
    assert sums.W.sum() == pytest.approx(problem["n_parts"], rel=1e-6)
    assert 0 <= sums.sum_pt2 <= problem["n_parts"] * sampling.t2.max() + 1e-9
