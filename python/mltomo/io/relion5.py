"""RELION 5 / WarpTools tilt-stack particles as pseudo-subtomograms (RELION 4/5's construction).

Input
-----
An *optimisation set* (a ``data_`` block with ``rlnTomoParticlesFile`` and
``rlnTomoTomogramsFile``, RELION 5's entry point), or a particle table whose ``data_general``
says ``rlnTomoSubTomosAre2DStacks 1``; its tomograms table is then the ``tomograms`` argument,
else ``<stem>_tomograms.star`` beside it, else the one ``<stem>_optimisation_set.star`` names.

* Particle table: ``rlnImageName`` (one ``.mrcs`` of 2D tilt images per particle),
  ``rlnTomoName``, ``rlnTomoVisibleFrames`` (``[1,0,1,...]``, one flag per tilt),
  ``rlnOpticsGroup``; optional ``rlnTomoSubtomogramRot/Tilt/Psi``, ``rlnAngleRot/Tilt/Psi``,
  ``rlnOriginX/Y/ZAngst``, ``rlnCenteredCoordinateX/Y/ZAngst``, ``rlnClassNumber``.
  ``data_optics``: ``rlnImagePixelSize``, ``rlnVoltage``, ``rlnSphericalAberration``,
  ``rlnAmplitudeContrast``, ``rlnCtfDataAreCtfPremultiplied``.
* Tomograms table: ``data_global`` (one row per tomogram: ``rlnTomoName``, optional
  ``rlnTomoHand``, ``rlnTomoDefocusSlope``, ``rlnCtfBfactorPerElectronDose``, optics
  fallbacks) and one block per tomogram, one row per tilt: ``rlnTomoProjX/Y/Z/W`` (RELION 4's
  rows of the 4×4 projection matrix; or RELION 5's ``rlnTomoXTilt/YTilt/ZRot`` in degrees,
  ``P = Rz(ZRot) Ry(YTilt) Rx(XTilt)``), ``rlnDefocusU/V/Angle``, ``rlnCtfScalefactor``,
  ``rlnMicrographPreExposure``, optional ``rlnPhaseShift``.
* A stack holds either every tilt of its series (WarpTools; invisible tilts are blank) or only
  the visible tilts, in order (``relion_tomo_subtomo --stack2d``). Each image is the particle
  extracted at its projected position with the sub-pixel remainder already shifted out
  (RELION ``TomoExtraction::extractAt2D_Fourier``), so only ``rlnOrigin*`` remains as a shift.

Geometry (RELION 5, ``Experiment::read`` and ``ParticleSet::getMatrix3x3``)
-------------------------------------------------------------------------
RELION projects the reference into tilt ``f`` with ``A_f = P_f · A_sub · A_part`` (3×3
rotation parts; ``P_f`` the tilt's projection matrix, ``A_sub`` the Euler matrix of
``rlnTomoSubtomogramRot/Tilt/Psi`` (identity without them), ``A_part`` that of
``rlnAngleRot/Tilt/Psi``), so image ``f`` is the central slice ``y_f(k2) = A(A_fᵀ (k2, 0))``.
We build the pseudo-subtomogram in the *subtomogram frame*, as ``relion_tomo_subtomo``
does: tilt ``f``'s 2D transform fills the plane ``k = (P_f A_sub)ᵀ (kx, ky, 0)``. Then the
particle is the reference rotated by ``A_part`` alone, so ``Particles.prior_angles`` is
``rlnAngle*`` unchanged, a refinement writes its angles back with RELION 5's meaning and
``rlnTomoSubtomogram*`` passes through untouched. ``rlnOrigin*Angst`` is a shift in the
same frame (RELION projects it with ``P_f A_sub``). On the WarpTools 70S test set this
rebuilds the map shipped with it mirrored in z, the tables' hand (tests/test_relion5.py).

CTF and dose (RELION ``CTF::initialise``/``CTF::getCTF``, ``Damage::weightImage``,
``Tomogram::getCtf``)
------------------------------------------------------------------------------------------
``c_f(k) = s_f · E_f(k) · sin γ_f(k)`` (RELION's ``−sin`` of its opposite-signed phase),
``γ = π λ Δf(k) |k|² − (π/2) Cs λ³ |k|⁴ + φ + atan(Q0/√(1−Q0²))``, ``k`` in 1/Å at the image
pixel size, ``Δf`` from defocus U/V/angle (RELION's astigmatic bilinear form), ``λ``
relativistic, ``φ`` the phase shift, ``s_f`` ``rlnCtfScalefactor`` and ``E_f = exp(−N_f /
(2 (0.245 |k|^−1.665 + 2.81)))`` the Grant & Grigorieff dose weight at pre-exposure ``N_f``
(``exp(−B N_f |k|²/4)`` with ``rlnCtfBfactorPerElectronDose``). With
``rlnCenteredCoordinate*Angst`` the defocus gets RELION's depth term
``hand · slope · (P_f)_z · (x − A_sub·origin)`` (not with pixel ``rlnCoordinate*``, whose unit
WarpTools and RELION 4 read differently).

What is returned (the convention the E-step relies on)
------------------------------------------------------
Per particle, on the unitary half spectrum of :mod:`mltomo.fourier` (centre ``n//2``):
``D(k) = Σ_f Pᵀ_f [c_f Y_f / √n]`` and ``W(k) = Σ_f Pᵀ_f [c_f²]`` over the visible tilts
(``Y_f`` the raw image's unitary 2D DFT: a premultiplied image is ``c_f Y_f`` and is inserted
as it is; ``1/√n`` makes the central-slice theorem hold for unitary DFTs, so ``D/W`` is the
transform of the 3D particle whose projections are the images). ``Pᵀ`` splats each 2D
component trilinearly into the 8 voxels around ``k``: the same kernel weighs ``D`` and ``W``,
so it cancels in ``X = D/W`` (a local least-squares estimate of ``A``), tilted planes leave no
holes, and it is RELION's splat (``backprojectSlice_forward``). Only 2D components with
``|k2| < n/2`` and voxels with every ``|k| < n/2`` are used: the half spectrum is exactly
Hermitian-consistent.
The particle is ``X = D/W`` where ``W > 1e-6·max W`` (0 elsewhere) and its mask is ``w = W``
itself, one per particle: then ``Σ w |X − RA|² = Σ |D − W·RA|²/W + const``, the exact
likelihood of premultiplied data with noise variance ``∝ W``. ``W`` is *not* normalised nor
thresholded here; it is in units of CTF² summed over tilts (at most the number of tilts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mltomo.particles import ParticleTableError, is_optimisation_set, is_stack_table, star_value

__all__ = ["TiltSeries", "ctf_2d", "insert_slices", "is_optimisation_set", "is_stack_table", "pseudo_subtomogram",
           "read_stack_particles", "read_tomograms", "resolve_inputs"]  # the two tests live in mltomo.particles

_PROJ_COLUMNS = ("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ")
_ANGLE_COLUMNS = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot")
_SUBTOMO_COLUMNS = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")


@dataclass(frozen=True)
class TiltSeries:
    """One tomogram's tilts (``F`` rows of its block in the tomograms table)."""

    name: str
    proj: np.ndarray  # (F, 3, 3) rotation parts of the projection matrices
    defocus_u: np.ndarray  # (F,) Å
    defocus_v: np.ndarray  # (F,) Å
    defocus_angle: np.ndarray  # (F,) degrees
    scale: np.ndarray  # (F,) rlnCtfScalefactor
    dose: np.ndarray  # (F,) pre-exposure e/Å²
    phase_shift: np.ndarray  # (F,) degrees
    hand: float = 1.0
    defocus_slope: float = 1.0
    bfactor_per_dose: float = 0.0
    optics: dict | None = None  # rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast of data_global

    @property
    def n_frames(self) -> int:
        return int(self.proj.shape[0])


# --------------------------------------------------------------------------------------------
# Which files
# --------------------------------------------------------------------------------------------


def _resolve(name, base: Path, what: str, named_in: Path) -> Path:
    """A file named in ``named_in`` (relative to its directory, else the current one)."""
    p = Path(str(name).strip()).expanduser()
    if not p.is_absolute():
        p = base / p if (base / p).exists() or not p.exists() else p
    if not p.is_file():
        raise ParticleTableError(f"{named_in}: {what} {name} not found ({p})")
    return p


def _read_blocks(path: Path) -> dict:
    from mltomo.io.star import read_star

    try:
        return read_star(path)
    except ValueError as exc:
        raise ParticleTableError(str(exc)) from exc


def _tomograms_beside(path: Path) -> Path:
    """The tomograms table of a particle table given alone: ``<stem>_tomograms.star`` beside it,
    else the one named by ``<stem>_optimisation_set.star`` beside it (``<stem>`` without a final
    ``_data``/``_particles``; a refinement writes ``run_itNNN_optimisation_set.star``)."""
    stem = re.sub(r"(_data|_particles)?\.star$", "", path.name)
    beside = path.parent / f"{stem}_tomograms.star"
    if beside.is_file():
        return beside
    opt = path.parent / f"{stem}_optimisation_set.star"
    if opt.is_file():
        named = next((star_value(b, "rlnTomoTomogramsFile") for b in _read_blocks(opt).values()
                      if star_value(b, "rlnTomoTomogramsFile") is not None), None)
        if named is not None:
            return _resolve(named, opt.parent, "tomograms file", opt)
    raise ParticleTableError(
        f"{path}: 2D tilt-stack particles need their tomograms table: pass an optimisation set or "
        f"--tomograms (neither {beside.name} nor {opt.name} is beside the table)")


def resolve_inputs(path, blocks: dict, tomograms=None) -> tuple[Path, dict, Path]:
    """``(particle table, its blocks, tomograms table)`` for an optimisation set or a 2D-stack
    particle table ``path`` (already read as ``blocks``)."""
    path = Path(path)
    if is_optimisation_set(blocks):
        block = next(b for b in blocks.values() if star_value(b, "rlnTomoParticlesFile") is not None)
        ppath = _resolve(star_value(block, "rlnTomoParticlesFile"), path.parent, "particles file", path)
        named = star_value(block, "rlnTomoTomogramsFile")
        if tomograms is None and named is None:
            raise ParticleTableError(f"{path}: optimisation set names no rlnTomoTomogramsFile")
        tpath = (Path(tomograms) if tomograms is not None
                 else _resolve(named, path.parent, "tomograms file", path))
        pblocks = _read_blocks(ppath)
    else:
        ppath, pblocks = path, blocks
        tpath = Path(tomograms) if tomograms is not None else _tomograms_beside(path)
    if not tpath.is_file():
        raise ParticleTableError(f"{tpath}: tomograms table not found")
    if "particles" not in pblocks or not hasattr(pblocks["particles"], "columns"):
        raise ParticleTableError(f"{ppath}: no data_particles loop")
    return ppath, pblocks, tpath


# --------------------------------------------------------------------------------------------
# Tomograms table
# --------------------------------------------------------------------------------------------


def _vectors(column, width: int, path, what: str) -> np.ndarray:
    """``(F, width)`` numbers from a column of ``[a,b,c,...]`` texts."""
    try:
        rows = [[float(v) for v in str(t).strip().strip("[]").split(",")] for t in column]
    except ValueError:
        raise ParticleTableError(f"{path}: {what} is not a list of numbers") from None
    if any(len(r) != width for r in rows):
        raise ParticleTableError(f"{path}: {what} must have {width} numbers per row")
    return np.asarray(rows, dtype=np.float64).reshape(-1, width)


def _projections(block, path, name: str) -> np.ndarray:
    """``(F, 3, 3)`` rotation parts of a tomogram's projection matrices."""
    from mltomo.geometry import rotation_x, rotation_y, rotation_z

    cols = set(block.columns)
    if set(_PROJ_COLUMNS) <= cols:
        rows = [_vectors(block[c], 4, path, f"{c} of data_{name}")[:, :3] for c in _PROJ_COLUMNS]
        P = np.stack(rows, axis=1)  # (F, 3, 3)
    elif set(_ANGLE_COLUMNS) <= cols or {"rlnTomoYTilt", "rlnTomoZRot"} <= cols:
        xt = block["rlnTomoXTilt"].to_numpy(np.float64) if "rlnTomoXTilt" in cols else np.zeros(len(block))
        P = (rotation_z(block["rlnTomoZRot"].to_numpy(np.float64))
             @ rotation_y(block["rlnTomoYTilt"].to_numpy(np.float64)) @ rotation_x(xt))
    else:
        raise ParticleTableError(f"{path}: data_{name} has no projection matrices (rlnTomoProjX/Y/Z/W "
                                 f"or rlnTomoXTilt/YTilt/ZRot)")
    err = np.abs(P @ np.swapaxes(P, 1, 2) - np.eye(3)).max(initial=0.0)
    if not np.all(np.isfinite(P)) or err > 1e-2:
        raise ParticleTableError(f"{path}: data_{name} projection matrices are not rotations "
                                 f"(|P Pᵀ − I| = {err:.3g})")
    return P


def _column(block, name: str, default, path, tomo: str, required: bool = False) -> np.ndarray:
    if name in block.columns:
        v = block[name].to_numpy(np.float64)
        if not np.all(np.isfinite(v)):
            raise ParticleTableError(f"{path}: {name} of data_{tomo} has non-numeric values")
        return v
    if required:
        raise ParticleTableError(f"{path}: data_{tomo} has no {name} column")
    return np.full(len(block), float(default))


def read_tomograms(path) -> dict:
    """``{rlnTomoName: TiltSeries}`` of a RELION 5 tomograms table."""
    path = Path(path)
    blocks = _read_blocks(path)
    glob = blocks.get("global")
    if glob is None or not hasattr(glob, "columns") or "rlnTomoName" not in glob.columns:
        raise ParticleTableError(f"{path}: no data_global loop with rlnTomoName (not a tomograms table)")
    out = {}
    for _, g in glob.iterrows():
        name = str(g["rlnTomoName"])
        block = blocks.get(name)
        if block is None or not hasattr(block, "columns") or len(block) == 0:
            continue  # reported when a particle needs it
        num = {k: float(g[k]) for k in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                                        "rlnTomoHand", "rlnTomoDefocusSlope", "rlnCtfBfactorPerElectronDose")
               if k in glob.columns}
        out[name] = TiltSeries(
            name=name, proj=_projections(block, path, name),
            defocus_u=_column(block, "rlnDefocusU", 0, path, name, required=True),
            defocus_v=_column(block, "rlnDefocusV", 0, path, name, required=True),
            defocus_angle=_column(block, "rlnDefocusAngle", 0, path, name),
            scale=_column(block, "rlnCtfScalefactor", 1, path, name),
            dose=_column(block, "rlnMicrographPreExposure", 0, path, name),
            phase_shift=_column(block, "rlnPhaseShift", 0, path, name),
            hand=num.get("rlnTomoHand", 1.0), defocus_slope=num.get("rlnTomoDefocusSlope", 1.0),
            bfactor_per_dose=num.get("rlnCtfBfactorPerElectronDose", 0.0), optics=num)
    return out


# --------------------------------------------------------------------------------------------
# CTF and insertion
# --------------------------------------------------------------------------------------------


def _freq_2d(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer frequencies ``(ky (n, 1), kx (1, n))`` of a full 2D FFT in numpy order."""
    k = np.fft.fftfreq(n, 1.0 / n).round().astype(np.int64)
    return k[:, None], k[None, :]


def ctf_2d(n: int, pixel_angstrom: float, ts: TiltSeries, frames, *, voltage_kv: float, cs_mm: float,
           q0: float, defocus_shift_angstrom=0.0) -> np.ndarray:
    """``(V, n, n)`` RELION's CTF × dose weight × scale of tilts ``frames`` on the full 2D FFT
    grid ``[ky, kx]`` of ``n²`` images at ``pixel_angstrom`` (see the module docstring)."""
    f = np.asarray(frames, dtype=np.int64)
    ky, kx = _freq_2d(n)
    X = kx / (n * pixel_angstrom)  # (1, n) 1/Å
    Y = ky / (n * pixel_angstrom)  # (n, 1)
    u2 = (X * X + Y * Y)[None]  # (1, n, n)
    lam = 12.2643247 / np.sqrt(voltage_kv * 1e3 * (1.0 + voltage_kv * 1e3 * 0.978466e-6))
    dz = np.broadcast_to(np.asarray(defocus_shift_angstrom, dtype=np.float64), f.shape)
    du = (ts.defocus_u[f] + dz)[:, None, None]
    dv = (ts.defocus_v[f] + dz)[:, None, None]
    az = np.deg2rad(ts.defocus_angle[f])[:, None, None]
    c, s = np.cos(az), np.sin(az)
    axx, axy, ayy = -(du * c * c + dv * s * s), -(du - dv) * c * s, -(du * s * s + dv * c * c)
    gamma = (np.pi * lam * (axx * X * X + 2.0 * axy * X * Y + ayy * Y * Y)
             + np.pi / 2 * cs_mm * 1e7 * lam ** 3 * u2 * u2
             - np.deg2rad(ts.phase_shift[f])[:, None, None] - np.arctan(q0 / np.sqrt(1.0 - q0 * q0)))
    dose = ts.dose[f][:, None, None]
    if ts.bfactor_per_dose > 0:
        E = np.exp(-ts.bfactor_per_dose * dose * u2 / 4.0)
    else:
        with np.errstate(divide="ignore"):
            crit = 0.245 * np.power(u2, -0.8325) + 2.81  # inf at the origin: weight 1
        E = np.exp(-0.5 * dose / crit)
    return (ts.scale[f][:, None, None] * E * -np.sin(gamma)).astype(np.float64)


def insert_slices(values: np.ndarray, weights: np.ndarray, mats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear insertion of 2D spectra into a 3D half spectrum.

    ``values`` ``(V, n, n)`` complex and ``weights`` ``(V, n, n)`` real on full 2D FFT grids
    ``[ky, kx]``; component ``(kx, ky)`` of slice ``v`` goes to ``k = mats[v]ᵀ (kx, ky, 0)``.
    Returns ``(D, W)``: complex128 and float64 ``(n, n, n//2+1)`` sums (module docstring).
    """
    V, n, _ = values.shape
    h = n // 2 + 1
    ky, kx = _freq_2d(n)
    keep = (kx * kx + ky * ky) < (n / 2.0) ** 2  # (n, n) strict disc: every component has its mirror
    kx_s = np.broadcast_to(kx, (n, n))[keep].astype(np.float64)
    ky_s = np.broadcast_to(ky, (n, n))[keep].astype(np.float64)
    M = np.asarray(mats, dtype=np.float64)
    pos = kx_s[None, :, None] * M[:, None, 0, :] + ky_s[None, :, None] * M[:, None, 1, :]  # (V, P, 3) x,y,z
    pos = pos.reshape(-1, 3)
    near = pos[:, 0] > -1.0  # the others only reach kx < 0, the half not stored (their mirrors are kept)
    pos = pos[near]
    val = values[:, keep].reshape(-1)[near]  # (Q,)
    wgt = weights[:, keep].reshape(-1)[near]
    base = np.floor(pos)
    frac = pos - base  # (Q, 3)
    corner = base.astype(np.int64)[:, :, None] + np.arange(2)  # (Q, 3, 2) the two neighbours per axis
    kern1 = np.stack([1.0 - frac, frac], axis=2)  # (Q, 3, 2) their 1-D kernels
    x, y, z = corner[:, 0], corner[:, 1], corner[:, 2]  # (Q, 2) each
    kern1[:, 0] *= (x >= 0) & (2 * x < n)  # outside the stored half spectrum: weight 0
    kern1[:, 1] *= 2 * np.abs(y) < n
    kern1[:, 2] *= 2 * np.abs(z) < n
    kx1 = np.where(x >= 0, np.minimum(x, h - 1), 0)
    idx = (((z % n) * n)[:, :, None, None] + (y % n)[:, None, :, None]) * h + kx1[:, None, None, :]  # (Q,2,2,2)
    kern = kern1[:, 2, :, None, None] * kern1[:, 1, None, :, None] * kern1[:, 0, None, None, :]
    idx, kern = idx.reshape(-1), kern.reshape(val.size, -1)
    size = n * n * h
    kv = (kern * val[:, None]).reshape(-1)
    D = np.bincount(idx, kv.real, size) + 1j * np.bincount(idx, kv.imag, size)
    W = np.bincount(idx, (kern * wgt[:, None]).reshape(-1), size)
    return D.reshape(n, n, h), W.reshape(n, n, h)


def pseudo_subtomogram(images: np.ndarray, mats: np.ndarray, ctf: np.ndarray, *,
                       premultiplied: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(X, W)`` of one particle from its visible tilt images.

    ``images`` ``(V, n, n)`` real ``[y, x]`` centred at ``n//2``; ``mats`` ``(V, 3, 3)`` the
    rotation ``P_f A_sub`` of each; ``ctf`` ``(V, n, n)`` its CTF on the full FFT grid
    (:func:`ctf_2d`). Returns ``X = D/W`` (complex64, 0 where ``W <= 1e-6·max W``) and ``W``
    (float32), both ``(n, n, n//2+1)`` (see the module docstring).
    """
    imgs = np.asarray(images, dtype=np.float64)
    n = imgs.shape[-1]
    Y = np.fft.fft2(np.fft.ifftshift(imgs, axes=(1, 2)), norm="ortho") / np.sqrt(n)  # (V, n, n)
    if not premultiplied:
        Y = Y * ctf
    D, W = insert_slices(Y, ctf * ctf, mats)
    good = W > 1e-6 * W.max(initial=0.0)
    X = np.zeros_like(D)
    X[good] = D[good] / W[good]
    return X.astype(np.complex64), W.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Particles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What every particle of a table needs: where it came from and the shared tables."""

    particles_path: Path
    tomograms_path: Path
    image_dir: Path
    series: dict  # {rlnTomoName: TiltSeries}
    optics: dict  # {optics group: {column: value}}
    columns: frozenset


def _optics_groups(pblocks: dict) -> dict:
    """``{rlnOpticsGroup: {column: value}}`` of ``data_optics`` (empty without one)."""
    opt = pblocks.get("optics")
    if opt is None or not hasattr(opt, "columns") or "rlnOpticsGroup" not in opt.columns:
        return {}
    return {int(r["rlnOpticsGroup"]): dict(r) for _, r in opt.iterrows()}


def _optic(ctx: _Context, row, ts: TiltSeries, key: str, name: str) -> float:
    """An optics value of the particle's group, else its tomogram's ``data_global``."""
    group = ctx.optics.get(int(row["rlnOpticsGroup"])) if "rlnOpticsGroup" in ctx.columns else None
    if group is not None and key in group:
        return float(group[key])
    if ts.optics and key in ts.optics:
        return float(ts.optics[key])
    raise ParticleTableError(f"{ctx.particles_path}: no {key} for particle {name} (data_optics or the "
                             f"tomograms table's data_global)")


def _visible(row, ts: TiltSeries, ctx: _Context, name: str) -> np.ndarray:
    """Indices of the particle's visible tilts."""
    text = str(row["rlnTomoVisibleFrames"]) if "rlnTomoVisibleFrames" in ctx.columns else None
    if text is None:
        flags = np.ones(ts.n_frames, dtype=bool)
    else:
        try:
            flags = np.array([int(float(v)) for v in text.strip().strip("[]").split(",") if v.strip()]) > 0
        except ValueError:
            raise ParticleTableError(f"{ctx.particles_path}: rlnTomoVisibleFrames of {name} is not a list "
                                     f"of 0/1 flags ({text[:40]})") from None
        if flags.size != ts.n_frames:
            raise ParticleTableError(f"{ctx.particles_path}: rlnTomoVisibleFrames of {name} has {flags.size} "
                                     f"entries, its tilt series {ts.name} has {ts.n_frames} tilts")
    if not flags.any():
        raise ParticleTableError(f"{ctx.particles_path}: particle {name} has no visible tilt")
    return np.flatnonzero(flags)


def _read_tilts(name: str, ctx: _Context, ts: TiltSeries, vis: np.ndarray) -> tuple[np.ndarray, float]:
    """``(V, n, n)`` float64 visible tilt images of a stack and its header pixel size."""
    from mltomo.io import FileFormatError
    from mltomo.io.mrc import _open, _voxel_size
    from mltomo.io.star import resolve_image_name

    path, index1 = resolve_image_name(name, ctx.image_dir)
    if index1 is not None:
        raise ParticleTableError(f"{ctx.particles_path}: {name}: a 2D tilt stack is one file per particle, "
                                 f"not i@stack")
    try:
        with _open(path) as mrc:
            data = np.asarray(mrc.data, dtype=np.float64)
            header_pixel = _voxel_size(mrc)
    except FileFormatError as exc:
        raise ParticleTableError(f"{exc} (tilt stack of {ctx.particles_path.name})") from None
    data = data[None] if data.ndim == 2 else data
    if data.ndim != 3:
        raise ParticleTableError(f"{path}: tilt stack is {data.ndim}-D, expected a stack of 2D images")
    nz, ny, nx = data.shape
    if nx != ny:
        raise ParticleTableError(f"{path}: tilt images are {nx}×{ny} pixels, they must be square")
    if nz == ts.n_frames:
        data = data[vis]  # every tilt of the series (WarpTools)
    elif nz != vis.size:
        raise ParticleTableError(f"{path}: stack has {nz} images, its tilt series {ts.name} has "
                                 f"{ts.n_frames} tilts ({vis.size} visible)")
    if not np.all(np.isfinite(data)):
        raise ParticleTableError(f"{path}: tilt images contain NaN or infinite pixels")
    return data, header_pixel


def _angles(row, columns, names) -> np.ndarray:
    """``(3, 3)`` Euler matrix of three angle columns (identity without them)."""
    from mltomo.geometry import euler_to_matrix

    if not set(names) <= columns:
        return np.eye(3)
    return euler_to_matrix(*(float(row[c]) for c in names))


def _defocus_shift(row, ctx: _Context, ts: TiltSeries, vis, A_sub) -> np.ndarray:
    """``(V,)`` RELION's depth-dependent defocus change (Å) of each visible tilt, 0 without
    ``rlnCenteredCoordinate*Angst``."""
    cols = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
    if not set(cols) <= ctx.columns:
        return np.zeros(vis.size)
    pos = np.array([float(row[c]) for c in cols])
    origin = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
    if set(origin) <= ctx.columns:
        pos = pos - A_sub @ np.array([float(row[c]) for c in origin])
    return ts.hand * ts.defocus_slope * (ts.proj[vis, 2, :] @ pos)


def particle_spectrum(row, ctx: _Context) -> tuple[np.ndarray, np.ndarray, float]:
    """``(X, W, pixel Å)`` of one table row (see :func:`pseudo_subtomogram`)."""
    name = str(row["rlnImageName"])
    tomo = str(row["rlnTomoName"])
    ts = ctx.series.get(tomo)
    if ts is None:
        raise ParticleTableError(f"{ctx.tomograms_path}: no data_{tomo} block (tilt series of particle {name})")
    vis = _visible(row, ts, ctx, name)
    images, header_pixel = _read_tilts(name, ctx, ts, vis)
    group = ctx.optics.get(int(row["rlnOpticsGroup"])) if "rlnOpticsGroup" in ctx.columns else None
    pixel = float(group["rlnImagePixelSize"]) if group and "rlnImagePixelSize" in group else header_pixel
    if not pixel > 0:
        raise ParticleTableError(f"{ctx.particles_path}: no pixel size for {name} (rlnImagePixelSize or header)")
    A_sub = _angles(row, ctx.columns, _SUBTOMO_COLUMNS)
    ctf = ctf_2d(images.shape[-1], pixel, ts, vis,
                 voltage_kv=_optic(ctx, row, ts, "rlnVoltage", name),
                 cs_mm=_optic(ctx, row, ts, "rlnSphericalAberration", name),
                 q0=_optic(ctx, row, ts, "rlnAmplitudeContrast", name),
                 defocus_shift_angstrom=_defocus_shift(row, ctx, ts, vis, A_sub))
    premultiplied = bool(int(float(group.get("rlnCtfDataAreCtfPremultiplied", 1)))) if group else True
    X, W = pseudo_subtomogram(images, ts.proj[vis] @ A_sub, ctf, premultiplied=premultiplied)
    return X, W, pixel


def _context(path: Path, blocks: dict, tomograms) -> tuple[_Context, object, dict]:
    """The shared tables of a 2D-stack input: ``(context, particle table, its file's blocks)``."""
    from mltomo.particles import image_dir

    ppath, pblocks, tpath = resolve_inputs(path, blocks, tomograms)
    df = pblocks["particles"].reset_index(drop=True)
    if len(df) == 0:
        raise ParticleTableError(f"{ppath}: the particle table is empty")
    missing = [c for c in ("rlnImageName", "rlnTomoName") if c not in df.columns]
    if missing:
        raise ParticleTableError(f"{ppath}: data_particles has no {', '.join(missing)} column")
    ctx = _Context(particles_path=ppath, tomograms_path=tpath, image_dir=image_dir(ppath),
                   series=read_tomograms(tpath), optics=_optics_groups(pblocks), columns=frozenset(df.columns))
    return ctx, df, pblocks


def _collective(comm, error: str | None) -> None:
    """Every rank raises if any rank has an error: :class:`ParticleTableError` itself in a single
    process, the communicator's collective error under MPI."""
    if comm.size == 1:
        if error:
            raise ParticleTableError(error)
        return
    comm.check(error)


def read_stack_particles(path, blocks: dict, *, tomograms=None, comm=None, memory_budget_bytes: float | None = None,
                         cache_dir=None):
    """This rank's block of the 2D tilt-stack particles named by ``path`` (an optimisation set
    or a particle table with ``rlnTomoSubTomosAre2DStacks 1``, read as ``blocks``) as
    :class:`~mltomo.model.Particles`: pseudo-subtomograms ``X`` and one weight ``W`` per
    particle (module docstring). Errors are one line, on every rank.

    Each particle is written into its row as it is built, never held twice: the spectra go to a
    memory-mapped cache in ``cache_dir`` when they exceed ``memory_budget_bytes``
    (:func:`mltomo.spectra_cache.allocate`); the weights stay in memory (half the spectra's size).
    """
    from mltomo import spectra_cache
    from mltomo.model import Particles
    from mltomo.parallel import SerialComm, split_range
    from mltomo.particles import _other_blocks

    comm = comm or SerialComm()
    error = ctx = df = pblocks = None
    try:
        ctx, df, pblocks = _context(Path(path), blocks, tomograms)
    except (ParticleTableError, OSError) as exc:
        error = str(exc)
    _collective(comm, error)
    N = len(df)
    a, b = split_range(N, comm.rank, comm.size)
    spectra = weights = None  # (b - a, box, box, box//2+1), allocated with the first particle's box
    pixel0 = None
    try:
        for i in range(a, b):
            X, W, pixel = particle_spectrum(df.iloc[i], ctx)
            if spectra is None:
                spectra = spectra_cache.allocate(b - a, X.shape[0], memory_budget_bytes, cache_dir)
                weights = np.empty(spectra.shape, np.float32)
                pixel0 = pixel
            elif X.shape != spectra.shape[1:]:
                raise ParticleTableError(f"{df['rlnImageName'].iloc[i]}: box {X.shape[0]} differs from the "
                                         f"first particle's {spectra.shape[1]}")
            spectra[i - a] = X
            weights[i - a] = W
            spectra_cache.after_row(spectra, i - a)
        if spectra is not None:
            spectra_cache.release(spectra, slice(None))
    except (ParticleTableError, OSError, ValueError) as exc:
        error = str(exc)
    _collective(comm, error)
    info = comm.bcast(comm.gather((spectra.shape[1] if spectra is not None else None, pixel0)))
    boxes = sorted({bx for bx, _ in info if bx is not None})
    _collective(comm, f"{ctx.particles_path}: particles have different box sizes {boxes}" if len(boxes) > 1 else None)
    box = boxes[0]
    voxel = next(v for _, v in info if v)
    if spectra is None:
        spectra = np.empty((0, box, box, box // 2 + 1), np.complex64)
        weights = np.empty(spectra.shape, np.float32)

    def cols(names):
        return df[list(names)].to_numpy(np.float64)[a:b] if set(names) <= ctx.columns else None

    names = tuple(str(v) for v in df["rlnImageName"].iloc[a:b])
    return Particles(
        spectra=spectra,
        masks=weights,
        groups=np.arange(b - a, dtype=np.int32),
        region_labels=tuple(f"tilts:{nm}" for nm in names),
        voxel_size_angstrom=float(voxel), names=names, indices=np.arange(a, b), n_total=N, table=df,
        star_blocks=_other_blocks(pblocks, "particles"),
        prior_angles=cols(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")),
        prior_shifts_angstrom=cols(("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")),
        prior_classes=df["rlnClassNumber"].to_numpy(np.int64)[a:b] if "rlnClassNumber" in ctx.columns else None,
        tomograms_file=str(ctx.tomograms_path),
    )
