"""``bench/paper_fig1.py``: the plan of runs, and a whole (tiny) pass through simulation,
refinement, scoring, ``runs.json``, the table and the figure."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest

from conftest import DATA, mpiexec, needs_data, needs_mpiexec, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fig1():
    spec = importlib.util.spec_from_file_location("paper_fig1", ROOT / "bench" / "paper_fig1.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["paper_fig1"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("paper_fig1", None)


def test_plan_covers_every_panel_once(fig1):
    """The quick protocol: A = ML, CC and the true-map ceiling at 3 SNRs x 2 seeds; B, C add σ/100 and weighted
    averaging at the B-D SNR; D both on severe data; E, F one run per SNR and seed. A's ML
    runs serve B, C, E and F, so no run is planned twice."""
    p = fig1.PROTOCOLS["quick"]
    runs = fig1.plan(p, set("ABCDEF"))
    ids = [r.id for r in runs]
    assert len(ids) == len(set(ids))
    count = {m: sum(r.method == m for r in runs) for m in fig1.METHODS}
    n_pts = len(p.snrs) * p.seeds
    assert count == {"ml": n_pts + p.seeds, "cc": n_pts, "ml-delta": p.seeds, "ml-wa": 2 * p.seeds,
                     "ml-true-maps": n_pts, "ml-true-poses": n_pts, "ml-k1-groel": n_pts}
    assert {r.preferred for r in runs if r.method == "ml-wa"} == {"moderate", "severe"}
    assert all(r.snr == p.snr_bcd for r in runs if r.method in ("ml-delta", "ml-wa"))
    # one data set at a time: runs on the same (preferred, seed, SNR) are adjacent
    keys = [(r.preferred, r.seed, r.snr) for r in runs]
    assert len([k for k, _ in itertools.groupby(keys)]) == len(set(keys))
    assert [r.method for r in fig1.plan(p, {"B"})] == ["ml", "ml-delta"] * p.seeds


@needs_data
def test_tiny_protocol_end_to_end(fig1, tmp_path, capsys):
    out = tmp_path / "fig1"
    argv = ["--out", str(out), "--data-dir", str(DATA), "--panels", "A,E,F", "--particles", "12", "--box", "16",
            "--voxel-size", "16", "--max-resolution", "0", "--iterations", "2", "--sampling", "45",
            "--snrs", "0.05,0.5", "--seeds", "1", "--threads", "1"]
    assert fig1.main(argv) == 0
    doc = json.loads((out / "runs.json").read_text())
    assert doc["protocol"]["snrs"] == [0.05, 0.5] and doc["protocol"]["iterations"] == 2
    runs = {r["id"]: r for r in doc["runs"]}
    methods = ("ml", "cc", "ml-true-maps", "ml-true-poses", "ml-k1-groel")
    assert set(runs) == {f"{m}/moderate/snr{s}/seed1" for m in methods for s in ("0.05", "0.5")}
    for r in runs.values():
        assert 0.5 <= r["purity"] <= 1.0
        # the ceiling is one E-step from the true maps; every other run follows the protocol
        assert len(r["purity_by_iteration"]) == r["iterations"] == (1 if r["method"] == "ml-true-maps" else 2)
        assert r["purity_by_iteration"][-1] == pytest.approx(r["purity"], abs=1e-4)
        assert 0.0 <= r["median_angular_error_deg"] <= 180.0
        assert sum(r["class_sizes"]) == r["particles"]
    k1 = runs["ml-k1-groel/moderate/snr0.5/seed1"]
    assert k1["classes"] == 1 and k1["particles"] < 12 and k1["purity"] == 1.0
    # the true poses are kept exactly: no angular error at all
    assert runs["ml-true-poses/moderate/snr0.5/seed1"]["median_angular_error_deg"] < 1e-3
    # started from the true maps at SNR 0.5 the classes are the true ones
    assert runs["ml-true-maps/moderate/snr0.5/seed1"]["purity"] == 1.0
    png = (out / "fig1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "summary.md").read_text()
    assert "| ML, true poses fixed | moderate | 0.5 | 1 |" in table

    # The same command again does nothing new; another protocol into the same folder is refused.
    capsys.readouterr()
    assert fig1.main(argv) == 0
    assert "0 runs to do (10 already in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another protocol"):
        fig1.main([*argv, "--iterations", "3"])
    assert json.loads((out / "runs.json").read_text()) == doc


@needs_data
@pytest.mark.mpi
@needs_mpiexec
def test_mpi_run_splits_particles_and_agrees_with_serial(tmp_path):
    """``mpiexec -n 2 python bench/paper_fig1.py``: each run's particles are split over the
    ranks (the table says 2 ranks), rank 0 alone writes, and the scores equal a serial run's
    (the sums are only added in another order)."""
    common = ["--data-dir", DATA, "--panels", "E,F", "--particles", "12", "--box", "16", "--voxel-size", "16",
              "--max-resolution", "0", "--iterations", "2", "--sampling", "45", "--snrs", "0.5", "--seeds", "1",
              "--threads", "1"]
    script = ROOT / "bench" / "paper_fig1.py"
    docs = {}
    for name, cmd in (("serial", [sys.executable, script]), ("mpi", mpiexec(2, sys.executable, script))):
        out = tmp_path / name
        rc, stdout, stderr = run([*cmd, "--out", out, *common], ROOT)
        assert rc == 0, stderr
        assert stdout.count("paper_fig1:") == 1  # rank 0 alone reports
        docs[name] = json.loads((out / "runs.json").read_text())
    assert docs["serial"]["meta"]["ranks"] == 1 and docs["mpi"]["meta"]["ranks"] == 2
    serial = {r["id"]: r for r in docs["serial"]["runs"]}
    mpi = {r["id"]: r for r in docs["mpi"]["runs"]}
    assert set(serial) == set(mpi) and len(serial) == 3
    for key, r in serial.items():
        assert mpi[key]["purity_by_iteration"] == r["purity_by_iteration"]
        assert mpi[key]["class_sizes"] == r["class_sizes"]
        assert mpi[key]["median_angular_error_deg"] == pytest.approx(r["median_angular_error_deg"], abs=0.1)
        assert mpi[key]["log_likelihood"] == pytest.approx(r["log_likelihood"], rel=1e-5)
