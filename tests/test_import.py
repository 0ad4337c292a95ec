"""``mltomo import``: other programs' particle tables -> mltomo's STAR table.

* round trips: random poses written in each format -> ``mltomo import`` -> the same poses;
* published values: Dynamo angles whose RELION/Warp equivalents other converters print;
* each program's Euler convention against a rotated phantom: the phantom is rotated and
  shifted as the program's own documentation/code says (matrices written out here, volumes
  resampled with ``scipy.ndimage.map_coordinates``), the table is written by hand, imported,
  and mltomo's rotation (``rotate_volume``) with the imported pose must give the same volume,
  while the transposed rotation and the opposite shift must not;
* bad input: one line on stderr, exit code 2, no output file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mltomo.cli import main
from mltomo.geometry.rotations import euler_to_matrix, geodesic_distance_deg, random_rotations
from mltomo.io.star import read_star
from mltomo.io.tables import ParticlePoses, write_table

VOXEL = 4.5
EXT = {"dynamo": "tbl", "motl": "em", "stopgap": "star", "pytom": "xml"}


def _import(tmp_path, table, *extra, out=None):
    out = Path(out) if out is not None else tmp_path / "out.star"
    code = main(["import", str(table), "-o", str(out), "--quiet", *map(str, extra)])
    return code, out


def _poses_of(star: Path):
    """``(A (N,3,3), t voxels (N,3), particle table)`` of an imported STAR file."""
    blocks = read_star(star)
    df = blocks["particles"]
    A = euler_to_matrix(df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"])
    vs = float(blocks["optics"]["rlnImagePixelSize"].iloc[0])
    t = df[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(float) / vs
    return A, t, df


# ----------------------------------------------------------------------------------------
# (a) round trips
# ----------------------------------------------------------------------------------------


def _random_poses(n=40, seed=3) -> ParticlePoses:
    rng = np.random.default_rng(seed)
    R = random_rotations(n, rng=rng)
    R[0] = np.eye(3)  # gimbal lock of every ZXZ / ZYZ convention
    R[1] = np.diag([1.0, -1.0, -1.0])  # tilt 180
    return ParticlePoses(
        matrices=R, shifts_voxels=rng.uniform(-4, 4, (n, 3)), tags=np.arange(1, n + 1) * 3,
        coordinates=np.round(rng.uniform(1, 500, (n, 3)), 2), tomograms=tuple(str(k) for k in rng.integers(1, 4, n)),
        classes=rng.integers(1, 3, n), missing_regions=("wedge_y:-54:66",) * n,
    )


@pytest.mark.parametrize("fmt", sorted(EXT))
def test_round_trip(tmp_path, fmt):
    poses = _random_poses()
    table = tmp_path / f"table.{EXT[fmt]}"
    write_table(table, fmt, poses)
    code, out = _import(tmp_path, table, "--voxel-size", VOXEL, "--tomo-names", "1=TS_01", "2=TS_02")
    assert code == 0
    A, t, df = _poses_of(out)
    assert geodesic_distance_deg(A, poses.matrices).max() < 1e-3
    np.testing.assert_allclose(t, poses.shifts_voxels, atol=1e-4)  # .em motls hold float32
    np.testing.assert_allclose(df[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]], poses.coordinates,
                               atol=1e-3)
    np.testing.assert_array_equal(df["rlnClassNumber"], poses.classes)
    names = {"1": "TS_01", "2": "TS_02", "3": "3"}
    assert list(df["rlnTomoName"]) == [names[k] for k in poses.tomograms]
    expect = {"dynamo": "particle_%05d.em", "motl": "particle_%d.em", "stopgap": "subtomo_%d.mrc",
              "pytom": "particle_%d.em"}[fmt]
    assert list(df["rlnImageName"]) == [expect % tag for tag in poses.tags]
    if fmt in ("dynamo", "pytom"):  # the formats that carry a tilt range
        assert set(df["mltomoMissingRegion"]) == {"wedge_y:-54:66"}
    else:
        assert "mltomoMissingRegion" not in df.columns


def test_round_trip_output_reads_as_particle_table(tmp_path):
    """The imported table is one mltomo's reader takes (optics block, image names, priors)."""
    from mltomo.io.mrc import write_volume
    from mltomo.particles import read_particles

    poses = _random_poses(n=4)
    write_table(tmp_path / "t.tbl", "dynamo", poses)
    (tmp_path / "data").mkdir()
    for tag in poses.tags:
        write_volume(tmp_path / "data" / f"particle_{tag:05d}.mrc", np.zeros((8, 8, 8), np.float32), VOXEL)
    code, out = _import(tmp_path, tmp_path / "t.tbl", "--images", "data/particle_{tag:05d}.mrc")
    assert code == 0  # the voxel size came from the first volume's header
    p = read_particles(out)
    assert p.voxel_size_angstrom == pytest.approx(VOXEL)
    np.testing.assert_allclose(p.prior_shifts_angstrom, poses.shifts_voxels * VOXEL, atol=1e-6)
    assert p.region_labels == ("wedge_y:-54:66",)


def _tbl_row(tag, tdrot, tilt, narot, shifts=(0, 0, 0), xyz=(10, 20, 30)):
    row = np.zeros(35)
    row[0], row[1], row[2] = tag, 1, 1
    row[3:6], row[6:9], row[12:15], row[19], row[21], row[23:26] = shifts, (tdrot, tilt, narot), (1, -60, 60), 1, 1, xyz
    return " ".join(f"{v:.10g}" for v in row)


def test_dynamo_published_equivalents(tmp_path):
    """Dynamo angles and the RELION/Warp angles public converters give for them: teamtomo
    eulerangles' test pair and a row of dynamo2m's Warp-checked test table (both derived
    from RELION rot = narot - 90, psi = tdrot + 90)."""
    pairs = [((-47.2730, 1.1777, -132.3000), (137.7000, 1.1777, 42.7270)),
             ((112.7, 8.4212, -65.676), (-155.676, 8.4212, -157.3)),
             ((161.32, 7.7828, -110.56), (159.44, 7.7828, -108.68))]
    lines = [_tbl_row(i + 1, *dyn) for i, (dyn, _) in enumerate(pairs)]
    (tmp_path / "t.tbl").write_text("\n".join(lines) + "\n")
    code, out = _import(tmp_path, tmp_path / "t.tbl", "--voxel-size", 1)
    assert code == 0
    A, _, _ = _poses_of(out)
    expect = euler_to_matrix(*np.array([rel for _, rel in pairs]).T)
    assert geodesic_distance_deg(A, expect).max() < 1e-2


# ----------------------------------------------------------------------------------------
# (b) each program's convention against a rotated phantom
# ----------------------------------------------------------------------------------------

N = 24


def _phantom() -> np.ndarray:
    """Four Gaussians of different sizes at asymmetric places, ``[z, y, x]``."""
    c = np.arange(N) - N // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((N, N, N))
    for (px, py, pz), s, a in [((5, 0, 0), 2.0, 1.0), ((0, 6, 1), 1.6, 0.8), ((-1, -2, -5), 1.4, 0.6),
                               ((3, 3, 4), 1.2, 0.5)]:
        vol += a * np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * s * s))
    return vol


def _pull(vol, P, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    """``out(r) = vol(P (r - t))``, coordinates ``(x, y, z)`` from the box centre."""
    from scipy.ndimage import map_coordinates

    c = np.arange(N) - N // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x.ravel() - t[0], y.ravel() - t[1], z.ravel() - t[2]])  # (3, N³) as (x, y, z)
    s = np.asarray(P) @ r + N // 2
    return map_coordinates(vol, [s[2], s[1], s[0]], order=3, mode="constant").reshape(vol.shape)


def _corr(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _check_phantom(tmp_path, table, program_particle, phantom, *, fmt=None):
    """Import ``table``, rotate/shift the phantom as mltomo does with the imported pose and
    compare with the program's particle (and show the comparison can fail)."""
    from mltomo.reference import rotate_volume

    extra = ["--voxel-size", VOXEL] + (["--format", fmt] if fmt else [])
    code, out = _import(tmp_path, table, *extra)
    assert code == 0
    A, t, _ = _poses_of(out)
    A, t = A[0], t[0]
    assert np.allclose(t, np.round(t), atol=1e-6)  # integer shifts: rolled exactly below
    shift = tuple(int(round(v)) for v in t[::-1])  # (z, y, x)

    def mltomo_particle(R, s):  # x(r) = a(Rᵀ(r - t))
        return np.roll(rotate_volume(phantom.astype(np.float32), R), s, axis=(0, 1, 2))

    good = _corr(program_particle, mltomo_particle(A, shift))
    transposed = _corr(program_particle, mltomo_particle(A.T, shift))
    flipped = _corr(program_particle, mltomo_particle(A, tuple(-v for v in shift)))
    assert good > 0.99, (good, transposed, flipped)
    assert transposed < 0.8 and flipped < 0.8, (good, transposed, flipped)


def _cos_sin(deg):
    return np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))


def _dynamo_euler2matrix(tdrot, tilt, narot) -> np.ndarray:
    """``dynamo_euler2matrix.m``, element by element."""
    ctd, std = _cos_sin(tdrot)
    cti, sti = _cos_sin(tilt)
    cna, sna = _cos_sin(narot)
    return np.array([
        [ctd * cna - std * cti * sna, -cna * std - ctd * cti * sna, sna * sti],
        [ctd * sna + cna * std * cti, ctd * cti * cna - std * sna, -cna * sti],
        [std * sti, ctd * sti, cti],
    ])


def _clockwise(axis: str, deg) -> np.ndarray:
    """A clockwise rotation about +axis seen from the positive axis towards the origin."""
    c, s = _cos_sin(deg)
    if axis == "z":
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])
    return np.array([[1.0, 0, 0], [0, c, s], [0, -s, c]])  # x


def test_dynamo_convention_on_phantom(tmp_path):
    """Dynamo wiki: the template turns clockwise about z (tdrot), the new x (tilt), the new z
    (narot) to match the particle, then is shifted by (dx, dy, dz)."""
    tdrot, tilt, narot, d = 40.0, 65.0, -110.0, (2, -1, 3)
    R = _clockwise("z", tdrot) @ _clockwise("x", tilt) @ _clockwise("z", narot)  # intrinsic: new axes
    assert np.allclose(R, _dynamo_euler2matrix(tdrot, tilt, narot).T)  # the wiki and the code agree
    assert np.allclose(_dynamo_euler2matrix(30, 60, 75), [[-0.0173, -0.5477, 0.8365], [0.9012, -0.3709, -0.2241],
                                                          [0.4330, 0.7500, 0.5000]], atol=1e-4)  # eulerangles test
    phantom = _phantom()
    particle = _pull(phantom, R.T, d)  # template rotated actively by R, then shifted
    (tmp_path / "p.tbl").write_text(_tbl_row(7, tdrot, tilt, narot, shifts=d) + "\n")
    _check_phantom(tmp_path, tmp_path / "p.tbl", particle, phantom)


def _tom_rotatec_matrix(phi, psi, theta) -> np.ndarray:
    """The matrix of ``tom_rotatec.c`` (rm[line][column])."""
    cph, sph = _cos_sin(phi)
    cps, sps = _cos_sin(psi)
    cth, sth = _cos_sin(theta)
    rm = np.empty((3, 3))
    rm[0, 0] = cps * cph - cth * sps * sph
    rm[1, 0] = sps * cph + cth * cps * sph
    rm[2, 0] = sth * sph
    rm[0, 1] = -cps * sph - cth * sps * cph
    rm[1, 1] = -sps * sph + cth * cps * cph
    rm[2, 1] = sth * cph
    rm[0, 2] = sth * sps
    rm[1, 2] = -sth * cps
    rm[2, 2] = cth
    return rm


def _tom_particle(phantom, phi, psi, theta, t):
    """``tom_rotate(template, [phi, psi, theta])`` reads the input at ``r_x = Σ_j rm[j][0] p_j``
    (``rmᵀ p``), then the AV3 particle is that shifted by ``t`` (av3_average_exact undoes
    ``tom_shift(particle, -t)`` first, then the rotation)."""
    return _pull(phantom, _tom_rotatec_matrix(phi, psi, theta).T, t)


def _write_em_motl(path, motl_rows: np.ndarray) -> None:
    """A TOM .em file of a (20, N) motive list: 512-byte header, x (the 20 rows) fastest."""
    nx, ny = motl_rows.shape
    header = bytes([6, 0, 0, 5]) + struct.pack("<3i", nx, ny, 1) + bytes(80 + 160 + 256)
    path.write_bytes(header + np.ascontiguousarray(motl_rows.T, dtype="<f4").tobytes())


def test_tom_motl_convention_on_phantom(tmp_path):
    phi, psi, theta, t = -35.0, 120.0, 50.0, (-2, 3, 1)
    phantom = _phantom()
    particle = _tom_particle(phantom, phi, psi, theta, t)
    motl = np.zeros((20, 1))
    motl[3], motl[4], motl[7:10, 0], motl[10:13, 0] = 5, 1, (100, 110, 120), t
    motl[16], motl[17], motl[18], motl[19] = phi, psi, theta, 1
    _write_em_motl(tmp_path / "allmotl_1.em", motl)
    _check_phantom(tmp_path, tmp_path / "allmotl_1.em", particle, phantom)


def _sg_euler2matrix(phi, psi, the) -> np.ndarray:
    """STOPGAP's ``sg_euler2matrix.m``: the product written out there."""
    def rz(a):
        c, s = _cos_sin(a)
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])

    c, s = _cos_sin(the)
    return rz(psi) @ np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]]) @ rz(phi)


def test_stopgap_convention_on_phantom(tmp_path):
    """STOPGAP averages with ``sg_rotate_vol(sg_shift_vol(subtomo, -t), [-psi, -phi, -the])``
    (tom_rotatec), so a subtomogram is the template rotated by [phi, psi, the] then shifted."""
    phi, psi, the, t = 75.0, -20.0, 110.0, (1, 2, -3)
    assert np.allclose(_sg_euler2matrix(phi, psi, the), _tom_rotatec_matrix(phi, psi, the))
    phantom = _phantom()
    particle = _tom_particle(phantom, phi, psi, the, t)
    text = ("\ndata_stopgap_motivelist\n\nloop_\n" + "".join(f"_{c}\n" for c in (
        "motl_idx", "tomo_num", "object", "subtomo_num", "halfset", "orig_x", "orig_y", "orig_z", "score",
        "x_shift", "y_shift", "z_shift", "phi", "psi", "the", "class")) + "\n"
        f"1 1 1 9 A 100.0 110.0 120.0 0.5 {t[0]} {t[1]} {t[2]} {phi} {psi} {the} 1\n")
    (tmp_path / "allmotl_2.star").write_text(text)
    _check_phantom(tmp_path, tmp_path / "allmotl_2.star", particle, phantom)


def test_pytom_convention_on_phantom(tmp_path):
    """PyTom's fromMOTL: Rotation Z1, Z2, X = motl phi, psi, theta; Shift = motl shift."""
    phi, psi, theta, t = 60.0, -35.0, 80.0, (3, 0, -2)  # a rotation by 83°, far from its inverse
    phantom = _phantom()
    particle = _tom_particle(phantom, phi, psi, theta, t)
    xml = (f'<ParticleList>\n  <Particle Filename="parts/p_1.em">\n'
           f'    <Rotation Z1="{phi}" Z2="{psi}" X="{theta}" Paradigm="ZXZ"/>\n'
           f'    <Shift X="{t[0]}" Y="{t[1]}" Z="{t[2]}"/>\n'
           f'    <PickPosition X="99" Y="109" Z="119" Origin="tomo_3.mrc"/>\n'
           f'    <SingleTiltWedge Angle1="30" Angle2="30" CutoffRadius="0.0"/>\n'
           f'    <Class Name="2"/>\n  </Particle>\n</ParticleList>\n')
    (tmp_path / "pl.xml").write_text(xml)
    _check_phantom(tmp_path, tmp_path / "pl.xml", particle, phantom)
    _, _, df = _poses_of(tmp_path / "out.star")
    row = df.iloc[0]
    assert (row["rlnImageName"], row["rlnTomoName"], row["rlnClassNumber"]) == ("parts/p_1.em", "tomo_3", 2)
    assert (row["rlnCoordinateX"], row["mltomoMissingRegion"]) == (100, "wedge_y:-60:60")


# ----------------------------------------------------------------------------------------
# (c) bad input: one line, exit code 2, nothing written
# ----------------------------------------------------------------------------------------


def _fails(tmp_path, capsys, table, *extra, expect=()):
    out = tmp_path / "out" / "particles.star"
    out.parent.mkdir(exist_ok=True)
    code, _ = _import(tmp_path, table, "--voxel-size", VOXEL, *extra, out=out)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mltomo import: error: "), err
    for word in expect:
        assert word in lines[0], lines[0]
    assert list(out.parent.iterdir()) == [], "nothing may be written"
    return lines[0]


def test_truncated_dynamo_row(tmp_path, capsys):
    good = _tbl_row(1, 10, 20, 30)
    (tmp_path / "t.tbl").write_text(good + "\n" + " ".join(good.split()[:12]) + "\n")
    _fails(tmp_path, capsys, tmp_path / "t.tbl", expect=("t.tbl", "line 2", "12 columns"))


def test_dynamo_non_number(tmp_path, capsys):
    fields = _tbl_row(1, 10, 20, 30).split()
    fields[7] = "tilt?"
    (tmp_path / "t.tbl").write_text(" ".join(fields) + "\n")
    _fails(tmp_path, capsys, tmp_path / "t.tbl", expect=("t.tbl", "line 1", "column 8"))


def test_motl_wrong_number_of_rows(tmp_path, capsys):
    _write_em_motl(tmp_path / "m.em", np.zeros((19, 4)))
    _fails(tmp_path, capsys, tmp_path / "m.em", expect=("m.em", "19 x 4 x 1", "20"))


def test_motl_truncated(tmp_path, capsys):
    _write_em_motl(tmp_path / "m.em", np.zeros((20, 4)))
    data = (tmp_path / "m.em").read_bytes()
    (tmp_path / "m.em").write_bytes(data[:-16])
    _fails(tmp_path, capsys, tmp_path / "m.em", expect=("m.em", "truncated"))


def test_malformed_xml(tmp_path, capsys):
    (tmp_path / "pl.xml").write_text('<ParticleList>\n  <Particle Filename="a.em">\n    <Rotation Z1="1"\n')
    _fails(tmp_path, capsys, tmp_path / "pl.xml", expect=("pl.xml", "malformed XML", "line"))


def test_xml_bad_number(tmp_path, capsys):
    (tmp_path / "pl.xml").write_text('<ParticleList><Particle Filename="a.em"><Rotation Z1="x" Z2="0" X="0"/>'
                                     '</Particle></ParticleList>')
    _fails(tmp_path, capsys, tmp_path / "pl.xml", expect=("pl.xml", "particle 1", "Z1"))


def test_missing_file(tmp_path, capsys):
    _fails(tmp_path, capsys, tmp_path / "nothere.tbl", expect=("nothere.tbl", "no such file"))


def test_relion_star_is_not_imported(tmp_path, capsys):
    (tmp_path / "p.star").write_text("data_particles\nloop_\n_rlnImageName #1\na.mrc\n")
    _fails(tmp_path, capsys, tmp_path / "p.star", expect=("p.star", "stopgap_motivelist"))


def test_stopgap_missing_column(tmp_path, capsys):
    (tmp_path / "m.star").write_text("data_stopgap_motivelist\nloop_\n_subtomo_num\n_phi\n1 10\n")
    _fails(tmp_path, capsys, tmp_path / "m.star", expect=("m.star", "_x_shift"))


def test_bad_template_and_existing_output(tmp_path, capsys):
    write_table(tmp_path / "t.tbl", "dynamo", _random_poses(n=2))
    _fails(tmp_path, capsys, tmp_path / "t.tbl", "--images", "p_%s_%d.em", expect=("--images",))
    out = tmp_path / "out" / "particles.star"
    out.write_text("keep me")
    code, _ = _import(tmp_path, tmp_path / "t.tbl", "--voxel-size", VOXEL, out=out)
    assert code == 2 and "exists" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_no_voxel_size_with_shifts(tmp_path, capsys):
    write_table(tmp_path / "t.tbl", "dynamo", _random_poses(n=2))
    out = tmp_path / "out" / "particles.star"
    out.parent.mkdir()
    code = main(["import", str(tmp_path / "t.tbl"), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--voxel-size" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("fmt", sorted(EXT))
def test_format_from_content_and_override(tmp_path, capsys, fmt):
    """Without a telling extension the content decides; a wrong --format is a clean error."""
    poses = _random_poses(n=3)
    write_table(tmp_path / f"t.{EXT[fmt]}", fmt, poses)
    bare = tmp_path / "table.txt"
    bare.write_bytes((tmp_path / f"t.{EXT[fmt]}").read_bytes())
    code, out = _import(tmp_path, bare, "--voxel-size", VOXEL)
    assert code == 0
    A, _, _ = _poses_of(out)
    assert geodesic_distance_deg(A, poses.matrices).max() < 1e-3
    wrong = {"dynamo": "pytom", "motl": "dynamo", "stopgap": "motl", "pytom": "stopgap"}[fmt]
    _fails(tmp_path, capsys, bare, "--format", wrong, expect=("table.txt",))
