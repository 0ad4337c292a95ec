"""The C++ E-step against the NumPy oracle (tests/oracle.py) on tiny boxes."""

import numpy as np
import pytest

from mltomo.estep import estep
from mltomo.reference import padded_transform

from conftest import wedge_half
from oracle import oracle_estep


def random_rotations(n, rng):
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], 1)


def smooth_volume(n, rng, blobs=4):
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((n, n, n))
    for _ in range(blobs):
        p = rng.uniform(-n / 5, n / 5, 3)
        v += rng.uniform(0.5, 1.5) * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / 2.0)
    return v


def half(vol):
    return np.fft.rfftn(np.fft.ifftshift(vol), norm="ortho").astype(np.complex64)


def make_problem(seed, n=8, K=2, R=4, N=4, sigma2=4.0, wedge=True):
    rng = np.random.default_rng(seed)
    refs = np.stack([smooth_volume(n, rng) for _ in range(K)])
    rots = random_rotations(R, rng)
    shifts = np.array([[0, 0, 0], [1, 0, 0], [0, -1, 0], [0, 0, 1], [-1, 1, 0]], np.int32)
    parts = []
    for _ in range(N):
        parts.append(refs[rng.integers(K)] + rng.normal(scale=0.5, size=(n, n, n)))
    parts = np.stack(parts)
    masks = np.stack([wedge_half(n, 60) if wedge else np.ones((n, n, n // 2 + 1), np.float32),
                      np.ones((n, n, n // 2 + 1), np.float32)])
    groups = (np.arange(N) % 2).astype(np.int32)
    lp = -0.5 * (shifts**2).sum(1) / 2.0
    lp -= np.log(np.exp(lp).sum())
    la = np.log(np.full(K, 1.0 / K))
    la[0] = np.log(0.3)
    la[1:] = np.log(0.7 / (K - 1))
    return dict(refs=refs, parts=parts, masks=masks, groups=groups, rots=rots, shifts=shifts,
                lp=lp, la=la, sigma2=sigma2, n=n)


def run_core(pb, pad=2, radius=3, mode="ml", prune=0.0, nthreads=1, gridding=True, **kw):
    refs = np.stack([padded_transform(a, pad, gridding) for a in pb["refs"]])
    parts = np.stack([half(x) for x in pb["parts"]])
    return estep(refs, pad, parts, pb["masks"], pb["groups"], radius, pb["rots"], pb["shifts"],
                 pb["lp"], pb["la"], pb["sigma2"], mode=mode, prune=prune, nthreads=nthreads, **kw)


@pytest.mark.parametrize("seed,nthreads,sigma2,wedge", [(0, 1, 4.0, True), (1, 2, 30.0, True), (2, 2, 8.0, False)])
def test_ml_estep_matches_oracle(seed, nthreads, sigma2, wedge):
    pb = make_problem(seed, sigma2=sigma2, wedge=wedge)
    sums, sc, cnt = run_core(pb, nthreads=nthreads)
    ora = oracle_estep(pb["refs"], pb["parts"], pb["masks"], pb["groups"], 2, 3, pb["rots"], pb["shifts"],
                       pb["lp"], pb["la"], pb["sigma2"])
    np.testing.assert_allclose(sc.x_norm, ora["x_norm"], rtol=1e-5)
    np.testing.assert_allclose(sc.n_observed, ora["n_observed"])
    np.testing.assert_allclose(sc.log_sum, ora["log_sum"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sums.W, ora["W"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sums.sum_pd2, ora["sum_pd2"], rtol=1e-4)
    np.testing.assert_allclose(sums.sum_pt2, ora["sum_pt2"], rtol=1e-4, atol=1e-6)
    scale = np.abs(ora["S"]).max()
    np.testing.assert_allclose(sums.S, ora["S"], atol=2e-4 * scale)
    np.testing.assert_allclose(sums.M, ora["M"], atol=2e-4 * np.abs(ora["M"]).max())
    np.testing.assert_allclose(sums.Mfull, ora["Mfull"], atol=2e-4 * np.abs(ora["Mfull"]).max())
    np.testing.assert_allclose(sc.max_post, ora["max_post"], rtol=1e-3, atol=1e-5)
    for i, (k, r, t) in enumerate(ora["best"]):
        assert (sc.best_class[i], sc.best_rot[i], sc.best_shift[i]) == (k, r, t)
    assert cnt["samples"] == 4 * 2 * 4 * 5
    assert cnt["kept"] == cnt["samples"]  # prune=0 keeps everything


@pytest.mark.parametrize("kernel,nthreads", [("fft", 1), ("pruned", 2)])
def test_scoring_on_an_inner_radius_matches_oracle(kernel, nthreads):
    """``score_radius``: d² counts the reference as 0 beyond it, while the sums, ``x_norm`` and
    ``n_observed`` cover the whole working set (the resolution schedule)."""
    pb = make_problem(4, sigma2=0.5)
    sums, sc, _ = run_core(pb, nthreads=nthreads, kernel=kernel, score_radius=1.5)
    ora = oracle_estep(pb["refs"], pb["parts"], pb["masks"], pb["groups"], 2, 3, pb["rots"], pb["shifts"],
                       pb["lp"], pb["la"], pb["sigma2"], score_radius=1.5)
    full = oracle_estep(pb["refs"], pb["parts"], pb["masks"], pb["groups"], 2, 3, pb["rots"], pb["shifts"],
                        pb["lp"], pb["la"], pb["sigma2"])
    assert np.max(np.abs(full["log_sum"] - ora["log_sum"])) > 0.5  # the inner radius changes the scores
    np.testing.assert_allclose(sc.x_norm, ora["x_norm"], rtol=1e-5)
    np.testing.assert_allclose(sc.n_observed, ora["n_observed"])
    np.testing.assert_allclose(sc.log_sum, ora["log_sum"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sc.max_post, ora["max_post"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(sums.W, ora["W"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sums.sum_pd2, ora["sum_pd2"], rtol=1e-4)
    np.testing.assert_allclose(sums.S, ora["S"], atol=2e-4 * np.abs(ora["S"]).max())
    np.testing.assert_allclose(sums.M, ora["M"], atol=2e-4 * np.abs(ora["M"]).max())
    np.testing.assert_allclose(sums.Mfull, ora["Mfull"], atol=2e-4 * np.abs(ora["Mfull"]).max())
    with pytest.raises(ValueError, match="score_radius"):
        run_core(pb, score_radius=3.5)


def test_cc_estep_matches_oracle():
    pb = make_problem(3)
    sums, sc, _ = run_core(pb, mode="cc", nthreads=2)
    ora = oracle_estep(pb["refs"], pb["parts"], pb["masks"], pb["groups"], 2, 3, pb["rots"], pb["shifts"],
                       pb["lp"], pb["la"], pb["sigma2"], mode="cc")
    for i, (k, r, t) in enumerate(ora["best"]):
        assert (sc.best_class[i], sc.best_rot[i], sc.best_shift[i]) == (k, r, t)
    np.testing.assert_allclose(sc.log_sum, ora["log_sum"], rtol=1e-4)
    np.testing.assert_allclose(sums.W, ora["W"])
    np.testing.assert_allclose(sums.S, ora["S"], atol=2e-4 * np.abs(ora["S"]).max())
    np.testing.assert_allclose(sums.M, ora["M"], atol=1e-6)
    np.testing.assert_allclose(sums.Mfull, ora["Mfull"], atol=1e-6)


def test_pruning_is_counted_and_nearly_exact():
    pb = make_problem(4, sigma2=0.5)  # sharp posteriors: most samples are pruned
    exact, sc0, c0 = run_core(pb, prune=0.0)
    pruned, sc1, c1 = run_core(pb, prune=1e-8)
    assert c1["kept"] < c1["samples"]
    assert c0["kept"] == c0["samples"]
    np.testing.assert_allclose(pruned.W, exact.W, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pruned.S, exact.S, atol=1e-6 * np.abs(exact.S).max())
    np.testing.assert_array_equal(sc0.best_rot, sc1.best_rot)
    # the same prune given as its log keeps the same samples; a log below a double's exp range
    # (-1e4: nothing is that far below here) keeps every one, as prune=0 does
    logged, sc2, c2 = run_core(pb, prune=0.5, log_prune=np.log(1e-8))
    assert c2["kept"] == c1["kept"] and np.array_equal(logged.S, pruned.S)
    far, _, c3 = run_core(pb, prune=0.5, log_prune=-1e4)
    assert c3["kept"] == c0["kept"] and np.array_equal(far.W, exact.W)
    with pytest.raises(ValueError, match="log_prune"):
        run_core(pb, log_prune=0.5)


def test_same_thread_count_is_bit_identical_and_thread_counts_agree():
    pb = make_problem(5, N=9)
    a, sa, _ = run_core(pb, nthreads=2)
    b, sb, _ = run_core(pb, nthreads=2)
    c, sc, _ = run_core(pb, nthreads=1)
    assert np.array_equal(a.S, b.S) and np.array_equal(a.M, b.M) and np.array_equal(a.W, b.W)
    np.testing.assert_allclose(a.S, c.S, rtol=1e-9, atol=1e-9 * np.abs(c.S).max())
    np.testing.assert_array_equal(sa.best_rot, sc.best_rot)


def test_bad_arrays_are_named():
    pb = make_problem(6)
    refs = np.stack([padded_transform(a, 2) for a in pb["refs"]])
    parts = np.stack([half(x) for x in pb["parts"]]).astype(np.complex128)
    with pytest.raises(TypeError, match="particles must have dtype complex64"):
        estep(refs, 2, parts, pb["masks"], pb["groups"], 3, pb["rots"], pb["shifts"], pb["lp"], pb["la"], 1.0)


def test_per_particle_class_priors_and_class_sums_match_oracle():
    """(N, K) log class priors (the adaptive scheme's self-fit offsets) and the per-class log sums
    the reported log-likelihood is formed from."""
    pb = make_problem(4, sigma2=0.5)
    rng = np.random.default_rng(5)
    la = pb["la"][None, :] + rng.uniform(-3, 0, size=(len(pb["parts"]), len(pb["la"])))
    refs = np.stack([padded_transform(a, 2, True) for a in pb["refs"]])
    parts = np.stack([half(x) for x in pb["parts"]])
    sums, sc, _ = estep(refs, 2, parts, pb["masks"], pb["groups"], 3, pb["rots"], pb["shifts"], pb["lp"], la,
                        pb["sigma2"], prune=0.0, nthreads=2, memory_budget_bytes=1)  # several chunks
    ora = oracle_estep(pb["refs"], pb["parts"], pb["masks"], pb["groups"], 2, 3, pb["rots"], pb["shifts"],
                       pb["lp"], la, pb["sigma2"])
    np.testing.assert_allclose(sc.log_sum, ora["log_sum"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sc.class_log_sum, ora["class_log_sum"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sc.max_post, ora["max_post"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sums.W, ora["W"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sums.sum_pd2, ora["sum_pd2"], rtol=1e-4)
    with pytest.raises(ValueError, match="log_alpha"):
        estep(refs, 2, parts, pb["masks"], pb["groups"], 3, pb["rots"], pb["shifts"], pb["lp"], la[:2],
              pb["sigma2"])


def test_half_sets_get_their_own_sums_from_one_plan():
    """estep(halves=h) adds each half set's statistics into its own Sums: the same numbers as two
    calls on the halves' particles, and their sum is the one-call total."""
    pb = make_problem(6, N=6, sigma2=5.0)
    refs = np.stack([padded_transform(a, 2, True) for a in pb["refs"]])
    parts = np.stack([half(x) for x in pb["parts"]])
    h = np.array([1, 0, 0, 1, 1, 0])
    args = (pb["rots"], pb["shifts"], pb["lp"], pb["la"], pb["sigma2"])
    pair, sc, _ = estep(refs, 2, parts, pb["masks"], pb["groups"], 3, *args, halves=h, nthreads=1)
    total, sc_all, _ = estep(refs, 2, parts, pb["masks"], pb["groups"], 3, *args, nthreads=1)
    for k in (0, 1):
        idx = np.flatnonzero(h == k)
        s, sck, _ = estep(refs, 2, parts[idx], pb["masks"], pb["groups"][idx], 3, *args, nthreads=1)
        np.testing.assert_array_equal(pair[k].S, s.S)
        np.testing.assert_array_equal(pair[k].W, s.W)
        np.testing.assert_array_equal(sc.log_sum[idx], sck.log_sum)
    np.testing.assert_allclose(pair[0].S + pair[1].S, total.S, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(sc.best_rot, sc_all.best_rot)


@pytest.mark.parametrize("mode", ["ml", "cc"])
def test_rotation_masses_match_oracle_and_scores_only_adds_nothing(mode):
    """``rot_mass=True``: the log of each rotation's posterior mass, summed over classes and
    shifts, as the oracle's posteriors give it (CC: 1 at the best rotation); ``accumulate=False`` leaves the
    sums at zero and the scores as they are with sums (a coarse-to-fine search's first pass)."""
    pb = make_problem(4, sigma2=20.0)
    refs = np.stack([padded_transform(a, 2, True) for a in pb["refs"]])
    parts = np.stack([half(x) for x in pb["parts"]])
    args = (refs, 2, parts, pb["masks"], pb["groups"], 3, pb["rots"], pb["shifts"], pb["lp"], pb["la"], pb["sigma2"])
    full_sums, full, _ = estep(*args, mode=mode, prune=0.0, nthreads=2)
    sums, sc, _ = estep(*args, mode=mode, prune=0.0, nthreads=2, accumulate=False, rot_mass=True)
    ora = oracle_estep(pb["refs"], pb["parts"], pb["masks"], pb["groups"], 2, 3, pb["rots"], pb["shifts"],
                       pb["lp"], pb["la"], pb["sigma2"], mode=mode)
    want = np.stack([P.sum(axis=(0, 2)) for P in ora["posteriors"]])
    np.testing.assert_allclose(np.exp(sc.rot_log_mass), want, rtol=1e-4, atol=1e-6)
    assert 0.01 < want.max(axis=1).min() and want.max(axis=1).max() <= 1.0
    assert not np.any(sums.W) and not np.any(sums.S) and not np.any(sums.scalars)
    np.testing.assert_array_equal(sc.best_rot, full.best_rot)
    np.testing.assert_allclose(sc.log_sum, full.log_sum)
    assert full.rot_log_mass is None and np.any(full_sums.W)
