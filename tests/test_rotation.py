"""Rotating references in Fourier space (the C++ gather) and rotating data back (its adjoint)."""

import numpy as np
import pytest

from mltomo import _core
from mltomo.fourier import half_weights, rfft_unitary
from mltomo.geometry import random_rotations, rotation_z
from mltomo.reference import padded_transform


def blob_phantom(n, R=None, seed=0, extent=0.6):
    """Gaussian blobs inside a sphere of diameter extent·n, rotated analytically by R (default: none)."""
    R = np.eye(3) if R is None else R
    rng = np.random.default_rng(seed)
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    sig = rng.uniform(1.0, 1.5, 12)
    pts = rng.uniform(-1, 1, (12, 3))
    pts *= (extent * n / 2 - 3 * sig.max()) / np.linalg.norm(pts, axis=1).max()
    v = np.zeros((n, n, n))
    for p, s in zip(pts, sig):
        q = R @ p
        v += np.exp(-((x - q[0]) ** 2 + (y - q[1]) ** 2 + (z - q[2]) ** 2) / (2 * s * s))
    return v


def full_inner(a, b, n):
    return float(np.real(np.sum(half_weights(n) * np.conj(a) * b)))


@pytest.mark.parametrize("pad", [2.0, 3.0])
def test_rotated_reference_accuracy_below_one_percent(pad):
    n = 32
    G = padded_transform(blob_phantom(n), pad, gridding=True)
    for R in random_rotations(3, 7):
        truth = rfft_unitary(blob_phantom(n, R))
        out = _core.rotate_forward(G, pad, R, n, 0.8 * n / 2)
        sel = out != 0
        err = np.linalg.norm((out - truth)[sel]) / np.linalg.norm(truth[sel])
        assert err < 0.01, err


def test_without_gridding_correction_the_error_is_larger():
    n = 32
    R = random_rotations(1, 3)[0]
    truth = rfft_unitary(blob_phantom(n, R))
    errs = []
    for gridding in (True, False):
        out = _core.rotate_forward(padded_transform(blob_phantom(n), 2, gridding=gridding), 2, R, n, 12.8)
        sel = out != 0
        errs.append(np.linalg.norm((out - truth)[sel]) / np.linalg.norm(truth[sel]))
    assert errs[1] > 2 * errs[0]


def test_rotation_convention_is_active():
    """A blob at p appears at R p (not Rᵀ p) after rotate_forward with R."""
    n = 24
    R = rotation_z(90.0)
    G = padded_transform(blob_phantom(n, seed=2), 2)
    out = np.fft.fftshift(np.fft.irfftn(_core.rotate_forward(G, 2, R, n, n / 2 - 1), s=(n, n, n),
                                        axes=(0, 1, 2), norm="ortho"))
    good = blob_phantom(n, R, seed=2)
    wrong = blob_phantom(n, R.T, seed=2)
    assert np.linalg.norm(out - good) < 0.2 * np.linalg.norm(out - wrong)


def test_centred_delta_stays_put():
    n = 16
    d = np.zeros((n, n, n))
    d[n // 2, n // 2, n // 2] = 1.0
    G = padded_transform(d, 2, gridding=False)
    ref = _core.rotate_forward(G, 2, np.eye(3), n, n / 2 - 1)
    for R in random_rotations(4, 1):
        out = _core.rotate_forward(G, 2, R, n, n / 2 - 1)
        np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("n,pad", [(12, 2.0), (10, 1.0), (16, 3.0)])
def test_rotate_back_is_the_adjoint(n, pad):
    rng = np.random.default_rng(n)
    P = int(pad * n)
    radius = n / 2 - 1
    G = np.fft.rfftn(rng.normal(size=(P, P, P))).astype(np.complex64)
    Y = rfft_unitary(rng.normal(size=(n, n, n))).astype(np.complex64)
    ws = _core.working_set(n, radius)
    keep = np.zeros(Y.size, bool)
    keep[ws["index"]] = True
    Y = np.where(keep.reshape(Y.shape), Y, 0).astype(np.complex64)
    ones = np.ones(Y.shape, np.float32)
    for R in random_rotations(3, n):
        lhs = full_inner(_core.rotate_forward(G, pad, R, n, radius), Y, n)
        S = np.zeros(G.shape, np.complex128)
        M = np.zeros(G.shape)
        _core.rotate_back(Y, ones, pad, R, radius, S, M)
        rhs = full_inner(G.astype(np.complex128), S, P)
        assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + np.abs(Y).sum()), (lhs, rhs)


def test_bad_arrays_are_named():
    G = np.zeros((16, 16, 9), np.complex128)
    with pytest.raises(TypeError, match="grid must have dtype complex64"):
        _core.rotate_forward(G, 2, np.eye(3), 8, 3)
    with pytest.raises(ValueError, match="rotation must have shape"):
        _core.rotate_forward(G.astype(np.complex64), 2, np.eye(4), 8, 3)
