"""The first split of a reference-free classification: aligned particles divided along the
principal components of their wedge-aware residuals (README, "Classification").

The adaptive scheme aligns every particle to one reference while the paper's regularisation
would tie the classes anyway (θ → ∞ is K = 1), then splits once, here, and runs K-class EM from
that split. Started from K equal references, EM has to leave a saddle point: the class
difference grows by a few per cent an iteration at the SNRs users have, so a run of 16
iterations may end before the split (measured: README). The leading principal component of the
residuals finds the direction in one step.

With particle ``i`` in its best pose ``(R_i, t_i)`` (shift undone), its data and missing-region
weights are brought into the reference frame on the padded grid (the M-step's trilinear
scatter): ``S_i(ν)``, ``M_i(ν)``. The mean structure seen through each particle's own wedge is
``M_i B`` with ``B = Σ_i S_i / Σ_i M_i``, and its residual is

    r_i(ν) = S_i(ν) − M_i(ν) B(ν),

the class difference seen through the particle's wedge plus noise. Over the components inside
the classes' resolution (the half-set FSC of the aligned average), each weighted by the Wiener
filter ``f(s)`` (signal shells count, noise shells do not) and its full-spectrum multiplicity
``h``, the Gram matrix

    G_ij = Re Σ_ν h(ν) f(s_ν) conj(r_i(ν)) r_j(ν),   G_ii = 0

has the class structure ``E G_ij = Σ_ν h f M_i M_j (c_i − B)^* (c_j − B)`` (noise is independent
between particles; the zeroed diagonal drops each particle's own noise power). Its leading
eigenvector separates two classes by sign; for K classes the particles are clustered (k-means)
on the top ``K − 1`` eigenvectors scaled by ``sqrt(λ)``. Where the grid holds more than
``max_components`` components inside the resolution, a seeded random subset of them is used
(an unbiased estimate of ``G``); beyond ``MAX_DENSE`` particles the top eigenvectors come from
subspace iteration on products with the residuals, so ``G`` (``N²``) is never formed.
"""

from __future__ import annotations

import numpy as np

from mltomo import geometry, spectra_cache
from mltomo.fourier import half_weights, radius_half

MAX_COMPONENTS = 16384


def _selection(P: int, pad: float, filt: np.ndarray, shell: int, max_components: int, seed: int):
    """Flat indices of the padded half grid inside the resolution ``shell`` (radius ``pad·shell``)
    and their weights ``h·f``."""
    s = radius_half(P) / pad
    inside = (s >= 0.5) & (s <= shell + 1e-9)
    idx = np.flatnonzero(inside.ravel())
    if len(idx) > max_components:
        idx = np.sort(np.random.default_rng([seed, 0, 11]).choice(idx, max_components, replace=False))
    f = np.concatenate([np.asarray(filt, dtype=np.float64), [0.0]])
    shells = np.minimum(np.rint(s.ravel()[idx]).astype(np.int64), len(f) - 1)
    w = half_weights(P).ravel()[idx].astype(np.float64) * f[shells]
    return idx, w


def residuals(spectra_w, masks_w, groups, angles, shifts_voxels, sampling, filt, shell, comm, *,
              seed: int = 0, max_components: int = MAX_COMPONENTS) -> np.ndarray:
    """``(N_local, C)`` complex128 residuals ``sqrt(h f) · r_i`` of this process's particles in
    their poses (``angles`` rot, tilt, psi degrees; ``shifts_voxels`` original voxels, undone)."""
    from mltomo import _core

    P = sampling.P_w
    idx, w = _selection(P, sampling.pad, filt, shell, max_components, seed)
    R = geometry.euler_to_matrix(*np.asarray(angles, dtype=np.float64).T).reshape(-1, 3, 3)
    N = len(spectra_w)
    S_i = np.zeros((N, len(idx)), np.complex128)
    M_i = np.zeros((N, len(idx)))
    S = np.zeros((P, P, P // 2 + 1), np.complex128)
    M = np.zeros(S.shape)
    for j in range(N):
        S[...] = 0
        M[...] = 0
        m = masks_w[groups[j]]
        x = sampling.apply_shifts(np.asarray(spectra_w[j : j + 1]), np.asarray(shifts_voxels)[j : j + 1])[0]
        spectra_cache.after_row(spectra_w, j)
        _core.rotate_back(np.ascontiguousarray(x * m, dtype=np.complex64),
                          np.ascontiguousarray(m, dtype=np.float32), sampling.pad,
                          np.ascontiguousarray(R[j]), sampling.radius, S, M)
        S_i[j] = S.ravel()[idx]
        M_i[j] = M.ravel()[idx]
    totals = [np.ascontiguousarray(S_i.sum(0)), np.ascontiguousarray(M_i.sum(0))]
    comm.allreduce_sum(totals)
    seen = totals[1] > 1e-9 * max(float(totals[1].max()), 1e-300)
    B = np.where(seen, totals[0] / np.where(seen, totals[1], 1.0), 0)
    return (S_i - M_i * B[None]) * np.sqrt(w)[None]


def gram(r: np.ndarray) -> np.ndarray:
    """``Re(r r^H)`` with the diagonal set to 0."""
    G = (r @ r.conj().T).real
    np.fill_diagonal(G, 0.0)
    return G


MAX_DENSE = 3000  # particles up to which the Gram matrix is formed and diagonalised whole


def top_eigenvectors(r: np.ndarray, m: int, *, seed: int = 0, max_dense: int = MAX_DENSE, iterations: int = 300):
    """``(λ (m,), V (N, m))``: the ``m`` largest eigenpairs of ``gram(r)``, largest first.

    Up to ``max_dense`` particles by ``eigh`` of the matrix; beyond, by subspace iteration
    on ``G V = Re(r (r^H V)) − diag(|r_i|²) V`` (``N × C`` per step, ``G`` never formed),
    shifted by the Gershgorin bound so that the wanted end of the spectrum dominates."""
    N = len(r)
    if N <= max_dense:
        lam, V = np.linalg.eigh(gram(r))
        top = np.argsort(lam)[::-1][:m]
        return lam[top], V[:, top]
    d = np.sum(np.abs(r) ** 2, axis=1)

    def apply(V):
        return (r @ (r.conj().T @ V)).real - d[:, None] * V

    shift = float(d.max())  # G + shift·I is positive semi-definite: the top of G is its top
    p = min(N, m + 8)
    V, _ = np.linalg.qr(np.random.default_rng([seed, 0, 13]).normal(size=(N, p)))
    for _ in range(iterations):
        V_new, _ = np.linalg.qr(apply(V) + shift * V)
        if np.allclose(np.abs(np.sum(V_new[:, :m] * V[:, :m], axis=0)), 1.0, atol=1e-10):
            V = V_new
            break
        V = V_new
    H = V.T @ apply(V)
    lam, U = np.linalg.eigh(0.5 * (H + H.T))
    top = np.argsort(lam)[::-1][:m]
    return lam[top], V @ U[:, top]


def split_from_residuals(r: np.ndarray, K: int, seed: int = 0, max_dense: int = MAX_DENSE) -> np.ndarray:
    """``(N,)`` 0-based labels: the top ``K − 1`` eigenvectors of ``gram(r)`` (scaled by
    sqrt λ), clustered into ``K`` groups (exact 1-D 2-means for ``K = 2``, seeded k-means
    otherwise)."""
    N = len(r)
    if N < K:
        return np.arange(N) % K
    lam, V = top_eigenvectors(r, K - 1, seed=seed, max_dense=max_dense)
    X = V * np.sqrt(np.maximum(lam, 0.0))[None]
    if K == 2:
        return _two_means_1d(X[:, 0])
    return kmeans(X, K, seed=seed, restarts=10)


def _two_means_1d(x: np.ndarray) -> np.ndarray:
    """The threshold split of ``x`` with the least within-group sum of squares."""
    order = np.argsort(x)
    xs = x[order]
    N = len(x)
    c1, c2 = np.cumsum(xs), np.cumsum(xs**2)
    n1 = np.arange(1, N)
    s1, q1 = c1[:-1], c2[:-1]
    s2, q2 = c1[-1] - s1, c2[-1] - q1
    cost = (q1 - s1**2 / n1) + (q2 - s2**2 / (N - n1))
    cut = int(np.argmin(cost)) + 1
    labels = np.zeros(N, np.int64)
    labels[order[cut:]] = 1
    return labels


def kmeans(X: np.ndarray, K: int, *, seed: int = 0, restarts: int = 10, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ starts (seeded); the labels of the lowest-cost restart."""
    rng = np.random.default_rng([seed, 0, 12])
    best, best_cost = None, np.inf
    for _ in range(restarts):
        C = X[[rng.integers(len(X))]]
        for _k in range(1, K):
            d = np.min(((X[:, None] - C[None]) ** 2).sum(-1), axis=1)
            p = d / d.sum() if d.sum() > 0 else np.full(len(X), 1.0 / len(X))
            C = np.vstack([C, X[rng.choice(len(X), p=p)]])
        for _i in range(iterations):
            labels = np.argmin(((X[:, None] - C[None]) ** 2).sum(-1), axis=1)
            newC = np.stack([X[labels == k].mean(0) if np.any(labels == k) else C[k] for k in range(K)])
            if np.allclose(newC, C):
                break
            C = newC
        cost = float(((X - C[labels]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = labels, cost
    return best.astype(np.int64)


def pca_split(spectra_w, masks_w, groups, results, voxel_size, sampling, shells, K: int, comm, *,
              seed: int = 0, max_components: int = MAX_COMPONENTS) -> np.ndarray:
    """``(N_local,)`` 0-based class of each of this process's particles (collective): the split of
    all particles (rank 0 computes it from the gathered residuals) along the principal components
    of their residuals, in the poses of ``results`` (this process's
    :class:`~mltomo.model.ParticleResults`), inside the resolution of ``shells``."""
    r = residuals(spectra_w, masks_w, groups, results.angles, results.shifts_angstrom / voxel_size, sampling,
                  shells.filter, shells.resolution_shell, comm, seed=seed, max_components=max_components)
    gathered = comm.gather((np.asarray(results.indices), r.astype(np.complex64)))
    labels_all = None
    if comm.rank == 0:
        rows = np.concatenate([g[0] for g in gathered])
        R = np.concatenate([g[1] for g in gathered]).astype(np.complex128)
        order = np.argsort(rows)
        labels_all = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, np.int64)  # by table row
        labels_all[rows[order]] = split_from_residuals(R[order], K, seed=seed)
    labels_all = comm.bcast(labels_all)
    return labels_all[np.asarray(results.indices, dtype=np.int64)]


def one_class(model):
    """The single-class view of a model whose classes are tied (equal references): the model
    the E-step and M-step of the tied iterations work with."""
    from dataclasses import replace

    return replace(model, refs=np.asarray(model.refs)[:1], alpha=np.ones(1), class_weights=None,
                   changes=np.asarray(model.changes)[:1])


def replicate(model, K: int):
    """The ``K``-class model of a single-class one: ``K`` equal references, α = 1/K."""
    from dataclasses import replace

    shells = model.shells
    if shells is not None:
        shells = replace(shells, fsc_classes=np.repeat(shells.fsc_classes[:1], K, axis=0))
    W = model.weights(1)[0] if model.class_weights is not None else float("nan")
    return replace(model, refs=np.repeat(np.asarray(model.refs)[:1], K, axis=0), alpha=np.full(K, 1.0 / K),
                   changes=np.repeat(np.asarray(model.changes)[:1], K), class_weights=np.full(K, W / K),
                   shells=shells)
