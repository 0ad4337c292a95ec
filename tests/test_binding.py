"""The pybind11 boundary: named arguments and results, types checked before shapes, one plan
reused across chunks of particles."""

import numpy as np
import pytest
from test_estep_oracle import half, make_problem

from mltomo import _core
from mltomo.estep import Sums, estep
from mltomo.reference import padded_transform

SCORES = ("best_class", "best_rot", "best_shift", "max_post", "n_significant", "log_sum", "x_norm")


@pytest.fixture(scope="module")
def problem():
    pb = make_problem(11, N=10)
    refs = np.stack([padded_transform(a, 2) for a in pb["refs"]])
    parts = np.stack([half(x) for x in pb["parts"]])
    return pb, refs, parts


def make_plan(pb, refs, **kw):
    args = {
        "refs": refs,
        "pad": 2.0,
        "masks": pb["masks"],
        "radius": 3.0,
        "rotations": pb["rots"],
        "shifts": pb["shifts"],
        "log_prior_shift": pb["lp"],
        "log_alpha": pb["la"],
        "sigma2": pb["sigma2"],
        "nthreads": 1,
    }
    args.update(kw)
    return _core.EStepPlan(**args)


def test_a_list_is_refused_before_its_shape_is_read(problem):
    pb, refs, parts = problem
    plan = make_plan(pb, refs)
    sums = Sums.zeros(refs.shape[0], refs.shape[1])
    with pytest.raises(TypeError, match="particles must be a numpy array, got list"):
        plan.run(particles=parts.tolist(), groups=pb["groups"], sums=sums)
    with pytest.raises(TypeError, match="refs must be a numpy array"):
        make_plan(pb, refs.tolist())
    with pytest.raises(TypeError, match="rotations must be a numpy array"):
        make_plan(pb, refs, rotations=pb["rots"].tolist())
    with pytest.raises(TypeError, match="grid must be a numpy array"):
        _core.rotate_forward(refs[0].tolist(), 2.0, np.eye(3), 8, 3.0)
    with pytest.raises(TypeError, match="values must be a numpy array"):
        _core.rotate_back(
            parts[0].tolist(), pb["masks"][0], 2.0, np.eye(3), 3.0, sums.S[0], sums.M[0]
        )


def test_arguments_are_checked_and_named(problem):
    pb, refs, parts = problem
    plan = make_plan(pb, refs)
    sums = Sums.zeros(refs.shape[0], refs.shape[1])
    with pytest.raises(ValueError, match="particles must have 4 dimensions"):
        plan.run(particles=parts[0], groups=pb["groups"], sums=sums)
    with pytest.raises(ValueError, match=r"particles must have shape \(10, 8, 8, 5\)"):
        plan.run(particles=np.zeros((10, 6, 6, 4), np.complex64), groups=pb["groups"], sums=sums)
    with pytest.raises(ValueError, match="particles must be C-contiguous"):
        plan.run(particles=parts[::2], groups=pb["groups"][::2].copy(), sums=sums)
    with pytest.raises(TypeError, match="groups must have dtype int32"):
        plan.run(particles=parts, groups=pb["groups"].astype(np.int64), sums=sums)
    with pytest.raises(ValueError, match="mode must be 'ml' or 'cc'"):
        make_plan(pb, refs, mode="ML")
    with pytest.raises(ValueError, match="bad mask group"):
        plan.run(particles=parts, groups=np.full(10, 5, np.int32), sums=sums)
    with pytest.raises(TypeError):  # positional arguments could be swapped: they are refused
        plan.run(parts, pb["groups"], sums)


def test_accumulators_are_taken_by_name(problem):
    pb, refs, parts = problem
    plan = make_plan(pb, refs)
    K, P = refs.shape[0], refs.shape[1]
    swapped = Sums.zeros(K, P)
    swapped.S, swapped.M = swapped.M, swapped.S  # same shapes, different dtypes
    with pytest.raises(TypeError, match="sums.S must have dtype complex128"):
        plan.run(particles=parts, groups=pb["groups"], sums=swapped)
    wrong = Sums.zeros(K, P)
    wrong.M, wrong.Mfull = np.zeros((K, 3)), wrong.M
    with pytest.raises(ValueError, match="sums.M must have"):
        plan.run(particles=parts, groups=pb["groups"], sums=wrong)
    with pytest.raises(AttributeError):
        plan.run(particles=parts, groups=pb["groups"], sums=object())
    res = plan.run(particles=parts, groups=pb["groups"], sums=Sums.zeros(K, P))
    assert set(res) == {"scores", "counters"}
    assert set(res["scores"]) == set(SCORES) | {"n_observed", "class_log_sum"}
    assert res["scores"]["best_class"].dtype == np.int32
    assert res["scores"]["max_post"].dtype == np.float64

def test_one_plan_over_chunks_equals_one_call(problem):
    pb, refs, parts = problem
    search = (pb["rots"], pb["shifts"], pb["lp"], pb["la"], pb["sigma2"])
    args = (refs, 2, parts, pb["masks"], pb["groups"], 3, *search)
    whole, sw, cw = estep(*args, nthreads=1)
    chunked, sc, cc = estep(*args, nthreads=1, memory_budget_bytes=1)  # chunks of 4 particles
    for name in SCORES:
        np.testing.assert_array_equal(getattr(sc, name), getattr(sw, name))
    np.testing.assert_allclose(chunked.S, whole.S, rtol=1e-12, atol=1e-12 * np.abs(whole.S).max())
    np.testing.assert_allclose(chunked.W, whole.W, rtol=1e-12)
    assert cc["samples"] == cw["samples"] and cc["kept"] == cw["kept"]
    # The same plan run twice on the same chunk (rotated references cached the second time).
    plan = make_plan(pb, refs)
    a, b = Sums.zeros(*refs.shape[:2]), Sums.zeros(*refs.shape[:2])
    ra = plan.run(particles=parts, groups=pb["groups"], sums=a)
    rb = plan.run(particles=parts, groups=pb["groups"], sums=b)
    assert np.array_equal(a.S, b.S) and np.array_equal(a.M, b.M) and np.array_equal(a.W, b.W)
    np.testing.assert_array_equal(ra["scores"]["max_post"], rb["scores"]["max_post"])


@pytest.mark.parametrize("seed", [0, 1])
def test_chunks_pack_particles_by_their_own_cost(seed):
    """A windowed search's chunks hold as many particles as their own rows' maps allow: every
    chunk within the budget unless it holds only the minimum, every particle once, in order."""
    from mltomo.estep import MAX_CHUNK, _runs

    rng = np.random.default_rng(seed)
    cost = rng.choice([3.0, 50.0, 400.0], size=500, p=[0.6, 0.35, 0.05])
    budget, min_n = 600.0, 4
    runs = list(_runs(cost, budget, min_n))
    assert [a for a, _ in runs] == [0] + [b for _, b in runs[:-1]] and runs[-1][1] == len(cost)
    for a, b in runs:
        assert b - a >= min(min_n, len(cost) - a)
        assert cost[a:b].sum() <= budget or b - a == min_n
        assert b == len(cost) or b - a == min_n or cost[a:b + 1].sum() > budget  # greedy: the next would not fit
    assert list(_runs(np.full(10, 7.0), 50.0, 2)) == [(0, 7), (7, 10)]  # the fixed chunk of a uniform cost
    assert list(_runs(np.zeros(MAX_CHUNK + 5), 1.0, 1)) == [(0, MAX_CHUNK), (MAX_CHUNK, MAX_CHUNK + 5)]


def test_cached_and_streamed_rotations_agree_with_local_search(problem):
    pb, refs, parts = problem
    rng = np.random.default_rng(3)
    rot_mask = (rng.random((len(parts), len(pb["rots"]))) < 0.5).astype(np.uint8)
    rot_mask[:, 0] = 1
    results = []
    for cache in (256.0 * (1 << 20), 0.0):
        plan = make_plan(pb, refs, rot_block=2, rotated_cache_bytes=cache)
        sums = Sums.zeros(*refs.shape[:2])
        scores = []
        for a in range(0, len(parts), 3):
            chunk = slice(a, a + 3)
            res = plan.run(particles=parts[chunk], groups=pb["groups"][chunk], sums=sums,
                           rot_mask=rot_mask[chunk])
            scores.append(res["scores"])
        results.append((sums, np.concatenate([s["max_post"] for s in scores])))
    (a, pa), (b, pb_) = results
    assert np.array_equal(a.S, b.S) and np.array_equal(a.M, b.M) and np.array_equal(a.W, b.W)
    np.testing.assert_array_equal(pa, pb_)


def test_no_particles_builds_no_plan(problem):
    pb, refs, parts = problem
    search = (pb["rots"], pb["shifts"], pb["lp"], pb["la"], pb["sigma2"])
    sums, sc, c = estep(refs, 2, parts[:0], pb["masks"], pb["groups"][:0], 3, *search)
    assert len(sc.max_post) == 0 and c["samples"] == 0 and not sums.S.any()
