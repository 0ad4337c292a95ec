"""Simulated subtomograms with known truth, as in Scheres et al. (2009).

The paper's test data: 200 subtomograms of GroEL14 or GroEL14-GroES7 (equal probability),
2.5 nm resolution maps, rotated and shifted (uniform integer shifts in ±3 voxels), white
Gaussian noise at a given SNR, a missing wedge of a ±60° tilt series applied in Fourier space,
and optionally preferred orientations (second Euler angle never in 60–120° or 40–140°).

Phantoms are point clouds ``(coords (M, 3) Å as (x, y, z), weights (M,))``: atoms of a PDB
model (:func:`~mltomo.io.structure.read_structure`, PDB or mmCIF via gemmi; :func:`groel_models`)
or the file-free :func:`builtin_phantoms` (both in :mod:`mltomo.phantoms`).

Rendering (:func:`render_points`)
    Every point is a 3-D Gaussian of standard deviation ``σ = 0.225 · resolution`` (the rule of
    UCSF Chimera's ``molmap``: ``σ = resolution · 0.225``, i.e. the Gaussian's 1/e² radius is
    about 0.64 · resolution), integral = its weight. The map is that sum sampled at the voxel
    centres: voxel ``[z, y, x]`` of an ``n³`` box sits at ``((x, y, z) - n//2) · voxel_size``
    Å, so the coordinate origin is voxel ``(n//2, n//2, n//2)``. Values are weight per voxel
    (the map sums to the total weight when the object is inside the box).

Poses (the conventions of :mod:`mltomo.geometry`)
    A particle with Euler angles ``(rot, tilt, psi)`` (``R = euler_to_matrix``) and shift
    ``t`` voxels (x, y, z) is ``x_i(r) = a(Rᵀ(r − t))``: it is rendered from the rotated
    **coordinates** ``R·(c − centre) + t·voxel_size`` -- no volume is interpolated, so poses
    are exact. ``centre`` is the model's centre of mass (weights), so the unshifted particle's
    centre of mass is the box centre, and a feature at ``p`` (relative to that centre) appears
    at ``R p + t``.

Noise and missing region (:func:`simulate`)
    ``σ² = mean_i var(s_i) / SNR``, where ``s_i`` is the noise-free particle ``i`` (rotated,
    shifted, before any missing region) and ``var`` its variance over all ``n³`` voxels: one
    ``σ`` for the whole data set. The observed particle is
    ``X_i = w ⊙ (FT(s_i) + FT(g_i))`` with ``g_i`` white Gaussian noise of variance ``σ²``
    per voxel, ``w`` the 0/1 mask of the missing region (:func:`mltomo.fourier.
    missing_region_mask`) and ``FT`` the unitary transform (:func:`mltomo.fourier.
    rfft_unitary`); the unobserved components are exactly zero.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mltomo.io.structure import read_structure
from mltomo.phantoms import (
    PointCloud,
    builtin_phantoms,
    default_data_dir,
    groel_models,
    groel_symmetry_groups,
)

__all__ = [
    "MOLMAP_SIGMA_FACTOR",
    "PREFERRED_TILT_BANDS",
    "PointCloud",
    "SimulatedData",
    "builtin_phantoms",
    "default_data_dir",
    "groel_models",
    "groel_symmetry_groups",
    "read_structure",
    "render_points",
    "render_points_exact",
    "simulate",
    "write_dataset",
]

log = logging.getLogger(__name__)

MOLMAP_SIGMA_FACTOR = 0.225  # Chimera molmap: sigma = 0.225 * resolution

# Tilt (second Euler angle) bands the paper left out: particles never have tilt inside them.
PREFERRED_TILT_BANDS = {"moderate": (60.0, 120.0), "severe": (40.0, 140.0)}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _check_points(coords, weights):
    c = np.asarray(coords, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"coords must have shape (M, 3), got {c.shape}")
    if w.shape != (c.shape[0],):
        raise ValueError(f"weights must have shape ({c.shape[0]},), got {w.shape}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(w))):
        raise ValueError("coords and weights must be finite")
    return c, w


def _check_grid(n, voxel_size, resolution_A):
    if int(n) != n or n < 2:
        raise ValueError(f"box size must be an integer >= 2, got {n}")
    if not (voxel_size > 0 and math.isfinite(voxel_size)):
        raise ValueError(f"voxel size must be positive, got {voxel_size}")
    if not (resolution_A > 0 and math.isfinite(resolution_A)):
        raise ValueError(f"resolution must be positive, got {resolution_A}")
    return int(n), float(voxel_size), MOLMAP_SIGMA_FACTOR * float(resolution_A)


def render_points_exact(coords_A, weights, n: int, voxel_size: float, resolution_A: float) -> np.ndarray:
    """The definition of :func:`render_points`, summed atom by atom (slow: tests only)."""
    n, voxel, sigma = _check_grid(n, voxel_size, resolution_A)
    c, w = _check_points(coords_A, weights)
    axis = (np.arange(n) - n // 2) * voxel  # (n,) Å
    norm = voxel**3 / (2.0 * np.pi * sigma**2) ** 1.5
    out = np.zeros((n, n, n), dtype=np.float64)
    for (x, y, z), wi in zip(c, w):
        gx = np.exp(-((axis - x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((axis - y) ** 2) / (2 * sigma**2))
        gz = np.exp(-((axis - z) ** 2) / (2 * sigma**2))
        out += wi * norm * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return out.astype(np.float32)


def _oversampling(sigma_voxels: float) -> int:
    # Fine spacing h <= sigma / 1.4: then the quadratic B-spline splat's aliases, weighted by
    # the Gaussian, leave < 0.5 % relative L2 error (measured against render_points_exact).
    return max(1, math.ceil(1.4 / sigma_voxels - 1e-9))


def _fft_size(m: int) -> int:
    """Smallest integer >= m whose prime factors are 2, 3 and 5."""
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _quadratic_bspline(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First grid index ``(M,)`` and weights ``(3, M)`` of the quadratic B-spline at ``u``."""
    i = np.floor(u + 0.5).astype(np.int64)
    d = u - i  # in [-0.5, 0.5)
    w = np.stack([0.5 * (0.5 - d) ** 2, 0.75 - d * d, 0.5 * (0.5 + d) ** 2])  # (3, M)
    return i - 1, w


def render_points(coords_A, weights, n: int, voxel_size: float, resolution_A: float,
                  oversample: int | None = None) -> np.ndarray:
    """Density map ``(n, n, n)`` float32 ``[z, y, x]`` of a point cloud (see module docstring).

    ``coords_A`` ``(M, 3)`` in Å as ``(x, y, z)`` with ``(0, 0, 0)`` at voxel ``n//2``;
    ``weights`` ``(M,)``. Each point is a normalised Gaussian of ``σ = 0.225·resolution_A``.

    Method: the points are spread with quadratic B-spline weights (27 grid points each) onto a
    grid ``oversample`` times finer than the voxels (default: spacing ``≤ σ/1.4``), padded by
    ``4σ`` on every side; that grid is convolved with the Gaussian in Fourier space, dividing
    by the B-spline's transform ``sinc³`` on each axis, and the voxels are read off it. The
    result matches :func:`render_points_exact` to about 0.5 % (relative L2; more oversampling,
    less error). Points farther than the padding outside the box are dropped (each would
    contribute less than ``e⁻⁸`` of its peak). Cost: ``O(M)`` plus one FFT of the fine grid:
    about 40 ms for 54,000 atoms in a 32³ box at 8 Å and 25 Å resolution.
    """
    n, voxel, sigma = _check_grid(n, voxel_size, resolution_A)
    c, w = _check_points(coords_A, weights)
    s_vox = sigma / voxel
    f = int(oversample) if oversample else _oversampling(s_vox)
    if f < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    margin = math.ceil(4.0 * s_vox) + 1  # coarse voxels of padding on each side
    nf = _fft_size(f * (n + 2 * margin))  # fine grid points per axis
    h = voxel / f  # fine spacing, Å
    origin = f * (margin + n // 2)  # fine index of the coordinate origin
    u = c / h + origin  # (M, 3) fine-grid coordinates (x, y, z)
    ix, wx = _quadratic_bspline(u[:, 0])
    iy, wy = _quadratic_bspline(u[:, 1])
    iz, wz = _quadratic_bspline(u[:, 2])
    ok = (np.minimum(np.minimum(ix, iy), iz) >= 0) & (np.maximum(np.maximum(ix, iy), iz) + 3 <= nf)
    ix, iy, iz, wx, wy, wz, wi = ix[ok], iy[ok], iz[ok], wx[:, ok], wy[:, ok], wz[:, ok], w[ok]
    d = np.arange(3)
    offsets = ((d[:, None, None] * nf + d[None, :, None]) * nf + d[None, None, :]).reshape(27, 1)  # (dz, dy, dx)
    idx = offsets + ((iz * nf + iy) * nf + ix)[None, :]  # (27, M); atoms innermost is fastest
    val = ((wz * wi)[:, None, None, :] * wy[None, :, None, :] * wx[None, None, :, :]).reshape(27, -1)  # (27, M)
    grid = np.bincount(idx.ravel(), weights=val.ravel(), minlength=nf**3).reshape(nf, nf, nf)
    sf = sigma / h
    k = np.fft.fftfreq(nf)  # cycles per fine spacing
    kh = np.fft.rfftfreq(nf)
    g = np.exp(-2.0 * np.pi**2 * sf**2 * k**2) / np.sinc(k) ** 3  # (nf,)
    gh = np.exp(-2.0 * np.pi**2 * sf**2 * kh**2) / np.sinc(kh) ** 3  # (nf//2+1,)
    F = np.fft.rfftn(grid)
    F *= g[:, None, None]
    F *= g[None, :, None]
    F *= gh[None, None, :]
    fine = np.fft.irfftn(F, s=grid.shape, axes=(0, 1, 2))
    a = origin - f * (n // 2)  # fine index of voxel 0
    out = fine[a : a + f * n : f, a : a + f * n : f, a : a + f * n : f]
    return (out * f**3).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulatedData:
    """A simulated data set and its truth (see :func:`simulate`).

    ``volumes`` ``(N, n, n, n)`` float32 observed particles; ``classes`` ``(N,)`` 1-based;
    ``angles`` ``(N, 3)`` ``(rot, tilt, psi)`` degrees; ``shifts_voxels`` ``(N, 3)`` ``(x, y, z)``
    integers; ``voxel_size`` in Å; ``missing_region`` its text form; ``noise_sigma`` the noise
    standard deviation per voxel; ``references`` ``(K, n, n, n)`` the noise-free, unrotated,
    unshifted maps (centred on each model's centre of mass, as the particles are).
    """

    volumes: np.ndarray
    classes: np.ndarray
    angles: np.ndarray
    shifts_voxels: np.ndarray
    voxel_size: float
    missing_region: str
    noise_sigma: float
    references: np.ndarray
    snr: float = math.inf
    resolution_angstrom: float = 0.0
    signal_variance: float = 0.0
    preferred_orientation: str | None = None
    seed: int = 0
    info: dict = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        return int(self.volumes.shape[0])

    @property
    def box(self) -> int:
        return int(self.volumes.shape[-1])

    @property
    def rotations(self) -> np.ndarray:
        """``(N, 3, 3)`` rotation matrices of the particles (``euler_to_matrix(angles)``)."""
        from mltomo.geometry import euler_to_matrix

        return euler_to_matrix(self.angles[:, 0], self.angles[:, 1], self.angles[:, 2])


def _as_models(models) -> list[PointCloud]:
    if isinstance(models, PointCloud) or (
        isinstance(models, tuple) and len(models) == 2 and np.asarray(models[0]).ndim == 2
    ):
        models = [models]
    out = []
    for m in models:
        c, w = _check_points(*m)
        if c.shape[0] == 0:
            raise ValueError("a model has no points")
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError("model weights must be >= 0 with a positive sum")
        out.append(PointCloud(c, w))
    if not out:
        raise ValueError("need at least one model")
    return out


def _rotate(coords: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``(R @ c.T).T`` for ``(M, 3)`` points, written out: a BLAS call on a 3x3 matrix costs
    more (thread start-up) than the arithmetic."""
    return coords[:, 0:1] * R[:, 0] + coords[:, 1:2] * R[:, 1] + coords[:, 2:3] * R[:, 2]


def sample_rotations(n: int, rng, preferred_orientation: str | None = None) -> np.ndarray:
    """``(n, 3, 3)`` rotations, uniform on SO(3), with tilt (the second Euler angle) outside the
    band of ``preferred_orientation`` (``None``/``"none"``, ``"moderate"`` 60–120°, ``"severe"``
    40–140°, after the paper) by rejection."""
    from mltomo.geometry import random_rotations

    band = None
    if preferred_orientation not in (None, "none"):
        if preferred_orientation not in PREFERRED_TILT_BANDS:
            raise ValueError(
                f"preferred orientation must be none, moderate or severe, got {preferred_orientation!r}"
            )
        band = PREFERRED_TILT_BANDS[preferred_orientation]
    kept = []
    have = 0
    while have < n:
        R = random_rotations(max(2 * (n - have), 16), rng)  # (m, 3, 3)
        if band is not None:
            tilt = np.degrees(np.arccos(np.clip(R[:, 2, 2], -1.0, 1.0)))  # RELION: A[2,2] = cos(tilt)
            R = R[(tilt <= band[0]) | (tilt >= band[1])]
        kept.append(R)
        have += R.shape[0]
    return np.concatenate(kept)[:n]


def _class_probabilities(class_probabilities, K: int) -> np.ndarray:
    """``(K,)`` normalised class probabilities (default equal)."""
    if class_probabilities is None:
        return np.full(K, 1.0 / K)
    p = np.asarray(class_probabilities, dtype=np.float64)
    if p.shape != (K,) or np.any(p < 0) or not p.sum() > 0:
        raise ValueError(f"class probabilities must be {K} non-negative numbers, got {class_probabilities}")
    return p / p.sum()


def _observe(signal: np.ndarray, sigma: float, mask, noise_rng) -> np.ndarray:
    """The observed particles: ``w ⊙ (FT(s) + FT(g))``, filled into ``signal`` in place,
    particle by particle (noise drawn in particle order)."""
    from mltomo.fourier import irfft_unitary, rfft_unitary

    n = signal.shape[1]
    for i in range(len(signal)):
        x = signal[i]
        if sigma > 0:
            x = x + (sigma * noise_rng.standard_normal((n, n, n))).astype(np.float32)
        if mask is not None:
            x = irfft_unitary(rfft_unitary(x) * mask, n)
        signal[i] = x
    return signal


def simulate(models, n_particles: int, box: int, voxel_size: float, resolution: float, snr: float,
             missing_region="wedge_y:-60:60", max_shift_voxels: int = 3,
             preferred_orientation: str | None = None, class_probabilities=None, seed: int = 0,
             centre_models: bool = True) -> SimulatedData:
    """Simulate subtomograms of ``models`` (a list of point clouds, one per class).

    Each particle: class ``k`` drawn with ``class_probabilities`` (default equal); rotation
    uniform on SO(3) (rejecting tilts in the band of ``preferred_orientation``); shift ``t``
    integers uniform in ``[-max_shift_voxels, max_shift_voxels]`` per axis; noise-free particle
    ``s = render(R·(c − centre) + t·voxel_size)`` (:func:`render_points` at ``resolution`` Å,
    ``centre`` = the model's centre of mass, or the origin with ``centre_models=False``);
    observed particle ``w ⊙ (FT(s) + FT(g))`` with white noise ``g`` of
    ``σ² = mean_i var(s_i) / snr`` (``snr = inf``: no noise). See the module docstring.

    Reproducible: poses come from one stream and noise from another, both derived from
    ``seed``, so runs differing only in ``snr`` have identical poses and classes.
    """
    from mltomo.fourier import missing_region_mask, parse_missing_region
    from mltomo.geometry import euler_to_matrix, matrix_to_euler

    models = _as_models(models)
    K = len(models)
    N = int(n_particles)
    if N != n_particles or N < 1:
        raise ValueError(f"number of particles must be a positive integer, got {n_particles}")
    n, voxel, _ = _check_grid(box, voxel_size, resolution)
    snr = float(snr)
    if not snr > 0:
        raise ValueError(f"SNR must be positive (inf for no noise), got {snr}")
    m = int(max_shift_voxels)
    if m != max_shift_voxels or m < 0:
        raise ValueError(f"max shift must be an integer >= 0 voxels, got {max_shift_voxels}")
    region = parse_missing_region(missing_region)
    p = _class_probabilities(class_probabilities, K)
    if preferred_orientation == "none":
        preferred_orientation = None

    pose_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    classes = pose_rng.choice(K, size=N, p=p) + 1  # (N,) 1-based
    R = sample_rotations(N, pose_rng, preferred_orientation)  # (N, 3, 3)
    rot, tilt, psi = matrix_to_euler(R)
    angles = np.stack([rot, tilt, psi], axis=1)  # (N, 3)
    R = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])  # exactly what the angles say
    shifts = pose_rng.integers(-m, m + 1, size=(N, 3)).astype(np.int64)  # (N, 3) x, y, z

    centred = []
    for c, w in models:
        centre = np.average(c, axis=0, weights=w) if centre_models else np.zeros(3)
        centred.append(PointCloud(c - centre, w))
    references = np.stack([render_points(c, w, n, voxel, resolution) for c, w in centred])  # (K, n, n, n)
    signal = np.empty((N, n, n, n), dtype=np.float32)
    for i in range(N):
        c, w = centred[classes[i] - 1]
        signal[i] = render_points(_rotate(c, R[i]) + shifts[i] * voxel, w, n, voxel, resolution)
    # The maps sum to the models' weight when nothing sticks out of the box.
    totals = np.array([centred[k - 1].weights.sum() for k in classes])  # (N,)
    outside = 1.0 - signal.reshape(N, -1).sum(axis=1, dtype=np.float64) / totals  # (N,)
    if outside.max() > 0.01:
        log.warning("up to %.1f%% of a particle's mass lies outside the %d³ box (%d of %d particles "
                    "lose more than 1%%): use a larger box or voxel size",
                    100 * outside.max(), n, int(np.sum(outside > 0.01)), N)
    signal_variance = float(np.mean(signal.reshape(N, -1).var(axis=1, dtype=np.float64)))
    sigma = math.sqrt(signal_variance / snr) if math.isfinite(snr) else 0.0

    mask = None if region.kind == "none" else missing_region_mask(region, n)  # (n, n, n//2+1)
    volumes = _observe(signal, sigma, mask, noise_rng)
    return SimulatedData(
        volumes=volumes,
        classes=classes.astype(np.int64),
        angles=angles,
        shifts_voxels=shifts,
        voxel_size=voxel,
        missing_region=str(region),
        noise_sigma=sigma,
        references=references,
        snr=snr,
        resolution_angstrom=float(resolution),
        signal_variance=signal_variance,
        preferred_orientation=preferred_orientation,
        seed=int(seed),
        info={"max_mass_outside_box": float(max(outside.max(), 0.0)),
              "mean_mass_outside_box": float(max(outside.mean(), 0.0))},
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

PARTICLES_STAR = "particles.star"
TRUTH_STAR = "truth.star"
TOMO_NAME = "tomo1"


def _particle_names(N: int, stack: bool) -> list[str]:
    if stack:
        return [f"{i + 1}@particles/particles.mrcs" for i in range(N)]
    width = max(5, len(str(N)))
    return [f"particles/particle_{i + 1:0{width}d}.mrc" for i in range(N)]


def _remove_previous(out: Path) -> None:
    """Remove what an earlier write_dataset left in ``out`` (only files it writes)."""
    for pattern in ("particles/particle_*.mrc", "particles/particles.mrcs", "references/class_*.mrc",
                    PARTICLES_STAR, TRUTH_STAR):
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()


def _truth_tables(sim: SimulatedData, names: list[str]):
    """``(data_simulation parameters, data_particles truth table)`` of ``truth.star``."""
    import pandas as pd

    voxel = float(sim.voxel_size)
    shifts_A = np.asarray(sim.shifts_voxels, dtype=np.float64) * voxel  # (N, 3)
    truth = pd.DataFrame({
        "rlnImageName": names,
        "rlnClassNumber": np.asarray(sim.classes, dtype=np.int64),
        "rlnAngleRot": sim.angles[:, 0],
        "rlnAngleTilt": sim.angles[:, 1],
        "rlnAnglePsi": sim.angles[:, 2],
        "rlnOriginXAngst": shifts_A[:, 0],
        "rlnOriginYAngst": shifts_A[:, 1],
        "rlnOriginZAngst": shifts_A[:, 2],
    })
    params = {
        "rlnImagePixelSize": voxel,
        "rlnImageSize": sim.box,
        "rlnNrClasses": int(sim.references.shape[0]),
        "mltomoSnr": repr(float(sim.snr)),
        "mltomoNoiseSigma": repr(float(sim.noise_sigma)),
        "mltomoSignalVariance": repr(float(sim.signal_variance)),
        "mltomoResolutionAngst": float(sim.resolution_angstrom),
        "mltomoMissingRegion": sim.missing_region,
        "mltomoPreferredOrientation": sim.preferred_orientation or "none",
        "mltomoSeed": int(sim.seed),
    }
    return params, truth


def write_dataset(sim: SimulatedData, out_dir, overwrite: bool = False, stack: bool = False) -> dict:
    """Write a simulated data set for ``mltomo refine`` and its truth for scoring.

    Layout of ``out_dir`` (created; refused if it exists and is not empty, unless
    ``overwrite=True``, which first removes the files an earlier call wrote there)::

        particles/particle_00001.mrc ...   one MRC per particle (float32, voxel size set)
          or particles/particles.mrcs      with stack=True: one MRC volume stack, i@...
        references/class_1.mrc ...         noise-free unrotated maps, one per class
        particles.star                     data_optics: rlnOpticsGroup, rlnOpticsGroupName,
                                             rlnImagePixelSize, rlnImageSize,
                                             rlnImageDimensionality (3)
                                           data_particles: rlnImageName (relative to out_dir),
                                             rlnTomoName (tomo1), rlnOpticsGroup,
                                             mltomoMissingRegion (text of the missing region)
        truth.star                         data_simulation: the parameters (SNR, noise sigma,
                                             resolution, seed, ...)
                                           data_particles: rlnImageName, rlnClassNumber,
                                             rlnAngleRot/Tilt/Psi, rlnOriginX/Y/ZAngst
                                             (= shift in voxels × voxel size, mltomo's sign)

    ``particles.star`` is written last, so a data set without it is incomplete. Returns the
    paths written: ``{"particles": ..., "truth": ..., "references": [...]}``.
    """
    import pandas as pd

    from mltomo.io.mrc import write_stack, write_volume
    from mltomo.io.star import write_star

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: directory is not empty (use overwrite to replace a data set)")
        _remove_previous(out)
    (out / "particles").mkdir(parents=True, exist_ok=True)
    (out / "references").mkdir(parents=True, exist_ok=True)

    N, n, voxel = sim.n_particles, sim.box, float(sim.voxel_size)
    refs = []
    for k, ref in enumerate(sim.references):
        path = out / "references" / f"class_{k + 1}.mrc"
        write_volume(path, ref, voxel)
        refs.append(path)
    names = _particle_names(N, stack)
    if stack:
        write_stack(out / "particles" / "particles.mrcs", sim.volumes, voxel)
    else:
        for name, vol in zip(names, sim.volumes):
            write_volume(out / name, vol, voxel)

    params, truth = _truth_tables(sim, names)
    truth_path = out / TRUTH_STAR
    write_star(truth_path, {"simulation": params, "particles": truth})

    optics = pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnImagePixelSize": [voxel],
        "rlnImageSize": [n],
        "rlnImageDimensionality": [3],
    })
    particles = pd.DataFrame({
        "rlnImageName": names,
        "rlnTomoName": [TOMO_NAME] * N,
        "rlnOpticsGroup": np.ones(N, dtype=np.int64),
        "mltomoMissingRegion": [sim.missing_region] * N,
    })
    particles_path = out / PARTICLES_STAR
    write_star(particles_path, {"optics": optics, "particles": particles})
    return {"particles": particles_path, "truth": truth_path, "references": refs}
