"""Tests for mltomo.io: MRC, volume stacks, TOM .em, STAR, image names, atomic writes."""

import gzip
import os
import struct
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from mltomo.io import FileFormatError, read_volume, read_volume_any, write_volume
from mltomo.io import em as emio
from mltomo.io import mrc as mrcio
from mltomo.io import star as stario
from mltomo.io.atomic import atomic_path, atomic_write_text


def cube(n=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, n, n)).astype(np.float32)


def leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------- MRC


def test_mrc_round_trip_values_voxel_and_order(tmp_path):
    v = cube(10)
    v[1, 2, 3] = 42.0  # z=1, y=2, x=3
    p = tmp_path / "a.mrc"
    write_volume(p, v, 3.25)
    w, vs = read_volume(p)
    assert w.dtype == np.float32 and w.shape == (10, 10, 10)
    np.testing.assert_array_equal(w, v)
    assert vs == pytest.approx(3.25)
    with mrcfile.open(p) as m:  # [z, y, x]: x is the fastest (column) axis of the file
        assert (int(m.header.nx), int(m.header.ny), int(m.header.nz)) == (10, 10, 10)
        assert m.data[1, 2, 3] == 42.0
        assert int(m.header.mode) == 2
    assert leftovers(tmp_path) == []


def test_mrc_writer_does_not_modify_input_and_converts_float64(tmp_path):
    v = np.random.default_rng(1).standard_normal((6, 6, 6))  # float64
    keep = v.copy()
    write_volume(tmp_path / "b.mrc", v, 1.0)
    np.testing.assert_array_equal(v, keep)
    w, _ = read_volume(tmp_path / "b.mrc")
    np.testing.assert_allclose(w, v.astype(np.float32))


def test_mrc_reader_errors_name_the_file(tmp_path):
    missing = tmp_path / "nothere.mrc"
    with pytest.raises(FileFormatError, match="nothere.mrc: no such file"):
        read_volume(missing)
    text = tmp_path / "notmrc.mrc"
    text.write_text("hello, I am not a map\n" * 100)
    with pytest.raises(FileFormatError, match="notmrc.mrc: not a readable MRC") as e:
        read_volume(text)
    assert "\n" not in str(e.value)
    flat = tmp_path / "flat.mrc"
    with mrcfile.new(flat) as m:
        m.set_data(np.zeros((4, 8, 8), np.float32))
    with pytest.raises(FileFormatError, match="flat.mrc: volume is not cubic"):
        read_volume(flat)
    bad = tmp_path / "nan.mrc"
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    with warnings.catch_warnings(), mrcfile.new(bad) as m:
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about the NaN
        m.set_data(data)
    with pytest.raises(FileFormatError, match="nan.mrc: volume contains 2 NaN or infinite"):
        read_volume(bad)


def test_mrc_writer_refuses_what_it_could_not_read(tmp_path):
    with pytest.raises(FileFormatError, match="x.mrc: volume is not cubic"):
        write_volume(tmp_path / "x.mrc", np.zeros((4, 4, 5)), 1.0)
    v = cube(4)
    v[0, 0, 0] = np.nan
    with pytest.raises(FileFormatError, match="NaN"):
        write_volume(tmp_path / "y.mrc", v, 1.0)
    assert list(tmp_path.iterdir()) == []


def test_mrc_gz_is_read(tmp_path):
    v = cube(6)
    write_volume(tmp_path / "c.mrc", v, 2.0)
    (tmp_path / "c.mrc.gz").write_bytes(gzip.compress((tmp_path / "c.mrc").read_bytes()))
    w, vs = read_volume(tmp_path / "c.mrc.gz")
    np.testing.assert_array_equal(w, v)
    assert vs == pytest.approx(2.0)


# ---------------------------------------------------------------- stacks


def test_stack_round_trip_and_at_names(tmp_path):
    vols = np.stack([cube(6, seed=s) for s in range(3)])
    mrcio.write_stack(tmp_path / "s.mrcs", vols, 4.5)
    with mrcfile.open(tmp_path / "s.mrcs") as m:  # MRC2014 volume stack
        assert int(m.header.ispg) == 401 and int(m.header.nz) == 18 and int(m.header.mz) == 6
    assert mrcio.stack_length(tmp_path / "s.mrcs") == 3
    for i in range(3):
        w, vs = mrcio.read_stack_item(tmp_path / "s.mrcs", i + 1)
        np.testing.assert_array_equal(w, vols[i])
        assert vs == pytest.approx(4.5)
        w2, _ = read_volume_any(f"{i + 1}@s.mrcs", tmp_path)
        np.testing.assert_array_equal(w2, vols[i])
    w3, _ = read_volume_any(f"000002@{tmp_path / 's.mrcs'}")  # RELION pads indices with zeros
    np.testing.assert_array_equal(w3, vols[1])
    with pytest.raises(FileFormatError, match="s.mrcs: asked for volume 4 but the stack holds 3"):
        read_volume_any("4@s.mrcs", tmp_path)
    with pytest.raises(FileFormatError, match=">= 1"):
        read_volume_any("0@s.mrcs", tmp_path)
    with pytest.raises(FileFormatError, match="stack of 3 volumes; name one as i@s.mrcs"):
        read_volume(tmp_path / "s.mrcs")


def test_stack_from_list_and_plain_nz_multiple_layout(tmp_path):
    vols = [cube(4, seed=s) for s in range(2)]
    mrcio.write_stack(tmp_path / "l.mrcs", vols, 1.0)
    np.testing.assert_array_equal(read_volume_any("2@l.mrcs", tmp_path)[0], vols[1])
    # A stack written by another program as plain 3-D data with nz = N * n (ispg 0).
    with mrcfile.new(tmp_path / "plain.mrcs") as m:
        m.set_data(np.concatenate(vols, axis=0))
        assert not m.is_volume_stack()
    np.testing.assert_array_equal(read_volume_any("2@plain.mrcs", tmp_path)[0], vols[1])
    with pytest.raises(FileFormatError, match="if it is a stack of 2 volumes"):
        read_volume(tmp_path / "plain.mrcs")
    # A single volume may be named 1@file.
    write_volume(tmp_path / "one.mrc", vols[0], 1.0)
    np.testing.assert_array_equal(read_volume_any("1@one.mrc", tmp_path)[0], vols[0])


# ---------------------------------------------------------------- TOM .em


def test_em_round_trip_little_endian_header_layout(tmp_path):
    v = cube(7)
    p = tmp_path / "a.em"
    write_volume(p, v, 6.125)  # dispatch on .em
    raw = p.read_bytes()
    assert len(raw) == 512 + 4 * 7**3
    assert raw[0] == 6 and raw[3] == 5  # PC / little-endian, float32
    assert struct.unpack("<3i", raw[4:16]) == (7, 7, 7)
    assert struct.unpack("<40i", raw[96:256])[6] == 6125  # object pixel size x 1000
    np.testing.assert_array_equal(np.frombuffer(raw[512:], "<f4").reshape(7, 7, 7), v)  # x fastest
    w, vs = read_volume(p)
    np.testing.assert_array_equal(w, v)
    assert vs == pytest.approx(6.125)


def test_em_big_endian_written_by_hand(tmp_path):
    # An SGI (machine 3), int16 volume with x fastest, as old TOM/AV3 files are.
    data = np.arange(4 * 4 * 4, dtype=np.int16).reshape(4, 4, 4) - 30
    emdata = [0] * 40
    emdata[6] = 10500  # 10.5 Å
    header = bytes([3, 0, 0, 2]) + struct.pack(">3i", 4, 4, 4) + b"big".ljust(80, b"\0")
    header += struct.pack(">40i", *emdata) + bytes(256)
    p = tmp_path / "big.em"
    p.write_bytes(header + data.astype(">i2").tobytes())
    w, vs = read_volume_any("big.em", tmp_path)
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, data.astype(np.float32))
    assert vs == pytest.approx(10.5)
    # and our own big-endian writer agrees with the reader
    emio.write_em(tmp_path / "b2.em", w, 2.0, big_endian=True)
    assert (tmp_path / "b2.em").read_bytes()[0] == 5
    w2, vs2 = emio.read_em(tmp_path / "b2.em")
    np.testing.assert_array_equal(w2, w)
    assert vs2 == pytest.approx(2.0)


def test_em_errors(tmp_path):
    p = tmp_path / "junk.em"
    p.write_bytes(b"\x09" + bytes(600))
    with pytest.raises(FileFormatError, match="junk.em: not an EM file"):
        read_volume(p)
    good = tmp_path / "t.em"
    emio.write_em(good, cube(4), 1.0)
    (tmp_path / "trunc.em").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(FileFormatError, match="trunc.em: EM file is truncated"):
        read_volume(tmp_path / "trunc.em")
    (tmp_path / "short.em").write_bytes(b"\x06\0\0\x05")
    with pytest.raises(FileFormatError, match="short.em: not an EM file"):
        read_volume(tmp_path / "short.em")
    with pytest.raises(FileFormatError, match="hold one volume"):
        read_volume_any("2@t.em", tmp_path)


def test_unknown_extension(tmp_path):
    (tmp_path / "v.xyz").write_text("nope")
    with pytest.raises(FileFormatError, match="v.xyz: unknown volume format"):
        read_volume(tmp_path / "v.xyz")
    write_volume(tmp_path / "v.mrc", cube(4), 1.0)
    os.replace(tmp_path / "v.mrc", tmp_path / "v.dat")  # an MRC under another name is sniffed
    np.testing.assert_array_equal(read_volume(tmp_path / "v.dat")[0], cube(4))


# ---------------------------------------------------------------- STAR and names


def test_star_round_trip_loop_and_simple_blocks(tmp_path):
    df = pd.DataFrame({
        "rlnImageName": ["1@stack.mrcs", "p/2.mrc"],
        "rlnTomoName": ["001", "002"],  # numeric-looking names stay strings
        "rlnAngleRot": [12.345678901, -170.0],
        "rlnClassNumber": [1, 2],
    })
    keep = df.copy()
    general = {"rlnImagePixelSize": 8.0, "rlnImageSize": 32}
    p = tmp_path / "t.star"
    stario.write_star(p, {"general": general, "particles": df})
    pd.testing.assert_frame_equal(df, keep)
    blocks = stario.read_star(p)
    assert list(blocks) == ["general", "particles"]
    assert blocks["general"]["rlnImageSize"] == 32
    assert blocks["general"]["rlnImagePixelSize"] == pytest.approx(8.0)
    got = blocks["particles"]
    assert list(got["rlnImageName"]) == ["1@stack.mrcs", "p/2.mrc"]
    assert list(got["rlnTomoName"]) == ["001", "002"]
    np.testing.assert_allclose(got["rlnAngleRot"], df["rlnAngleRot"], rtol=1e-9)
    assert list(got["rlnClassNumber"]) == [1, 2]
    assert leftovers(tmp_path) == []


def test_star_errors(tmp_path):
    with pytest.raises(FileFormatError, match="none.star: no such file"):
        stario.read_star(tmp_path / "none.star")
    (tmp_path / "text.star").write_text("just some words\n")
    with pytest.raises(FileFormatError, match="text.star: not a STAR file"):
        stario.read_star(tmp_path / "text.star")


def test_resolve_image_name(tmp_path, monkeypatch):
    d = tmp_path / "job"
    d.mkdir()
    assert stario.resolve_image_name("p/a.mrc", d) == (d / "p" / "a.mrc", None)
    assert stario.resolve_image_name("12@p/s.mrcs", d) == (d / "p" / "s.mrcs", 12)
    assert stario.resolve_image_name("/abs/x.mrc", d) == (Path("/abs/x.mrc"), None)
    assert stario.resolve_image_name("x.mrc", None)[0].name == "x.mrc"
    with pytest.raises(FileFormatError, match="integer >= 1"):
        stario.resolve_image_name("-3@s.mrcs", d)
    # RELION names relative to the project directory: used when nothing exists next to the STAR
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Extract").mkdir()
    write_volume(tmp_path / "Extract" / "v.mrc", cube(4), 1.0)
    path, _ = stario.resolve_image_name("Extract/v.mrc", d)
    assert path.resolve() == (tmp_path / "Extract" / "v.mrc").resolve()
    np.testing.assert_array_equal(read_volume_any("Extract/v.mrc", d)[0], cube(4))
    with pytest.raises(FileFormatError, match=r"job/gone.mrc: no such file \(image gone.mrc named relative to"):
        read_volume_any("gone.mrc", d)


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failing_write_leaves_old_file_and_no_partial_or_temp(tmp_path, monkeypatch):
    p = tmp_path / "v.mrc"
    write_volume(p, cube(4, seed=1), 1.0)
    before = p.read_bytes()

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), atomic_path(p) as tmp:
        tmp.write_bytes(b"partial")
        raise Boom
    assert p.read_bytes() == before and leftovers(tmp_path) == []

    # A library failing half-way through an MRC write.
    real_new = mrcfile.new

    def failing_new(name, *args, **kwargs):
        m = real_new(name, *args, **kwargs)
        m.close()
        raise Boom("disk full")

    monkeypatch.setattr(mrcfile, "new", failing_new)
    with pytest.raises(Boom):
        write_volume(p, cube(4, seed=2), 1.0)
    with pytest.raises(Boom):
        write_volume(tmp_path / "new.mrc", cube(4, seed=2), 1.0)
    assert p.read_bytes() == before
    assert not (tmp_path / "new.mrc").exists()
    assert leftovers(tmp_path) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == ["v.mrc"]


def test_atomic_path_refuses_directory(tmp_path):
    with pytest.raises(IsADirectoryError):
        write_volume(tmp_path, cube(4), 1.0)


def test_reading_particles_holds_their_spectra_once(tmp_path):
    """read_particles fills one preallocated array: the peak memory while reading 40 particles
    of 24³ stays near the size of their spectra (it was twice that: a list, then a copy),
    and the spectra equal the unitary transforms of the files."""
    import tracemalloc

    from mltomo.fourier import rfft_unitary
    from mltomo.particles import read_particles

    n, N = 24, 40
    rng = np.random.default_rng(5)
    vols = rng.normal(size=(N, n, n, n)).astype(np.float32)
    names = []
    for i, v in enumerate(vols):
        write_volume(tmp_path / f"p{i:02d}.mrc", v, 10.0)
        names.append(f"p{i:02d}.mrc")
    stario.write_star(tmp_path / "particles.star", {"particles": pd.DataFrame({"rlnImageName": names})})
    tracemalloc.start()
    try:
        parts = read_particles(tmp_path / "particles.star", missing="wedge_y:-60:60")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = parts.spectra.nbytes  # 40 × 24·24·13 × 8 B = 2.4 MB
    assert parts.spectra.shape == (N, n, n, n // 2 + 1) and parts.spectra.dtype == np.complex64
    assert peak < 1.5 * size, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB of spectra"
    np.testing.assert_allclose(parts.spectra[7], rfft_unitary(vols[7]), rtol=1e-5, atol=1e-4)


def test_ref_maps_read_em_as_mrc(tmp_path):
    """``--ref`` reads TOM ``.em`` maps as the particles do (it refused them once), and a map of
    the wrong box is still one line naming the file."""
    from types import SimpleNamespace

    from mltomo.cli.runner import _read_refs
    from mltomo.io import write_volume
    from mltomo.model import Config

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 6, 6, 6)).astype(np.float32)
    write_volume(tmp_path / "a.em", a, 4.0)
    write_volume(tmp_path / "b.mrc", b, 4.0)
    parts = SimpleNamespace(box=6, voxel_size_angstrom=4.0)
    refs = _read_refs([tmp_path / "a.em", tmp_path / "b.mrc"], Config(n_classes=2), parts)
    np.testing.assert_array_equal(refs, np.stack([a, b]))
    write_volume(tmp_path / "c.em", np.zeros((4, 4, 4), np.float32), 4.0)
    with pytest.raises(ValueError, match=r"c\.em: reference is 4x4x4, particles are 6³"):
        _read_refs([tmp_path / "c.em"], Config(n_classes=1), parts)
