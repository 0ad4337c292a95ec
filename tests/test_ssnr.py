"""The adaptive scheme's pieces (mltomo.ssnr) against slow NumPy oracles on tiny boxes, and the
self-fit it corrects measured on pure-noise particles."""

import numpy as np
import pytest

from mltomo.estep import estep
from mltomo.fourier import rfft_unitary
from mltomo.reference import Constraints, crop_padded, padded_size, padded_transform, soft_sphere
from mltomo.ssnr import (
    FSC_THRESHOLD,
    ShellStats,
    apply_filter,
    effective_components,
    half_sets,
    self_fit_offsets,
    shell_stats,
)

from conftest import wedge_half


def full_shells(n):
    f = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    return np.rint(np.sqrt(kz**2 + ky**2 + kx**2)).astype(int), np.sqrt(kz**2 + ky**2 + kx**2)


def oracle_fsc(a, b):
    """FSC over the full spectrum of numpy's fftn, shells round(|k|) = 0 … n//2."""
    n = a.shape[0]
    A, B = np.fft.fftn(a), np.fft.fftn(b)
    s, _ = full_shells(n)
    out = np.zeros(n // 2 + 1)
    for q in range(n // 2 + 1):
        sel = s == q
        num = np.sum(np.real(A[sel] * np.conj(B[sel])))
        den = np.sqrt(np.sum(np.abs(A[sel]) ** 2) * np.sum(np.abs(B[sel]) ** 2))
        out[q] = num / den if den > 0 else 0.0
    return out


def test_half_sets_balanced_and_seeded():
    h = half_sets(3, 101)
    assert set(np.unique(h)) == {0, 1} and abs(int(h.sum()) - 50) <= 1
    assert np.array_equal(h, half_sets(3, 101)) and not np.array_equal(h, half_sets(4, 101))


def test_shell_stats_match_oracle():
    rng = np.random.default_rng(0)
    n, K = 10, 2
    signal = rng.normal(size=(K, n, n, n))
    a = signal + 0.8 * rng.normal(size=(K, n, n, n))
    b = signal + 0.8 * rng.normal(size=(K, n, n, n))
    weights = np.array([30.0, 10.0])
    st = shell_stats(a, b, weights, limit_shell=n / 2 - 1)
    per = np.stack([oracle_fsc(a[k], b[k]) for k in range(K)])
    assert np.allclose(st.fsc_classes, per, atol=1e-10)
    common = np.clip((30 * per[0] + 10 * per[1]) / 40, 0, 0.999)
    common[0] = 1
    assert np.allclose(st.fsc, common, atol=1e-10)
    below = [q for q in range(1, n // 2 + 1) if common[q] < FSC_THRESHOLD]
    res = min((below[0] - 1) if below else n // 2, int(n / 2 - 1))
    assert st.resolution_shell == res
    want = np.array([1.0] + [2 * c / (1 + c) if q <= res else 0.0 for q, c in enumerate(common)][1:])
    assert np.allclose(st.filter, want)
    c = np.clip(common, 0, 0.999)
    assert np.allclose(st.ssnr, 2 * c / (1 - c))


def test_shell_stats_cut_at_threshold():
    """Signal only in the lowest shells: the filter is zero from the first shell below 0.143."""
    rng = np.random.default_rng(1)
    n = 12
    s, _ = full_shells(n)
    sig = np.real(np.fft.ifftn(np.fft.fftn(rng.normal(size=(n, n, n))) * (s <= 2)))
    a = (10 * sig + 0.3 * rng.normal(size=(n, n, n)))[None]
    b = (10 * sig + 0.3 * rng.normal(size=(n, n, n)))[None]
    st = shell_stats(a, b, np.ones(1), limit_shell=n / 2)
    assert st.resolution_shell == 2
    assert np.all(st.filter[3:] == 0) and np.all(st.filter[:3] > 0.9)
    assert st.resolution_angstrom(n, 5.0) == pytest.approx(n * 5.0 / 2)


def test_apply_filter_matches_oracle():
    rng = np.random.default_rng(2)
    n = 9
    refs = rng.normal(size=(2, n, n, n))
    filt = rng.uniform(0, 1, n // 2 + 1)
    out = apply_filter(refs, filt)
    s, _ = full_shells(n)
    f = np.where(s <= n // 2, filt[np.minimum(s, n // 2)], 0.0)
    for k in range(2):
        # mltomo's transforms put the origin at n//2: shift, filter, shift back
        want = np.fft.fftshift(np.real(np.fft.ifftn(np.fft.fftn(np.fft.ifftshift(refs[k])) * f)))
        assert np.allclose(out[k], want, atol=1e-10)


def test_effective_components_match_full_spectrum_count():
    n, radius = 10, 4.0
    mask_half = wedge_half(n, 60).astype(np.float32)
    filt = np.linspace(1, 0.2, n // 2 + 1)
    j = effective_components(filt, mask_half[None], radius)
    # oracle: the same mask on the full spectrum (centrosymmetric), f per shell, |k| <= radius
    f1 = (np.fft.fftfreq(n) * n).astype(int)
    full = np.zeros((n, n, n))
    for iz, kz in enumerate(f1):
        for iy, ky in enumerate(f1):
            for ix, kx in enumerate(f1):
                if kx >= 0 and kx <= n // 2:
                    full[iz, iy, ix] = mask_half[iz, iy, kx]
                else:
                    full[iz, iy, ix] = mask_half[(-kz) % n, (-ky) % n, -kx]
    s, r = full_shells(n)
    want = np.sum(full * np.where(r <= radius, filt[np.minimum(s, n // 2)], 0.0))
    assert j.shape == (1,) and j[0] == pytest.approx(want, rel=1e-6)


def test_self_fit_offsets():
    post = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.25, 0.75]])
    off = self_fit_offsets(post, np.array([0, 1, 0, 0]), np.array([100.0, 50.0]), np.array([10.0, 20.0]))
    assert np.allclose(off, [[-10, 0], [0, -2.5], [0, 0], [-2.5, -3.75]])


def test_shell_stats_round_trip_fields():
    st = ShellStats(np.ones((1, 3)), np.array([1.0, 0.5, 0.1]), np.array([1.0, 2 / 3, 0.0]), 1)
    assert st.ssnr[1] == pytest.approx(2.0) and st.resolution_angstrom(4, 2.0) == 8.0


@pytest.mark.parametrize("seed,masked", [(0, False), (1, False), (0, True), (1, True)])
def test_self_fit_is_J_over_W_and_the_offsets_remove_it(seed, masked):
    """Pure-noise particles, two classes that are the averages of random halves of them: each
    particle prefers the class it is in by J/W nats on average (J its observed components, W
    the class size: E|n − A_own|² = σ²(1 − 1/W), E|n − A_other|² = σ²(1 + 1/W) per component),
    and the self-fit offsets bring that preference to zero. Averaged over 6 random splits (the
    class averages' own noise moves one split's mean by ~√(2J)/W). With the class averages
    masked by a soft sphere (``masked``) the preference is ``mean(m)·J/W`` and the offsets
    scaled by :attr:`Constraints.noise_fraction` remove it (unscaled they over-correct by
    ``1/mean(m)``, about 2× on this box)."""
    rng = np.random.default_rng(seed)
    n, N, sigma2, pad = 8, 100, 1.0, 1.0
    vols = rng.normal(scale=np.sqrt(sigma2), size=(N, n, n, n))
    spectra = np.stack([rfft_unitary(np.fft.fftshift(v)) for v in vols]).astype(np.complex64)
    masks = np.ones((1, n, n, n // 2 + 1), np.float32)
    masks[0] = wedge_half(n, 60)
    groups = np.zeros(N, np.int32)
    radius = n / 2 - 1
    J = effective_components(np.ones(n // 2 + 1), masks, radius)[0]
    P = padded_size(n, pad)
    sphere = soft_sphere(n, n / 2 - 2, 2.0) if masked else None
    fraction = Constraints(np.eye(3)[None], radius, pad, sphere).noise_fraction
    assert fraction == pytest.approx(float(np.mean(sphere)) if masked else 1.0) and (fraction < 0.6) == masked
    sphere = 1.0 if sphere is None else sphere
    plain, corrected, expect = [], [], []
    for _ in range(6):
        member = rng.permutation(N) % 2
        W = np.bincount(member).astype(float)
        # class averages of what each particle observes (weighted averages with one wedge)
        refs_real = np.stack([vols[member == k].mean(0) for k in (0, 1)]) * sphere
        F = np.stack([crop_padded(padded_transform(np.fft.fftshift(a), pad, gridding=False), P) for a in refs_real])
        F = (F * masks[0]).astype(np.complex64)  # nothing but noise outside the wedge either way

        def preference(log_alpha, F=F, member=member):
            _, sc, _ = estep(F, pad, spectra, masks, groups, radius, np.eye(3)[None], np.zeros((1, 3), np.int32),
                             np.zeros(1), log_alpha, sigma2, prune=0.0, nthreads=1)
            p_best = np.clip(sc.max_post, 1e-300, 1 - 1e-16)
            lo = np.log(p_best / (1 - p_best))  # log P(best)/P(other), K = 2
            return np.where(sc.best_class == member, lo, -lo)

        plain.append(np.mean(preference(np.zeros(2))))
        offsets = fraction * self_fit_offsets(np.eye(2)[member], groups, np.array([J]), W)
        corrected.append(np.mean(preference(offsets)))
        expect.append(fraction * np.mean(J / W[member]))
    assert np.mean(plain) == pytest.approx(np.mean(expect), rel=0.15)
    assert abs(np.mean(corrected)) < 0.15 * np.mean(expect)
