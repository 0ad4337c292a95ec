"""``mltomo report``: figures of a real (tiny) refinement, and clean errors for bad run directories."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mltomo.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_FILES = ("classes.png", "classes_over_iterations.png", "convergence.png", "orientations.png", "posteriors.png",
                "noise.png")


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """12 simulated particles of 16³, two classes, two iterations (about a second)."""
    from mltomo.simulate import builtin_phantoms, simulate, write_dataset

    root = tmp_path_factory.mktemp("report")
    sim = simulate(builtin_phantoms(), 12, 16, 15.0, 40.0, snr=1.0, missing_region="wedge_y:-60:60",
                   max_shift_voxels=1, seed=0)
    paths = write_dataset(sim, root / "data")
    run = root / "run"
    code = main(["refine", str(paths["particles"]), "--out", str(run), "--classes", "2", "--iter", "2",
                 "--angular-sampling", "45", "--max-shift", "1", "--threads", "2", "--quiet"])
    assert code == 0
    return run, paths


def _check_png(path, min_width=300, min_height=200):
    from matplotlib.image import imread

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    img = imread(str(path))
    h, w = img.shape[:2]
    assert w >= min_width and h >= min_height, (path, img.shape)
    assert np.ptp(img[..., :3]) > 0, f"{path} is blank"


def test_report_default_directory(refined, capsys):
    run, _ = refined
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.split()
    for name in REPORT_FILES:
        _check_png(run / "report" / name)
        assert str(run / "report" / name) in out
    assert not list((run / "report").glob(".*.tmp")), "temporary files left behind"


def test_report_out_option_and_rerun(refined, tmp_path, capsys):
    run, _ = refined
    out = tmp_path / "figs" / "nested"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert main(["report", str(run), "--out", str(out)]) == 0  # a second report replaces the first
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    for name in REPORT_FILES:
        _check_png(out / name)


def test_report_does_not_touch_matplotlib_global_state(refined, tmp_path):
    """No pyplot figures are created and pyplot is not even imported by a report."""
    run, _ = refined
    had_pyplot = "matplotlib.pyplot" in sys.modules
    from mltomo.report import write_report

    write_report(run, tmp_path / "r")
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_demo_report(refined, tmp_path):
    run, paths = refined
    from mltomo.report import write_demo_report

    out = write_demo_report(run, paths["truth"], paths["references"], tmp_path / "demo" / "demo.png",
                            {"class purity": 0.75, "median angular error (°)": 12.3})
    _check_png(out, 600, 300)


def test_report_partial_run_uses_complete_iterations(refined, tmp_path, capsys):
    """A stopped run: files of an unfinished iteration (no model.star) are ignored."""
    import shutil

    run, _ = refined
    partial = tmp_path / "partial"
    partial.mkdir()
    for p in run.glob("run_it001_*"):
        shutil.copy(p, partial / p.name)
    shutil.copy(run / "run_it002_class001.mrc", partial / "run_it002_class001.mrc")  # killed mid-write
    assert main(["report", str(partial)]) == 0
    for name in REPORT_FILES:
        _check_png(partial / "report" / name)


def _fails_cleanly(capsys, argv, *expect):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mltomo report: error: "), err
    for e in expect:
        assert e in lines[0], lines[0]


def test_missing_directory(tmp_path, capsys):
    _fails_cleanly(capsys, ["report", str(tmp_path / "nope")], "nope", "no such directory")
    assert not (tmp_path / "nope").exists()


def test_directory_without_iterations(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails_cleanly(capsys, ["report", str(tmp_path / "empty")], "empty", "no complete iteration")
    assert list((tmp_path / "empty").iterdir()) == []


def test_file_instead_of_directory(tmp_path, capsys):
    (tmp_path / "x.star").write_text("data_\n")
    _fails_cleanly(capsys, ["report", str(tmp_path / "x.star")], "x.star", "not a directory")


def test_corrupt_model_file(refined, tmp_path, capsys):
    import shutil

    run, _ = refined
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("report"))
    (broken / "run_it002_model.star").write_text("data_model_general\n_rlnCurrentIteration 2\n")
    _fails_cleanly(capsys, ["report", str(broken)], "run_it002_model.star")
    assert not (broken / "report").exists()


def test_missing_class_map(refined, tmp_path, capsys):
    import shutil

    run, _ = refined
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("report"))
    (broken / "run_it002_class002.mrc").unlink()
    _fails_cleanly(capsys, ["report", str(broken)], "run_it002_class002.mrc", "no such file")
    assert not (broken / "report").exists()
