"""RELION 5 / WarpTools 2D tilt stacks (mltomo.io.relion5): pseudo-subtomograms, geometry, CTF,
errors, and the real 70S data set of ../shared/data/relion5_stacks (skipped when absent).

The synthetic data sets are built in Fourier space from an analytic phantom (a sum of Gaussian
blobs), so every tilt image is exactly the central slice RELION 5's model predicts, CTF-
premultiplied: the raw image ``c_f · √n · A(A_fᵀ (k2, 0))`` times ``c_f`` once more, with
``A_f = P_f A_sub A_part`` (``Experiment::read``, ``ParticleSet::getMatrix3x3``), independently
of the reader's code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mltomo.geometry import euler_to_matrix, matrix_to_euler, random_rotations, rotation_x, rotation_y, rotation_z
from mltomo.io import relion5
from mltomo.io.star import read_star, write_star
from mltomo.particles import ParticleTableError, read_particles

from conftest import DATA

PIXEL = 10.0
BLOBS = np.array([[0.0, 0.0, 0.0, 1.0], [3.0, 1.0, -1.0, 0.8], [-2.0, 2.5, 1.0, 0.6], [1.0, -3.0, 2.5, 0.5]])
REAL = DATA / "relion5_stacks"
REAL_STEM = "warptools_test_4-tomos_10-ptcls_box-32_angpix-12"


def phantom_ft(k, n, sigma=1.5):
    """The asymmetric phantom's transform at frequencies ``k`` (..., 3) as x, y, z in 1/(n voxels)."""
    k = np.asarray(k, dtype=np.float64)
    out = np.zeros(k.shape[:-1], np.complex128)
    for x, y, z, a in BLOBS:
        out += a * np.exp(-2 * np.pi**2 * sigma**2 * np.sum(k * k, -1) / n**2
                          - 2j * np.pi * (k @ np.array([x, y, z])) / n)
    return out


def half_grid(n):
    """``(n, n, n//2+1, 3)`` integer frequencies x, y, z of the half spectrum."""
    f = np.fft.fftfreq(n, 1.0 / n).round()
    kz, ky, kx = np.meshgrid(f, f, np.arange(n // 2 + 1), indexing="ij")
    return np.stack([kx, ky, kz], -1)


CTF = dict(voltage_kv=300.0, cs_mm=2.7, q0=0.07)


def tilt_series(P, du=15000.0, dv=14000.0):
    F = len(P)
    return relion5.TiltSeries(
        name="TS_01", proj=np.asarray(P, dtype=np.float64), defocus_u=np.full(F, du), defocus_v=np.full(F, dv),
        defocus_angle=np.linspace(10, 80, F), scale=np.linspace(0.6, 1.0, F), dose=np.linspace(0, 60, F),
        phase_shift=np.zeros(F), hand=-1.0)


def tilt_images(n, A_f, ctf, power=2):
    """``(F, n, n)`` images ``[y, x]``: unitary DFT ``c_f^power √n A(A_fᵀ (k2, 0))`` (2: premultiplied)."""
    f = np.fft.fftfreq(n, 1.0 / n).round()
    ky, kx = np.meshgrid(f, f, indexing="ij")
    k2 = np.stack([kx, ky, np.zeros_like(kx)], -1)  # (n, n, 3)
    Y = np.stack([ctf[i] ** power * np.sqrt(n) * phantom_ft(k2 @ A, n) for i, A in enumerate(A_f)])  # k2 @ A = Aᵀ k2
    return np.fft.fftshift(np.fft.ifft2(Y, norm="ortho").real, axes=(1, 2))


def write_dataset(root, P, sub_angles, part_angles, *, n=16, visible=None, all_frames=True, dtype=np.float32,
                  table_angles=None, premultiplied=True):
    """Stacks, particle table, tomograms table and optimisation set for one tilt series ``P``; the
    images are of poses ``part_angles``, the table says ``table_angles`` (default the same)."""
    import mrcfile

    root = Path(root)
    (root / "stacks").mkdir(parents=True, exist_ok=True)
    ts = tilt_series(P)
    F, N = len(P), len(part_angles)
    visible = np.ones((N, F), bool) if visible is None else np.asarray(visible, bool)
    table_angles = part_angles if table_angles is None else table_angles
    rows = []
    for i in range(N):
        A_sub, A_part = euler_to_matrix(*sub_angles[i]), euler_to_matrix(*part_angles[i])
        frames = np.arange(F) if all_frames else np.flatnonzero(visible[i])
        ctf = relion5.ctf_2d(n, PIXEL, ts, frames, **CTF)
        imgs = tilt_images(n, ts.proj[frames] @ A_sub @ A_part, ctf, power=2 if premultiplied else 1)
        if all_frames:
            imgs[~visible[i]] = 0.0  # WarpTools leaves invisible tilts blank
        name = f"stacks/p{i + 1}.mrcs"
        with mrcfile.new(root / name, overwrite=True) as m:
            m.set_data(imgs.astype(dtype))
            m.voxel_size = PIXEL
        rows.append({"rlnTomoName": "TS_01", "rlnTomoParticleName": f"TS_01/{i + 1}", "rlnImageName": name,
                     "rlnOpticsGroup": 1, "rlnTomoVisibleFrames": "[" + ",".join(str(int(v)) for v in visible[i]) + "]",
                     "rlnTomoSubtomogramRot": sub_angles[i][0], "rlnTomoSubtomogramTilt": sub_angles[i][1],
                     "rlnTomoSubtomogramPsi": sub_angles[i][2], "rlnAngleRot": table_angles[i][0],
                     "rlnAngleTilt": table_angles[i][1], "rlnAnglePsi": table_angles[i][2],
                     "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0, "rlnOriginZAngst": 0.0})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnSphericalAberration": [2.7], "rlnVoltage": [300.0], "rlnAmplitudeContrast": [0.07],
                           "rlnCtfDataAreCtfPremultiplied": [int(premultiplied)], "rlnImageDimensionality": [2],
                           "rlnImagePixelSize": [PIXEL], "rlnImageSize": [n]})
    write_star(root / "particles.star", {"general": {"rlnTomoSubTomosAre2DStacks": 1}, "optics": optics,
                                         "particles": pd.DataFrame(rows)})
    vec = lambda M: ["[" + ",".join(f"{v:.10g}" for v in r) + ",0]" for r in M]  # noqa: E731
    tilts = pd.DataFrame({"rlnTomoProjX": vec(ts.proj[:, 0]), "rlnTomoProjY": vec(ts.proj[:, 1]),
                          "rlnTomoProjZ": vec(ts.proj[:, 2]), "rlnTomoProjW": ["[0,0,0,1]"] * F,
                          "rlnDefocusU": ts.defocus_u, "rlnDefocusV": ts.defocus_v,
                          "rlnDefocusAngle": ts.defocus_angle, "rlnCtfScalefactor": ts.scale,
                          "rlnMicrographPreExposure": ts.dose})
    glob = pd.DataFrame({"rlnTomoName": ["TS_01"], "rlnTomoHand": [-1.0], "rlnTomoFrameCount": [F]})
    write_star(root / "tomograms.star", {"global": glob, "TS_01": tilts})
    write_star(root / "optimisation_set.star", {"": {"rlnTomoParticlesFile": "particles.star",
                                                     "rlnTomoTomogramsFile": "tomograms.star"}})
    return root / "optimisation_set.star"


def general_tilts(F=7, zrot=85.0):
    """A single-axis series about y, turned in-plane as real tilt series are."""
    return rotation_z(zrot) @ rotation_y(np.linspace(-60, 60, F))


# --------------------------------------------------------------------------------------------
# Oracles: geometry, scale, CTF
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("premultiplied", [True, False])
def test_pseudo_subtomogram_equals_rotated_phantom_on_grid_planes(tmp_path, premultiplied):
    """Tilts whose planes ``(P_f A_sub)ᵀ (k2, 0)`` are grid planes (kz=0, kx=0, ky=0), with a
    random subtomogram rotation and particle pose: X equals the phantom rotated by A_part
    exactly wherever W > 0, CTF, dose and scale divided out (premultiplied images or raw ones,
    ``rlnCtfDataAreCtfPremultiplied 0``, which the reader multiplies by the CTF)."""
    n = 16
    rng = np.random.default_rng(3)
    sub = np.array(matrix_to_euler(random_rotations(2, rng))).T
    part = np.array(matrix_to_euler(random_rotations(2, rng))).T
    Q = np.stack([np.eye(3), rotation_y(90.0), rotation_x(90.0)])  # signed permutations: not symmetric
    # one tilt series for both particles: P_f = Q_f A_subᵀ of particle 1; particle 2 gets general planes
    P = Q @ euler_to_matrix(*sub[0]).T
    opt = write_dataset(tmp_path, P, sub, part, n=n, premultiplied=premultiplied)
    p = read_particles(opt)
    assert p.spectra.shape == (2, n, n, n // 2 + 1) and p.masks.shape == (2, n, n, n // 2 + 1)
    assert list(p.groups) == [0, 1] and p.region_labels[0] == "tilts:stacks/p1.mrcs"
    np.testing.assert_allclose(p.prior_angles, part)
    truth = phantom_ft(half_grid(n) @ euler_to_matrix(*part[0]), n)  # A(A_partᵀ k)
    W = p.masks[0]
    on = W > 1e-6 * W.max()
    assert 0.1 < on.mean() < 0.5  # three planes of a 16³ half spectrum
    err = np.abs(p.spectra[0][on] - truth[on]).max() / np.abs(truth).max()
    assert err < 1e-5
    # W is Σ c² of the tilts through each voxel: CTF² (dose, scale) of one tilt off the plane crossings
    assert np.all(W >= 0) and W.max() <= 3.0 + 1e-5


def test_pseudo_subtomogram_on_general_tilts_matches_interpolation_accuracy(tmp_path):
    """General tilts: X matches the phantom rotated by A_part to the trilinear splat's accuracy
    (W-weighted, to half Nyquist: 0.21 for blobs 4 voxels off centre in a 16³ box), and the
    other compositions do not (absolute pose A_sub·A_part 0.73, transposed pose 0.81)."""
    n = 16
    rng = np.random.default_rng(4)
    sub = np.array(matrix_to_euler(random_rotations(1, rng))).T
    part = np.array(matrix_to_euler(random_rotations(1, rng))).T
    write_dataset(tmp_path, general_tilts(13), sub, part, n=n)
    p = read_particles(tmp_path / "optimisation_set.star")
    k = half_grid(n)
    low = np.sum(k * k, -1) <= (n / 4) ** 2
    W, X = p.masks[0][low], p.spectra[0][low]

    def rel_err(R):
        truth = phantom_ft(k @ R, n)[low]
        return np.sqrt(np.sum(W * np.abs(X - truth) ** 2) / np.sum(W * np.abs(truth) ** 2))

    A_sub, A_part = euler_to_matrix(*sub[0]), euler_to_matrix(*part[0])
    assert rel_err(A_part) < 0.3
    assert rel_err(A_sub @ A_part) > 0.6
    assert rel_err(A_part.T) > 0.6


def _splat_oracle(values, weights, mats):
    """Slow trilinear insertion on the FULL 3D spectrum, pixel by pixel, then its half."""
    V, n, _ = values.shape
    D = np.zeros((n, n, n), complex)
    Wf = np.zeros((n, n, n))
    f = np.fft.fftfreq(n, 1.0 / n).round()
    for v in range(V):
        for iy in range(n):
            for ix in range(n):
                if f[ix] ** 2 + f[iy] ** 2 >= (n / 2) ** 2:
                    continue
                k = mats[v].T @ np.array([f[ix], f[iy], 0.0])
                k0 = np.floor(k).astype(int)
                for d in np.ndindex(2, 2, 2):
                    c = k0 + np.array(d)
                    if np.any(2 * np.abs(c) >= n):
                        continue
                    w = np.prod([k[a] - k0[a] if d[a] else 1 - (k[a] - k0[a]) for a in range(3)])
                    D[c[2] % n, c[1] % n, c[0] % n] += w * values[v, iy, ix]
                    Wf[c[2] % n, c[1] % n, c[0] % n] += w * weights[v, iy, ix]
    h = n // 2 + 1
    return D[:, :, :h], Wf[:, :, :h]


def test_insert_slices_matches_a_slow_full_spectrum_splat():
    """The vectorised half-spectrum splat equals a pixel-by-pixel one on the full spectrum."""
    n, V = 8, 3
    rng = np.random.default_rng(5)
    imgs = rng.normal(size=(V, n, n))
    values = np.fft.fft2(imgs, norm="ortho")  # Hermitian, as every image's transform
    weights = rng.uniform(0.1, 1.0, size=(V, n, n))
    weights = 0.5 * (weights + np.roll(np.flip(weights, (1, 2)), 1, axis=(1, 2)))  # centrosymmetric, as c²
    mats = random_rotations(V, rng)
    D, W = relion5.insert_slices(values, weights, mats)
    D0, W0 = _splat_oracle(values, weights, mats)
    np.testing.assert_allclose(W, W0, atol=1e-12)
    np.testing.assert_allclose(D, D0, atol=1e-12)
    # the kept half is Hermitian-consistent on the plane kx = 0
    plane = D[:, :, 0]
    np.testing.assert_allclose(plane, np.conj(np.roll(np.flip(plane, (0, 1)), 1, axis=(0, 1))), atol=1e-12)


def test_central_slice_scale_is_unitary():
    """``D/W`` of a projection along z is the volume's unitary 3D transform on the plane kz = 0."""
    from mltomo.fourier import rfft_unitary

    n = 12
    vol = np.random.default_rng(0).normal(size=(n, n, n))
    X, W = relion5.pseudo_subtomogram(vol.sum(axis=0)[None], np.eye(3)[None], np.ones((1, n, n)))
    ref = rfft_unitary(vol)
    k = half_grid(n)
    plane = (k[..., 2] == 0) & (np.sum(k * k, -1) < (n / 2) ** 2 - n + 0.25)  # whole voxels of the disc
    np.testing.assert_allclose(X[plane], ref[plane], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.all(W[k[..., 2] != 0] == 0)


def test_ctf_matches_relion_polar_form():
    """ctf_2d against RELION's CTF written in polar form (CTF::getDeltaF):
    ``c = s·E·sin(πλΔf(φ)k² − π/2·Cs·λ³k⁴ + atan(Q0/√(1−Q0²)))``, ``Δf(φ) = (U+V)/2 +
    (U−V)/2·cos 2(φ−az)``, E the Grant & Grigorieff weight (Damage::getWeight)."""
    n, pixel = 24, 4.0
    ts = tilt_series(np.eye(3)[None].repeat(3, 0), du=21000.0, dv=17000.0)
    c = relion5.ctf_2d(n, pixel, ts, [0, 1, 2], **CTF)
    f = np.fft.fftfreq(n, pixel)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    k = np.hypot(fx, fy)
    lam = 12.2643247 / np.sqrt(300e3 * (1 + 300e3 * 0.978466e-6))
    for i in range(3):
        dfz = 19000.0 + 2000.0 * np.cos(2 * (np.arctan2(fy, fx) - np.deg2rad(ts.defocus_angle[i])))
        g = np.pi * lam * dfz * k**2 - np.pi / 2 * 2.7e7 * lam**3 * k**4 + np.arctan(0.07 / np.sqrt(1 - 0.07**2))
        with np.errstate(divide="ignore"):
            E = np.exp(-ts.dose[i] / (2 * (0.245 * k ** -1.665 + 2.81)))
        np.testing.assert_allclose(c[i], ts.scale[i] * E * np.sin(g), atol=1e-9)
    assert c[0][0, 0] == pytest.approx(ts.scale[0] * 0.07, rel=1e-6)  # amplitude contrast at the origin


# --------------------------------------------------------------------------------------------
# Layout, dispatch, refinement output
# --------------------------------------------------------------------------------------------


def test_visible_only_stacks_and_particle_table_entry_agree(tmp_path):
    """A RELION stack of visible tilts only equals a WarpTools stack of every tilt with blanks,
    and the particle table alone finds its tomograms table by name."""
    P = general_tilts(5)
    sub, part = [[10.0, 80.0, -30.0]], [[40.0, 60.0, 120.0]]
    vis = [[1, 0, 1, 1, 0]]
    write_dataset(tmp_path / "all", P, sub, part, visible=vis, all_frames=True)
    write_dataset(tmp_path / "vis", P, sub, part, visible=vis, all_frames=False)
    a = read_particles(tmp_path / "all" / "optimisation_set.star")
    (tmp_path / "vis" / "tomograms.star").rename(tmp_path / "vis" / "particles_tomograms.star")
    b = read_particles(tmp_path / "vis" / "particles.star")
    np.testing.assert_allclose(a.spectra, b.spectra, atol=1e-6)
    np.testing.assert_allclose(a.masks, b.masks, atol=1e-6)
    c = read_particles(tmp_path / "vis" / "particles.star", tomograms=tmp_path / "vis" / "particles_tomograms.star")
    np.testing.assert_array_equal(c.masks, b.masks)
    assert [name for name, _ in a.star_blocks] == ["general", "optics", "particles"]


class _Rank1of2:
    """Rank 1 of 2, enough for a reader: its collectives see both ranks hold the same kind of data."""

    rank, size = 1, 2

    def gather(self, obj):
        return [obj, obj]

    def bcast(self, obj):
        return obj

    def check(self, error):
        if error:
            raise RuntimeError(error)


def test_each_rank_reads_its_own_block(tmp_path):
    part = np.array(matrix_to_euler(random_rotations(5, np.random.default_rng(2)))).T
    opt = write_dataset(tmp_path, general_tilts(5), np.zeros((5, 3)), part, n=8)
    whole = read_particles(opt)
    mine = read_particles(opt, comm=_Rank1of2())
    assert list(mine.indices) == [3, 4] and mine.n_total == 5 and list(mine.groups) == [0, 1]
    np.testing.assert_array_equal(mine.spectra, whole.spectra[3:])
    np.testing.assert_array_equal(mine.masks, whole.masks[3:])
    np.testing.assert_array_equal(mine.prior_angles, whole.prior_angles[3:])
    assert mine.names == whole.names[3:] and mine.region_labels == whole.region_labels[3:]


def test_a_memory_budget_streams_pseudo_subtomograms_to_a_cache(tmp_path):
    """Past ``--memory-budget`` the pseudo-subtomograms go to a memory-mapped cache as they are
    built, with the same values as in memory, and no file is left in the cache directory."""
    from mltomo import spectra_cache

    part = np.array(matrix_to_euler(random_rotations(5, np.random.default_rng(3)))).T
    opt = write_dataset(tmp_path / "data", general_tilts(5), np.zeros((5, 3)), part, n=8)
    cache = tmp_path / "cache"
    cache.mkdir()
    held = read_particles(opt)
    streamed = read_particles(opt, memory_budget_bytes=1.0, cache_dir=cache)
    assert spectra_cache.is_cached(streamed.spectra) and not spectra_cache.is_cached(held.spectra)
    np.testing.assert_array_equal(streamed.spectra, held.spectra)
    np.testing.assert_array_equal(streamed.masks, held.masks)
    assert held.masks.max() == 1.0  # normalised to the largest weight
    assert list(cache.iterdir()) == []


def test_refinement_writes_relative_poses_that_read_back(tmp_path):
    """A local refinement from table poses 12° off the truth returns poses near the truth
    relative to the subtomogram rotation (RELION 5's rlnAngle*), keeps rlnTomoSubtomogram*
    unchanged, writes an optimisation set, and its table reads back with the same poses."""
    from mltomo.cli import main
    from mltomo.geometry import geodesic_distance_deg
    from mltomo.io.mrc import write_volume

    n, N = 16, 3
    rng = np.random.default_rng(7)
    R_sub, R_part = random_rotations(N, rng), random_rotations(N, rng)
    start = np.stack([rotation_x(12.0) @ R for R in R_part])
    euler = lambda R: np.array(matrix_to_euler(R)).T  # noqa: E731
    write_dataset(tmp_path / "d", general_tilts(9), euler(R_sub), euler(R_part), n=n, table_angles=euler(start))
    ref = np.fft.fftshift(np.fft.irfftn(phantom_ft(half_grid(n), n), s=(n, n, n), axes=(0, 1, 2), norm="ortho"))
    write_volume(tmp_path / "ref.mrc", ref.astype(np.float32), PIXEL)
    out = tmp_path / "run"
    rc = main(["refine", str(tmp_path / "d" / "optimisation_set.star"), "--out", str(out), "--ref",
               str(tmp_path / "ref.mrc"), "--classes", "1", "--iter", "1", "--angular-sampling", "8",
               "--angular-range", "20", "--no-perturb", "--max-shift", "1", "--threads", "1", "--quiet"])
    assert rc == 0
    written = read_star(out / "run_it001_data.star")
    assert written["general"]["rlnTomoSubTomosAre2DStacks"] == 1
    table = written["particles"]
    src = read_star(tmp_path / "d" / "particles.star")["particles"]
    cols = ["rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi"]
    np.testing.assert_allclose(table[cols].to_numpy(float), src[cols].to_numpy(float), atol=1e-6)
    angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
    err = geodesic_distance_deg(euler_to_matrix(*angles.T), R_part)
    assert np.all(err < 7.0), err  # about the 8° grid's covering radius; the table started 12° off
    for entry in ("run_it001_optimisation_set.star", "run_it001_data.star"):
        back = read_particles(out / entry)
        np.testing.assert_allclose(back.prior_angles, angles, atol=1e-6)
        assert Path(back.tomograms_file).resolve() == (tmp_path / "d" / "tomograms.star").resolve()


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit code 2, nothing written, inputs untouched
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path):
    opt = write_dataset(tmp_path / "d", general_tilts(5), [[0.0, 0.0, 0.0]] * 2,
                        [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]], n=8)
    return opt.parent


def _edit(path, block, fn):
    blocks = read_star(path)
    blocks[block] = fn(blocks[block])
    write_star(path, blocks)


def _write_images(path, shape):
    import mrcfile

    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros(shape, np.float32))


CASES = {
    "particles file missing": (lambda d: (d / "particles.star").unlink(), "optimisation_set.star",
                               "particles file particles.star not found"),
    "tomograms file missing": (lambda d: (d / "tomograms.star").unlink(), "optimisation_set.star",
                               "tomograms file tomograms.star not found"),
    "table without tomograms": (lambda d: None, "particles.star", "need their tomograms table"),
    "tomogram without block": (lambda d: _edit(d / "particles.star", "particles",
                                               lambda t: t.assign(rlnTomoName=["TS_01", "TS_09"])),
                               "optimisation_set.star", "tomograms.star: no data_TS_09 block"),
    "frame count": (lambda d: _write_images(d / "stacks" / "p2.mrcs", (4, 8, 8)), "optimisation_set.star",
                    "p2.mrcs: stack has 4 images, its tilt series TS_01 has 5 tilts (5 visible)"),
    "visible frames": (lambda d: _edit(d / "particles.star", "particles",
                                       lambda t: t.assign(rlnTomoVisibleFrames=["[1,1,1,1,1]", "[1,1,1]"])),
                       "optimisation_set.star", "rlnTomoVisibleFrames of stacks/p2.mrcs has 3 entries"),
    "non-square": (lambda d: _write_images(d / "stacks" / "p1.mrcs", (5, 8, 10)), "optimisation_set.star",
                   "p1.mrcs: tilt images are 10×8 pixels, they must be square"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_file(small, tmp_path, capsys, case):
    from mltomo.cli import main

    breaker, entry, message = CASES[case]
    breaker(small)
    before = {p: p.read_bytes() for p in small.rglob("*") if p.is_file()}
    with pytest.raises(ParticleTableError) as exc:
        read_particles(small / entry)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    out = tmp_path / "run"
    assert main(["refine", str(small / entry), "--out", str(out), "--classes", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
    assert before == {p: p.read_bytes() for p in small.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# The real data: 40 70S ribosomes, WarpTools, 37 tilts of 32² at 12 Å
# --------------------------------------------------------------------------------------------

needs_real = pytest.mark.skipif(not (REAL / f"{REAL_STEM}_optimisation_set.star").is_file(),
                                reason=f"real tilt-stack data not found in {REAL}")


def _flip_z(vol):
    """The map mirrored through the plane z = 0 of its box centre n//2."""
    return np.roll(np.flip(vol, 0), 1, axis=0)


@needs_real
def test_real_stacks_read_fast_with_one_weight_per_particle():
    import time

    t0 = time.perf_counter()
    p = read_particles(REAL / f"{REAL_STEM}_optimisation_set.star")
    seconds = time.perf_counter() - t0
    assert p.spectra.shape == (40, 32, 32, 17) and p.masks.shape == (40, 32, 32, 17)
    assert p.voxel_size_angstrom == 12.0 and p.n_total == 40
    assert seconds < 5.0
    # 3 tilts of Unt_083 are invisible: its weights sum over 34 tilts, Unt_050's over 37
    assert 0 < p.masks.max() <= 37


@needs_real
def test_real_reconstruction_with_table_poses_matches_the_flipped_map():
    """Tilts inserted in the reference frame with RELION 5's ``A_f = P_f A_sub A_part`` rebuild
    the provided map mirrored in z (the README's finding): CC 0.78 and FSC > 0.5 to 38 Å,
    against CC ≈ 0.59 (the shape of a blob) and FSC ≈ 0 beyond 55 Å with random poses, and CC
    0.49 with the unmirrored map."""
    from mltomo.fourier import fsc, irfft_unitary, rfft_unitary
    from mltomo.io import read_volume
    from mltomo.io.star import read_star as _read

    opt = REAL / f"{REAL_STEM}_optimisation_set.star"
    ctx, df, _ = relion5._context(opt, _read(opt), None)
    tilts = []
    for i in range(len(df)):
        row = df.iloc[i]
        ts = ctx.series[row["rlnTomoName"]]
        vis = relion5._visible(row, ts, ctx, row["rlnImageName"])
        imgs, _ = relion5._read_tilts(row["rlnImageName"], ctx, ts, vis)
        c = relion5.ctf_2d(32, 12.0, ts, vis, **CTF)
        Y = np.fft.fft2(np.fft.ifftshift(imgs, axes=(1, 2)), norm="ortho") / np.sqrt(32)
        tilts.append((Y, c, ts.proj[vis] @ relion5._angles(row, ctx.columns, relion5._SUBTOMO_COLUMNS)))

    def reconstruct(R):
        D = W = 0
        for (Y, c, M), Ri in zip(tilts, R):
            d, w = relion5.insert_slices(Y, c * c, M @ Ri)
            D, W = D + d, W + w
        return irfft_unitary(np.where(W > 0, D / (W + 0.05 * W.max()), 0), 32)

    ref, _ = read_volume(REAL / "warptools_test_box-32_angpix-12_reconstruct.mrc")
    ref = ref.astype(np.float64)
    c = np.arange(32) - 16
    sphere = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) < 14**2

    def cc(a, b):
        a, b = a[sphere] - a[sphere].mean(), b[sphere] - b[sphere].mean()
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))

    table = reconstruct(euler_to_matrix(*df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float).T))
    rand = reconstruct(random_rotations(40, np.random.default_rng(0)))
    flipped = _flip_z(ref)
    f_table = fsc(rfft_unitary(table), rfft_unitary(flipped), 32)
    f_rand = fsc(rfft_unitary(rand), rfft_unitary(flipped), 32)
    assert cc(table, flipped) > 0.72
    assert cc(table, flipped) > cc(rand, flipped) + 0.12
    assert cc(table, ref) < cc(table, flipped) - 0.2  # the tables' hand is the mirror of the map's
    assert np.all(f_table[1:11] > 0.45)  # to 38 Å
    assert np.mean(f_table[8:14]) > np.mean(f_rand[8:14]) + 0.3


@needs_real
def test_real_particles_score_the_flipped_map_at_their_table_poses():
    """The E-step's view: each pseudo-subtomogram's W-weighted correlation with the reference
    rotated by its prior pose (``Σ W X̄ RA``, 128–32 Å) is 0.17 for the z-mirrored map against
    ≈ 0.03 with random poses or the unmirrored map."""
    from mltomo.fourier import half_weights, radius_half, rfft_unitary
    from mltomo.io import read_volume
    from mltomo.reference import rotate_volume

    p = read_particles(REAL / f"{REAL_STEM}_optimisation_set.star")
    ref, _ = read_volume(REAL / "warptools_test_box-32_angpix-12_reconstruct.mrc")
    r = radius_half(32)
    band = half_weights(32) * ((r >= 3) & (r <= 12))

    def score(vol, R):
        s = []
        for i in range(len(p)):
            A = rfft_unitary(rotate_volume(vol.astype(np.float64), R[i]))
            X, w = p.spectra[i].astype(np.complex128), p.masks[i] * band
            s.append(np.sum(w * (np.conj(X) * A).real) / np.sqrt(np.sum(w * abs(X) ** 2) * np.sum(w * abs(A) ** 2)))
        return np.mean(s)

    R_table = euler_to_matrix(*p.prior_angles.T)
    R_rand = random_rotations(40, np.random.default_rng(1))
    flipped = _flip_z(ref)
    s_table = score(flipped, R_table)
    assert s_table > 0.13
    assert s_table > score(flipped, R_rand) + 0.08
    assert s_table > score(ref, R_table) + 0.08
