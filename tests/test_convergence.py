"""Stopping a single-class refinement at convergence (``--auto-stop``, mltomo.convergence)."""

from types import SimpleNamespace

import numpy as np
import pytest

from mltomo import convergence, geometry
from mltomo.cli import main
from mltomo.em import run_em
from mltomo.model import Config, Model, ParticleResults
from mltomo.outputs import read_iteration
from mltomo.parallel import SerialComm
from mltomo.particles import particles_from_arrays
from mltomo.phantoms import PointCloud
from mltomo.simulate import simulate

STEP = 20.0
C1 = np.eye(3)[None]


def _results(R):
    N = len(R)
    return ParticleResults(indices=np.arange(N), classes=np.ones(N, np.int64),
                           angles=np.stack(geometry.matrix_to_euler(R), axis=-1), shifts_angstrom=np.zeros((N, 3)),
                           max_post=np.ones(N), n_significant=np.ones(N, int), log_likelihood=np.zeros(N))


def _model(shell):
    return Model(refs=np.zeros((1, 4, 4, 4), np.float32), alpha=np.ones(1), sigma2=1.0, xi2_voxels=1.0,
                 shells=SimpleNamespace(resolution_shell=shell))


def _step(shell, counts, prev, new, eligible=True, config=None):
    config = config or Config(n_classes=1, angular_sampling_deg=STEP)
    return convergence.step(_model(shell), counts, prev, new, config, C1, len(new.classes), SerialComm(),
                            eligible=eligible)


def _turned(R, deg, which):
    """``R`` with the rotations ``which`` turned by ``deg`` about z on the left (a particle's own move)."""
    t = np.radians(deg)
    Q = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    out = R.copy()
    out[which] = np.matmul(Q, R[which])
    return out


@pytest.fixture
def poses():
    return geometry.random_rotations(100, np.random.default_rng(0))


def test_counts_iterations_without_a_resolution_gain(poses):
    r = _results(poses)
    m, _ = _step(9, (8, 3), r, r)
    assert (m.best_resolution_shell, m.iterations_without_gain) == (9, 0)  # a gain resets the count
    m, _ = _step(9, (9, 0), r, r)
    assert (m.best_resolution_shell, m.iterations_without_gain) == (9, 1)
    m, _ = _step(7, (9, 1), r, r)  # a loss is no gain, and the best shell is kept
    assert (m.best_resolution_shell, m.iterations_without_gain) == (9, 2)


def test_stops_when_the_resolution_and_the_poses_hold(poses):
    prev = _results(poses)
    step_moves = np.arange(len(poses)) < 5  # 5 % of the particles move by 2 steps: still converged
    new = _results(_turned(poses, 2 * STEP, step_moves))
    _, stop = _step(9, (9, 0), prev, new)
    assert stop is None  # one iteration without a gain is not enough
    m, stop = _step(9, (9, 1), prev, new)
    assert stop is not None and "converged" in stop and m.iterations_without_gain == 2
    _, stop = _step(10, (9, 5), prev, new)
    assert stop is None  # the resolution improved
    _, stop = _step(9, (9, 1), None, new)
    assert stop is None  # no earlier poses to compare
    _, stop = _step(9, (9, 1), prev, new, eligible=False)
    assert stop is None  # poses that were not free (tied or seeded iterations)


def test_does_not_stop_while_poses_move(poses):
    prev = _results(poses)
    moved = np.arange(len(poses)) < 6  # 6 % move by 2 steps
    _, stop = _step(9, (9, 4), prev, _results(_turned(poses, 2 * STEP, moved)))
    assert stop is None
    # ... but a common turn of the whole map is no move (a reference-free frame may rotate)
    Q = geometry.euler_to_matrix(30.0, 40.0, 50.0)
    _, stop = _step(9, (9, 4), prev, _results(np.matmul(poses, Q)))
    assert stop is not None


def test_which_runs_stop():
    def stops(given_refs=True, **kw):
        return convergence.applies(convergence.resolve(Config(**kw), given_refs))

    assert stops(n_classes=1)  # refinement from a reference: RELION's auto-refine
    assert not stops(given_refs=False, n_classes=1)  # reference-free: keeps its --iter
    assert not stops(n_classes=2)  # classification keeps its --iter
    assert stops(given_refs=False, n_classes=2, auto_stop="on")
    assert not stops(n_classes=1, auto_stop="off")
    assert not stops(n_classes=1, scheme="paper")  # no resolution measure
    assert not stops(n_classes=1, no_align=True, auto_stop="on")
    assert convergence.tracked(Config(n_classes=2)) and not convergence.tracked(Config(scheme="paper"))
    with pytest.raises(ValueError, match="auto-stop"):
        convergence.applies(Config(auto_stop="sometimes"))


def _cloud_set(seed, n_particles=60):
    """One 12-blob cloud: no symmetry, so converged poses are unique."""
    rng = np.random.default_rng(seed)
    pts = np.concatenate([c + rng.normal(scale=6, size=(300, 3)) for c in rng.normal(scale=35, size=(12, 3))])
    return simulate([PointCloud(pts, np.ones(len(pts)))], n_particles, 20, 12.0, 36.0, snr=0.5,
                    missing_region="wedge_y:-60:60", max_shift_voxels=1, seed=seed)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_run_stops_where_the_rule_holds_and_continues_alike(tmp_path, seed):
    """With the stop on, the run is the run without it cut at the first iteration the rule
    holds; continued from the iteration before, it stops there too, with the same model."""
    sim = _cloud_set(seed)
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    ref = np.asarray(sim.references[:1], dtype=np.float64)
    cfg = Config(n_classes=1, iterations=12, angular_sampling_deg=STEP, max_shift_voxels=1, seed=seed, threads=2,
                 eps=0, initial_lowpass_angstrom=60.0)
    free = run_em(parts, Config(**{**cfg.to_dict(), "auto_stop": "off"}), refs=ref)
    held = [h.iteration for h in free.history if h.converged]
    assert held, [(h.iteration, h.resolution_angstrom) for h in free.history]
    stopped = run_em(parts, cfg, refs=ref, out_dir=str(tmp_path))
    assert len(stopped.history) == held[0] < cfg.iterations
    ll_free = [h.log_likelihood for h in free.history[: held[0]]]
    assert [h.log_likelihood for h in stopped.history] == ll_free
    start_model, start_results = read_iteration(tmp_path, held[0] - 1)
    cont = run_em(parts, cfg, refs=ref, start_model=start_model, start_results=start_results)
    assert [h.iteration for h in cont.history] == [held[0]]
    np.testing.assert_allclose(cont.model.refs, stopped.model.refs, rtol=1e-5,
                               atol=1e-5 * np.abs(stopped.model.refs).max())


def test_auto_stop_option_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["refine", str(tmp_path / "none.star"), "--out", str(tmp_path / "o"), "--auto-stop", "maybe"])
    code = e.value.code
    assert code == 2 and "--auto-stop" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_run_records_whether_it_stops(tmp_path):
    """``auto`` is resolved when the run starts and written to run_config.json, so a continued
    run (which reads no --ref) stops as the uninterrupted one does."""
    import json

    from mltomo.io import write_volume
    from mltomo.simulate import write_dataset

    sim = _cloud_set(1, n_particles=8)
    star = str(write_dataset(sim, tmp_path / "data")["particles"])
    write_volume(tmp_path / "ref.mrc", np.asarray(sim.references[0], dtype=np.float32), sim.voxel_size)
    common = ["--classes", "1", "--iter", "1", "--angular-sampling", "40", "--max-shift", "1", "--threads", "1",
              "--quiet"]
    assert main(["refine", star, "--out", str(tmp_path / "a"), "--ref", str(tmp_path / "ref.mrc"), *common]) == 0
    assert main(["refine", star, "--out", str(tmp_path / "b"), *common]) == 0
    resolved = [json.loads((tmp_path / r / "run_config.json").read_text())["config"]["auto_stop"] for r in "ab"]
    assert resolved == ["on", "off"]
