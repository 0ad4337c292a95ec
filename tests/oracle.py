"""A slow, obviously correct NumPy E-step on tiny boxes: the truth the C++ core must match.

Everything here is done on the FULL spectrum with dense arrays and explicit loops: the
rotated reference is a dense trilinear-interpolation matrix applied to the full padded
transform, rotating back is that matrix transposed, and d² is computed shift by shift from
its definition. Nothing is shared with the core but the conventions.
"""

from __future__ import annotations

import numpy as np


def full_freqs(n):
    f = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    return kx, ky, kz


def full_from_half_mask(mask_half, n):
    """Expand a centrosymmetric half-spectrum mask to the full spectrum."""
    full = np.zeros((n, n, n))
    nh = n // 2 + 1
    for z in range(n):
        for y in range(n):
            for x in range(n):
                if x < nh:
                    full[z, y, x] = mask_half[z, y, x]
                else:
                    full[z, y, x] = mask_half[(-z) % n, (-y) % n, (-x) % n]
    return full


def interp_matrix(n, P, pad, R, radius):
    """Dense (J_full, P³) trilinear matrix: row j reads the padded grid at pad·Rᵀk_j."""
    kx, ky, kz = full_freqs(n)
    sel = kx**2 + ky**2 + kz**2 <= radius**2 + 1e-9
    ks = np.stack([kx[sel], ky[sel], kz[sel]], axis=1)  # (J, 3) as (x, y, z)
    A = np.zeros((len(ks), P**3))
    for j, k in enumerate(ks):
        p = pad * (R.T @ k)
        p0 = np.floor(p).astype(int)
        f = p - p0
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    w = (f[0] if dx else 1 - f[0]) * (f[1] if dy else 1 - f[1]) * (f[2] if dz else 1 - f[2])
                    x, y, z = (p0[0] + dx) % P, (p0[1] + dy) % P, (p0[2] + dz) % P
                    A[j, (z * P + y) * P + x] += w
    return sel, ks, A


def padded_full(vol, pad, gridding):
    from mltomo.reference import gridding_kernel

    n = vol.shape[0]
    P = int(round(pad * n))
    v = vol / gridding_kernel(n, pad) if gridding else vol
    big = np.zeros((P, P, P))
    o = P // 2 - n // 2
    big[o : o + n, o : o + n, o : o + n] = v
    return np.fft.fftn(np.fft.ifftshift(big)) / n**1.5


def oracle_estep(refs_real, particles_real, masks_half, groups, pad, radius, rotations, shifts,
                 log_prior_shift, log_alpha, sigma2, gridding=True, mode="ml", score_radius=None):
    """``score_radius``: d² counts the rotated reference as 0 beyond it (the sums still cover
    the whole working set)."""
    n = refs_real.shape[1]
    P = int(round(pad * n))
    K, N = len(refs_real), len(particles_real)
    G_full = [padded_full(a, pad, gridding).ravel() for a in refs_real]
    X_full = [np.fft.fftn(np.fft.ifftshift(x), norm="ortho") for x in particles_real]
    W_full = [full_from_half_mask(m, n) for m in masks_half]
    mats = [interp_matrix(n, P, pad, R, radius) for R in rotations]
    sel = mats[0][0]
    ks = mats[0][1]
    scored = np.ones(len(ks)) if score_radius is None else (np.sum(ks**2, axis=1) <= score_radius**2 + 1e-9) * 1.0
    phases = [np.exp(-2j * np.pi * (ks @ np.asarray(t, float)) / n) for t in shifts]
    T = len(shifts)
    out = dict(W=np.zeros(K), S=np.zeros((K, P**3), complex), M=np.zeros((K, P**3)), Mfull=np.zeros((K, P**3)),
               sum_pd2=0.0, sum_pt2=0.0, log_sum=np.zeros(N), best=[], max_post=np.zeros(N),
               x_norm=np.zeros(N), n_observed=np.zeros(N), posteriors=[], class_log_sum=np.zeros((N, K)))
    log_alpha = np.asarray(log_alpha, dtype=np.float64)
    for i in range(N):
        w = W_full[groups[i]][sel]
        X = X_full[i][sel]
        out["x_norm"][i] = np.sum(w * np.abs(X) ** 2)
        out["n_observed"][i] = np.sum(w > 0)
        L = np.full((K, len(rotations), T), -np.inf)
        D2 = np.zeros_like(L)
        for k in range(K):
            for r, (_, _, A) in enumerate(mats):
                RA = (A @ G_full[k]) * scored
                for t in range(T):
                    d2 = np.sum(w * np.abs(X - phases[t] * RA) ** 2)
                    D2[k, r, t] = d2
                    if mode == "ml":
                        la = log_alpha[i, k] if log_alpha.ndim == 2 else log_alpha[k]  # per particle, or shared
                        L[k, r, t] = la + log_prior_shift[t] - d2 / (2 * sigma2)
                    else:
                        nodc = np.ones(len(ks), bool)
                        nodc[np.all(ks == 0, axis=1)] = False
                        num = np.real(np.sum((w * np.conj(X) * phases[t] * RA)[nodc]))
                        den = np.sqrt(np.sum((w * np.abs(X) ** 2)[nodc]) * np.sum((w * np.abs(RA) ** 2)[nodc]))
                        L[k, r, t] = num / den
        if mode == "ml":
            m = L.max()
            Pp = np.exp(L - m)
            out["log_sum"][i] = m + np.log(Pp.sum())
            for k in range(K):  # log Σ_{r,t} p(t) exp(−d²/2σ²) of class k, without its prior
                la = log_alpha[i, k] if log_alpha.ndim == 2 else log_alpha[k]
                with np.errstate(divide="ignore"):  # a class no sample reaches: -inf
                    out["class_log_sum"][i, k] = m + np.log(Pp[k].sum()) - la
            Pp /= Pp.sum()
        else:
            Pp = np.zeros_like(L)
            Pp[np.unravel_index(np.argmax(L), L.shape)] = 1.0
            out["log_sum"][i] = L.max()
        out["posteriors"].append(Pp)
        best = np.unravel_index(np.argmax(Pp), Pp.shape)
        out["best"].append(best)
        out["max_post"][i] = Pp[best]
        for k in range(K):
            for r, (_, _, A) in enumerate(mats):
                for t in range(T):
                    p = Pp[k, r, t]
                    if p == 0:
                        continue
                    out["W"][k] += p
                    out["sum_pd2"] += p * D2[k, r, t]
                    out["sum_pt2"] += p * float(np.dot(shifts[t], shifts[t]))
                    out["S"][k] += p * (A.T @ (np.conj(phases[t]) * w * X))
                    out["M"][k] += p * (A.T @ w)
                    out["Mfull"][k] += p * A.sum(0)
    out["S"] = out["S"].reshape(K, P, P, P)[..., : P // 2 + 1]
    out["M"] = out["M"].reshape(K, P, P, P)[..., : P // 2 + 1]
    out["Mfull"] = out["Mfull"].reshape(K, P, P, P)[..., : P // 2 + 1]
    return out
