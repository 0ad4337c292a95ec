"""Bad input to ``mltomo refine``: one line on stderr naming the problem, exit code 2, no
traceback, no output directory, inputs untouched.

Every case builds a small valid data set (6 particles of 8³, written here rather than
simulated so each file can be broken on purpose), breaks one thing and runs the CLI
in-process with ``mltomo.cli.main``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mltomo.cli import main
from mltomo.io.mrc import write_volume
from mltomo.io.star import write_star

BOX = 8
VOXEL = 10.0
N = 6


def _write_raw_mrc(path, data, voxel=VOXEL):
    """An MRC the project's own writer would refuse (non-cubic, NaN)."""
    import warnings

    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about NaN/inf, as it should
        with mrcfile.new(str(path), overwrite=True) as m:
            m.set_data(np.asarray(data, dtype=np.float32))
            m.voxel_size = voxel


def _table(names, **extra):
    d = {"rlnImageName": list(names)}
    d.update(extra)
    return pd.DataFrame(d)


@pytest.fixture
def data(tmp_path):
    """A valid data set: particles.star (no optics block, so the voxel size comes from the
    headers), 6 particle volumes and one reference per class."""
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    (d / "particles").mkdir(parents=True)
    names = []
    for i in range(N):
        name = f"particles/p{i + 1}.mrc"
        write_volume(d / name, rng.standard_normal((BOX,) * 3).astype(np.float32), VOXEL)
        names.append(name)
    for k in (1, 2):
        write_volume(d / f"ref{k}.mrc", rng.standard_normal((BOX,) * 3).astype(np.float32), VOXEL)
    write_star(d / "particles.star", {"particles": _table(names)})
    return d


def _snapshot(root: Path) -> dict:
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _refine_fails(capsys, root: Path, argv, *expect, out=None):
    """Run ``mltomo refine ARGV --out OUT`` and check the failure is clean; returns the line."""
    out = Path(out) if out is not None else root.parent / "run"
    out_existed = out.exists()
    before = _snapshot(root)
    # The case's own arguments come last, so that they override these.
    code = main(["refine", "--out", str(out), "--classes", "2", "--iter", "1", "--angular-sampling", "90",
                 "--max-shift", "0", "--threads", "1", "--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in captured.out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("mltomo refine: error: "), line
    for e in expect:
        assert e in line, line
    if not out_existed:
        assert not out.exists(), f"{out} was created"
    after = _snapshot(root)
    assert list(after) == list(before), "files appeared or disappeared in the input directory"
    for p, (content, mtime) in before.items():
        assert after[p][0] == content, f"{p} was modified"
        assert after[p][1] == mtime, f"{p} was touched"
    return line


def test_valid_data_set_runs(data, capsys, tmp_path):
    """The fixture itself is good: the failures below are due to what each case breaks."""
    code = main(["refine", str(data / "particles.star"), "--out", str(tmp_path / "ok"), "--classes", "2",
                 "--iter", "1", "--angular-sampling", "90", "--max-shift", "0", "--threads", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "ok" / "run_it001_model.star").is_file()


def test_missing_star(data, capsys):
    _refine_fails(capsys, data, [data / "nope.star"], "nope.star", "no such file")


def test_garbage_star(data, capsys):
    bad = data / "garbage.star"
    bad.write_bytes(bytes(range(256)) * 8)
    _refine_fails(capsys, data, [bad], "garbage.star")


def test_text_that_is_not_star(data, capsys):
    bad = data / "notes.star"
    bad.write_text("these are my notes\nno data blocks here\n")
    _refine_fails(capsys, data, [bad], "notes.star")


def test_star_without_image_name(data, capsys):
    bad = data / "noimage.star"
    write_star(bad, {"particles": pd.DataFrame({"rlnAngleRot": [0.0, 1.0], "rlnAngleTilt": [0.0, 2.0]})})
    _refine_fails(capsys, data, [bad], "noimage.star", "rlnImageName")


def test_empty_table(data, capsys):
    bad = data / "empty.star"
    bad.write_text("data_particles\n\nloop_\n_rlnImageName #1\n\n")
    _refine_fails(capsys, data, [bad], "empty.star", "empty")


def test_missing_particle_volume(data, capsys):
    (data / "particles" / "p4.mrc").unlink()
    _refine_fails(capsys, data, [data / "particles.star"], "p4.mrc", "no such file")


def test_corrupt_mrc(data, capsys):
    p = data / "particles" / "p2.mrc"
    p.write_bytes(p.read_bytes()[:300])  # a truncated header
    _refine_fails(capsys, data, [data / "particles.star"], "p2.mrc")


def test_corrupt_mrc_garbage_bytes(data, capsys):
    (data / "particles" / "p3.mrc").write_bytes(b"\x00\xff" * 2000)
    _refine_fails(capsys, data, [data / "particles.star"], "p3.mrc")


def test_non_cubic_volume(data, capsys):
    _write_raw_mrc(data / "particles" / "p2.mrc", np.zeros((BOX, BOX, BOX + 2)))
    _refine_fails(capsys, data, [data / "particles.star"], "p2.mrc", "cubic")


def test_mismatched_box_sizes(data, capsys):
    write_volume(data / "particles" / "p5.mrc", np.zeros((BOX + 2,) * 3, np.float32), VOXEL)
    _refine_fails(capsys, data, [data / "particles.star"], "p5.mrc", "box")


def test_mismatched_voxel_sizes(data, capsys):
    write_volume(data / "particles" / "p3.mrc", np.zeros((BOX,) * 3, np.float32), 2 * VOXEL)
    _refine_fails(capsys, data, [data / "particles.star"], "p3.mrc", "voxel size")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_voxels(data, capsys, value):
    vol = np.zeros((BOX,) * 3, np.float32)
    vol[1, 2, 3] = value
    _write_raw_mrc(data / "particles" / "p6.mrc", vol)
    _refine_fails(capsys, data, [data / "particles.star"], "p6.mrc", "NaN")


def test_more_classes_than_particles(data, capsys):
    _refine_fails(capsys, data, [data / "particles.star", "--classes", str(N + 1)], f"{N} particles", "classes")


@pytest.mark.parametrize("region, expect", [
    ("wedge_y:-100:60", "[-90, 90]"),
    ("wedge_y:60:-60", "exceeds upper"),
    ("cone:120", "[0, 90]"),
    ("wedge_z:-60:60", "unknown missing-region kind"),
    ("wedge_y:-60", "takes 2 angle"),
])
def test_impossible_missing_region(data, capsys, region, expect):
    _refine_fails(capsys, data, [data / "particles.star", "--missing", region], "--missing", region, expect)


def test_impossible_missing_region_in_table(data, capsys):
    names = [f"particles/p{i + 1}.mrc" for i in range(N)]
    regions = ["wedge_y:-60:60"] * N
    regions[2] = "wedge_x:70:20"
    write_star(data / "regions.star", {"particles": _table(names, mltomoMissingRegion=regions)})
    _refine_fails(capsys, data, [data / "regions.star"], "p3.mrc", "wedge_x:70:20", "exceeds upper")


@pytest.mark.parametrize("sym", ["X9", "C0", "D", ""])
def test_unknown_symmetry(data, capsys, sym):
    _refine_fails(capsys, data, [data / "particles.star", "--sym", sym], "symmetry")


def test_weight_volume_observing_nothing(data, capsys):
    """A missing region that leaves no observed components: with the geometric regions this
    cannot happen (every wedge_y/wedge_x/pyramid/cone keeps at least the central kz = 0 plane,
    cone:0 included), but a per-particle RELION weight volume (rlnCtfImage) can be all zero."""
    names = [f"particles/p{i + 1}.mrc" for i in range(N)]
    write_volume(data / "ctf_ok.mrc", np.ones((BOX,) * 3, np.float32), VOXEL)
    write_volume(data / "ctf_zero.mrc", np.zeros((BOX,) * 3, np.float32), VOXEL)
    ctf = ["ctf_ok.mrc"] * N
    ctf[4] = "ctf_zero.mrc"
    write_star(data / "weights.star", {"particles": _table(names, rlnCtfImage=ctf)})
    _refine_fails(capsys, data, [data / "weights.star"], "ctf_zero.mrc", "no observed")


def test_weight_volume_of_the_wrong_size(data, capsys):
    """A weight volume that is not the particles' box (nor its half layout): one line naming the
    file and both sizes, exit 2, nothing written."""
    names = [f"particles/p{i + 1}.mrc" for i in range(N)]
    write_volume(data / "ctf_big.mrc", np.ones((BOX + 2,) * 3, np.float32), VOXEL)
    write_star(data / "big_weights.star", {"particles": _table(names, rlnCtfImage=["ctf_big.mrc"] * N)})
    _refine_fails(capsys, data, [data / "big_weights.star"], "ctf_big.mrc", f"the particles are {BOX}³")


def test_weight_layout_that_cannot_be_told(data, capsys):
    """A full-size weight volume whose layout the particles do not reveal: refused naming the
    option (a wrong layout is never silently assumed)."""
    names = [f"particles/p{i + 1}.mrc" for i in range(N)]
    c = np.arange(BOX) - BOX // 2
    k = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    write_volume(data / "ctf_radial.mrc", np.cos(k).astype(np.float32), VOXEL)
    write_star(data / "radial.star", {"particles": _table(names, rlnCtfImage=["ctf_radial.mrc"] * N)})
    _refine_fails(capsys, data, [data / "radial.star"], "ctf_radial.mrc", "--weight-layout centred or origin")


def test_reference_wrong_box(data, capsys):
    write_volume(data / "big.mrc", np.zeros((BOX + 4,) * 3, np.float32), VOXEL)
    _refine_fails(capsys, data, [data / "particles.star", "--ref", data / "ref1.mrc", data / "big.mrc"],
                  "big.mrc", f"{BOX}")


def test_reference_wrong_voxel_size(data, capsys):
    write_volume(data / "coarse.mrc", np.zeros((BOX,) * 3, np.float32), 3 * VOXEL)
    _refine_fails(capsys, data, [data / "particles.star", "--ref", data / "coarse.mrc", data / "ref2.mrc"],
                  "coarse.mrc", "voxel size")


def test_reference_count(data, capsys):
    _refine_fails(capsys, data, [data / "particles.star", "--ref", data / "ref1.mrc"], "--ref", "2 classes")


def test_missing_reference(data, capsys):
    _refine_fails(capsys, data, [data / "particles.star", "--ref", data / "ref1.mrc", data / "ref9.mrc"],
                  "ref9.mrc", "no such file")


def test_output_directory_not_empty(data, capsys, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refine_fails(capsys, data, [data / "particles.star"], "used", "not empty", out=out)
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("option, value", [("--classes", "0"), ("--iter", "0"), ("--angular-sampling", "0"),
                                           ("--angular-sampling", "-5"), ("--threads", "-1"),
                                           ("--particle-diameter", "-5"), ("--particle-diameter", "nan")])
def test_nonsense_numbers(data, capsys, option, value):
    _refine_fails(capsys, data, [data / "particles.star", option, value], option)


def test_continue_without_a_run(data, capsys, tmp_path):
    before = _snapshot(data)
    code = main(["refine", "--continue", str(data), "--iter", "3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "run_config.json" in lines[0], err
    assert _snapshot(data) == before


# The two cases below are caught by mltomo.em.check_inputs, which needs the particles and so runs
# after refine_files has created --out and written run_config.json there. They pass once
# cli.runner.refine_files calls check_inputs(particles, config, comm) before creating the directory.


def test_weight_volume_observing_nothing_at_working_resolution(data, capsys):
    names = [f"particles/p{i + 1}.mrc" for i in range(N)]
    c = np.arange(BOX) - BOX // 2
    k = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    write_volume(data / "ctf_high.mrc", (k > 3).astype(np.float32), VOXEL)  # only beyond |k| = 3
    write_star(data / "high.star", {"particles": _table(names, rlnCtfImage=["ctf_high.mrc"] * N)})
    _refine_fails(capsys, data, [data / "high.star", "--max-resolution", str(BOX * VOXEL / 2),
                                 "--weight-layout", "centred"],
                  "ctf_high.mrc", "working resolution")


def test_focused_mask_wrong_box(data, capsys):
    write_volume(data / "mask.mrc", np.ones((BOX + 2,) * 3, np.float32), VOXEL)
    _refine_fails(capsys, data, [data / "particles.star", "--mask", data / "mask.mrc"], "mask.mrc", f"{BOX}³")
