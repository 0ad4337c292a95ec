"""Tests for mltomo.simulate and ``mltomo simulate``: PDB models, rendering, poses, noise, files."""

import gzip

import numpy as np
import pytest
import starfile

from mltomo import geometry as geo
from mltomo.fourier import missing_region_mask, rfft_unitary
from mltomo.io import read_volume, read_volume_any
from mltomo.io.structure import read_structure
from mltomo.simulate import (
    PointCloud,
    builtin_phantoms,
    groel_models,
    render_points,
    render_points_exact,
    simulate,
    write_dataset,
)

from conftest import DATA, needs_data


def com_voxels(vol):
    """Centre of mass (x, y, z) in voxels from the box centre n//2."""
    n = vol.shape[0]
    g = np.arange(n) - n // 2
    m = vol.sum(dtype=np.float64)
    return np.array([
        (vol.sum(axis=(0, 1)) * g).sum() / m,
        (vol.sum(axis=(0, 2)) * g).sum() / m,
        (vol.sum(axis=(1, 2)) * g).sum() / m,
    ])


def blob_cloud(seed=0, m=400, radius=25.0):
    """A compact asymmetric cloud (Å) centred on its centre of mass."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, radius / 2, (m, 3)) * [1.0, 0.7, 0.5] + [8.0, 0.0, 0.0] * (rng.random((m, 1)) < 0.2)
    w = rng.uniform(1, 3, m)
    return PointCloud(c - np.average(c, axis=0, weights=w), w)


# ---------------------------------------------------------------- PDB

PDB_TEXT = """\
REMARK 350 BIOMOLECULE: 1
REMARK 350 APPLY THE FOLLOWING TO CHAINS: A
REMARK 350   BIOMT1   1  1.000000  0.000000  0.000000        0.00000
REMARK 350   BIOMT2   1  0.000000  1.000000  0.000000        0.00000
REMARK 350   BIOMT3   1  0.000000  0.000000  1.000000        0.00000
REMARK 350   BIOMT1   2  1.000000  0.000000  0.000000       10.00000
REMARK 350   BIOMT2   2  0.000000 -1.000000  0.000000        0.00000
REMARK 350   BIOMT3   2  0.000000  0.000000 -1.000000        0.00000
REMARK 350 APPLY THE FOLLOWING TO CHAINS: B
REMARK 350   BIOMT1   3  0.000000 -1.000000  0.000000        0.00000
REMARK 350   BIOMT2   3  1.000000  0.000000  0.000000        0.00000
REMARK 350   BIOMT3   3  0.000000  0.000000  1.000000        0.00000
REMARK 350 BIOMOLECULE: 2
REMARK 350 APPLY THE FOLLOWING TO CHAINS: B
REMARK 350   BIOMT1   1  1.000000  0.000000  0.000000        0.00000
REMARK 350   BIOMT2   1  0.000000  1.000000  0.000000        0.00000
REMARK 350   BIOMT3   1  0.000000  0.000000  1.000000        0.00000
ATOM      1  N   ALA A   1       1.000   2.000   3.000  1.00  0.00           N
ATOM      2  CA AALA A   1       2.000   2.000   3.000  0.50  0.00           C
ATOM      3  CA BALA A   1       2.100   2.000   3.000  0.50  0.00           C
ATOM      4  H   ALA A   1       1.500   2.000   3.000  1.00  0.00           H
ATOM      5  SG  CYS B   2       1.000   0.000   0.000  1.00  0.00
HETATM    6 FE   HEM B   3       0.000   0.000   5.000  1.00  0.00          FE
HETATM    7  O   HOH B   4       9.000   9.000   9.000  1.00  0.00           O
END
"""


def test_read_structure_elements_altloc_water_and_biomt(tmp_path):
    p = tmp_path / "toy.pdb.gz"
    p.write_bytes(gzip.compress(PDB_TEXT.encode()))
    c, w, ch = read_structure(p, apply_biomt=False, return_chains=True)
    # H skipped, altloc B skipped; S from the atom name, Fe from columns 77-78, water kept.
    np.testing.assert_array_equal(w, [7, 6, 16, 26, 8])
    assert list(ch) == ["A", "A", "B", "B", "B"]
    _, w2 = read_structure(p, apply_biomt=False, include_water=False)
    assert len(w2) == 4
    # Assembly 1: chain A twice (op 2: x+10, -y, -z), chain B rotated by op 3 only.
    c, w, ch = read_structure(p, return_chains=True)
    assert list(ch) == ["A", "A", "A/2", "A/2", "B/3", "B/3", "B/3"]
    np.testing.assert_allclose(c[2], [11.0, -2.0, -3.0])
    np.testing.assert_allclose(c[4], [0.0, 1.0, 0.0])  # (1,0,0) rotated by +90 deg about z
    np.testing.assert_allclose(c[5], [0.0, 0.0, 5.0])


@needs_data
def test_read_structure_groel_assemblies():
    c, w, ch = read_structure(DATA / "models" / "1oel.pdb.gz", return_chains=True)
    assert c.shape == (54156, 3) and w.shape == (54156,)
    assert len(set(ch)) == 14
    assert set(np.unique(w)) == {6, 7, 8, 16}  # C N O S (no hydrogens in the file)
    c1, _ = read_structure(DATA / "models" / "1oel.pdb.gz", apply_biomt=False)
    assert c1.shape == (27078, 3)
    np.testing.assert_allclose(np.ptp(c, axis=0), [147.2, 145.1, 147.9], atol=0.5)  # README's size
    c, w, ch = read_structure(DATA / "models" / "1aon.pdb.gz", return_chains=True)
    assert c.shape == (58870, 3) and len(set(ch)) == 21


def _as_mmcif(pdb_path, cif_path):
    """The same model written as mmCIF by gemmi (assemblies as pdbx_struct_assembly_gen)."""
    import gemmi

    st = gemmi.read_structure(str(pdb_path))
    st.setup_entities()
    st.make_mmcif_document().write_file(str(cif_path))


def test_read_structure_mmcif_matches_pdb(tmp_path):
    """PDB and mmCIF give the same atoms and the same assembly (mmCIF's generators name
    subchains, PDB's chains)."""
    p = tmp_path / "toy.pdb"
    p.write_text(PDB_TEXT)
    _as_mmcif(p, tmp_path / "toy.cif")
    for biomt in (False, True):
        c1, w1, ch1 = read_structure(p, apply_biomt=biomt, return_chains=True)
        c2, w2, ch2 = read_structure(tmp_path / "toy.cif", apply_biomt=biomt, return_chains=True)
        np.testing.assert_allclose(c2, c1, atol=1e-3)
        np.testing.assert_array_equal(w2, w1)
        assert list(ch2) == list(ch1)


@needs_data
def test_read_structure_groel_mmcif(tmp_path):
    cif = tmp_path / "1oel.cif"
    _as_mmcif(DATA / "models" / "1oel.pdb.gz", cif)
    c, w = read_structure(cif)
    c0, w0 = read_structure(DATA / "models" / "1oel.pdb.gz")
    assert c.shape == (54156, 3)
    np.testing.assert_allclose(c, c0, atol=1e-3)
    np.testing.assert_array_equal(w, w0)


def test_read_structure_bad_files(tmp_path):
    from mltomo.io import FileFormatError

    with pytest.raises(FileFormatError, match="no such file"):
        read_structure(tmp_path / "missing.pdb")
    (tmp_path / "empty.pdb").write_text("REMARK nothing here\nEND\n")
    with pytest.raises(FileFormatError, match="empty.pdb"):
        read_structure(tmp_path / "empty.pdb")


@needs_data
def test_groel_models_common_frame():
    groel, cplx = groel_models(DATA)
    for c, _w in (groel, cplx):
        assert np.max(np.abs(c[:, :2])) < 80  # 7-fold axis along z: barrel radius ~72 Å
    # The barrel is centred at the origin in both; GroES sits on +z in 1AON.
    assert abs(np.average(groel.coords[:, 2], weights=groel.weights)) < 1.0
    assert cplx.coords[:, 2].max() > 115 and cplx.coords[:, 2].min() > -80
    assert abs(groel.coords[:, 2].max() - 74) < 3 and abs(groel.coords[:, 2].min() + 74) < 3


def test_builtin_phantoms_shapes():
    a, b = builtin_phantoms()
    assert b.coords.shape[0] > a.coords.shape[0]
    # The trans (lower) ring is the same in both; class 2's cis ring is opened and capped.
    in_b = set(map(tuple, np.round(b.coords, 3)))
    lower = np.round(a.coords[a.coords[:, 2] < -5], 3)
    assert all(tuple(x) in in_b for x in lower)
    upper = np.round(a.coords[a.coords[:, 2] > 40], 3)
    assert np.mean([tuple(x) in in_b for x in upper]) < 0.5
    width = np.ptp(a.coords[:, :2], axis=0)
    assert np.all((width > 130) & (width < 160))
    assert 140 < np.ptp(a.coords[:, 2]) < 160
    assert np.ptp(b.coords[:, 2]) > np.ptp(a.coords[:, 2]) + 30
    cap = b.coords[b.coords[:, 2] > 97]
    assert 60 < np.ptp(cap[:, 0]) < 90 and 20 < np.ptp(cap[:, 2]) < 40
    # They differ clearly at 30 Å, like the real 1OEL and 1AON maps (~47 %).
    ra = render_points(*a, 24, 10.0, 30.0)
    rb = render_points(*b, 24, 10.0, 30.0)
    assert np.linalg.norm(rb - ra) / np.linalg.norm(ra) > 0.35


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("voxel,res", [(8.0, 25.0), (8.0, 16.0), (4.0, 25.0)])
def test_render_matches_exact_gaussians(voxel, res):
    c, w = blob_cloud(m=150)
    fast = render_points(c, w, 24, voxel, res)
    exact = render_points_exact(c, w, 24, voxel, res)
    assert np.linalg.norm(fast - exact) / np.linalg.norm(exact) < 0.01


def test_render_origin_scale_and_centre_of_mass():
    # One point at the origin: the peak is voxel (n//2, n//2, n//2), the map sums to its weight.
    v = render_points([[0.0, 0.0, 0.0]], [5.0], 16, 8.0, 25.0)
    assert np.unravel_index(np.argmax(v), v.shape) == (8, 8, 8)
    assert v.sum() == pytest.approx(5.0, rel=1e-3)
    # A point at x = +16 Å moves the peak to x index n//2 + 2, axis order [z, y, x].
    v = render_points([[16.0, -8.0, 0.0]], [1.0], 16, 8.0, 25.0)
    assert np.unravel_index(np.argmax(v), v.shape) == (8, 7, 10)
    # A model centred on its centre of mass renders with its centre of mass at the box centre.
    c, w = builtin_phantoms()[1]
    c = c - np.average(c, axis=0, weights=w)
    np.testing.assert_allclose(com_voxels(render_points(c, w, 32, 8.0, 25.0)), 0.0, atol=0.02)


def test_rotating_coordinates_equals_rotating_the_map():
    # Odd box: np.rot90 rotates about the centre voxel n//2 exactly.
    c, w = blob_cloud(seed=3)
    n = 25
    a = render_points(c, w, n, 8.0, 25.0)
    R = geo.rotation_z(90.0)  # active, right-handed: x -> y
    b = render_points(c @ R.T, w, n, 8.0, 25.0)
    # b(r) = a(Rᵀ r): b[z, y, x] = a[z, -x, y], i.e. a quarter turn from the x towards the y axis.
    expected = np.rot90(a, k=1, axes=(2, 1))
    assert np.linalg.norm(b - expected) / np.linalg.norm(a) < 1e-3
    wrong = np.rot90(a, k=1, axes=(1, 2))
    assert np.linalg.norm(b - wrong) / np.linalg.norm(a) > 0.1


# ---------------------------------------------------------------- simulate

SMALL = {"box": 24, "voxel_size": 8.0, "resolution": 25.0}


def test_particle_is_the_rendered_rotated_model_and_follows_r_p():
    p = np.array([40.0, -16.0, 24.0])
    marker = PointCloud(p[None, :], np.array([1.0]))
    model = blob_cloud(seed=5)
    sim = simulate([model], 6, snr=np.inf, missing_region="none", max_shift_voxels=0, seed=2, **SMALL)
    simm = simulate([marker], 6, snr=np.inf, missing_region="none", max_shift_voxels=0, seed=2,
                    centre_models=False, **SMALL)
    np.testing.assert_array_equal(sim.angles, simm.angles)
    for i in range(6):
        R = geo.euler_to_matrix(*sim.angles[i])
        expected = render_points(model.coords @ R.T, model.weights, 24, 8.0, 25.0)
        np.testing.assert_allclose(sim.volumes[i], expected, atol=1e-6 * np.abs(expected).max())
        # A feature at p appears at R p (Å from the box centre).
        np.testing.assert_allclose(com_voxels(simm.volumes[i]) * 8.0, R @ p, atol=0.05)
    assert sim.noise_sigma == 0.0


def test_relion_angles_pin_the_direction():
    # rot = -90 (tilt = psi = 0) is an active +90 deg turn about z: x -> y.
    R = geo.euler_to_matrix(-90.0, 0.0, 0.0)
    np.testing.assert_allclose(R @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)


def test_shifts_move_the_centre_of_mass_by_t():
    sim = simulate([blob_cloud(seed=1)], 12, snr=np.inf, missing_region="none", max_shift_voxels=3, seed=4, **SMALL)
    assert np.abs(sim.shifts_voxels).max() == 3 and sim.shifts_voxels.dtype.kind == "i"
    assert len(np.unique(sim.shifts_voxels)) == 7
    for vol, t in zip(sim.volumes, sim.shifts_voxels):
        np.testing.assert_allclose(com_voxels(vol), t, atol=0.02)


def test_snr_matches_request_and_noise_is_white():
    kw = dict(missing_region="none", seed=11, **SMALL)
    models = [blob_cloud(0), blob_cloud(1)]
    clean = simulate(models, 40, snr=np.inf, **kw)
    noisy = simulate(models, 40, snr=0.05, **kw)
    np.testing.assert_array_equal(clean.angles, noisy.angles)  # noise has its own stream
    noise = noisy.volumes.astype(np.float64) - clean.volumes
    signal_var = np.mean(clean.volumes.reshape(40, -1).var(axis=1))
    measured = signal_var / noise.var()
    assert measured == pytest.approx(0.05, rel=0.1)
    assert noise.std() == pytest.approx(noisy.noise_sigma, rel=0.02)
    assert noisy.noise_sigma**2 == pytest.approx(signal_var / 0.05, rel=1e-5)
    # white: the noise power is flat over Fourier shells (low vs high frequencies)
    P = np.mean([np.abs(rfft_unitary(x.astype(np.float32))) ** 2 for x in noise[:8]], axis=0)
    assert P[1:4, 1:4, 1:4].mean() == pytest.approx(P[8:12, 8:12, 8:12].mean(), rel=0.15)


def test_missing_wedge_is_applied():
    sim = simulate(builtin_phantoms(), 4, snr=1.0, missing_region="wedge_y:-60:60", seed=1, **SMALL)
    assert sim.missing_region == "wedge_y:-60:60"
    mask = missing_region_mask("wedge_y:-60:60", 24)
    assert 0.2 < 1 - mask.mean() < 0.5
    for v in sim.volumes:
        F = rfft_unitary(v)
        outside = np.sum(np.abs(F[mask == 0]) ** 2)
        inside = np.sum(np.abs(F[mask > 0]) ** 2)
        assert outside < 1e-9 * inside


@pytest.mark.parametrize("mode,band", [("moderate", (60, 120)), ("severe", (40, 140))])
def test_preferred_orientation_rejects_tilts_in_band(mode, band):
    sim = simulate([blob_cloud()], 150, snr=np.inf, missing_region="none", preferred_orientation=mode,
                   box=8, voxel_size=16.0, resolution=40.0, seed=3)
    tilt = sim.angles[:, 1]
    assert not np.any((tilt > band[0]) & (tilt < band[1]))
    assert np.any(tilt < 30) and np.any(tilt > 150)
    free = simulate([blob_cloud()], 150, snr=np.inf, missing_region="none",
                    box=8, voxel_size=16.0, resolution=40.0, seed=3)
    inside = np.mean((free.angles[:, 1] > 60) & (free.angles[:, 1] < 120))
    assert 0.35 < inside < 0.65  # uniform rotations: half of them have tilt in 60-120


def test_seed_reproducibility_classes_and_references():
    kw = dict(snr=0.1, seed=5, **SMALL)
    models = builtin_phantoms()
    a = simulate(models, 8, **kw)
    b = simulate(models, 8, **kw)
    np.testing.assert_array_equal(a.volumes, b.volumes)
    np.testing.assert_array_equal(a.angles, b.angles)
    c = simulate(models, 8, **{**kw, "seed": 6})
    assert not np.array_equal(a.volumes, c.volumes)
    assert not np.array_equal(a.angles, c.angles)
    assert set(a.classes) <= {1, 2} and a.classes.dtype.kind == "i"
    only1 = simulate(models, 8, class_probabilities=[1, 0], **kw)
    assert np.all(only1.classes == 1)
    for k, (coords, w) in enumerate(models):
        ref = render_points(coords - np.average(coords, axis=0, weights=w), w, 24, 8.0, 25.0)
        np.testing.assert_allclose(a.references[k], ref, atol=1e-5 * ref.max())
    with pytest.raises(ValueError, match="preferred orientation"):
        simulate(models, 2, preferred_orientation="strong", **kw)
    with pytest.raises(ValueError, match="SNR"):
        simulate(models, 2, **{**kw, "snr": 0.0})


# ---------------------------------------------------------------- files and CLI


def test_write_dataset_layout_and_refusal(tmp_path):
    sim = simulate(builtin_phantoms(), 5, snr=0.5, seed=0, **SMALL)
    out = tmp_path / "ds"
    paths = write_dataset(sim, out)
    assert sorted(p.name for p in (out / "particles").iterdir()) == [f"particle_{i:05d}.mrc" for i in range(1, 6)]
    assert sorted(p.name for p in (out / "references").iterdir()) == ["class_1.mrc", "class_2.mrc"]
    assert paths["particles"] == out / "particles.star"
    blocks = starfile.read(out / "particles.star", always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    assert float(optics["rlnImagePixelSize"].iloc[0]) == 8.0
    assert int(optics["rlnImageSize"].iloc[0]) == 24 and int(optics["rlnImageDimensionality"].iloc[0]) == 3
    assert list(parts["rlnTomoName"]) == ["tomo1"] * 5
    assert list(parts["mltomoMissingRegion"]) == ["wedge_y:-60:60"] * 5
    for i, name in enumerate(parts["rlnImageName"]):
        vol, vs = read_volume_any(name, out)
        np.testing.assert_array_equal(vol, sim.volumes[i])
        assert vs == pytest.approx(8.0)
    np.testing.assert_array_equal(read_volume(out / "references" / "class_2.mrc")[0], sim.references[1])
    with pytest.raises(FileExistsError, match="not empty"):
        write_dataset(sim, out)
    smaller = simulate(builtin_phantoms(), 3, snr=0.5, seed=1, **SMALL)
    write_dataset(smaller, out, overwrite=True, stack=True)
    assert sorted(p.name for p in (out / "particles").iterdir()) == ["particles.mrcs"]
    parts = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert list(parts["rlnImageName"]) == ["1@particles/particles.mrcs", "2@particles/particles.mrcs",
                                           "3@particles/particles.mrcs"]
    np.testing.assert_array_equal(read_volume_any(parts["rlnImageName"][2], out)[0], smaller.volumes[2])


def test_cli_writes_files_matching_the_truth(tmp_path):
    from mltomo.cli import main

    out = tmp_path / "sim"
    args = ["simulate", "--out", str(out), "--particles", "6", "--box", "20", "--voxel-size", "10",
            "--resolution", "30", "--snr", "0.2", "--missing", "wedge_y:-54:66", "--preferred", "moderate",
            "--seed", "3", "--quiet"]
    assert main(args) == 0
    sim = simulate(builtin_phantoms(), 6, 20, 10.0, 30.0, 0.2, missing_region="wedge_y:-54:66",
                   preferred_orientation="moderate", seed=3)
    truth = starfile.read(out / "truth.star", always_dict=True)
    t = truth["particles"]
    assert list(t["rlnClassNumber"]) == list(sim.classes)
    np.testing.assert_allclose(t[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), sim.angles, atol=1e-6)
    np.testing.assert_allclose(t[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(),
                               sim.shifts_voxels * 10.0)
    assert float(truth["simulation"]["mltomoNoiseSigma"]) == pytest.approx(sim.noise_sigma, rel=1e-9)
    parts = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert list(parts["rlnImageName"]) == list(t["rlnImageName"])
    for name, vol in zip(parts["rlnImageName"], sim.volumes):
        np.testing.assert_allclose(read_volume_any(name, out)[0], vol)
    # A second run into the same directory needs --overwrite; bad input exits 2 with one line.
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0
    assert main(["simulate", "--out", str(tmp_path / "x"), "--missing", "wedge_q:1:2"]) == 2
    assert main(["simulate", "--out", str(tmp_path / "y"), "--phantom", "groel", "--data-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_error_message_is_one_line(tmp_path, capsys):
    from mltomo.cli import main

    assert main(["simulate", "--out", str(tmp_path / "z"), "--snr", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mltomo simulate: error: --snr must be positive (inf for no noise), got -1.0"
