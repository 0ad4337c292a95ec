"""What an iteration searches: the working box and set, the shifts, the rotation grids.

:class:`Sampling` holds the quantities fixed for a whole run (boxes, working set, shifts and
their prior); :func:`rotation_grid` and :func:`search_space` give an iteration's rotations:
the global grid (perturbed by a rotation seeded by ``(seed, iteration)``, reduced to the
symmetry's asymmetric unit), a per-particle local subset around the previous pose, or the
fixed poses of ``--no-rotate``/``--no-align``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from mltomo import geometry
from mltomo.fourier import freq_half, working_box, working_radius
from mltomo.model import Config
from mltomo.reference import crop_padded, padded_size


@dataclass(frozen=True, eq=False)
class Sampling:
    """Derived, fixed quantities of a run: boxes, working set, shifts.

    Shifts are integer vectors of the working box with every component within ±max_shift
    (a cube, like the simulator's and the paper's uniform shifts), weighted by the Gaussian
    prior N(0, ξ²I); the zero shift comes first. Build one with :meth:`create`.
    """

    n: int  # particle box (voxels)
    voxel_size: float  # Å
    radius: float  # working radius (frequency index units of the n box)
    n_w: int  # working (Fourier-cropped) box
    pad: float  # padding factor of the reference transforms
    P: int  # padded n box
    P_w: int  # padded working box
    scale: float  # original voxels per working voxel
    J: float  # full-spectrum size of the working set
    ws_index: np.ndarray  # (J_half,) flat indices of the working set in the half spectrum
    ws_hweight: np.ndarray  # (J_half,) float64 full-spectrum multiplicity
    max_shift_w: int  # largest shift component, working voxels
    shifts: np.ndarray  # (T, 3) int32 x, y, z working voxels, zero shift first

    @classmethod
    def create(cls, n: int, voxel_size: float, config: Config) -> Sampling:
        from mltomo import _core

        radius = float(working_radius(n, voxel_size, config.max_resolution_angstrom))
        n_w = int(working_box(n, radius))
        pad = float(config.padding)
        scale = n / n_w
        ws = _core.working_set(n_w, radius)
        unshifted = cls(
            n=n, voxel_size=voxel_size, radius=radius, n_w=n_w, pad=pad, P=padded_size(n, pad),
            P_w=padded_size(n_w, pad), scale=scale, J=float(ws["hweight"].sum()), ws_index=ws["index"],
            ws_hweight=ws["hweight"].astype(np.float64), max_shift_w=0, shifts=_shift_cube(0),
        )
        return unshifted.for_xi(config, config.xi0_voxels**2)

    def for_xi(self, config: Config, xi2_voxels: float) -> Sampling:
        """This sampling with the shift range an iteration whose prior width is ``ξ`` searches
        (:func:`_max_shift_w`; none with ``--no-align``), so the range follows ξ as the M-step
        re-estimates it. Everything else is unchanged."""
        m = 0 if config.no_align else _max_shift_w(config, self.n, self.n_w, xi2_voxels)
        return self if m == self.max_shift_w else replace(self, max_shift_w=m, shifts=_shift_cube(m))

    @property
    def t2(self) -> np.ndarray:
        """``(T,)`` float64 |t|² of the shifts, working voxels²."""
        return (self.shifts.astype(np.float64) ** 2).sum(1)

    def log_prior_shift(self, xi2_voxels: float) -> np.ndarray:
        """``(T,)`` log of the normalised Gaussian prior of the shifts (ξ² in original voxels²)."""
        xi2_w = max(xi2_voxels / self.scale**2, 1e-6)
        lp = -self.t2 / (2.0 * xi2_w)
        return lp - (lp.max() + np.log(np.exp(lp - lp.max()).sum()))

    def working_sum(self, half: np.ndarray) -> float:
        """Full-spectrum sum over the working set of a (n_w, n_w, n_w//2+1) real array."""
        return float(np.dot(self.ws_hweight, half.ravel()[self.ws_index]))

    def working_weights(self) -> np.ndarray:
        """``(n_w, n_w, n_w//2+1)`` full-spectrum multiplicity inside the working set, 0 outside."""
        hw = np.zeros(self.n_w * self.n_w * (self.n_w // 2 + 1))
        hw[self.ws_index] = self.ws_hweight
        return hw.reshape(self.n_w, self.n_w, self.n_w // 2 + 1)

    def crop(self, half: np.ndarray) -> np.ndarray:
        """Fourier-crop half spectra (..., n, n, n//2+1) to the working box (values unchanged)."""
        return np.ascontiguousarray(crop_padded(half, self.n_w))

    def apply_shifts(self, spectra_w: np.ndarray, shifts_voxels: np.ndarray) -> np.ndarray:
        """Undo known shifts t (original voxels): X ← e^{+2πik·t} X, on the working box."""
        n_w = self.n_w
        kz, ky, kx = freq_half(n_w)
        out = np.empty_like(spectra_w)
        for i, t in enumerate(np.asarray(shifts_voxels) / self.scale):
            ph = np.exp(2j * np.pi * (kx * t[0] + ky * t[1] + kz * t[2]) / n_w)
            out[i] = spectra_w[i] * ph
        return out


def _max_shift_w(config: Config, n: int, n_w: int, xi2_voxels: float) -> int:
    """The largest shift component searched, in working voxels (whole steps of ``n/n_w``, below
    ``n_w/2``): ``--max-shift`` when given, else ``min(n/4, ⌈3ξ⌉)`` voxels for the current prior
    width ``ξ`` (``ξ0`` at the start) and at least one step: with none, ξ would be estimated as 0
    and the search could never widen again."""
    if config.max_shift_voxels is not None:
        m = int(math.floor(config.max_shift_voxels * n_w / n + 1e-9))
    else:
        xi = math.sqrt(max(float(xi2_voxels), 0.0))
        m = max(1, int(math.floor(min(n / 4.0, math.ceil(3.0 * xi - 1e-9)) * n_w / n + 1e-9)))
    return min(m, n_w // 2 - 1)


def _shift_cube(m: int) -> np.ndarray:
    """``(T, 3)`` int32 x, y, z: every vector with components within ±m, by |t|², zero first."""
    r = np.arange(-m, m + 1)
    tz, ty, tx = np.meshgrid(r, r, r, indexing="ij")
    t = np.stack([tx.ravel(), ty.ravel(), tz.ravel()], 1)
    order = np.lexsort((t[:, 0], t[:, 1], t[:, 2], (t**2).sum(1)))
    return np.ascontiguousarray(t[order], dtype=np.int32)


def same_rotations_every_iteration(config: Config) -> bool:
    """Whether every iteration searches the rotations of the last (fixed poses, an explicit
    list, or an unperturbed grid): then a particle is scored at the poses its noise was added
    to the references with, and fits that noise (:mod:`mltomo.ssnr`)."""
    return bool(config.no_rotate or config.no_align or config.rotations is not None or not config.perturb)


def rotation_grid(config: Config, iteration: int, group: np.ndarray) -> np.ndarray:
    """``(R, 3, 3)`` the global grid of an iteration: ``config.rotations`` if given, else the
    SO(3) grid, perturbed (seeded by ``(seed, iteration)``), in the asymmetric unit of ``group``."""
    if config.rotations is not None:
        return np.ascontiguousarray(config.rotations, dtype=np.float64)
    grid = geometry.so3_grid(config.angular_sampling_deg)
    if config.perturb:
        rng = np.random.default_rng([config.seed, iteration, 1])
        grid = geometry.perturb(grid, config.angular_sampling_deg, rng)
    if len(group) > 1:
        grid = grid[geometry.asymmetric_unit(grid, group)]
    return np.ascontiguousarray(grid, dtype=np.float64)


def _prior_poses(particles, prev):
    """Previous rotations ``(N, 3, 3)`` and shifts ``(N, 3)`` (original voxels), or None: the last
    iteration's results, else the table's prior angles and shifts."""
    if prev is not None:
        return geometry.euler_to_matrix(*prev.angles.T), prev.shifts_angstrom / particles.voxel_size_angstrom
    if particles.prior_angles is None:
        return None, None
    prior_t = None
    if particles.prior_shifts_angstrom is not None:
        prior_t = particles.prior_shifts_angstrom / particles.voxel_size_angstrom
    return geometry.euler_to_matrix(*particles.prior_angles.T), prior_t


def _local_mask(rotations, prior_R, group, range_deg) -> np.ndarray:
    """``(N, R)`` uint8: the rotations within ``range_deg`` of each particle's previous pose
    (at least the nearest one)."""
    mask = np.zeros((len(prior_R), len(rotations)), np.uint8)
    for i in range(len(prior_R)):
        d = geometry.symmetry_min_distance_deg(rotations, prior_R[i], group) if len(group) > 1 else \
            geometry.geodesic_distance_deg(rotations, prior_R[i])
        sel = d <= range_deg
        if not sel.any():
            sel[np.argmin(d)] = True
        mask[i] = sel
    return mask


def search_space(config: Config, it: int, group: np.ndarray, particles, prev):
    """An iteration's ``(rotations (R, 3, 3), rot_mask (N, R) uint8 or None, known shifts
    (N, 3) original voxels to undo or None)`` for this process's particles; ``prev`` is the
    previous iteration's :class:`~mltomo.model.ParticleResults` (or None)."""
    N = len(particles)
    prior_R, prior_t = _prior_poses(particles, prev)
    if config.no_rotate or config.no_align:
        if prior_R is None:
            prior_R = np.broadcast_to(np.eye(3), (N, 3, 3))
        if N == 0:
            return np.eye(3)[None].copy(), None, None
        rotations = np.ascontiguousarray(prior_R, dtype=np.float64)
        mask = np.ascontiguousarray(np.eye(N, dtype=np.uint8))
        pre = None
        if config.no_align:
            pre = prior_t if prior_t is not None else np.zeros((N, 3))
        return rotations, mask, pre
    rotations = rotation_grid(config, it, group)
    if config.angular_range_deg is None:
        return rotations, None, None
    if prior_R is None:
        if it == 1:
            return rotations, None, None  # a first global pass gives the poses to search around
        raise ValueError("local search needs prior angles")
    return rotations, _local_mask(rotations, prior_R, group, config.angular_range_deg), None
