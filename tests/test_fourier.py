"""Unit tests of mltomo.fourier: transforms, half-spectrum weights, cropping, shells, masks."""

import math

import numpy as np
import pytest

from mltomo import fourier as ft

# ---------------------------------------------------------------- transforms and grids


@pytest.mark.parametrize("n", [8, 9, 16, 15])
def test_rfft_matches_numpy_fftn_and_parseval(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, n, n))
    y = rng.standard_normal((n, n, n))
    X, Y = ft.rfft_unitary(x), ft.rfft_unitary(y)
    assert X.shape == (n, n, n // 2 + 1) and X.dtype == np.complex128
    full_x = np.fft.fftn(np.fft.ifftshift(x)) / n**1.5
    full_y = np.fft.fftn(np.fft.ifftshift(y)) / n**1.5
    np.testing.assert_allclose(X, full_x[:, :, : n // 2 + 1], atol=1e-12)
    hw = ft.half_weights(n)
    # Parseval and cross terms through half_weights equal the full-spectrum sums
    assert np.isclose((hw * abs(X) ** 2).sum(), (abs(full_x) ** 2).sum(), rtol=1e-12)
    assert np.isclose((hw * abs(X) ** 2).sum(), (x**2).sum(), rtol=1e-12)
    assert np.isclose(
        (hw * np.real(np.conj(X) * Y)).sum(), np.real(np.conj(full_x) * full_y).sum(), rtol=1e-10
    )
    assert hw.sum() == n**3
    np.testing.assert_allclose(ft.irfft_unitary(X, n), x, atol=1e-12)


@pytest.mark.parametrize("n", [8, 9])
def test_centred_delta_has_flat_real_transform(n):
    x = np.zeros((n, n, n), np.float32)
    x[n // 2, n // 2, n // 2] = 1.0
    X = ft.rfft_unitary(x)
    assert X.dtype == np.complex64
    np.testing.assert_allclose(X, n**-1.5, atol=1e-7)
    assert ft.irfft_unitary(X, n).dtype == np.float32


@pytest.mark.parametrize("n", [8, 9])
def test_freq_and_radius_follow_fftfreq(n):
    kz, ky, kx = ft.freq_half(n)
    np.testing.assert_array_equal(kz.ravel(), np.round(np.fft.fftfreq(n) * n))
    np.testing.assert_array_equal(ky.ravel(), np.round(np.fft.fftfreq(n) * n))
    np.testing.assert_array_equal(kx.ravel(), np.round(np.fft.rfftfreq(n) * n))
    r = ft.radius_half(n)
    assert r.shape == (n, n, n // 2 + 1)
    assert r[0, 0, 0] == 0 and np.isclose(r[1, 2, 2], 3.0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="cubic"):
        ft.rfft_unitary(np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="half spectrum"):
        ft.irfft_unitary(np.zeros((4, 4, 4), complex), 4)


# ---------------------------------------------------------------- cropping and padding


def _band_energy_full(x, n_new):
    """Energy of the components with |k_i| < n_new / 2, summed over the numpy full spectrum."""
    n = x.shape[0]
    X = np.fft.fftn(x) / n**1.5
    k = np.abs(np.round(np.fft.fftfreq(n) * n))
    inb = k < n_new / 2
    band = inb[:, None, None] & inb[None, :, None] & inb[None, None, :]
    return (np.abs(X[band]) ** 2).sum()


def _zero_nyquist(F, n):
    """Copy of a half spectrum with the even-size Nyquist planes (|k_i| = n/2) set to zero."""
    G = F.copy()
    if n % 2 == 0:
        G[n // 2], G[:, n // 2], G[:, :, n // 2] = 0, 0, 0
    return G


def test_crop_to_same_size_is_identity():
    F = ft.rfft_unitary(np.random.default_rng(0).standard_normal((12, 12, 12)))
    C = ft.crop_half(F, 12)
    np.testing.assert_array_equal(C, F)
    assert C is not F


@pytest.mark.parametrize(("n", "n_new"), [(16, 10), (16, 9), (15, 8), (15, 11), (16, 15)])
def test_crop_keeps_coefficients_and_band_energy(n, n_new):
    rng = np.random.default_rng(n * 100 + n_new)
    x = rng.standard_normal((n, n, n))
    F = ft.rfft_unitary(x)
    C = ft.crop_half(F, n_new)
    assert C.shape == (n_new, n_new, n_new // 2 + 1) and C.dtype == F.dtype
    # same frequency index, same value
    kz, ky, kx = ft.freq_half(n_new)
    kz, ky, kx = np.broadcast_arrays(kz, ky, kx)
    inside = (np.abs(kz) < n_new / 2) & (np.abs(ky) < n_new / 2) & (kx < n_new / 2)
    np.testing.assert_array_equal(C[inside], F[kz[inside] % n, ky[inside] % n, kx[inside]])
    assert (C[~inside] == 0).all()  # even-size Nyquist planes are zero
    e = (ft.half_weights(n_new) * np.abs(C) ** 2).sum()
    assert np.isclose(e, _band_energy_full(x, n_new), rtol=1e-10)
    # the cropped spectrum is Hermitian-consistent: irfft -> rfft reproduces it
    np.testing.assert_allclose(ft.rfft_unitary(ft.irfft_unitary(C, n_new)), C, atol=1e-10)


@pytest.mark.parametrize(("n", "n_new"), [(10, 16), (9, 16), (8, 15), (11, 15)])
def test_pad_crop_round_trip_and_interpolation(n, n_new):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, n, n))
    G = ft.rfft_unitary(x)
    P = ft.pad_half(G, n_new)
    assert P.shape == (n_new, n_new, n_new // 2 + 1)
    # padding is exactly Hermitian (Nyquist split) and energy is conserved off the Nyquist planes
    np.testing.assert_allclose(ft.rfft_unitary(ft.irfft_unitary(P, n_new)), P, atol=1e-10)
    Gz = _zero_nyquist(G, n)
    np.testing.assert_allclose(ft.crop_half(ft.pad_half(Gz, n_new), n), Gz, atol=0)
    hw = ft.half_weights
    energy_padded = (hw(n_new) * abs(ft.pad_half(Gz, n_new)) ** 2).sum()
    assert np.isclose(energy_padded, (hw(n) * abs(Gz) ** 2).sum())
    # trigonometric interpolation: the padded volume passes through the original samples
    # irfft of the padded spectrum is the interpolant scaled by (n / n_new)^{3/2}: its mean is
    # the original mean times that factor (DC coefficient unchanged)
    y = ft.irfft_unitary(P, n_new)
    assert np.isclose(y.mean() * (n_new / n) ** 1.5, x.mean(), rtol=1e-10)


def test_pad_even_source_interpolates_exactly():
    """Doubling an even box reproduces every original sample, Nyquist included."""
    rng = np.random.default_rng(5)
    n, m = 8, 16
    x = rng.standard_normal((n, n, n))
    y = ft.irfft_unitary(ft.pad_half(ft.rfft_unitary(x), m), m) * (m / n) ** 1.5
    idx = m // 2 + (np.arange(n) - n // 2) * 2
    np.testing.assert_allclose(y[np.ix_(idx, idx, idx)], x, atol=1e-10)
    np.testing.assert_allclose(ft.resample_volume(x, m)[np.ix_(idx, idx, idx)], x, atol=1e-10)


def test_crop_batch_and_errors():
    rng = np.random.default_rng(0)
    stack = np.stack([ft.rfft_unitary(rng.standard_normal((12, 12, 12))) for _ in range(3)])
    C = ft.crop_half(stack, 8)
    assert C.shape == (3, 8, 8, 5)
    np.testing.assert_array_equal(C[1], ft.crop_half(stack[1], 8))
    with pytest.raises(ValueError, match="pad_half"):
        ft.crop_half(stack[0], 14)
    with pytest.raises(ValueError, match="crop_half"):
        ft.pad_half(stack[0], 10)
    with pytest.raises(ValueError, match="half spectra"):
        ft.crop_half(np.zeros((12, 12, 12)), 8)


def _blob(n, centre_offset, sigma):
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    dz, dy, dx = centre_offset
    return np.exp(-((z - dz) ** 2 + (y - dy) ** 2 + (x - dx) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize(("n", "n_new"), [(48, 24), (48, 30), (47, 32), (32, 45)])
def test_resample_gaussian_blob_keeps_centre_and_integral(n, n_new):
    offset = np.array([3.0, -5.0, 4.0])  # voxels of the n box, (z, y, x)
    vol = _blob(n, offset, sigma=3.0).astype(np.float32)
    out = ft.resample_volume(vol, n_new)
    assert out.shape == (n_new,) * 3 and out.dtype == np.float32
    scale = n / n_new  # new voxel size in old voxels
    assert np.isclose(out.sum() * scale**3, vol.sum(), rtol=1e-4)  # physical integral
    c = np.arange(n_new) - n_new // 2
    grids = np.meshgrid(c, c, c, indexing="ij")
    centroid = np.array([(g * out).sum() / out.sum() for g in grids]) * scale
    np.testing.assert_allclose(centroid, offset, atol=0.02)
    # and the values are the blob's, sampled on the new grid
    expected = _blob(n_new, offset / scale, sigma=3.0 / scale)
    assert np.abs(out - expected).max() < 1e-3


# ---------------------------------------------------------------- shells, FSC, working set


def test_shells_and_fsc():
    n = 32
    s = ft.shells_half(n)
    assert s.dtype == np.int32 and s[0, 0, 0] == 0 and s[3, 4, 0] == 5 and s[1, 1, 1] == 2
    rng = np.random.default_rng(2)
    a = ft.rfft_unitary(rng.standard_normal((n, n, n)))
    b = ft.rfft_unitary(rng.standard_normal((n, n, n)))
    f_same = ft.fsc(a, a, n)
    assert f_same.shape == (n // 2 + 1,)
    np.testing.assert_allclose(f_same, 1.0, atol=1e-12)
    np.testing.assert_allclose(ft.fsc(a, -2.0 * a, n), -1.0, atol=1e-12)
    f_noise = ft.fsc(a, b, n)
    shell_counts = np.bincount(s.ravel(), ft.half_weights(n).ravel())[: n // 2 + 1]
    # independent noise: FSC ~ N(0, 1/count) per shell; allow 5 sigma (DC shell excluded)
    assert (np.abs(f_noise[2:]) < 5.0 / np.sqrt(shell_counts[2:])).all()
    assert abs(f_noise[4:].mean()) < 0.02
    assert ft.fsc(np.zeros_like(a), a, n)[3] == 0.0


def test_working_radius_and_box():
    assert ft.working_radius(64, 2.0) == 31.0
    assert ft.working_radius(64, 2.0, 8.0) == 16.0
    assert ft.working_radius(64, 2.0, 4.0) == 31.0  # Nyquist request capped at n/2 - 1
    with pytest.raises(ValueError, match="Nyquist"):
        ft.working_radius(64, 2.0, 3.0)
    with pytest.raises(ValueError):
        ft.working_radius(64, 0.0, 8.0)
    assert ft.working_radius(63, None) == 30.5  # no resolution given: voxel size not needed
    assert ft.working_box(64, 16.0) == 36  # needs n_w >= 34; 34 = 2·17 is not 2,3,5-smooth
    assert ft.working_box(64, 15.0) == 32
    assert ft.working_box(64, 31.0) == 64
    assert ft.working_box(47, 22.5) == 47  # odd full box: no smaller even box helps
    assert ft.working_box(100, 10.3) == 24
    for n in (40, 64, 100, 128):
        for r in (3.0, 7.5, 12.2, n / 2 - 1):
            nw = ft.working_box(n, r)
            assert nw <= n and (nw == n or (nw % 2 == 0 and r <= nw / 2 - 1))


def test_working_set_selects_radius():
    """The core's working set (what the E-step and M-step sum over) is |k| ≤ radius on the
    half spectrum, with full-spectrum multiplicities."""
    from mltomo import _core

    ws = _core.working_set(36, 16.0)
    inside = ft.radius_half(36) <= 16.0 + 1e-9
    np.testing.assert_array_equal(np.sort(ws["index"]), np.flatnonzero(inside))
    np.testing.assert_array_equal(ws["hweight"], ft.half_weights(36).ravel()[ws["index"]])
    assert inside[0, 0, 16] and not inside[0, 0, 17] and inside[16 % 36, 0, 0] and not inside[1, 1, 16]
    J = float(ws["hweight"].sum())  # the working set counted over the full spectrum
    assert abs(J - 4 / 3 * math.pi * 16**3) / J < 0.02
