"""Science of the adaptive classification scheme on simulated two-class data with known classes
and poses, over several seeds (slow: minutes). ``bench/bench_classification.py`` runs the same
comparisons over 10 seeds and more conditions (README, "Classification")."""

import dataclasses

import numpy as np
import pytest

from mltomo.em import run_em
from mltomo.evaluate import angular_errors, class_purity
from mltomo.geometry import euler_to_matrix, symmetry_group
from mltomo.model import Config
from mltomo.particles import particles_from_arrays
from mltomo.simulate import builtin_phantoms, simulate

from conftest import DATA, needs_data

pytestmark = pytest.mark.slow


def tutorial_data(seed, n_particles=150, snr=0.5):
    """The README's Python tutorial data set (its seed is 3)."""
    return simulate(builtin_phantoms(), n_particles, 24, 10.0, 30.0, snr=snr, missing_region="wedge_y:-60:60",
                    max_shift_voxels=2, preferred_orientation="moderate", seed=seed)


def fixed_pose_particles(sim):
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    return dataclasses.replace(parts, prior_angles=np.asarray(sim.angles, np.float64),
                               prior_shifts_angstrom=np.asarray(sim.shifts_voxels, np.float64) * sim.voxel_size)


@pytest.mark.parametrize("seed", [1, 2])
def test_fixed_poses_classify_from_random_subsets(seed):
    """True poses fixed, 100 particles at SNR 0.03: the true maps separate the classes, random
    subsets reach that with the adaptive scheme and stay near the random split with the
    paper's (measured over 10 seeds in the README: 1.00 in 10/10 against 0.51-0.58)."""
    sim = tutorial_data(seed, n_particles=100, snr=0.03)
    parts = fixed_pose_particles(sim)
    base = dict(n_classes=2, no_align=True, eps=0.0, threads=1, seed=seed)
    truth = run_em(parts, Config(iterations=1, reg0=0.0, **base), refs=sim.references)
    assert class_purity(sim.classes, truth.particles.classes) >= 0.99  # the data support the split
    res = run_em(parts, Config(iterations=20, **base))
    purity = class_purity(sim.classes, res.particles.classes)
    lls = [h.log_likelihood for h in res.history]
    print(f"seed {seed}: purity {purity:.3f}, resolution {res.history[-1].resolution_angstrom:.1f} Å, "
          f"logL {lls[0]:.6e} -> {lls[-1]:.6e}")
    assert purity >= 0.95
    assert res.model.shells is not None and np.isfinite(res.history[-1].resolution_angstrom)
    if seed == 1:
        paper = run_em(parts, Config(iterations=20, scheme="paper", **base))
        assert class_purity(sim.classes, paper.particles.classes) < 0.8  # what the scheme fixes


@pytest.mark.parametrize("seed", [3, 6])
def test_reference_free_tutorial_finds_both_classes(seed):
    """The README's Python tutorial, verbatim for seed 3 (the paper's scheme puts all 150
    particles in one class there), and seed 6, where the adaptive scheme without the tied
    alignment and principal-component split was still at 0.74 after 16 iterations."""
    sim = tutorial_data(seed)
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    res = run_em(parts, Config(n_classes=2, iterations=16, angular_sampling_deg=20, max_resolution_angstrom=30,
                               threads=2, seed=0 if seed == 3 else seed))
    found = res.particles
    purity = class_purity(sim.classes, found.classes)
    err = angular_errors(sim.rotations, euler_to_matrix(*found.angles.T), found.classes, group=symmetry_group("C7"))
    sizes = np.bincount(found.classes - 1, minlength=2)
    print(f"seed {seed}: purity {purity:.3f}, sizes {sizes.tolist()}, median angular error {np.median(err):.1f}°")
    assert purity >= 0.95
    assert sizes.min() > 0.3 * len(found.classes)
    assert np.median(err) < 20.0


@needs_data
def test_three_classes_on_two_class_data_give_two_pure_groups(caplog):
    """K = 3 on GroEL14 / GroEL14-GroES7 (100 particles of 32³, SNR 0.05, 30°, the default
    command otherwise): every found class is pure, each true class is the majority of at least
    one of them, and a class left (nearly) empty is named in a warning (measured for this
    seed: 0/54/46)."""
    from mltomo.phantoms import groel_models

    sim = simulate(groel_models(DATA), 100, 32, 7.5, 20.0, snr=0.05, missing_region="wedge_y:-60:60",
                   max_shift_voxels=3, preferred_orientation="moderate", seed=1)
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    with caplog.at_level("WARNING", logger="mltomo"):
        res = run_em(parts, Config(n_classes=3, iterations=16, angular_sampling_deg=30, threads=2, seed=1))
    found = res.particles.classes
    purity = class_purity(sim.classes, found)
    majority = {k: np.bincount(sim.classes[found == k]).argmax() for k in np.unique(found)}
    sizes = np.bincount(found - 1, minlength=3)
    print(f"purity {purity:.3f}, sizes {sizes.tolist()}, majority {majority}")
    assert purity >= 0.95
    assert set(majority.values()) == {1, 2}
    for k in np.flatnonzero(sizes < 2):
        assert any(f"class {k + 1} ends with" in r.getMessage() for r in caplog.records)
