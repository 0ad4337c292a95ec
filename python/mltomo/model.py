"""Small dataclasses for the state that flows through a refinement.

Data flows one way: files -> :class:`Particles` -> E-step (C++) -> :class:`Sums` and
:class:`ParticleScores` -> allreduce -> M-step -> :class:`Model` -> files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(frozen=True)
class Particles:
    """The particles one process holds (a contiguous block of the table)."""

    spectra: np.ndarray  # (N_local, n, n, n//2+1) complex64 unitary half spectra, centre at n//2
    masks: np.ndarray  # (G, n, n, n//2+1) float32 missing-region masks, 1 = observed
    groups: np.ndarray  # (N_local,) int32: mask of each particle
    region_labels: tuple  # (G,) text of each mask's region ("wedge_y:-60:60", a weight file...)
    voxel_size_angstrom: float
    names: tuple  # (N_local,) rlnImageName
    indices: np.ndarray  # (N_local,) int64 rows of the table
    n_total: int  # rows in the whole table
    table: object = None  # the particle table (pandas DataFrame, all rows) as read
    # the input file's other data blocks in file order, (name, block) pairs, with (name, None)
    # where the particle table stood: data_general, data_optics... are written back unchanged
    star_blocks: tuple = ()
    prior_angles: np.ndarray | None = None  # (N_local, 3) rot, tilt, psi in degrees
    prior_shifts_angstrom: np.ndarray | None = None  # (N_local, 3) x, y, z
    prior_classes: np.ndarray | None = None  # (N_local,) 1-based
    # RELION 5 2D tilt stacks (mltomo.io.relion5): the tomograms table the particles were read with,
    # written into each iteration's optimisation set
    tomograms_file: str | None = None

    @property
    def box(self) -> int:
        return int(self.spectra.shape[1])

    def __len__(self) -> int:
        return int(self.spectra.shape[0])


@dataclass(frozen=True)
class Config:
    """Every option of a refinement (``mltomo refine --help`` documents each one)."""

    n_classes: int = 2
    iterations: int = 25
    mode: str = "ml"  # "ml" (imputation), "ml-wa" (weighted averaging), "cc"
    scheme: str = "adaptive"  # "adaptive" (half-set FSC filter + self-fit correction) or "paper"
    angular_sampling_deg: float = 15.0
    angular_range_deg: float | None = None  # local search around the previous pose
    search: str = "global"  # "global", or "auto": local once the poses have converged (mltomo.narrowing)
    coarse_to_fine: bool = True  # a global search scores a coarse grid first (mltomo.coarse)
    coarse_window: float = 100.0  # nats: the coarse rotations kept below each particle's best
    resolution_schedule: bool = True  # adaptive scheme: score only to the classes' resolution (mltomo.resolution)
    perturb: bool = True
    no_rotate: bool = False
    no_align: bool = False
    max_shift_voxels: float | None = None  # default min(n/4, max(1, ceil(3 ξ))) of each iteration's ξ
    xi0_voxels: float = 2.0
    missing: str = "none"  # default region for particles the table gives none
    weight_threshold: float | None = None  # binarise weight volumes at this value (None: continuous weights)
    weight_layout: str = "auto"  # weight volumes: "auto", "centred", "origin" (full n³) or "half"
    tomograms: str | None = None  # RELION 5 tomograms table of a 2D-stack particle table (default: found)
    weight_kind: str = "auto"  # weight volumes: "ctf" (multiplies the reference), "ctf2" (premultiplied data), auto
    noise: str = "auto"  # "white" (σ², the paper's), "shell" (σ²(shell) per noise group: mltomo.noise), or
    # "auto": shell for continuous weights (CTF volumes, tilt stacks), white for binary missing regions
    scale_correction: bool = True  # per-group intensity scale, and a given --ref brought to the data's scale
    impute_iter: int = 1
    wa_threshold: float = 0.1
    reg0: float = 5.0
    regF: float = 0.0
    reg_steps: int = 5
    fix_sigma: float | None = None
    fix_xi: bool = False
    fix_fractions: bool = False
    max_resolution_angstrom: float | None = None
    padding: float = 2.0
    gridding: bool = True
    particle_diameter_angstrom: float | None = None
    mask: str | None = None
    sym: str = "C1"
    eps: float = 1e-5
    auto_stop: str = "auto"  # stop at convergence (mltomo.convergence): "on", "off", or "auto" (on for one class
    # refined from given references: mltomo.convergence.resolve)
    seed: int = 0
    threads: int = 0
    initial_lowpass_angstrom: float | None = None
    prune: float = 1e-8
    kernel: str = "auto"  # how the E-step scores shifts: "auto", "fft" or "pruned" (mltomo.estep)
    memory_budget_bytes: int = 1 << 30  # the E-step's chunk of particles (translation maps, copies)
    # the particles' spectra are held in memory up to this many bytes, else in a memory-mapped
    # cache in cache_dir (None: the system's temporary directory): mltomo.spectra_cache
    spectra_budget_bytes: float | None = None
    cache_dir: str | None = None
    rotations: object = None  # optional explicit (R, 3, 3) rotation list (tests, experiments)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rotations"}


@dataclass(frozen=True)
class Model:
    """Parameters Θ after an iteration."""

    refs: np.ndarray  # (K, n, n, n) float32, real space
    alpha: np.ndarray  # (K,) class fractions
    sigma2: float  # noise variance per voxel
    xi2_voxels: float  # translation prior variance (original voxels²)
    iteration: int = 0
    log_likelihood: float = float("nan")
    changes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) ‖ΔA‖²/‖A‖²
    class_weights: np.ndarray | None = None  # (K,) W_k of the sums that made refs (None: α·N)
    shells: object = None  # mltomo.ssnr.ShellStats of the adaptive scheme's last M-step, or None
    noise: object = None  # mltomo.noise.NoiseModel the next E-step uses (None: white, scale 1)
    search_local: bool = False  # the next iteration searches locally (search="auto": mltomo.narrowing)
    search_noise: float = 0.0  # ... until the log-likelihood falls by more than this
    coarse_window: float = 0.0  # the next coarse-to-fine iteration's window, nats (0: the configured one)
    coarse_skip: int = 0  # iterations left that search every rotation (the coarse pass kept most of them)
    best_resolution_shell: int = 0  # the highest FSC-0.143 shell reached so far (mltomo.convergence)
    iterations_without_gain: int = 0  # iterations since the resolution last improved on it

    def weights(self, n_particles: int) -> np.ndarray:
        """``(K,)`` W_k, the summed class posteriors behind the references."""
        if self.class_weights is not None:
            return np.asarray(self.class_weights, dtype=np.float64)
        return np.asarray(self.alpha, dtype=np.float64) * n_particles


@dataclass(frozen=True)
class ParticleResults:
    """Per-particle results of one iteration, for the particles a process holds (or all)."""

    indices: np.ndarray  # (N,) rows of the table
    classes: np.ndarray  # (N,) 1-based
    angles: np.ndarray  # (N, 3) rot, tilt, psi degrees
    shifts_angstrom: np.ndarray  # (N, 3) x, y, z: rlnOriginX/Y/ZAngst
    max_post: np.ndarray  # (N,)
    n_significant: np.ndarray  # (N,)
    log_likelihood: np.ndarray  # (N,) rlnLogLikeliContribution
    class_posteriors: np.ndarray | None = None  # (N, K) P(class k | X_i) of the E-step (ML), or None


@dataclass(frozen=True)
class IterationStats:
    iteration: int
    log_likelihood: float
    sigma: float
    xi_voxels: float
    alpha: tuple
    changes: tuple
    samples: int
    kept: int
    n_rotations: int
    n_shifts: int
    seconds_estep: float
    seconds_mstep: float
    seconds_total: float
    resolution_angstrom: float = float("nan")  # adaptive scheme: FSC-0.143 resolution of the classes
    search: str = "global"  # this iteration's rotational search: "global", "local" (around the last poses)
    rotations_searched: float = float("nan")  # mean rotations searched per particle
    coarse_rotations: int = 0  # coarse-to-fine: rotations of the coarse pass (0: none)
    coarse_window: float = float("nan")  # coarse-to-fine: the window used, nats
    coarse_missed: float = float("nan")  # coarse-to-fine: mean mass the audited particles' windows missed, nats
    coarse_needed: float = float("nan")  # coarse-to-fine: the widest window an audited particle needed, nats
    score_radius: float = float("nan")  # the radius the E-step scored to (index units; mltomo.resolution)
    converged: bool = False  # the auto-stop rule held after this iteration (mltomo.convergence)

    @property
    def pruned_fraction(self) -> float:
        return 1.0 - self.kept / self.samples if self.samples else 0.0


@dataclass(frozen=True)
class RefineResult:
    model: Model
    particles: ParticleResults  # all particles (on rank 0; this rank's block elsewhere)
    history: tuple  # IterationStats per iteration run
    out_dir: str | None = None


@dataclass
class Sums:
    """Sufficient statistics of one E-step; chunks, threads and MPI ranks add them up.

    ``S``, ``M`` and ``Mfull`` live on the padded half-spectrum grid of the references (see
    :mod:`mltomo.reference`): ``S_k = Σ P R⁻¹[e^{+2πik·t} w X]``, ``M_k = Σ P R⁻¹[w]`` and
    ``Mfull_k = Σ P R⁻¹[1]``, the weight fully observed particles would leave at each grid
    point (it equals ``W_k`` when rotations land on grid points).
    """

    W: np.ndarray  # (K,) float64: Σ_i Σ_{r,t} P_i(k,r,t)
    S: np.ndarray  # (K, P, P, P//2+1) complex128
    M: np.ndarray  # (K, P, P, P//2+1) float64
    Mfull: np.ndarray  # (K, P, P, P//2+1) float64
    scalars: np.ndarray = field(default_factory=lambda: np.zeros(2))  # [Σ P d², Σ P |t|²]

    @classmethod
    def zeros(cls, K: int, P: int) -> Sums:
        shape = (K, P, P, P // 2 + 1)
        return cls(np.zeros(K), np.zeros(shape, np.complex128), np.zeros(shape), np.zeros(shape), np.zeros(2))

    @property
    def sum_pd2(self) -> float:
        return float(self.scalars[0])

    @property
    def sum_pt2(self) -> float:
        return float(self.scalars[1])

    def buffers(self):
        """The arrays an MPI ``Allreduce(SUM)`` must add, in a fixed order."""
        return [self.W, self.S, self.M, self.Mfull, self.scalars]

    def add(self, other: Sums, k: int | None = None) -> None:
        """Add ``other`` in place: all classes, or ``other``'s single class into class ``k``."""
        if k is None:
            for a, b in zip(self.buffers(), other.buffers()):
                a += b
            return
        self.W[k] += other.W[0]
        self.S[k] += other.S[0]
        self.M[k] += other.M[0]
        self.Mfull[k] += other.Mfull[0]
        self.scalars += other.scalars


@dataclass
class ParticleScores:
    """Per-particle E-step results (arrays of length N)."""

    best_class: np.ndarray  # int32, 0-based, -1 if nothing was scored
    best_rot: np.ndarray  # int32 index into the rotation list
    best_shift: np.ndarray  # int32 index into the shift list
    max_post: np.ndarray  # float64
    n_significant: np.ndarray  # int64: samples not pruned
    log_sum: np.ndarray  # float64: log Σ α_k p(t) exp(−d²/2σ²) (ML) or best CC (CC mode)
    x_norm: np.ndarray  # float64: Σ w |X|² over the working set
    n_observed: np.ndarray  # float64: J_i^o
    class_log_sum: np.ndarray | None = None  # (N, K) float64: log Σ_{r,t} p(t) exp(−d²/2σ²) per class (ML)
    rot_log_mass: np.ndarray | None = None  # (N, R) float64 log posterior mass per rotation (estep(rot_mass=True))

    def put(self, idx: np.ndarray, other: ParticleScores) -> None:
        """Write ``other``'s scores (of the particles ``idx``, in that order) into this set."""
        for f in fields(self):
            if f.name == "rot_log_mass":
                continue
            if f.name == "class_log_sum":
                if other.class_log_sum is None:
                    continue
                if self.class_log_sum is None:
                    self.class_log_sum = np.full((len(self.log_sum), other.class_log_sum.shape[1]), -np.inf)
            getattr(self, f.name)[idx] = getattr(other, f.name)

    @classmethod
    def empty(cls, N: int, K: int | None = None) -> ParticleScores:
        """Scores of ``N`` particles before any is scored (with ``K``, room for the per-class sums)."""
        return cls(
            np.full(N, -1, np.int32),
            np.full(N, -1, np.int32),
            np.full(N, -1, np.int32),
            np.zeros(N),
            np.zeros(N, np.int64),
            np.zeros(N),
            np.zeros(N),
            np.zeros(N),
            None if K is None else np.full((N, K), -np.inf),
        )
