"""Helpers and fixtures shared by the test files (imported as ``from conftest import ...``).

* the shared data (PDB models of GroEL) and the ``needs_data`` marker;
* launching subprocesses and ``mpiexec`` (``run``, ``mpiexec``, ``needs_mpiexec``);
* small synthetic data sets built in memory: exact cube rotations, blob phantoms, a wedge
  mask, :class:`~mltomo.model.Particles` of rotated, shifted, noisy copies.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mltomo.model import Particles


def _shared_data() -> Path:
    """``$MLTOMO_DATA``, else ``../shared/data`` beside the checkout, else the workplace's copy
    (a clone elsewhere, e.g. in a temporary directory, still runs the data tests)."""
    candidates = [Path(os.environ["MLTOMO_DATA"])] if os.environ.get("MLTOMO_DATA") else []
    candidates += [Path(__file__).resolve().parents[1].parent / "shared" / "data", Path("/work/shared/data")]
    return next((c for c in candidates if (c / "models").is_dir()), candidates[0])


DATA = _shared_data()
needs_data = pytest.mark.skipif(
    not (DATA / "models").is_dir(), reason=f"shared data not found at {DATA} (PDB 1OEL/1AON)"
)

MPIEXEC = shutil.which("mpiexec")
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec is not on PATH (pip install '.[mpi]')")
TIMEOUT = 60  # seconds a launched command may take; a run takes a few

# Exact and cheap EM runs: rotations on grid points, no padding, no regularisation, shifts
# within ±1 voxel, 1 thread (the machine is shared), the paper's scheme (no half-set filter).
EXACT = {"padding": 1.0, "gridding": False, "perturb": False, "reg0": 0.0, "regF": 0.0, "eps": 0.0,
         "threads": 1, "max_shift_voxels": 1, "xi0_voxels": 1.0, "scheme": "paper"}


# --------------------------------------------------------------------------- subprocesses


def clean_env(**extra):
    """The environment minus any MPI launcher's variables (the test may itself run under one)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd, cwd, **env):
    """Run ``cmd``; on timeout kill its whole process group (mpiexec and every rank) and fail."""
    p = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=clean_env(**env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} hung for {TIMEOUT} s\nstdout:\n{out}\nstderr:\n{err}")
    return p.returncode, out, err


def mpiexec(n, *args):
    """The command line that runs ``args`` on ``n`` MPI processes."""
    return [MPIEXEC, "-n", str(n), "-bind-to", "core", *map(str, args)]


# ----------------------------------------------------------------------- synthetic data


def cube_rotations() -> np.ndarray:
    """``(24, 3, 3)`` the rotations of the cube: exact on the voxel grid."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            R = np.zeros((3, 3))
            for i, j in enumerate(perm):
                R[i, j] = signs[i]
            if np.linalg.det(R) > 0:
                out.append(R)
    return np.array(out)


def angles_of(R):
    """``(N, 3)`` Euler angles (rot, tilt, psi) of rotation matrices ``(N, 3, 3)``."""
    from mltomo.geometry import matrix_to_euler

    return np.stack(matrix_to_euler(np.asarray(R)), 1)


def blobs(n, rng, count=6, spread=0.22):
    """A phantom of ``count`` Gaussian blobs (σ 1.5 voxels) within ``±spread·n`` of the centre."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((n, n, n))
    for _ in range(count):
        p = rng.uniform(-spread * n, spread * n, 3)
        v += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * 1.5**2))
    return v


def blob_cloud(seed=7, half_width=50.0, spread=12.0, points=150, blobs=7):
    """An asymmetric point-cloud phantom (Å): ``blobs`` Gaussian blobs of ``points`` points,
    centres uniform in ±``half_width``, weights 1, 2, ... per blob (no symmetry)."""
    from mltomo.phantoms import PointCloud

    r = np.random.default_rng(seed)
    cen = r.uniform(-half_width, half_width, (blobs, 3))
    pts = np.concatenate([c + r.normal(0, spread, (points, 3)) for c in cen])
    return PointCloud(pts, np.concatenate([np.full(points, 1.0 + k) for k in range(blobs)]))


def rotate_exact(a, R):
    """x(r) = a(Rᵀ r) for an integer (cube) rotation, exactly, on the grid centred at n//2."""
    n = a.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x, y, z], -1) @ R  # rows: (Rᵀ r)ᵀ = rᵀ R
    ix, iy, iz = [(r[..., d].round().astype(int) + n // 2) % n for d in range(3)]
    return a[iz, iy, ix]


def wedge_half(n, half_angle_deg):
    """``(n, n, n//2+1)`` float32 half-spectrum mask of a wedge about ``y``: observed within
    ``half_angle_deg`` of the ``x`` axis in the ``x–z`` plane (DC observed)."""
    from mltomo.fourier import freq_half

    kz, ky, kx = freq_half(n)
    kz, kx = np.broadcast_to(kz, (n, n, n // 2 + 1)), np.broadcast_to(kx, (n, n, n // 2 + 1))
    theta = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    return ((theta <= half_angle_deg) | ((kx == 0) & (kz == 0))).astype(np.float32)


def make_particles(refs, rots, N, sigma, rng, max_shift=1, wedge=60):
    """``N`` particles: copies of random ``refs`` rotated exactly by random ``rots``, shifted by
    integer vectors of length ≤ ``max_shift``, with white noise ``sigma`` and a wedge.
    Returns ``(particles, classes, rotation indices, shifts (N, 3) x, y, z)``."""
    n = refs.shape[1]
    mask = wedge_half(n, wedge)
    cls = rng.integers(len(refs), size=N)
    ridx = rng.integers(len(rots), size=N)
    r = np.arange(-max_shift, max_shift + 1)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[(grid**2).sum(1) <= max_shift**2]
    shifts = grid[rng.integers(len(grid), size=N)]
    spectra = []
    for i in range(N):
        x = rotate_exact(refs[cls[i]], rots[ridx[i]])
        x = np.roll(x, shift=(shifts[i, 2], shifts[i, 1], shifts[i, 0]), axis=(0, 1, 2))
        x = x + rng.normal(scale=sigma, size=x.shape)
        spectra.append(np.fft.rfftn(np.fft.ifftshift(x), norm="ortho") * mask)
    p = Particles(
        spectra=np.array(spectra, dtype=np.complex64), masks=mask[None].copy(),
        groups=np.zeros(N, np.int32), region_labels=("wedge",), voxel_size_angstrom=10.0,
        names=tuple(f"p{i}" for i in range(N)), indices=np.arange(N), n_total=N,
    )
    return p, cls, ridx, shifts
