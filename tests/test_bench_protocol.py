"""``bench/bench_protocol.py``'s extrapolation of an exhaustive run from its first iterations:
the first iterations of a reference-free run search one class (the classes are tied until the
split), the later ones all K, so the remaining iterations are counted per class searched."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_protocol.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_protocol", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_protocol"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("last_classes, expected", [(1, 80 + 38 * 30 * 2), (2, 80 + 38 * 30)])
def test_remaining_iterations_cost_the_last_one_per_class(bench, last_classes, expected):
    measured = {"iterations": 2, "seconds": 80.0, "seconds_last_iteration": 30.0,
                "classes_searched": [1, last_classes]}
    assert bench.extrapolate(measured, 40, 2, 1.0) == pytest.approx(expected)
    assert bench.extrapolate(measured, 40, 2, 2.5) == pytest.approx(2.5 * expected)
    assert bench.extrapolate(measured, 2, 2, 1.0) == pytest.approx(80.0)  # nothing left to extrapolate


@pytest.mark.parametrize("seed", [1, 2])
def test_exhaustive_run_searches_one_class_until_the_split(bench, seed):
    from mltomo.simulate import builtin_phantoms, simulate

    sim = simulate(builtin_phantoms()[:2], 12, 16, 16.0, 40.0, 1.0, max_shift_voxels=1, seed=seed)
    args = SimpleNamespace(classes=2, sampling=30.0, seed=seed, scheme="adaptive")
    out = bench.run("exhaustive", "fft", 8, sim, [np.eye(3)[None]] * 2, args, 1)
    # reg_steps = 5 tied iterations; the split's iteration scores each particle in the class it
    # was seeded to; every later iteration searches both classes
    assert out["classes_searched"] == [1, 1, 1, 1, 1, 1, 2, 2]
