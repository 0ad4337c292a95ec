"""The pruned shift kernel (cpp/src/shift_scores.cpp) against numpy's inverse FFT, against
today's one-c2r-per-map E-step (``kernel="fft"``) and against the NumPy oracle."""

import numpy as np
import pytest
from test_estep_oracle import half, make_problem, random_rotations, smooth_volume

from mltomo import _core
from mltomo.estep import estep
from mltomo.reference import padded_transform

from conftest import wedge_half
from oracle import oracle_estep


def ball_working_set(n, radius):
    """(kx, ky, kz) int32 of the half-spectrum components with |k| <= radius, and their mask."""
    f = np.rint(np.fft.fftfreq(n) * n)
    kz, ky, kx = np.meshgrid(f, f, np.arange(n // 2 + 1), indexing="ij")
    sel = kx**2 + ky**2 + kz**2 <= radius**2 + 1e-9
    return [a[sel].astype(np.int32) for a in (kx, ky, kz)], sel


def cube(m):
    r = np.arange(-m, m + 1)
    tz, ty, tx = np.meshgrid(r, r, r, indexing="ij")
    return np.stack([tx.ravel(), ty.ravel(), tz.ravel()], 1).astype(np.int32)


def ball(radius):
    t = cube(int(np.floor(radius)))
    return np.ascontiguousarray(t[(t**2).sum(1) <= radius**2])


SHIFT_SETS = {
    "zero": lambda: cube(0),
    "pm1": lambda: cube(1),
    "pm3": lambda: cube(3),
    "ball2.5": lambda: ball(2.5),
    "asymmetric": lambda: np.array([[2, 0, -1], [-1, 1, 0], [0, 0, 0], [1, -2, 3]], np.int32),
}


@pytest.mark.parametrize("n", [12, 15, 16, 24])
@pytest.mark.parametrize("shifts", list(SHIFT_SETS))
def test_kernel_is_the_c2r_at_the_shifts(n, shifts):
    """On random (non-Hermitian) data the kernel returns exactly what an inverse real FFT of the
    cross spectrum holds at each shift: the real part of the full-spectrum sum."""
    rng = np.random.default_rng(n)
    (kx, ky, kz), sel = ball_working_set(n, (n - 1) // 2 - 0.5)
    hw = np.where(kx == 0, 1, 2).astype(np.float32)
    J = len(kx)
    wx = (rng.normal(size=J) + 1j * rng.normal(size=J)).astype(np.complex64)
    ref = (rng.normal(size=J) + 1j * rng.normal(size=J)).astype(np.complex64)
    t = SHIFT_SETS[shifts]()
    got = _core.shift_correlations(n=n, kx=kx, ky=ky, kz=kz, hweight=hw, shifts=t, wx=wx, ref=ref)
    Z = np.zeros((n, n, n // 2 + 1), complex)
    Z[sel] = wx.astype(complex) * np.conj(ref.astype(complex))
    full = np.fft.irfftn(Z, s=(n, n, n), axes=(0, 1, 2)) * n**3  # c2r, unnormalised
    want = full[t[:, 2] % n, t[:, 1] % n, t[:, 0] % n]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(full).max())


def test_kernel_on_an_irregular_working_set():
    """Any half-spectrum frequency list works (absent partners count as zero)."""
    rng = np.random.default_rng(3)
    n = 16
    (kx, ky, kz), sel = ball_working_set(n, 7)
    keep = rng.random(len(kx)) < 0.6
    kx, ky, kz = kx[keep], ky[keep], kz[keep]
    hw = np.where(kx == 0, 1, 2).astype(np.float32)
    wx = (rng.normal(size=len(kx)) + 1j * rng.normal(size=len(kx))).astype(np.complex64)
    ref = np.ones(len(kx), np.complex64)
    t = cube(2)
    got = _core.shift_correlations(n=n, kx=kx, ky=ky, kz=kz, hweight=hw, shifts=t, wx=wx, ref=ref)
    phase = np.exp(2j * np.pi * (np.outer(t[:, 0], kx) + np.outer(t[:, 1], ky) + np.outer(t[:, 2], kz)) / n)
    want = (hw * (phase * wx.astype(complex)).real).sum(1)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    with pytest.raises(ValueError, match="appears twice"):
        _core.shift_correlations(n=n, kx=np.r_[kx, kx[:1]], ky=np.r_[ky, ky[:1]], kz=np.r_[kz, kz[:1]],
                                 hweight=np.r_[hw, hw[:1]], shifts=t, wx=np.r_[wx, wx[:1]],
                                 ref=np.r_[ref, ref[:1]])


def problem(seed, n, shifts, K=2, R=6, N=6, sigma2=20.0, radius=None):
    """Random references, noisy particles, a wedge and a full mask, a rotation mask."""
    rng = np.random.default_rng(seed)
    refs = np.stack([smooth_volume(n, rng, blobs=5) for _ in range(K)])
    parts = np.stack([refs[rng.integers(K)] + rng.normal(scale=0.7, size=(n, n, n)) for _ in range(N)])
    masks = np.stack([wedge_half(n, 60), np.ones((n, n, n // 2 + 1), np.float32)])
    lp = -0.5 * (shifts**2).sum(1) / 4.0
    lp -= np.log(np.exp(lp).sum())
    rot_mask = (rng.random((N, R)) < 0.7).astype(np.uint8)
    rot_mask[:, 0] = 1
    return dict(refs=np.stack([padded_transform(a, 2) for a in refs]), parts=np.stack([half(x) for x in parts]),
                masks=masks, groups=(np.arange(N) % 2).astype(np.int32), rots=random_rotations(R, rng),
                shifts=shifts, lp=lp, la=np.log(np.linspace(1, 2, K) / np.linspace(1, 2, K).sum()),
                sigma2=sigma2, radius=n // 2 - 1 if radius is None else radius, rot_mask=rot_mask)


def run(pb, kernel, mode="ml", nthreads=1, prune=0.0, rot_mask=True):
    return estep(pb["refs"], 2, pb["parts"], pb["masks"], pb["groups"], pb["radius"], pb["rots"], pb["shifts"],
                 pb["lp"], pb["la"], pb["sigma2"], mode=mode, prune=prune, nthreads=nthreads, kernel=kernel,
                 rot_mask=pb["rot_mask"] if rot_mask else None)


def assert_same_estep(a, b, mode):
    (sa, ca, _), (sb, cb, _) = a, b
    np.testing.assert_array_equal(ca.best_class, cb.best_class)
    np.testing.assert_array_equal(ca.best_rot, cb.best_rot)
    np.testing.assert_array_equal(ca.best_shift, cb.best_shift)
    np.testing.assert_allclose(ca.log_sum, cb.log_sum, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ca.max_post, cb.max_post, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ca.n_significant, cb.n_significant)
    if mode == "ml":
        ok = np.isfinite(ca.class_log_sum)
        np.testing.assert_array_equal(ok, np.isfinite(cb.class_log_sum))
        np.testing.assert_allclose(ca.class_log_sum[ok], cb.class_log_sum[ok], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(sa.W, sb.W, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sa.scalars, sb.scalars, rtol=1e-5)
    for name in ("S", "M", "Mfull"):
        x, y = getattr(sa, name), getattr(sb, name)
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * np.abs(y).max())


CASES = [  # (box, shift set, classes, radius or None = n/2 - 1)
    (12, "zero", 2, None),
    (12, "pm1", 3, None),
    (16, "pm3", 2, None),
    (16, "ball2.5", 2, 5.0),
    (16, "asymmetric", 2, None),
    (24, "pm3", 2, 9.0),
    (24, "pm1", 1, None),
]


@pytest.mark.parametrize("mode", ["ml", "cc"])
@pytest.mark.parametrize("n,shifts,K,radius", CASES)
def test_pruned_estep_matches_fft_estep(n, shifts, K, radius, mode):
    """Scores, posteriors and sums of the whole E-step agree between the two kernels (missing
    wedge, K classes, a rotation mask; ML and CC)."""
    pb = problem(n + K, n, SHIFT_SETS[shifts](), K=K, radius=radius)
    fft = run(pb, "fft", mode)
    pruned = run(pb, "pruned", mode)
    maps = int(fft[2]["samples"] // len(pb["shifts"]))
    assert fft[2]["maps_pruned_kernel"] == 0 and pruned[2]["maps_pruned_kernel"] == maps
    assert fft[2]["samples"] == pruned[2]["samples"] == pb["rot_mask"].sum() * K * len(pb["shifts"])
    assert_same_estep(pruned, fft, mode)


def test_pruned_estep_with_pruning_and_sharp_posteriors():
    pb = problem(7, 16, cube(3), sigma2=1.0)
    a, b = run(pb, "pruned", prune=1e-8), run(pb, "fft", prune=1e-8)
    assert a[2]["kept"] < a[2]["samples"]
    np.testing.assert_array_equal(a[1].best_rot, b[1].best_rot)
    np.testing.assert_array_equal(a[1].best_shift, b[1].best_shift)
    np.testing.assert_allclose(a[0].W, b[0].W, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a[1].log_sum, b[1].log_sum, rtol=1e-6)


@pytest.mark.parametrize("mode", ["ml", "cc"])
def test_pruned_estep_matches_oracle(mode):
    """The slow NumPy E-step of tests/oracle.py (8^3, 5 shifts, wedge) is the truth."""
    pb = make_problem(8 if mode == "ml" else 3, sigma2=6.0)
    refs = np.stack([padded_transform(a, 2, True) for a in pb["refs"]])
    parts = np.stack([half(x) for x in pb["parts"]])
    sums, sc, cnt = estep(refs, 2, parts, pb["masks"], pb["groups"], 3, pb["rots"], pb["shifts"], pb["lp"],
                          pb["la"], pb["sigma2"], mode=mode, prune=0.0, nthreads=2, kernel="pruned")
    ora = oracle_estep(pb["refs"], pb["parts"], pb["masks"], pb["groups"], 2, 3, pb["rots"], pb["shifts"],
                       pb["lp"], pb["la"], pb["sigma2"], mode=mode)
    assert cnt["maps_pruned_kernel"] == cnt["samples"] // len(pb["shifts"])
    for i, (k, r, t) in enumerate(ora["best"]):
        assert (sc.best_class[i], sc.best_rot[i], sc.best_shift[i]) == (k, r, t)
    np.testing.assert_allclose(sc.log_sum, ora["log_sum"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sums.W, ora["W"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sums.S, ora["S"], atol=2e-4 * np.abs(ora["S"]).max())
    if mode == "ml":
        np.testing.assert_allclose(sums.sum_pd2, ora["sum_pd2"], rtol=1e-4)
        np.testing.assert_allclose(sc.max_post, ora["max_post"], rtol=1e-3, atol=1e-5)


def test_pruned_threads_agree():
    """Each particle is scored by one thread with no shared state: 2 threads give the same
    numbers as 1 (to the order of the final additions) and repeat bit for bit."""
    pb = problem(9, 16, cube(2), N=9)
    one, two, again = run(pb, "pruned", nthreads=1), run(pb, "pruned", nthreads=2), run(pb, "pruned", nthreads=2)
    assert np.array_equal(two[0].S, again[0].S) and np.array_equal(two[1].log_sum, again[1].log_sum)
    np.testing.assert_array_equal(one[1].log_sum, two[1].log_sum)
    np.testing.assert_array_equal(one[1].best_rot, two[1].best_rot)
    np.testing.assert_allclose(one[0].S, two[0].S, rtol=1e-9, atol=1e-9 * np.abs(one[0].S).max())
    np.testing.assert_allclose(one[0].W, two[0].W, rtol=1e-12)


def test_auto_picks_by_cost_and_kernel_is_checked():
    pb = problem(10, 16, cube(1), N=2, R=2)
    refs = np.zeros((1, 64, 64, 33), np.complex64)
    masks = np.ones((1, 32, 32, 17), np.float32)

    def plan(shifts, kernel):
        lp = np.full(len(shifts), -np.log(len(shifts)))
        return _core.EStepPlan(refs=refs, pad=2.0, masks=masks, radius=15.0, rotations=pb["rots"], shifts=shifts,
                               log_prior_shift=lp, log_alpha=np.zeros(1), sigma2=1.0, kernel=kernel)

    simd = plan(cube(1), "auto").kernel == "pruned"  # the baseline (non-AVX2) build prefers the FFT
    assert plan(cube(15), "auto").kernel == "fft"  # the shift box is the whole 32^3 box
    assert plan(cube(15), "pruned").kernel == "pruned"
    assert plan(cube(1), "fft").kernel == "fft"
    if simd:
        assert plan(cube(3), "auto").kernel == "pruned"
    with pytest.raises(ValueError, match="kernel must be"):
        plan(cube(1), "direct")
    with pytest.raises(ValueError, match="unknown E-step kernel"):
        run(pb, "direct")
