"""Spectra that do not fit in memory (mltomo.spectra_cache): the cache holds what the in-memory
array holds, leaves no file behind, and a refinement streaming from it gives the in-memory
result (same log-likelihoods, poses and classes), from Python and from the command line."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from mltomo import spectra_cache
from mltomo.em import run_em
from mltomo.model import Config
from mltomo.particles import particles_from_arrays
from mltomo.sampling import Sampling
from mltomo.simulate import builtin_phantoms, simulate


def test_allocate_in_memory_or_cached_and_no_file_is_left(tmp_path):
    a = spectra_cache.allocate(5, 8)
    assert type(a) is np.ndarray and a.shape == (5, 8, 8, 5) and a.dtype == np.complex64
    assert type(spectra_cache.allocate(5, 8, budget_bytes=1e9, cache_dir=tmp_path)) is np.ndarray
    c = spectra_cache.allocate(5, 8, budget_bytes=100, cache_dir=tmp_path)
    assert isinstance(c, np.memmap) and spectra_cache.is_cached(c)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=c.shape) + 1j * rng.normal(size=c.shape)).astype(np.complex64)
    c[:] = x
    spectra_cache.release(c, slice(0, 3))
    spectra_cache.release(c, np.array([4, 2]))
    np.testing.assert_array_equal(np.asarray(c), x)  # released pages come back from the file
    assert os.listdir(tmp_path) == []  # the cache file is unlinked from the start


def test_allocate_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="cache directory does not exist"):
        spectra_cache.allocate(5, 8, budget_bytes=1, cache_dir=tmp_path / "nope")


def test_a_full_disk_is_one_error_naming_the_directory(tmp_path, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ValueError, match=f"{tmp_path}: cannot hold a .* GB spectra cache .No space left on device"):
        spectra_cache.allocate(50, 16, budget_bytes=1, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_derived_rows_equal_the_in_memory_arrays(tmp_path):
    rng = np.random.default_rng(1)
    n, N = 12, 7
    x = (rng.normal(size=(N, n, n, n // 2 + 1)) + 1j * rng.normal(size=(N, n, n, n // 2 + 1))).astype(np.complex64)
    c = spectra_cache.allocate(N, n, budget_bytes=1, cache_dir=tmp_path)
    c[:] = x
    factor = rng.uniform(0.5, 2.0, N)
    s = spectra_cache.scaled(c, factor)
    assert isinstance(s, spectra_cache.Rows) and len(s) == N and s.shape == x.shape
    want = x * factor.astype(np.float32)[:, None, None, None]
    np.testing.assert_array_equal(s[2:5], want[2:5])
    np.testing.assert_array_equal(s[np.array([6, 0])], want[[6, 0]])
    np.testing.assert_array_equal(s[3], want[3])
    np.testing.assert_array_equal(spectra_cache.scaled(x, factor), want)  # in memory: the array itself
    sampling = Sampling.create(n, 10.0, Config())
    t = rng.uniform(-2, 2, (N, 3))
    sh = spectra_cache.shifted(c, sampling.apply_shifts, t)
    np.testing.assert_allclose(sh[1:4], sampling.apply_shifts(x, t)[1:4], rtol=1e-6, atol=1e-6)
    crop = Sampling.create(n, 10.0, Config(max_resolution_angstrom=40.0))
    assert crop.n_w < n
    got = spectra_cache.cropped(c, crop.crop, crop.n_w, None, tmp_path)
    assert spectra_cache.is_cached(got)
    np.testing.assert_array_equal(np.asarray(got), crop.crop(x))


def _sim(seed):
    return simulate(builtin_phantoms(), 24, 16, 15.0, 40.0, snr=0.5, missing_region="wedge_y:-60:60",
                    max_shift_voxels=1, preferred_orientation="none", seed=seed)


@pytest.mark.parametrize("case", ["reference-free, cropped", "fixed poses"])
def test_a_run_streaming_from_the_cache_equals_the_in_memory_run(tmp_path, case, monkeypatch):
    sim = _sim(3)
    lazy = []
    shifted = spectra_cache.shifted
    monkeypatch.setattr(spectra_cache, "shifted",
                        lambda x, f, t: lazy.append(spectra_cache.is_cached(x)) or shifted(x, f, t))
    mem = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    cached = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region, memory_budget_bytes=1,
                                   cache_dir=tmp_path)
    assert spectra_cache.is_cached(cached.spectra) and not spectra_cache.is_cached(mem.spectra)
    cfg = Config(n_classes=2, iterations=3, angular_sampling_deg=40.0, max_shift_voxels=1, seed=2, threads=2,
                 missing=sim.missing_region, reg_steps=1)
    if case == "reference-free, cropped":
        cfg = replace(cfg, max_resolution_angstrom=60.0, memory_budget_bytes=4 << 20)  # several chunks
    else:
        angles = np.asarray(sim.angles, dtype=np.float64)
        shifts = np.asarray(sim.shifts_voxels, dtype=np.float64) * sim.voxel_size
        mem, cached = (replace(p, prior_angles=angles, prior_shifts_angstrom=shifts) for p in (mem, cached))
        cfg = replace(cfg, no_align=True)
    cfg_cached = replace(cfg, spectra_budget_bytes=1, cache_dir=str(tmp_path))
    a = run_em(mem, cfg)
    b = run_em(cached, cfg_cached)
    assert [h.log_likelihood for h in a.history] == [h.log_likelihood for h in b.history]
    np.testing.assert_array_equal(a.particles.angles, b.particles.angles)
    np.testing.assert_array_equal(a.particles.classes, b.particles.classes)
    np.testing.assert_array_equal(a.model.refs, b.model.refs)
    assert os.listdir(tmp_path) == []
    if case == "fixed poses":  # the known shifts are undone block by block from the cache
        assert True in lazy and False in lazy


def _star(tmp_path):
    import pandas as pd

    from mltomo.io.mrc import write_volume
    from mltomo.io.star import write_star

    sim = _sim(5)
    d = tmp_path / "data"
    d.mkdir()
    names = []
    for i, v in enumerate(sim.volumes):
        names.append(f"p{i + 1}.mrc")
        write_volume(d / names[-1], v.astype(np.float32), sim.voxel_size)
    write_star(d / "particles.star", {"particles": pd.DataFrame({"rlnImageName": names})})
    return d / "particles.star"


def test_refine_with_a_memory_budget_writes_what_it_writes_without(tmp_path, capsys):
    from mltomo.cli import main
    from mltomo.io.star import read_star

    star = _star(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    common = ["--classes", "2", "--iter", "2", "--angular-sampling", "45", "--missing", "wedge_y:-60:60",
              "--max-shift", "1", "--threads", "2", "--quiet"]
    assert main(["refine", str(star), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["refine", str(star), "--out", str(tmp_path / "b"), *common, "--memory-budget", "1e-6",
                 "--cache-dir", str(cache)]) == 0
    ta = read_star(tmp_path / "a" / "run_it002_data.star")
    tb = read_star(tmp_path / "b" / "run_it002_data.star")
    for name, block in ta.items():
        assert block.equals(tb[name]), name
    assert os.listdir(cache) == []
    capsys.readouterr()
    code = main(["refine", str(star), "--out", str(tmp_path / "c"), *common, "--memory-budget", "1",
                 "--cache-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cache-dir" in err[0] and "nowhere" in err[0]
    assert not (tmp_path / "c").exists()
