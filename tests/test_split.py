"""The first split of a reference-free run (mltomo.split) against slow NumPy oracles, and its
science: aligned particles of two classes split along the residuals' principal component."""

import numpy as np
import pytest

from mltomo.evaluate import class_purity
from mltomo.fourier import half_weights, radius_half, rfft_unitary
from mltomo.model import Config, ParticleResults
from mltomo.parallel import SerialComm
from mltomo.particles import particles_from_arrays
from mltomo.sampling import Sampling
from mltomo.simulate import builtin_phantoms, simulate
from mltomo.split import _two_means_1d, gram, kmeans, pca_split, residuals, split_from_residuals, top_eigenvectors

from conftest import wedge_half


def test_two_means_is_the_best_threshold():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = np.concatenate([rng.normal(-1, 0.7, 13), rng.normal(1.5, 0.5, 21)])
        labels = _two_means_1d(x)
        best = np.inf
        for t in np.sort(x)[:-1]:  # every split of the sorted values, its within-group sum of squares
            a, b = x[x <= t], x[x > t]
            best = min(best, ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum())
        a, b = x[labels == 0], x[labels == 1]
        assert np.isclose(((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum(), best)


def test_gram_is_real_part_without_diagonal():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(7, 11)) + 1j * rng.normal(size=(7, 11))
    G = gram(r)
    for i in range(7):
        for j in range(7):
            want = 0.0 if i == j else float(np.sum(np.conj(r[i]) * r[j]).real)
            assert np.isclose(G[i, j], want)


def _two_class_residuals(seed, N=80, C=600):
    """Residuals of two classes: per component the class difference is half the unit noise, but
    it is shared by half the particles; every fourth particle is 5× noisier."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=C) + 1j * rng.normal(size=C)
    truth = np.arange(N) % 2
    noise = np.where(np.arange(N) % 4 == 0, 5.0, 1.0)[:, None]
    z = (rng.normal(size=(N, C)) + 1j * rng.normal(size=(N, C))) / np.sqrt(2)
    return np.where(truth[:, None] == 0, 0.25, -0.25) * d[None] + noise * z, truth


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_from_gram_finds_two_classes_below_the_noise(seed):
    r, truth = _two_class_residuals(seed)
    labels = split_from_residuals(r, 2, seed=seed)
    assert class_purity(truth + 1, labels + 1) >= 0.95


def test_zeroed_diagonal_keeps_noisy_particles_from_leading_the_split():
    """With its diagonal, ``Re(r r^H)``'s leading eigenvector follows the noisy particles' norms."""
    zeroed, kept = [], []
    for seed in range(4):
        r, truth = _two_class_residuals(seed)
        zeroed.append(class_purity(truth + 1, split_from_residuals(r, 2) + 1))
        lam, V = np.linalg.eigh((r @ r.conj().T).real)  # the same split with the diagonal kept
        kept.append(class_purity(truth + 1, (V[:, -1] > 0).astype(int) + 1))
    assert np.mean(zeroed) > np.mean(kept) + 0.03


def test_subspace_iteration_matches_eigh():
    """The large-N path (no Gram matrix) finds the eigenpairs the dense one does."""
    r, _ = _two_class_residuals(5, N=120, C=300)
    lam_d, V_d = top_eigenvectors(r, 3)
    lam_s, V_s = top_eigenvectors(r, 3, max_dense=10)
    assert np.allclose(lam_s, lam_d, rtol=1e-6)
    assert np.allclose(np.abs(np.sum(V_s * V_d, axis=0)), 1.0, atol=1e-6)


def test_kmeans_three_clusters():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    truth = np.repeat(np.arange(3), 20)
    X = centres[truth] + rng.normal(scale=0.5, size=(60, 2))
    labels = kmeans(X, 3, seed=0)
    assert class_purity(truth + 1, labels + 1) == 1.0


def test_residuals_match_oracle_without_padding():
    """Identity poses on an unpadded grid: the scatter is exact, ``S_i = w X_i``, ``M_i = w``, so
    the residuals are ``sqrt(h f)(w X_i − w ΣwX/Σw)`` inside the resolution."""
    rng = np.random.default_rng(4)
    n, N = 8, 5
    sampling = Sampling.create(n, 10.0, Config(padding=1.0, gridding=False, no_align=True))
    assert sampling.P_w == n
    X = np.stack([rfft_unitary(rng.normal(size=(n, n, n))) for _ in range(N)]).astype(np.complex64)
    masks = np.stack([wedge_half(n, 60), wedge_half(n, 40)])
    groups = np.array([0, 1, 0, 1, 1], dtype=np.int32)
    filt = np.array([1.0, 0.9, 0.7, 0.4, 0.2])
    r = residuals(X, masks, groups, np.zeros((N, 3)), np.zeros((N, 3)), sampling, filt, 3, SerialComm())
    s = radius_half(n)
    inside = (s >= 0.5) & (s <= 3 + 1e-9)
    w = masks[groups]
    S, M = (w * X).astype(np.complex128), w.astype(np.float64)
    seen = M.sum(0) > 0
    B = np.where(seen, S.sum(0) / np.where(seen, M.sum(0), 1), 0)
    weight = half_weights(n) * filt[np.minimum(np.rint(s).astype(int), 4)]
    want = ((S - M * B) * np.sqrt(weight))[:, inside]
    assert r.shape == want.shape
    assert np.allclose(r, want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pca_split_of_aligned_particles(seed):
    """The tutorial's phantoms at SNR 0.02, true poses, inside 30 Å: the split alone is ≥ 0.9 pure
    (measured 0.96-0.99; EM takes it from there)."""
    sim = simulate(builtin_phantoms(), 100, 24, 10.0, 30.0, snr=0.02, missing_region="wedge_y:-60:60",
                   max_shift_voxels=2, preferred_orientation="moderate", seed=seed)
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    sampling = Sampling.create(parts.box, parts.voxel_size_angstrom, Config())
    results = ParticleResults(indices=np.asarray(parts.indices), classes=np.ones(len(parts), np.int64),
                              angles=np.asarray(sim.angles, np.float64),
                              shifts_angstrom=np.asarray(sim.shifts_voxels, np.float64) * sim.voxel_size,
                              max_post=np.ones(len(parts)), n_significant=np.ones(len(parts), np.int64),
                              log_likelihood=np.zeros(len(parts)))
    from mltomo.ssnr import ShellStats

    shells = ShellStats(fsc_classes=np.ones((1, 13)), fsc=np.ones(13), filter=np.ones(13), resolution_shell=8)
    labels = pca_split(sampling.crop(parts.spectra), sampling.crop(parts.masks).astype(np.float32), parts.groups,
                       results, parts.voxel_size_angstrom, sampling, shells, 2, SerialComm(), seed=seed)
    purity = class_purity(sim.classes, labels + 1)
    print(f"seed {seed}: split purity {purity:.3f}")
    assert purity >= 0.9
