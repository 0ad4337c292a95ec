"""The paper's variants and the options users of ml_tomo relied on (SPEC §4-5).

Every option is exercised by a test whose assertion fails when the option is ignored (each
test states which). The data sets are built here: blob phantoms, exact cube rotations (24
rotations that land on grid points, so ``padding=1, gridding=False`` is exact), a ±60° wedge,
a 7-fold phantom for the symmetry tests. Small on purpose: boxes of 12-20, at most 40
particles, one or two iterations.

A ``--ref`` map whose voxel size differs from the particles' is refused in
``tests/test_bad_input.py::test_reference_wrong_voxel_size``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from mltomo import geometry
from mltomo.em import run_em
from mltomo.estep import estep
from mltomo.geometry import euler_to_matrix
from mltomo.model import Config, Particles
from mltomo.mstep import _to_grid, update_references
from mltomo.reference import crop_padded, lowpass, padded_transform, rotate_volume, soft_sphere
from mltomo.sampling import Sampling, rotation_grid

from conftest import EXACT, angles_of, blobs, cube_rotations, make_particles, wedge_half

N_BOX = 16
VOXEL = 10.0

def _rotations_of(res):
    return euler_to_matrix(*res.particles.angles.T)


def _two_class_data(N=30, sigma=0.5, seed=1, wedge=60, max_shift=1):
    rng = np.random.default_rng(seed)
    refs = np.stack([blobs(N_BOX, rng), blobs(N_BOX, rng)])
    rots = cube_rotations()
    parts, cls, ridx, shifts = make_particles(refs, rots, N, sigma, rng, max_shift=max_shift, wedge=wedge)
    return refs, rots, parts, cls, ridx, shifts


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _spectrum(vol):
    return np.fft.rfftn(np.fft.ifftshift(vol), norm="ortho")


# ------------------------------------------------------------------------- 1. modes


@pytest.mark.parametrize("mode", ["ml", "ml-wa", "cc"])
def test_every_mode_recovers_classes_poses_and_shifts(mode):
    """From references near the truth, each M-step variant keeps every particle in its class
    and pose (a sanity check; the tests below tell the modes apart)."""
    refs, rots, parts, cls, ridx, shifts = _two_class_data(sigma=0.3)
    start = refs + np.random.default_rng(9).normal(scale=0.05, size=refs.shape)
    res = run_em(parts, Config(n_classes=2, iterations=2, rotations=rots, mode=mode, **EXACT), refs=start)
    assert np.array_equal(res.particles.classes - 1, cls)
    R = _rotations_of(res)
    assert max(geometry.geodesic_distance_deg(R[i], rots[ridx[i]]) for i in range(len(cls))) < 1e-3
    assert np.array_equal(np.round(res.particles.shifts_angstrom / VOXEL).astype(int), shifts)
    for k in range(2):
        assert _rel(res.model.refs[k], refs[k]) < 0.35  # noise of ~15 particles per class


def test_cc_mode_assigns_every_particle_to_one_pose():
    """Noisy data where the ML posteriors are spread over several poses: ``mode="cc"`` gives
    max_post == 1 and one significant sample per particle. (Ignoring the mode = ML: fails.)"""
    refs, rots, parts, *_ = _two_class_data(N=20, sigma=2.5, seed=3)
    cfg = Config(n_classes=2, iterations=1, rotations=rots, fix_sigma=2.5, **EXACT)
    ml = run_em(parts, cfg, refs=refs)
    assert ml.particles.max_post.min() < 0.9  # the data are ambiguous for ML
    assert np.all(ml.particles.n_significant > 1)
    cc = run_em(parts, dataclasses.replace(cfg, mode="cc"), refs=refs)
    assert np.all(cc.particles.max_post == 1.0)
    assert np.all(cc.particles.n_significant == 1)


@pytest.mark.parametrize("mode", ["ml-wa", "cc"])
def test_weighted_averaging_zeroes_unobserved_components_while_ml_imputes_them(mode):
    """Every particle in the same orientation (rotations = [identity]) with a ±60° wedge: the
    missing wedge is never observed. ML (imputation) keeps the current reference there;
    weighted averaging (``ml-wa``, ``cc``) sets it to zero. (Ignoring the mode: ml-wa/cc
    would keep the start reference in the wedge and fail.)"""
    rng = np.random.default_rng(2)
    truth = blobs(N_BOX, rng)
    parts, *_ = make_particles(truth[None], np.eye(3)[None], 12, 0.3, rng, max_shift=0)
    missing = wedge_half(N_BOX, 60) == 0
    cfg = Config(n_classes=1, iterations=1, rotations=np.eye(3)[None], **{**EXACT, "max_shift_voxels": 0})
    power = np.abs(_spectrum(truth)[missing]) ** 2
    ml = run_em(parts, cfg, refs=truth[None])
    kept = np.abs(_spectrum(ml.model.refs[0])[missing]) ** 2
    assert kept.sum() > 0.9 * power.sum()  # ML: the wedge keeps the start reference
    wa = run_em(parts, dataclasses.replace(cfg, mode=mode, wa_threshold=0.5), refs=truth[None])
    left = np.abs(_spectrum(wa.model.refs[0])[missing]) ** 2
    assert left.sum() < 1e-6 * power.sum()
    # ... and the observed components are the average of the particles in both
    f = np.fft.fftfreq(N_BOX) * N_BOX
    k2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + np.arange(N_BOX // 2 + 1)[None, None, :] ** 2
    seen = ~missing & (k2 <= (N_BOX / 2 - 1) ** 2)  # inside the working radius
    avg = np.mean(parts.spectra, 0)
    for r in (ml, wa):
        F = _spectrum(r.model.refs[0])
        assert np.abs(F[seen] - avg[seen]).max() < 1e-3 * np.abs(avg[seen]).max()


def test_wa_threshold_zeroes_components_seen_by_too_few_particles():
    """``wa_threshold`` above the particle count leaves nothing (references zero); the default
    keeps them. (Ignoring ``wa_threshold``: the references are not zero.)"""
    refs, rots, parts, *_ = _two_class_data(N=16)
    cfg = Config(n_classes=2, iterations=1, rotations=rots, mode="ml-wa", **EXACT)
    normal = run_em(parts, cfg, refs=refs)
    assert all(np.linalg.norm(a) > 0.5 * np.linalg.norm(b) for a, b in zip(normal.model.refs, refs))
    huge = run_em(parts, dataclasses.replace(cfg, wa_threshold=1e6), refs=refs)
    assert np.abs(huge.model.refs).max() == 0.0


# ---------------------------------------------------------------- 2. fixed parameters


def test_fix_sigma_holds_and_the_near_delta_run_gives_delta_posteriors():
    """``fix_sigma`` keeps σ at its value every iteration; at σ_true/100 (the paper's near-delta
    experiment) every posterior is a delta. (Ignoring ``fix_sigma``: σ is re-estimated, near
    σ_true, and the posteriors are as spread as in the σ_true run.)"""
    sigma = 2.5
    refs, rots, parts, *_ = _two_class_data(N=20, sigma=sigma, seed=3)
    cfg = Config(n_classes=2, iterations=2, rotations=rots, **EXACT)
    soft = run_em(parts, dataclasses.replace(cfg, fix_sigma=sigma), refs=refs)
    assert soft.particles.max_post.min() < 0.9
    assert np.all(soft.particles.n_significant > 1)
    assert [h.sigma for h in soft.history] == pytest.approx([sigma] * 2, rel=1e-12)
    delta = run_em(parts, dataclasses.replace(cfg, fix_sigma=sigma / 100), refs=refs)
    assert [h.sigma for h in delta.history] == pytest.approx([sigma / 100] * 2, rel=1e-12)
    assert delta.model.sigma2 == pytest.approx((sigma / 100) ** 2, rel=1e-12)
    assert delta.particles.max_post.min() > 1 - 1e-12
    assert np.all(delta.particles.n_significant == 1)


def _unbalanced(n_a=20, n_b=5):
    refs, rots, parts, cls, _, _ = _two_class_data(N=40, seed=4)
    keep = np.sort(np.r_[np.flatnonzero(cls == 0)[:n_a], np.flatnonzero(cls == 1)[:n_b]])
    N = len(keep)
    parts = dataclasses.replace(parts, spectra=parts.spectra[keep], groups=parts.groups[keep],
                                names=tuple(parts.names[i] for i in keep), indices=np.arange(N), n_total=N)
    return refs, rots, parts, cls[keep]


def test_fix_fractions_keeps_alpha_and_fix_xi_keeps_xi():
    """A 20:5 data set with shifts up to 1 voxel. Free: α → (0.8, 0.2) and ξ moves from ξ0.
    ``fix_fractions`` keeps α = 1/K and ``fix_xi`` keeps ξ = ξ0 in every iteration.
    (Ignoring either option: the corresponding assertion fails, as the free run shows.)"""
    refs, rots, parts, cls = _unbalanced()
    cfg = Config(n_classes=2, iterations=2, rotations=rots, **{**EXACT, "xi0_voxels": 2.0})
    free = run_em(parts, cfg, refs=refs)
    assert free.model.alpha == pytest.approx([0.8, 0.2], abs=1e-6)
    assert abs(free.history[-1].xi_voxels - 2.0) > 0.3
    fixed = run_em(parts, dataclasses.replace(cfg, fix_fractions=True, fix_xi=True), refs=refs)
    assert np.array_equal(fixed.particles.classes - 1, cls)
    for h in fixed.history:
        assert h.alpha == (0.5, 0.5)
        assert h.xi_voxels == pytest.approx(2.0, rel=1e-12)
    only_xi = run_em(parts, dataclasses.replace(cfg, fix_xi=True), refs=refs)
    assert only_xi.model.alpha == pytest.approx([0.8, 0.2], abs=1e-6)
    assert only_xi.history[-1].xi_voxels == pytest.approx(2.0, rel=1e-12)


# ----------------------------------------------------------------------- 3. imputation


def _one_estep(refs, rots, parts, sigma2, geo):
    Fref = np.stack([crop_padded(padded_transform(a, geo.pad, gridding=False), geo.P_w) for a in refs])
    sums, _, _ = estep(np.ascontiguousarray(Fref, dtype=np.complex64), geo.pad, parts.spectra, parts.masks,
                       parts.groups, geo.radius, rots, geo.shifts, geo.log_prior_shift(1.0),
                       np.log(np.full(len(refs), 1.0 / len(refs))), sigma2, nthreads=1, prune=0.0)
    return sums


def test_many_imputation_iterations_tend_to_the_weighted_average():
    """``A ← A + (S − M⊙A)/W`` repeated m times → S/M where M > 0 (SPEC §4): with
    impute_iter=200 the ML update equals weighted averaging (``ml-wa`` with a tiny threshold)
    on every observed component, and keeps the current reference on the unobserved ones;
    impute_iter=1 differs. (Ignoring ``impute_iter``: the m=200 update equals the m=1 one and
    the first assertion fails.)"""
    refs, rots, parts, *_ = _two_class_data(N=16, sigma=1.0)
    geo = Sampling.create(N_BOX, VOXEL, Config(**EXACT))
    sums = _one_estep(refs, rots, parts, 1.0, geo)
    start = 0.5 * refs  # far from the data, so the imputation has work to do
    kw = {"pad": 1.0, "gridding": False}
    ml200 = update_references(start, sums, mode="ml", impute_iter=200, **kw)
    ml1 = update_references(start, sums, mode="ml", impute_iter=1, **kw)
    wa = update_references(start, sums, mode="ml-wa", wa_threshold=1e-9, **kw)
    g = np.ones((N_BOX,) * 3)
    for k in range(2):
        seen = sums.M[k] > 1e-9 * sums.M[k].max()
        frac = sums.M[k][seen] / sums.W[k]
        assert frac.min() >= 1.0 / len(parts) - 1e-9
        B200, B1, Bwa, B0 = (_to_grid(a[k], 1.0, geo.P_w, g) for a in (ml200, ml1, wa, start))
        scale = np.abs(Bwa[seen]).max()
        # residual factor (1 - M/W)^200 <= (1 - 1/16)^200 ~ 2.5e-6 of the start's distance
        assert np.abs(B200[seen] - Bwa[seen]).max() < 1e-4 * scale
        assert np.abs(B1[seen] - Bwa[seen]).max() > 0.1 * scale
        assert np.allclose(B200[~seen], B0[~seen], atol=1e-9 * scale)  # unobserved: the model


def test_impute_iter_reaches_the_refinement():
    """The same through ``run_em``: one iteration with impute_iter=200 ends where weighted
    averaging does; impute_iter=1 does not. (Ignoring ``impute_iter`` in run_em: fails.)"""
    refs, rots, parts, *_ = _two_class_data(N=16, sigma=1.0)
    cfg = Config(n_classes=2, iterations=1, rotations=rots, fix_sigma=1.0, **EXACT)
    start = 0.5 * refs
    wa = run_em(parts, dataclasses.replace(cfg, mode="ml-wa", wa_threshold=1e-9), refs=start).model.refs
    m200 = run_em(parts, dataclasses.replace(cfg, impute_iter=200), refs=start).model.refs
    m1 = run_em(parts, cfg, refs=start).model.refs
    assert _rel(m200, wa) < 1e-3
    assert _rel(m1, wa) > 0.05


# ----------------------------------------------------------------- 4. restricted searches


def _with_priors(parts, R, shifts_voxels=None):
    kw = {"prior_angles": angles_of(R)}
    if shifts_voxels is not None:
        kw["prior_shifts_angstrom"] = np.asarray(shifts_voxels, dtype=np.float64) * VOXEL
    return dataclasses.replace(parts, **kw)


def test_local_search_stays_within_the_angular_range_of_the_priors():
    """A 20° grid (perturbed), particles in random orientations. Priors: the true pose for half
    the particles, the true pose turned by 60° about z for the other half. With
    ``angular_range_deg=25`` every found pose stays within 25° of its prior (so the true-prior
    half is found near the truth, the others cannot reach it); a global search finds the truth
    for all. (Ignoring ``angular_range_deg``: the 60° half leaves its range and fails.)"""
    rng = np.random.default_rng(5)
    n = N_BOX
    truth = blobs(n, rng)
    N = 12
    R_true = geometry.random_rotations(N, rng)
    mask = wedge_half(n, 60)
    spectra = np.stack([_spectrum(rotate_volume(truth, R) + rng.normal(scale=0.2, size=(n,) * 3)) * mask
                        for R in R_true]).astype(np.complex64)
    parts = Particles(spectra=spectra, masks=mask[None], groups=np.zeros(N, np.int32), region_labels=("w",),
                      voxel_size_angstrom=VOXEL, names=tuple(map(str, range(N))), indices=np.arange(N), n_total=N)
    off = np.arange(N) % 2 == 1
    R_prior = np.where(off[:, None, None], R_true @ geometry.rotation_z(60.0), R_true)
    parts = _with_priors(parts, R_prior)
    cfg = Config(n_classes=1, iterations=1, angular_sampling_deg=20.0, angular_range_deg=25.0, fix_sigma=2.0,
                 max_shift_voxels=0, reg0=0.0, eps=0.0, threads=1, seed=3)
    local = run_em(parts, cfg, refs=truth[None])
    R = _rotations_of(local)
    d_prior = geometry.geodesic_distance_deg(R, R_prior)
    d_true = geometry.geodesic_distance_deg(R, R_true)
    assert d_prior.max() <= 25.0 + 1e-6, d_prior
    assert d_true[~off].max() < 20.0, d_true
    assert d_true[off].min() > 30.0, d_true
    # a global search (no angular range) reaches the truth from every prior
    glob = run_em(parts, dataclasses.replace(cfg, angular_range_deg=None), refs=truth[None])
    assert geometry.geodesic_distance_deg(_rotations_of(glob), R_true).max() < 20.0


def test_no_rotate_keeps_each_prior_rotation_and_searches_shifts_and_classes():
    """Priors: the true rotations; the rotation list offered is only the identity. With
    ``no_rotate`` every particle keeps its prior rotation exactly while classes and shifts are
    found. (Ignoring ``no_rotate``: every rotation becomes the identity and fails.)"""
    refs, rots, parts, cls, ridx, shifts = _two_class_data(N=20)
    parts = _with_priors(parts, rots[ridx])
    cfg = Config(n_classes=2, iterations=2, rotations=np.eye(3)[None], no_rotate=True, **EXACT)
    res = run_em(parts, cfg, refs=refs)
    assert np.allclose(_rotations_of(res), rots[ridx], atol=1e-9)
    assert np.allclose(res.particles.angles, parts.prior_angles, atol=1e-6)
    assert np.array_equal(res.particles.classes - 1, cls)
    assert np.array_equal(np.round(res.particles.shifts_angstrom / VOXEL).astype(int), shifts)
    assert res.history[0].n_shifts == 27


def test_no_align_keeps_rotations_and_shifts_and_classifies():
    """``no_align``: rotations and shifts are the priors' (even a prior shift one voxel off is
    kept), only classes are searched. (Ignoring ``no_align``: the identity-only rotation list
    and the shift search take over and the poses change.)"""
    refs, rots, parts, cls, ridx, shifts = _two_class_data(N=20)
    prior_t = shifts.astype(float)
    prior_t[0] += (1, 0, 0)  # a wrong prior shift stays wrong: shifts are not searched
    parts = _with_priors(parts, rots[ridx], prior_t)
    cfg = Config(n_classes=2, iterations=2, rotations=np.eye(3)[None], no_align=True, **EXACT)
    res = run_em(parts, cfg, refs=refs)
    assert np.allclose(_rotations_of(res), rots[ridx], atol=1e-9)
    assert np.allclose(res.particles.shifts_angstrom, prior_t * VOXEL, atol=1e-9)
    assert np.array_equal(res.particles.classes - 1, cls)
    assert res.history[0].n_shifts == 1


def test_focused_mask_is_applied_to_the_references(tmp_path):
    """A focused mask (an MRC file: 1 for x < 6, a raised-cosine edge to 0 at x = 9) with
    ``no_align``: the references vanish outside it. (Ignoring ``mask``: the blobs outside the
    mask stay.) ``run_em`` reads no files: the API reads the mask and passes the array; without
    it, a ``config.mask`` is an error, not silently ignored."""
    from mltomo.api import read_focus
    from mltomo.io import write_volume

    refs, rots, parts, cls, ridx, shifts = _two_class_data(N=20)
    parts = _with_priors(parts, rots[ridx], shifts)
    x = np.arange(N_BOX)
    edge = 0.5 + 0.5 * np.cos(np.pi * np.clip((x - 6) / 3.0, 0, 1))  # 1 up to x=6, 0 from x=9
    focus = np.broadcast_to(edge, (N_BOX,) * 3).astype(np.float32)
    write_volume(tmp_path / "focus.mrc", focus, VOXEL)
    cfg = Config(n_classes=2, iterations=1, no_align=True, mask=str(tmp_path / "focus.mrc"), **EXACT)
    with pytest.raises(ValueError, match="focus="):
        run_em(parts, cfg, refs=refs)
    res = run_em(parts, cfg, refs=refs, focus=read_focus(cfg))
    inside = focus > 0
    far = np.zeros_like(inside)
    far[:, :, 10:14] = True  # away from the mask's edge (and the box's periodic wrap)
    for k in range(2):
        a = res.model.refs[k]
        assert np.sum(refs[k][~inside] ** 2) > 0.2 * np.sum(refs[k] ** 2)  # the truth has mass there
        assert np.sum(a[~inside] ** 2) < 0.01 * np.sum(a[inside] ** 2)
        assert np.abs(a[far]).max() < 0.05 * np.abs(a).max()  # the low-pass rings a little
    assert np.array_equal(res.particles.classes - 1, cls)


# ------------------------------------------------------------------------------ 5. symmetry


def c7_phantom(n):
    """Two rings of 7 Gaussian blobs about z (different radii, heights and phases): C7, not more."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((n,) * 3)
    for j in range(7):
        a = 2 * np.pi * j / 7
        for r, h, phase, w, amp in ((4.5, 2.0, 0.0, 1.3, 1.0), (2.5, -2.5, 0.3, 1.0, 0.7)):
            px, py = r * np.cos(a + phase), r * np.sin(a + phase)
            v += amp * np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - h) ** 2) / (2 * w**2))
    return v


def _c7_particles(R_true, sigma, rng, n=20):
    truth = c7_phantom(n)
    mask = wedge_half(n, 60)
    spectra = np.stack([_spectrum(rotate_volume(truth, R) + rng.normal(scale=sigma, size=(n,) * 3)) * mask
                        for R in R_true]).astype(np.complex64)
    N = len(R_true)
    parts = Particles(spectra=spectra, masks=mask[None], groups=np.zeros(N, np.int32), region_labels=("w",),
                      voxel_size_angstrom=VOXEL, names=tuple(map(str, range(N))), indices=np.arange(N), n_total=N)
    return truth, parts


def test_c7_phantom_is_c7():
    truth = c7_phantom(20)
    G = geometry.symmetry_group("C7")
    assert max(_rel(rotate_volume(truth, g), truth) for g in G[1:]) < 0.05  # interpolation error
    assert _rel(rotate_volume(truth, geometry.rotation_z(360 / 14)), truth) > 0.3


def _inner(vol):
    """The part of a map a rotation keeps inside the box and renders accurately: low-passed to
    0.7 × Nyquist and multiplied by a soft sphere of radius 6 + 3 voxels."""
    n = vol.shape[0]
    return lowpass(vol, 0.35 * n) * soft_sphere(n, 6.0)


def test_symmetrising_c7_lowers_the_reference_error():
    """The same noisy C7 particles at their true poses (``no_align``, classification of one
    class = plain reconstruction): ``sym="C7"`` averages the 7 copies and the reference is
    closer to the truth than with C1 (0.18 vs 0.47), and C7-symmetric. (Ignoring ``sym``:
    equal errors.)"""
    rng = np.random.default_rng(6)
    R_true = geometry.random_rotations(14, rng)
    truth, parts = _c7_particles(R_true, 1.0, rng)
    parts = _with_priors(parts, R_true, np.zeros((14, 3)))
    cfg = Config(n_classes=1, iterations=1, no_align=True, mode="ml-wa", fix_sigma=1.0, reg0=0.0, eps=0.0,
                 scheme="paper", threads=1)
    zero = np.zeros((1,) + truth.shape)
    c1 = run_em(parts, cfg, refs=zero).model.refs[0]
    c7 = run_em(parts, dataclasses.replace(cfg, sym="C7"), refs=zero).model.refs[0]
    e1, e7 = _rel(_inner(c1), _inner(truth)), _rel(_inner(c7), _inner(truth))
    assert e7 < 0.6 * e1, (e1, e7)
    g = geometry.symmetry_group("C7")[1]
    assert _rel(_inner(rotate_volume(c7, g)), _inner(c7)) < 0.1  # 0.05 (C1: 0.65)
    assert _rel(_inner(rotate_volume(c1, g)), _inner(c1)) > 0.3


def test_symmetry_reduced_grid_gives_the_full_grid_answer():
    """A C7-closed rotation list ``{b g}`` (20 random b, g in C7) and its asymmetric unit (one
    rotation per orbit): with ``sym="C7"`` both find the same poses modulo C7 and near-identical
    maps. The automatic grid of a C7 run is the asymmetric unit of the SO(3) grid (1/7 of it).
    (Ignoring ``sym``: the automatic grid is the full one, and the reduced-list map is not
    symmetrised while the full-list one is averaged over the 7 mates: they differ.)"""
    rng = np.random.default_rng(7)
    G = geometry.symmetry_group("C7")
    base = geometry.random_rotations(20, rng)
    full = (base[:, None] @ G[None]).reshape(-1, 3, 3)
    reduced = full[geometry.asymmetric_unit(full, G)]
    assert len(reduced) == 20
    N = 12
    R_true = base[rng.integers(20, size=N)] @ G[rng.integers(7, size=N)]
    truth, parts = _c7_particles(R_true, 0.5, rng)
    cfg = Config(n_classes=1, iterations=1, sym="C7", fix_sigma=0.5, max_shift_voxels=0, reg0=0.0, eps=0.0,
                 scheme="paper", threads=1, perturb=False)
    a = run_em(parts, dataclasses.replace(cfg, rotations=full), refs=truth[None])
    b = run_em(parts, dataclasses.replace(cfg, rotations=reduced), refs=truth[None])
    d = geometry.symmetry_min_distance_deg(_rotations_of(a), _rotations_of(b), G)
    assert d.max() < 1e-4, d
    assert geometry.symmetry_min_distance_deg(_rotations_of(b), R_true, G).max() < 1e-4
    assert _rel(_inner(a.model.refs[0]), _inner(b.model.refs[0])) < 0.05  # 0.02 (C1: 0.15)
    assert a.model.log_likelihood == pytest.approx(b.model.log_likelihood, rel=1e-3)
    # The grid of a run with sym="C7" is reduced to the asymmetric unit.
    step = 30.0
    grid = geometry.so3_grid(step)
    auto = rotation_grid(Config(sym="C7", angular_sampling_deg=step, perturb=False), 1, G)
    assert abs(len(auto) - len(grid) / 7) < 0.1 * len(grid) / 7
    cov = geometry.symmetry_min_distance_deg(grid[:, None], auto[None], G).min(1)
    # with the group, the kept rotations reach every grid rotation (within the documented seams:
    # the grid is closed under I, not C7)
    assert cov.max() < 1.35 * geometry.covering_radius_deg(grid, n_samples=5000)
    run = run_em(parts, dataclasses.replace(cfg, angular_sampling_deg=step, iterations=1), refs=truth[None])
    assert run.history[0].n_rotations == len(auto)


# ------------------------------------------------------------------- 6. the particle table


def _write_particles(folder, vols):
    from mltomo.io import write_volume

    (folder / "particles").mkdir(parents=True, exist_ok=True)
    names = []
    for i, v in enumerate(vols):
        names.append(f"particles/p{i + 1}.mrc")
        write_volume(folder / names[-1], np.asarray(v, np.float32), VOXEL)
    return names


def test_per_particle_missing_regions_and_priors_from_the_table(tmp_path):
    """``rlnCtfImage`` weight volumes (two files, read as binary masks with a weight threshold), the
    ``mltomoMissingRegion`` column, the region of a particle's ``rlnTomoName`` in a
    ``data_tomograms`` block, and ``--missing`` for the rest, in that order of precedence;
    priors from rlnAngle*/rlnOrigin*Angst/rlnClassNumber. (Dropping any of those columns or
    blocks, or ignoring ``missing=``/``weight_threshold=``, changes a particle's mask and fails.)"""
    from mltomo.fourier import missing_region_mask, weight_volume_mask
    from mltomo.io import write_star, write_volume
    from mltomo.particles import read_particles

    n = 12
    rng = np.random.default_rng(8)
    names = _write_particles(tmp_path, rng.normal(size=(8, n, n, n)))
    # Full-layout (centred) weights: 1 inside a ±50° wedge about y, 0.3 in a band beyond it, 0 elsewhere.
    c = np.arange(n) - n // 2
    kz, _, kx = np.meshgrid(c, c, c, indexing="ij")
    ang = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    w1 = np.where(ang <= 50, 1.0, np.where(ang <= 70, 0.3, 0.0)).astype(np.float32)
    w2 = np.where(ang <= 30, 1.0, 0.0).astype(np.float32)
    write_volume(tmp_path / "w1.mrc", w1, VOXEL)
    write_volume(tmp_path / "w2.mrc", w2, VOXEL)
    angles = rng.uniform(-180, 180, size=(8, 3))
    origins = rng.uniform(-20, 20, size=(8, 3))
    table = pd.DataFrame({
        "rlnImageName": names,
        "rlnCtfImage": ["w1.mrc", "w1.mrc", "w2.mrc", None, None, None, None, None],
        "mltomoMissingRegion": ["wedge_x:-30:30", None, None, "wedge_x:-45:45", "wedge_y:-50:70", None, None, None],
        "rlnTomoName": ["A", "A", "A", "A", "A", "A", "B", "C"],
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1], "rlnOriginZAngst": origins[:, 2],
        "rlnClassNumber": [1, 2, 1, 2, 1, 2, 1, 2],
    })
    tomos = pd.DataFrame({"rlnTomoName": ["A", "B"], "mltomoMissingRegion": ["cone:30", "pyramid:-60:60:-50:50"]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [VOXEL]})
    write_star(tmp_path / "particles.star", {"optics": optics, "particles": table, "tomograms": tomos})

    p = read_particles(tmp_path / "particles.star", missing="wedge_y:-60:60", weight_threshold=0.5,
                       weight_layout="centred")
    expected = [weight_volume_mask(w1), weight_volume_mask(w1), weight_volume_mask(w2),
                missing_region_mask("wedge_x:-45:45", n), missing_region_mask("wedge_y:-50:70", n),
                missing_region_mask("cone:30", n), missing_region_mask("pyramid:-60:60:-50:50", n),
                missing_region_mask("wedge_y:-60:60", n)]
    assert len(p.region_labels) == 7
    assert p.groups[0] == p.groups[1] and len(set(p.groups[1:].tolist())) == 7
    for i in range(8):
        assert np.array_equal(p.masks[p.groups[i]], expected[i]), (i, p.region_labels[p.groups[i]])
    assert p.voxel_size_angstrom == VOXEL
    assert np.allclose(p.prior_angles, angles, atol=1e-6)
    assert np.allclose(p.prior_shifts_angstrom, origins, atol=1e-6)
    assert np.array_equal(p.prior_classes, [1, 2, 1, 2, 1, 2, 1, 2])
    # The weight threshold: 0.2 also keeps the 0.3 band of w1.
    q = read_particles(tmp_path / "particles.star", missing="wedge_y:-60:60", weight_threshold=0.2,
                       weight_layout="centred")
    assert q.masks[q.groups[0]].sum() > p.masks[p.groups[0]].sum()
    assert np.array_equal(q.masks[q.groups[0]], weight_volume_mask(w1, 0.2))
    assert np.array_equal(q.masks[q.groups[2]], p.masks[p.groups[2]])


def _cli(*argv):
    from mltomo.cli import main

    code = main(["refine", *map(str, argv), "--threads", "1", "--quiet", "--reg0", "0"])
    assert code == 0


def test_continue_from_a_previous_runs_data_star_with_local_search(tmp_path):
    """Run 1 (CLI) aligns the particles to a reference turned by 90° about x, so its poses are
    90° from the truth. Its ``run_it001_data.star``, given as the particle table of run 2 (images
    resolved through run 1's input table), supplies rlnAngle*/rlnOrigin* as priors; run 2 with
    the true reference and ``--angular-range 30`` stays within 30° of them, where a global search
    jumps to the truth. (Ignoring the priors or ``--angular-range``: the poses move by ~90°.)"""
    from mltomo.io import read_star, write_star, write_volume
    from mltomo.particles import read_particles

    rng = np.random.default_rng(10)
    truth = blobs(N_BOX, rng)
    R_true = geometry.random_rotations(10, rng)
    data = tmp_path / "data"
    names = _write_particles(data, [rotate_volume(truth, R) + rng.normal(scale=0.2, size=truth.shape) for R in R_true])
    write_star(data / "particles.star", {"particles": pd.DataFrame({"rlnImageName": names})})
    Q = geometry.rotation_x(90.0)
    write_volume(data / "turned.mrc", rotate_volume(truth, Q).astype(np.float32), VOXEL)
    write_volume(data / "truth.mrc", truth.astype(np.float32), VOXEL)
    common = ["--classes", "1", "--iter", "1", "--max-shift", "0", "--fix-sigma", "1"]
    _cli(data / "particles.star", "--out", tmp_path / "run1", "--ref", data / "turned.mrc",
         "--angular-sampling", "20", *common)
    star1 = tmp_path / "run1" / "run_it001_data.star"
    df1 = read_star(star1)["particles"]
    R1 = euler_to_matrix(*df1[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float).T)
    assert geometry.geodesic_distance_deg(R1, R_true @ Q.T).max() < 20  # poses in the turned frame
    assert geometry.geodesic_distance_deg(R1, R_true).min() > 60

    p = read_particles(star1)
    assert np.allclose(euler_to_matrix(*p.prior_angles.T), R1, atol=1e-8)
    assert np.allclose(p.prior_shifts_angstrom, df1[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]])
    assert list(p.names) == names

    _cli(star1, "--out", tmp_path / "run2", "--ref", data / "truth.mrc", "--angular-sampling", "20",
         "--angular-range", "30", *common)
    df2 = read_star(tmp_path / "run2" / "run_it001_data.star")["particles"]
    R2 = euler_to_matrix(*df2[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float).T)
    assert geometry.geodesic_distance_deg(R2, R1).max() <= 30 + 1e-6
    assert list(df2["rlnImageName"]) == names  # the names are copied, still relative to data/
    # ... and run 2's table can be continued from in turn
    assert np.allclose(euler_to_matrix(*read_particles(tmp_path / "run2" / "run_it001_data.star").prior_angles.T),
                       R2, atol=1e-8)


def test_output_table_keeps_the_inputs_general_and_optics_blocks(tmp_path):
    """A RELION-style input (``data_general``, ``data_optics``, ``data_particles``): the run's
    ``_data.star`` has the same blocks in the same order, the other blocks unchanged, the
    particle block with mltomo's columns; ``starfile`` parses it as RELION's own, and it reads
    back as a particle table (voxel size from the optics block)."""
    import starfile

    from mltomo.io import read_star, write_star
    from mltomo.particles import read_particles

    rng = np.random.default_rng(4)
    truth = blobs(N_BOX, rng)
    data = tmp_path / "data"
    names = _write_particles(data, [truth + rng.normal(scale=0.3, size=truth.shape) for _ in range(4)])
    general = {"rlnTomoSubTomosAre2DStacks": 0}
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [VOXEL], "rlnVoltage": [300.0]})
    parts = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": [1] * 4, "rlnTomoName": ["TS_01"] * 4})
    write_star(data / "particles.star", {"general": general, "optics": optics, "particles": parts})
    before = (data / "particles.star").read_bytes()
    _cli(data / "particles.star", "--out", tmp_path / "run", "--classes", "1", "--iter", "1",
         "--angular-sampling", "45", "--max-shift", "0")
    out = tmp_path / "run" / "run_it001_data.star"
    blocks = read_star(out)
    assert list(blocks) == ["general", "optics", "particles"]
    assert {k: int(v) for k, v in blocks["general"].items()} == general
    pd.testing.assert_frame_equal(blocks["optics"], optics, check_dtype=False)
    table = blocks["particles"]
    assert list(table["rlnImageName"]) == names and list(table["rlnTomoName"]) == ["TS_01"] * 4
    assert {"rlnAngleRot", "rlnOriginXAngst", "rlnClassNumber", "rlnLogLikeliContribution"} <= set(table.columns)
    theirs = starfile.read(out, always_dict=True)
    assert list(theirs) == ["general", "optics", "particles"] and len(theirs["particles"]) == 4
    again = read_particles(out)
    assert again.voxel_size_angstrom == VOXEL and again.prior_angles.shape == (4, 3)
    assert [n for n, b in again.star_blocks] == ["general", "optics", "particles"]
    assert (data / "particles.star").read_bytes() == before  # the input is untouched


# ----------------------------------------------------------------------------------- 7. help


def test_refine_help_states_every_default():
    """``mltomo refine --help`` names the default of every option (and the paper's value where
    it differs), and the defaults it states are the ones a run uses (CLI defaults == Config)."""
    import argparse
    import contextlib
    import io

    from mltomo.cli import build_parser, main
    from mltomo.cli.refine import config_from_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["refine", "--help"])
    assert info.value.code == 0
    text = " ".join(out.getvalue().split())
    expected = {
        "--classes": "default 2", "--iter": "default 25; the paper ran 40",
        "--mode": "ml: ML with imputation of missing data (default, the paper's method)",
        "--impute-iter": "default 1", "--wa-threshold": "default 0.1, the paper's",
        "--reg0": "default 5, the paper's", "--regF": "default 0, the paper's", "--reg-steps": "default 5",
        "--fix-sigma": "default: estimated every iteration; the paper's near-delta runs: sigma/100",
        "--fix-xi": "default: updated every iteration", "--fix-fractions": "default: updated every iteration",
        "--sym": "default C1", "--angular-sampling": "default 15, the paper's",
        "--angular-range": "default: exhaustive search; paper: 50 with 10 deg sampling",
        "--no-perturb": "default: re-oriented", "--no-rotate": "default: off", "--no-align": "default: off",
        "--max-shift": "default: min(n/4, max(1, ceil(3 xi))) for each iteration's xi",
        "--xi0": "default 2", "--missing": "(default none)",
        "--weight-threshold": "default: continuous CTF² weights",
        "--weight-layout": "default auto", "--weight-kind": "default auto",
        "--noise": "default auto: shell for continuous weights",
        "--no-scale-correction": "default: both", "--tomograms": "default: the one its optimisation set names",
        "--mask": "default: none",
        "--particle-diameter": "default: box - 2 voxels with a soft edge outside when classifying, none with "
                               "--classes 1 or --scheme paper; 0: no mask",
        "--max-resolution": "default: full box", "--padding": "default 2",
        "--initial-lowpass": "default: none for --ref maps, 8 voxels", "--eps": "default 1e-5",
        "--seed": "default 0", "--threads": "default: all cores",
    }
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["refine"]
    for action in sub._actions:
        if not action.option_strings or action.dest in ("help", "out", "cont"):
            continue
        opt = action.option_strings[0]
        assert "default" in action.help, opt
        if opt in expected:
            assert expected[opt] in " ".join(action.help.split()), opt
            assert expected[opt] in text, opt
    assert set(expected) <= {a.option_strings[0] for a in sub._actions if a.option_strings}
    args = parser.parse_args(["refine", "particles.star", "--out", "run"])
    assert config_from_args(args) == Config()
