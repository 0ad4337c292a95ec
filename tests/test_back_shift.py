"""The weighted sums' back-shift (cpp/src/back_shift.cpp): the separable sum and the FFT path
against a direct NumPy sum of the phases, and the E-step's sums against the oracle when every
shift is kept (the FFT path)."""

import numpy as np
import pytest
from test_estep_oracle import make_problem, run_core

from mltomo import _core

from oracle import oracle_estep


def cube(m):
    r = np.arange(-m, m + 1)
    tz, ty, tx = np.meshgrid(r, r, r, indexing="ij")
    return np.stack([tx.ravel(), ty.ravel(), tz.ravel()], 1).astype(np.int32)


def direct(n, radius, shifts, post, wx):
    """y_j = sum_t post_t exp(+2 pi i k_j . t / n) wx_j, one phase at a time."""
    ws = _core.working_set(n, radius)
    k = np.stack([ws["kx"], ws["ky"], ws["kz"]], 1).astype(np.float64)
    phi = np.exp(2j * np.pi * (k @ shifts.T.astype(np.float64)) / n) @ post
    return phi * wx.astype(np.complex128)


@pytest.mark.parametrize("n,radius,m", [(8, 3.0, 1), (12, 5.0, 2), (16, 7.0, 3), (32, 15.0, 3), (20, 6.5, 4)])
@pytest.mark.parametrize("kept", ["one", "few", "all"])
@pytest.mark.parametrize("method", ["separable", "fft"])
def test_back_shift_matches_the_direct_sum(n, radius, m, kept, method):
    rng = np.random.default_rng([n, m, len(kept), len(method)])
    shifts = cube(m)
    T = len(shifts)
    post = np.zeros(T)
    which = {"one": rng.choice(T, 1), "few": rng.choice(T, min(T, 5), replace=False), "all": np.arange(T)}[kept]
    post[which] = rng.random(len(which))
    post /= post.sum()
    J = len(_core.working_set(n, radius)["kx"])
    wx = (rng.normal(size=J) + 1j * rng.normal(size=J)).astype(np.complex64)
    got = _core.back_shift(n=n, radius=radius, shifts=shifts, post=post, wx=wx, method=method)
    want = direct(n, radius, shifts, post, wx)
    scale = np.abs(wx).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()  # not vacuous: the sums are not ~0


def test_back_shift_refuses_bad_input():
    shifts = cube(1)
    wx = np.zeros(len(_core.working_set(8, 3.0)["kx"]), np.complex64)
    with pytest.raises(ValueError, match="method"):
        _core.back_shift(n=8, radius=3.0, shifts=shifts, post=np.ones(27), wx=wx, method="table")
    with pytest.raises(ValueError, match="shift outside the box"):
        _core.back_shift(n=8, radius=3.0, shifts=cube(4), post=np.ones(729), wx=wx)


def test_estep_sums_on_the_fft_path_match_the_oracle():
    """Every one of 125 shifts kept (prune=0; the separable sum takes at most 51 at n=8, radius
    3): each map is back-shifted through one r2c. (The oracle tests of test_estep_oracle.py keep
    at most 5 shifts: the separable sum.)"""
    pb = make_problem(1, sigma2=30.0, R=2, N=3)
    pb["shifts"] = cube(2)
    lp = -0.5 * (pb["shifts"] ** 2).sum(1) / 2.0
    pb["lp"] = lp - np.log(np.exp(lp).sum())
    sums, sc, cnt = run_core(pb, nthreads=2)
    assert cnt["kept"] == cnt["samples"] == 3 * 2 * 2 * 125
    ora = oracle_estep(pb["refs"], pb["parts"], pb["masks"], pb["groups"], 2, 3, pb["rots"], pb["shifts"],
                       pb["lp"], pb["la"], pb["sigma2"])
    np.testing.assert_allclose(sums.W, ora["W"], rtol=1e-4, atol=1e-6)
    scale = np.abs(ora["S"]).max()
    np.testing.assert_allclose(sums.S, ora["S"], atol=2e-4 * scale)
    np.testing.assert_allclose(sums.M, ora["M"], atol=2e-4 * np.abs(ora["M"]).max())
