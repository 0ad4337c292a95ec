"""Distributed runs: ``mpiexec -n 2 mltomo refine`` against a serial run, and failures on one rank.

The MPI tests launch real processes (``mpiexec -n 2 -bind-to core python -m mltomo refine``)
on a small two-class data set written to disk, with a timeout, so a hang fails the test
instead of stalling the suite.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mltomo.parallel import SerialComm, get_comm, launched_with_mpi, split_range

from conftest import MPIEXEC, mpiexec, needs_mpiexec, run

BOX = 16
N_PARTICLES = 24
VOXEL = 10.0
WEDGE = "wedge_y:-60:60"
REFINE = ["--classes", "2", "--iter", "3", "--angular-sampling", "30", "--max-shift", "1",
          "--missing", WEDGE, "--seed", "3", "--threads", "1", "--reg-steps", "1"]  # split after it 1
# ``mltomo refine`` under a file-size limit (as on a full disk, or over quota), for rank 0 only;
# MPI is initialised before the limit is set because its shared-memory transport makes big files.
_LIMITED_RANK = ("import resource, sys; import mltomo._core; from mpi4py import MPI; from mltomo.cli import main; "
                 "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)); sys.exit(main(sys.argv[1:]))")
# Report whether a serial run imported mpi4py.
_SERIAL = ("import json, sys; from mltomo.cli import main; rc = main(sys.argv[1:]); "
           "print(json.dumps({'rc': rc, 'mpi4py': 'mpi4py' in sys.modules}))")


# ------------------------------------------------------------------------------ helpers


def _phantoms(rng, n, k):
    """``k`` smooth random blob phantoms in an ``n³`` box, unit standard deviation."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vols = []
    for _ in range(k):
        v = np.zeros((n, n, n))
        for _ in range(6):
            p = rng.uniform(-n / 4, n / 4, 3)
            s = rng.uniform(1.2, 2.2)
            v += rng.uniform(0.5, 1.5) * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
        vols.append(v / v.std())
    return vols


def write_dataset(root: Path, n_particles: int = N_PARTICLES, box: int = BOX, seed: int = 0,
                  optics_groups: bool = False) -> Path:
    """Two classes, random rotations, integer shifts (|t| ≤ 1), noise (SNR 2) and a ±60° wedge;
    with ``optics_groups`` the last third of the particles (all on the last rank of two) are in
    optics group 2, on 3× the intensity scale."""
    from mltomo import geometry
    from mltomo.fourier import irfft_unitary, missing_region_mask, rfft_unitary
    from mltomo.io import write_star, write_volume
    from mltomo.reference import rotate_volume

    rng = np.random.default_rng(seed)
    phantoms = _phantoms(rng, box, 2)
    wedge = missing_region_mask(WEDGE, box)
    rotations = geometry.random_rotations(n_particles, rng)
    (root / "particles").mkdir(parents=True)
    names = []
    for i in range(n_particles):
        v = rotate_volume(phantoms[i % 2], rotations[i])
        v = np.roll(v, tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
        v = v + rng.normal(scale=np.sqrt(0.5), size=v.shape)
        v = irfft_unitary(rfft_unitary(v) * wedge, box)
        if optics_groups and 3 * i >= 2 * n_particles:
            v = 3.0 * v
        name = f"particles/p{i:03d}.mrc"
        write_volume(root / name, v.astype(np.float32), VOXEL)
        names.append(name)
    import pandas as pd

    star = root / "particles.star"
    table = pd.DataFrame({"rlnImageName": names})
    if optics_groups:
        table["rlnOpticsGroup"] = [2 if 3 * i >= 2 * n_particles else 1 for i in range(n_particles)]
    write_star(star, {"particles": table})
    return star


def _readrun(out: Path, iterations: int):
    from mltomo.io import read_star, read_volume

    its = []
    for it in range(1, iterations + 1):
        model = read_star(out / f"run_it{it:03d}_model.star")
        gen = model["model_general"]
        if hasattr(gen, "iloc"):
            gen = {c: gen[c].iloc[0] for c in gen.columns}
        maps = np.stack([read_volume(out / name)[0] for name in model["model_classes"]["rlnReferenceImage"]])
        data = read_star(out / f"run_it{it:03d}_data.star")["particles"]
        its.append({
            "logl": float(gen["rlnLogLikelihood"]), "sigma2": float(gen["mltomoSigma2Noise"]),
            "xi2": float(gen["mltomoXi2Voxels"]), "search": str(gen["mltomoSearch"]),
            "alpha": model["model_classes"]["rlnClassDistribution"].to_numpy(np.float64),
            "maps": maps, "data": data,
        })
    return its


# ------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize("n", [0, 1, 5, 24, 25])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_split_range_covers_every_particle_once_in_order(n, size):
    blocks = [split_range(n, r, size) for r in range(size)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(b[1] == c[0] for b, c in zip(blocks, blocks[1:]))
    lengths = [b - a for a, b in blocks]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 0
    assert blocks == [split_range(n, r, size) for r in range(size)]  # deterministic


def test_launcher_detection(monkeypatch):
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_with_mpi()
    assert isinstance(get_comm(), SerialComm)
    monkeypatch.setenv("PMI_SIZE", "1")  # mpiexec -n 1: serial
    assert not launched_with_mpi()
    monkeypatch.setenv("PMI_SIZE", "2")
    assert launched_with_mpi()
    monkeypatch.delenv("PMI_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_with_mpi()


# -------------------------------------------------------------------------- MPI runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi_data")
    return write_dataset(root)


@pytest.fixture(scope="module")
def grouped_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mpi_groups"), optics_groups=True)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("case", ["white", "shell-noise-two-scales", "search-auto", "cached-shell-noise"])
def test_two_ranks_agree_with_one(dataset, grouped_dataset, tmp_path, case):
    """Serial and two ranks agree; also with σ²(shell) and a scale per optics group, the second
    group held by rank 1 alone (its label and sums must reach rank 0), with ``--search auto``
    (its decision sums over ranks; the search narrows after iteration 9 here), and with each
    rank streaming its particles from its own memory-mapped cache (``--memory-budget``; the
    scales divided out block by block)."""
    options = list(REFINE)
    mpi_options = []
    iterations = 3
    cache = tmp_path / "cache"
    if case in ("shell-noise-two-scales", "cached-shell-noise"):
        dataset = grouped_dataset
        options += ["--noise", "shell"]
    if case == "cached-shell-noise":
        cache.mkdir()
        mpi_options = ["--memory-budget", "1e-6", "--cache-dir", cache]
    if case == "search-auto":
        iterations = 11
        options[options.index("--iter") + 1] = str(iterations)
        options += ["--search", "auto"]
    rc, out1, err1 = run([sys.executable, "-c", _SERIAL, "refine", dataset, "--out", tmp_path / "serial", *options],
                          tmp_path)
    assert rc == 0, err1
    report = json.loads(out1.strip().splitlines()[-1])
    assert report == {"rc": 0, "mpi4py": False}, "a serial run must not import mpi4py"

    rc, out2, err2 = run(mpiexec(2, sys.executable, "-m", "mltomo", "refine", dataset, "--out", tmp_path / "mpi",
                                   *options, *mpi_options), tmp_path)
    assert rc == 0, err2
    # Only rank 0 logs (and writes): one line per iteration, not one per rank.
    assert sum(line.startswith("it   1 ") for line in (out2 + err2).splitlines()) == 1, out2 + err2

    serial, mpi = tmp_path / "serial", tmp_path / "mpi"
    assert sorted(p.name for p in serial.iterdir()) == sorted(p.name for p in mpi.iterdir())
    from mltomo.geometry import euler_to_matrix

    for it, (a, b) in enumerate(zip(_readrun(serial, iterations), _readrun(mpi, iterations)), start=1):
        assert b["search"] == a["search"], it
        assert b["logl"] == pytest.approx(a["logl"], rel=1e-6, abs=1e-6), it
        assert b["sigma2"] == pytest.approx(a["sigma2"], rel=1e-6), it
        assert b["xi2"] == pytest.approx(a["xi2"], rel=1e-5), it
        np.testing.assert_allclose(b["alpha"], a["alpha"], atol=1e-6)
        scale = np.abs(a["maps"]).max()
        assert np.abs(b["maps"] - a["maps"]).max() <= 1e-4 * scale, it
        da, db = a["data"], b["data"]
        assert list(da["rlnImageName"]) == list(db["rlnImageName"])
        np.testing.assert_array_equal(db["rlnClassNumber"], da["rlnClassNumber"])
        ang = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
        Ra = euler_to_matrix(*da[ang].to_numpy(np.float64).T)
        Rb = euler_to_matrix(*db[ang].to_numpy(np.float64).T)
        np.testing.assert_allclose(Rb, Ra, atol=1e-5)
        sh = ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]
        np.testing.assert_allclose(db[sh].to_numpy(np.float64), da[sh].to_numpy(np.float64), atol=1e-6)
        np.testing.assert_allclose(db["rlnLogLikeliContribution"].to_numpy(np.float64),
                                   da["rlnLogLikeliContribution"].to_numpy(np.float64), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(db["rlnMaxValueProbDistribution"].to_numpy(np.float64),
                                   da["rlnMaxValueProbDistribution"].to_numpy(np.float64), atol=1e-5)
    # Not a trivial agreement: both ranks' particles were classified, into both classes.
    assert set(a["data"]["rlnClassNumber"]) == {1, 2}
    if case == "search-auto":
        assert "local" in [r["search"] for r in _readrun(serial, iterations)]
    if case == "white":  # the default coarse-to-fine search: its coarse pass and audit span both ranks
        assert "coarse-to-fine" in [r["search"] for r in _readrun(serial, iterations)]
    if case == "cached-shell-noise":
        assert "stream from memory-mapped caches" in out2 + err2, out2 + err2
        assert list(cache.iterdir()) == []  # the ranks' caches were unlinked files
    if case in ("shell-noise-two-scales", "cached-shell-noise"):  # scales and noise agree, and the scales are not 1
        from mltomo.io import read_star

        ga, gb = (read_star(d / "run_it003_model.star") for d in (serial, mpi))
        sa = ga["model_groups"]["rlnGroupScaleCorrection"].to_numpy(np.float64)
        np.testing.assert_allclose(gb["model_groups"]["rlnGroupScaleCorrection"].to_numpy(np.float64), sa, rtol=1e-5)
        np.testing.assert_allclose(gb["model_noise"]["rlnSigma2Noise"].to_numpy(np.float64),
                                   ga["model_noise"]["rlnSigma2Noise"].to_numpy(np.float64), rtol=1e-5)
        assert sa[1] / sa[0] == pytest.approx(3.0, rel=0.15), sa


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_bad_particle_on_rank_1_stops_every_rank(dataset, tmp_path, fault):
    import pandas as pd

    from mltomo.io import read_star, write_star

    df = read_star(dataset)["particles"]
    df["rlnImageName"] = [str(dataset.parent / name) for name in df["rlnImageName"]]
    bad = 20
    assert split_range(len(df), 1, 2)[0] <= bad  # only rank 1 reads it
    bad_file = tmp_path / f"bad_p{bad:03d}.mrc"
    if fault == "corrupt":
        bad_file.write_bytes(b"not an MRC volume\n" * 64)
    df.loc[bad, "rlnImageName"] = str(bad_file)
    star = tmp_path / "particles.star"
    write_star(star, {"particles": pd.DataFrame(df)})

    out = tmp_path / "out"
    rc, _, stderr = run(mpiexec(2, sys.executable, "-m", "mltomo", "refine", star, "--out", out, *REFINE),
                              tmp_path)
    assert rc != 0
    assert bad_file.name in stderr and "rank 1" in stderr, stderr
    assert stderr.count(bad_file.name) == 1, stderr  # printed once, not once per rank
    assert not out.exists(), "an input error must not write anything"


@pytest.mark.mpi
@needs_mpiexec
def test_rank_0_failing_mid_run_stops_every_rank(dataset, tmp_path):
    """Rank 0 cannot write iteration 1's maps (a file-size limit, as on a full disk) while rank 1
    is already in iteration 2's Allreduce: the run must end with rank 0's message, not hang."""
    out = tmp_path / "out"
    args = ["refine", dataset, "--out", out, *REFINE]
    cmd = [MPIEXEC, "-bind-to", "core", "-n", "1", sys.executable, "-c", _LIMITED_RANK, *args,
           ":", "-n", "1", sys.executable, "-m", "mltomo", *args]
    rc, _, stderr = run(cmd, tmp_path)
    assert rc != 0
    assert "error on rank 0" in stderr and "File too large" in stderr, stderr
    assert (out / "run_config.json").is_file()  # the run had started
    assert not (out / "run_it001_model.star").exists()


_LIMITED = ("import resource, sys; from mltomo.cli import main; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)); sys.exit(main(sys.argv[1:]))")


def test_serial_run_on_a_full_disk_is_one_line_naming_the_file(dataset, tmp_path):
    """The same file-size limit without MPI: exit code 2, one line naming the output file that
    could not be written (not the temporary file, not a traceback), no temporary file left."""
    out = tmp_path / "out"
    rc, _, stderr = run([sys.executable, "-c", _LIMITED, "refine", dataset, "--out", out, *REFINE], tmp_path)
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"{out}/run_it001_" in lines[0] and lines[0].endswith(": File too large"), stderr
    assert not list(out.glob(".*.tmp"))
    assert not (out / "run_it001_model.star").exists()


def test_simulate_on_a_full_disk_is_one_line_naming_the_file(tmp_path):
    """``mltomo simulate`` (each particle is 16³ float32 = 16 KB, over the 8 KB limit): exit
    code 2 and one line naming the map it could not write."""
    out = tmp_path / "sim"
    rc, _, stderr = run([sys.executable, "-c", _LIMITED, "simulate", "--out", out, "--phantom", "builtin",
                          "--particles", "2", "--box", "16", "--voxel-size", "16", "--quiet"], tmp_path)
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"mltomo simulate: error: {out}/") and lines[0].endswith(".mrc: File too large"), stderr


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed")
def test_launcher_and_mpi_disagreeing_is_an_error(dataset, tmp_path):
    """A launcher that says 2 ranks while MPI initialises 1 (mpi4py built for another MPI) must not
    run the refinement twice over into the same directory."""
    out = tmp_path / "out"
    rc, _, stderr = run([sys.executable, "-m", "mltomo", "refine", dataset, "--out", out, *REFINE],
                              tmp_path, PMI_SIZE="2")
    assert rc == 2
    assert "launcher started 2 processes but MPI sees 1" in stderr, stderr
    assert not out.exists()


def test_launched_without_mpi4py_is_a_user_error(monkeypatch):
    """MPI is an extra (``mltomo[mpi]``): the package imports and runs serially without mpi4py,
    and a launcher without it gives one line saying what to install, not a traceback."""
    import sys

    from mltomo.parallel import RankError

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    monkeypatch.setenv("PMI_SIZE", "1")
    assert isinstance(get_comm(), SerialComm)
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(RankError, match=r"mltomo\[mpi\]"):
        get_comm()
