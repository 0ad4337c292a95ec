"""A refinement killed with SIGKILL mid-iteration and continued ends where an uninterrupted run does."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mltomo.cli import main
from mltomo.io import read_volume
from mltomo.io.star import read_star
from mltomo.simulate import builtin_phantoms, simulate, write_dataset

ARGS = ["--classes", "2", "--iter", "6", "--angular-sampling", "40", "--max-shift", "1", "--threads", "1",
        "--seed", "4", "--quiet", "--missing", "wedge_y:-60:60"]


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra", [[], ["--noise", "shell"]], ids=["white", "shell"])
def test_sigkill_then_continue_matches_uninterrupted(tmp_path, extra):
    """(With ``--noise shell`` the estimated σ²(shell) is part of the state the files must keep.)"""
    sim = simulate(builtin_phantoms(), 24, 20, 12.0, 36.0, snr=1.0, missing_region="wedge_y:-60:60",
                   max_shift_voxels=1, seed=5)
    files = write_dataset(sim, tmp_path / "data")
    before = digest(tmp_path / "data")
    star = str(files["particles"])

    assert main(["refine", star, "--out", str(tmp_path / "a"), *ARGS, *extra]) == 0

    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "mltomo", "refine", star, "--out", str(b), *ARGS, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (b / "run_it002_model.star").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "run_it006_model.star").exists()

    assert main(["refine", "--continue", str(b), "--quiet"]) == 0
    for k in (1, 2):
        va, _ = read_volume(tmp_path / "a" / f"run_it006_class{k:03d}.mrc")
        vb, _ = read_volume(b / f"run_it006_class{k:03d}.mrc")
        np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-5 * np.abs(va).max())
    da = read_star(tmp_path / "a" / "run_it006_data.star")["particles"]
    db = read_star(b / "run_it006_data.star")["particles"]
    np.testing.assert_array_equal(da["rlnClassNumber"], db["rlnClassNumber"])
    np.testing.assert_allclose(da[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float),
                               db[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float), atol=1e-4)
    ma = read_star(tmp_path / "a" / "run_it006_model.star")["model_general"]
    mb = read_star(b / "run_it006_model.star")["model_general"]
    ga = ma if isinstance(ma, dict) else {c: ma[c].iloc[0] for c in ma.columns}
    gb = mb if isinstance(mb, dict) else {c: mb[c].iloc[0] for c in mb.columns}
    ll_a, ll_b = float(ga["rlnLogLikelihood"]), float(gb["rlnLogLikelihood"])
    assert abs(ll_a - ll_b) <= 1e-7 * abs(ll_a)
    assert digest(tmp_path / "data") == before  # inputs never modified
