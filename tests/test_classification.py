"""Science of the adaptive classification scheme on simulated two-class data with known classes
and poses, over several seeds (slow: minutes). ``bench/bench_classification.py`` runs the same
comparisons over 10 seeds and more conditions (README, "Classification")."""

import dataclasses
import logging

import numpy as np
import pytest

from mltomo.em import run_em
from mltomo.evaluate import angular_errors, class_purity
from mltomo.geometry import euler_to_matrix, symmetry_group
from mltomo.model import Config
from mltomo.particles import particles_from_arrays
from mltomo.simulate import builtin_phantoms, simulate

pytestmark = pytest.mark.slow


def tutorial_data(seed, n_particles=150, snr=0.5):
    """The README's Python tutorial data set (its seed is 3)."""
    return simulate(builtin_phantoms(), n_particles, 24, 10.0, 30.0, snr=snr, missing_region="wedge_y:-60:60",
                    max_shift_voxels=2, preferred_orientation="moderate", seed=seed)


def fixed_pose_particles(sim):
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    return dataclasses.replace(parts, prior_angles=np.asarray(sim.angles, np.float64),
                               prior_shifts_angstrom=np.asarray(sim.shifts_voxels, np.float64) * sim.voxel_size)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fixed_poses_classify_from_random_subsets(seed):
    """True poses fixed: random-subset starts reach the purity of the true maps."""
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


@pytest.mark.parametrize("seed", [3, 4])
def test_reference_free_tutorial_finds_both_classes(seed):
    """The README's tutorial command (seed 3 collapsed into one class with the paper's scheme)."""
    sim = tutorial_data(seed)
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    res = run_em(parts, Config(n_classes=2, iterations=16, angular_sampling_deg=20, max_resolution_angstrom=30,
                               threads=2))
    found = res.particles
    purity = class_purity(sim.classes, found.classes)
    err = angular_errors(sim.rotations, euler_to_matrix(*found.angles.T), found.classes, group=symmetry_group("C7"))
    sizes = np.bincount(found.classes - 1, minlength=2)
    print(f"seed {seed}: purity {purity:.3f}, sizes {sizes.tolist()}, median angular error {np.median(err):.1f}°")
    assert purity >= 0.95
    assert sizes.min() > 0.3 * len(found.classes)
    assert np.median(err) < 20.0


def test_three_classes_on_two_class_data_give_two_pure_groups(caplog):
    sim = tutorial_data(3)
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    with caplog.at_level(logging.WARNING, logger="mltomo"):
        res = run_em(parts, Config(n_classes=3, iterations=16, angular_sampling_deg=20, max_resolution_angstrom=30,
                                   threads=2))
    found = res.particles.classes
    sizes = np.bincount(found - 1, minlength=3)
    purity = class_purity(sim.classes, found)
    print(f"K = 3: purity {purity:.3f}, sizes {sizes.tolist()}")
    assert purity >= 0.95  # every found class is (nearly) one true class
    small = [k for k in range(3) if sizes[k] < max(2, 0.02 * len(found))]
    for k in small:  # a class left (nearly) empty is reported
        assert f"class {k + 1} ends with" in caplog.text
