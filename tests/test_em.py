"""The EM driver on small synthetic data sets built in the test (no files)."""

import dataclasses

import numpy as np

from mltomo.em import run_em
from mltomo.model import Config

from conftest import blobs, cube_rotations, make_particles


def test_log_likelihood_never_decreases_with_exact_rotations():
    rng = np.random.default_rng(0)
    n = 16
    refs = np.stack([blobs(n, rng), blobs(n, rng)])
    rots = cube_rotations()
    sigma = 0.6
    parts, *_ = make_particles(refs, rots, 30, sigma, rng)
    cfg = Config(n_classes=2, iterations=8, rotations=rots, padding=1.0, gridding=False, fix_sigma=sigma,
                 fix_xi=True, xi0_voxels=1.0, max_shift_voxels=1, reg0=0, regF=0, perturb=False, prune=0.0,
                 eps=0, threads=2)
    res = run_em(parts, cfg)
    ll = np.array([s.log_likelihood for s in res.history])
    assert len(ll) == 8
    assert np.all(np.diff(ll) >= -1e-7 * np.abs(ll[:-1])), ll
    assert ll[-1] > ll[0]


def test_exact_rotations_from_true_references_recover_classes_poses_and_shifts():
    rng = np.random.default_rng(1)
    n = 16
    refs = np.stack([blobs(n, rng), blobs(n, rng)])
    rots = cube_rotations()
    parts, cls, ridx, shifts = make_particles(refs, rots, 40, 0.5, rng)
    cfg = Config(n_classes=2, iterations=4, rotations=rots, padding=1.0, gridding=False, reg0=0,
                 max_shift_voxels=1, xi0_voxels=1.0, perturb=False, threads=2, eps=0)
    res = run_em(parts, cfg, refs=refs)
    assert np.mean(res.particles.classes - 1 == cls) == 1.0
    from mltomo.geometry import euler_to_matrix

    R = euler_to_matrix(*res.particles.angles.T)
    assert all(np.allclose(R[i], rots[ridx[i]], atol=1e-6) for i in range(40))
    assert np.array_equal(np.round(res.particles.shifts_angstrom / 10.0).astype(int), shifts)
    # The references stay close to the truth (noise averaged over ~20 particles each, over the
    # whole box: 0.38 and 0.31 here; the plain average of the aligned particles: 0.41 and 0.32).
    for k in range(2):
        rel = np.linalg.norm(res.model.refs[k] - refs[k]) / np.linalg.norm(refs[k])
        assert rel < 0.45, rel


def test_prior_classes_and_poses_from_the_table_start_the_references():
    """A previous run's table (rlnClassNumber + angles + origins) seeds each class with the
    average of its particles in their poses; without it the start is reference-free."""
    import dataclasses

    from mltomo.geometry import matrix_to_euler
    from mltomo.initial import initial_references
    from mltomo.parallel import SerialComm
    from mltomo.sampling import Sampling

    rng = np.random.default_rng(3)
    n = 16
    refs = np.stack([blobs(n, rng), blobs(n, rng)])
    rots = cube_rotations()
    parts, cls, ridx, shifts = make_particles(refs, rots, 30, 0.3, rng)
    angles = np.stack(matrix_to_euler(rots[ridx]), 1)
    cfg = Config(n_classes=2, padding=1.0, gridding=False, initial_lowpass_angstrom=20.0, max_shift_voxels=1)
    geo = Sampling.create(n, 10.0, cfg)

    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    with_priors = dataclasses.replace(parts, prior_classes=cls + 1, prior_angles=angles,
                                      prior_shifts_angstrom=shifts * 10.0)
    start = initial_references(with_priors, geo, cfg, SerialComm())
    for k in range(2):
        assert corr(start[k], refs[k]) > 0.8
        assert corr(start[k], refs[k]) > corr(start[k], refs[1 - k]) + 0.2
    swapped = initial_references(dataclasses.replace(with_priors, prior_classes=2 - cls), geo, cfg, SerialComm())
    assert corr(swapped[0], refs[1]) > 0.8
    free = initial_references(parts, geo, cfg, SerialComm())
    assert max(corr(free[0], refs[0]), corr(free[1], refs[1])) < 0.8


def test_seeded_first_iteration_log_likelihood_includes_log_alpha():
    """A reference-free start (the paper's scheme) scores each particle only against its random
    subset's class in iteration 1; its log-likelihood must still be SPEC §3's
    ``log Σ α_k p(t) (1/R) exp(−d²/2σ²) − (J_i^o/2) log 2πσ²``, here with the other classes'
    α set to zero, so that it is comparable with the later iterations'. (Without ``N log α``
    every particle's contribution was ``log K`` too high.)"""
    from mltomo.estep import estep
    from mltomo.initial import seed_classes
    from mltomo.reference import padded_transform

    rng = np.random.default_rng(4)
    n = 8
    refs = np.stack([blobs(n, rng, count=3) for _ in range(2)])
    rots = cube_rotations()[:4]
    parts, _, _, _ = make_particles(refs, rots, 12, 0.5, rng, max_shift=0)
    cfg = Config(n_classes=2, iterations=0, padding=1.0, gridding=False, perturb=False, rotations=rots,
                 max_shift_voxels=0, reg0=0.0, regF=0.0, eps=0.0, threads=1, scheme="paper")
    start = run_em(parts, cfg).model  # iteration 0: the initial references and σ²
    seen = {}
    run_em(parts, dataclasses.replace(cfg, iterations=1), callback=lambda s, m, r: seen.update(ll=r.log_likelihood))
    seeds = seed_classes(cfg, len(parts))
    Fref = np.ascontiguousarray([padded_transform(a, 1.0, gridding=False) for a in start.refs], dtype=np.complex64)
    from mltomo.fourier import working_radius

    radius = float(working_radius(n, parts.voxel_size_angstrom, None))
    expect = np.zeros(len(parts))
    for i in range(len(parts)):
        log_alpha = np.full(2, -np.inf)
        log_alpha[seeds[i]] = np.log(start.alpha[seeds[i]])
        _, sc, _ = estep(Fref, 1.0, parts.spectra[i : i + 1], parts.masks, parts.groups[i : i + 1], radius, rots,
                         np.zeros((1, 3), np.int32), np.zeros(1), log_alpha, start.sigma2, prune=0.0, nthreads=1)
        expect[i] = sc.log_sum[0] - np.log(len(rots)) - 0.5 * sc.n_observed[0] * np.log(2 * np.pi * start.sigma2)
    np.testing.assert_allclose(seen["ll"], expect, rtol=1e-5, atol=1e-3)


def test_default_mask_only_when_classifying():
    """The soft sphere of a classification is (box - 2 voxels) across; alignment alone (K = 1)
    and the paper's scheme have none unless asked; --particle-diameter 0 turns it off."""
    from mltomo.reference import particle_diameter

    assert particle_diameter(Config(n_classes=2), 32, 8.0) == 240.0
    assert particle_diameter(Config(n_classes=4), 24, 10.0) == 220.0
    assert particle_diameter(Config(n_classes=1), 32, 8.0) is None
    assert particle_diameter(Config(n_classes=2, scheme="paper"), 32, 8.0) is None
    assert particle_diameter(Config(n_classes=2, particle_diameter_angstrom=0.0), 32, 8.0) is None
    assert particle_diameter(Config(n_classes=1, particle_diameter_angstrom=180.0), 32, 8.0) == 180.0
    assert particle_diameter(Config(n_classes=2, scheme="paper", particle_diameter_angstrom=180.0), 32, 8.0) == 180.0


def test_shift_range_is_three_xi_unless_given():
    """Without --max-shift the cube searched is ±min(n/4, max(1, ⌈3ξ⌉)) voxels of the current ξ,
    every vector within it once, the zero shift first; --max-shift and --no-align fix it."""
    from mltomo.sampling import Sampling

    s = Sampling.create(32, 8.0, Config())  # ξ0 = 2: ±6
    for xi2, m in ((4.0, 6), (0.25, 2), (1e-6, 1), (1.0, 3), (1.0001, 4), (9.0, 8), (100.0, 8)):
        t = s.for_xi(Config(), xi2).shifts
        r = np.arange(-m, m + 1)
        cube = {(x, y, z) for x in r for y in r for z in r}
        assert {tuple(v) for v in t} == cube and len(t) == len(cube), (xi2, m)
        assert tuple(t[0]) == (0, 0, 0) and np.all(np.diff((t.astype(np.int64) ** 2).sum(1)) >= 0)
    half = Sampling.create(32, 8.0, Config(max_resolution_angstrom=32.0))  # 18³ working box: steps of 16/9 voxel
    assert half.n_w == 18 and half.for_xi(Config(max_resolution_angstrom=32.0), 1.0).max_shift_w == 1  # ⌊3·9/16⌋
    assert half.for_xi(Config(max_resolution_angstrom=32.0), 0.01).max_shift_w == 1  # ±1 voxel is < 1 step: kept at 1
    fixed = Sampling.create(32, 8.0, Config(max_shift_voxels=3))
    assert fixed.max_shift_w == 3 and fixed.for_xi(Config(max_shift_voxels=3), 100.0) is fixed
    assert Sampling.create(32, 8.0, Config(no_align=True)).for_xi(Config(no_align=True), 9.0).max_shift_w == 0


def test_shift_range_follows_xi_both_ways(tmp_path):
    """Started too wide (ξ0 = 2 on shifts of one voxel) the range shrinks to ⌈3ξ⌉ as ξ is
    estimated; started too narrow (ξ0 = 0.3: ±1 on shifts of up to 3 voxels) it widens until the
    true shifts are inside. Both recover every shift, and the model file records the range."""
    from mltomo.geometry import euler_to_matrix
    from mltomo.io.star import read_star
    from mltomo.outputs import iteration_prefix

    rng = np.random.default_rng(5)
    n = 16
    refs = np.stack([blobs(n, rng)])
    rots = cube_rotations()
    for true_max, xi0, first, last_at_least in ((1, 2.0, 4, 2), (3, 0.3, 1, 3)):
        parts, _, ridx, shifts = make_particles(refs, rots, 30, 0.4, rng, max_shift=true_max)
        cfg = Config(n_classes=1, iterations=5, rotations=rots, padding=1.0, gridding=False, reg0=0,
                     xi0_voxels=xi0, perturb=False, threads=2, eps=0, auto_stop="off")
        out = tmp_path / f"run{true_max}"
        out.mkdir()
        res = run_em(parts, cfg, refs=refs, out_dir=out)
        ranges = [round(s.n_shifts ** (1 / 3)) // 2 for s in res.history]  # T = (2m + 1)³
        assert ranges[0] == first, ranges
        assert ranges[-1] >= last_at_least and ranges[-1] != first, ranges
        gen = read_star(f"{iteration_prefix(out, 5)}_model.star")["model_general"]
        value = gen["mltomoMaxShiftVoxels"].iloc[0] if hasattr(gen, "iloc") else gen["mltomoMaxShiftVoxels"]
        assert float(value) == ranges[-1]
        R = euler_to_matrix(*res.particles.angles.T)
        assert all(np.allclose(R[i], rots[ridx[i]], atol=1e-6) for i in range(30))
        assert np.array_equal(np.round(res.particles.shifts_angstrom / 10.0).astype(int), shifts)
