"""Unit tests of mltomo.fourier: transforms, half-spectrum weights, cropping, shells, masks."""

import math

import numpy as np
import pytest

from mltomo import fourier as ft


def _full_from_half(h, n):
    """Expand a centrosymmetric real half-spectrum array to the full FFT layout (n, n, n)."""
    full = np.empty((n, n, n), dtype=h.dtype)
    full[:, :, : n // 2 + 1] = h
    ix = np.arange(n // 2 + 1, n)
    mirror = np.roll(np.flip(h, axis=(0, 1)), 1, axis=(0, 1))  # h[-kz, -ky, kx]
    full[:, :, ix] = mirror[:, :, (n - ix)]
    return full


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
