"""The issue's real-data check (issue 14, item 1): ``mltomo refine`` on the 40 real 70S ribosome
particles of ``shared/data/relion5_stacks`` (RELION 5 / WarpTools 2D tilt stacks), with the
32³ reconstruction flipped along z as the reference (it agrees with the tables' geometry only
so: tests/test_relion5.py), recovers the table's poses with no tuning beyond the command."""

from __future__ import annotations

import numpy as np
import pytest

from mltomo import geometry
from mltomo.cli import main
from mltomo.io import read_star, read_volume, write_volume
from mltomo.outputs import last_complete_iteration

from conftest import DATA

STACKS = DATA / "relion5_stacks"
NAME = "warptools_test_4-tomos_10-ptcls_box-32_angpix-12"
needs_stacks = pytest.mark.skipif(not (STACKS / f"{NAME}_optimisation_set.star").is_file(),
                                  reason=f"real RELION 5 particles not found in {STACKS}")


def _errors(run, it: int) -> np.ndarray:
    """Per-particle angle (degrees) between the refined rotation and the table's."""
    table = read_star(STACKS / f"{NAME}.star")["particles"]
    out = read_star(run / f"run_it{it:03d}_data.star")["particles"]
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    R0 = geometry.euler_to_matrix(*table[cols].to_numpy(np.float64).T)
    R1 = geometry.euler_to_matrix(*out[cols].to_numpy(np.float64).T)
    return geometry.geodesic_distance_deg(R0, R1)


def _refine(tmp_path, *options):
    vol, voxel = read_volume(STACKS / "warptools_test_box-32_angpix-12_reconstruct.mrc")
    write_volume(tmp_path / "ref.mrc", vol[::-1].copy(), voxel)  # the handedness the tables have
    run = tmp_path / "run"
    code = main(["refine", str(STACKS / f"{NAME}_optimisation_set.star"), "--out", str(run), "--classes", "1",
                 "--ref", str(tmp_path / "ref.mrc"), "--initial-lowpass", "40", "--quiet", "--threads", "2",
                 *options])
    assert code == 0
    return run


@needs_stacks
def test_local_search_around_the_table_poses(tmp_path):
    """A local search (5° within 15° of the table's poses): median error ≤ 8° (measured 6.8°)."""
    run = _refine(tmp_path, "--angular-sampling", "5", "--angular-range", "15", "--iter", "1")
    e = _errors(run, 1)
    assert np.median(e) <= 8.0, np.sort(e).round(1)


@needs_stacks
@pytest.mark.slow
def test_global_search_recovers_the_table_poses(tmp_path):
    """The issue's command as it is (global search, 10°, the default --iter 25; ``--noise auto`` is
    ``shell`` for tilt stacks): the single-class refinement stops at convergence (after iteration
    3 here, measured 10.7°; 12.0°, 12.4°, 11.4° with seeds 1–3) and its last iteration's median
    error is ≤ 15°. Run on to 25 iterations (``--auto-stop off``) the poses drift to 19.7° (README,
    "From RELION 5"). The particles' intensities are ~80× the map's, which the reference-scale
    pass absorbs."""
    run = _refine(tmp_path, "--angular-sampling", "10")
    last = last_complete_iteration(run)
    assert 2 <= last < 25, last  # it stopped at convergence
    assert read_star(run / f"run_it{last:03d}_model.star")["model_general"]["mltomoConverged"] == 1
    e = _errors(run, last)
    assert np.median(e) <= 15.0, np.sort(e).round(1)
