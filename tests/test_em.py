"""The EM driver on small synthetic data sets built in the test (no files)."""

import itertools

import numpy as np

from mltomo.em import run_em
from mltomo.model import Config, Particles


def cube_rotations():
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            R = np.zeros((3, 3))
            for i, j in enumerate(perm):
                R[i, j] = signs[i]
            if np.linalg.det(R) > 0:
                out.append(R)
    return np.array(out)


def blobs(n, rng, count=6, spread=0.22):
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((n, n, n))
    for _ in range(count):
        p = rng.uniform(-spread * n, spread * n, 3)
        v += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * 1.5**2))
    return v


def rotate_exact(a, R):
    """x(r) = a(Rᵀ r) for an integer (cube) rotation, exactly, on the grid centred at n//2."""
    n = a.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x, y, z], -1) @ R  # rows: (Rᵀ r)ᵀ = rᵀ R
    ix, iy, iz = [(r[..., d].round().astype(int) + n // 2) % n for d in range(3)]
    return a[iz, iy, ix]


def wedge_half(n, half_angle):
    f = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(f, f, np.arange(n // 2 + 1), indexing="ij")
    theta = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    return ((theta <= half_angle) | ((kx == 0) & (kz == 0))).astype(np.float32)


def make_particles(refs, rots, N, sigma, rng, max_shift=1, wedge=60):
    n = refs.shape[1]
    mask = wedge_half(n, wedge)
    cls = rng.integers(len(refs), size=N)
    ridx = rng.integers(len(rots), size=N)
    r = np.arange(-max_shift, max_shift + 1)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[(grid**2).sum(1) <= max_shift**2]
    shifts = grid[rng.integers(len(grid), size=N)]
    spectra = []
    for i in range(N):
        x = rotate_exact(refs[cls[i]], rots[ridx[i]])
        x = np.roll(x, shift=(shifts[i, 2], shifts[i, 1], shifts[i, 0]), axis=(0, 1, 2))
        x = x + rng.normal(scale=sigma, size=x.shape)
        spectra.append(np.fft.rfftn(np.fft.ifftshift(x), norm="ortho") * mask)
    p = Particles(
        spectra=np.array(spectra, dtype=np.complex64), masks=mask[None].copy(),
        groups=np.zeros(N, np.int32), region_labels=("wedge",), voxel_size_angstrom=10.0,
        names=tuple(f"p{i}" for i in range(N)), indices=np.arange(N), n_total=N,
    )
    return p, cls, ridx, shifts


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
