"""Half-spectrum helpers, Fourier cropping, resolution shells and missing-region masks.

Conventions (the contract of SPEC.md §1; every other module relies on them)
---------------------------------------------------------------------------
* A volume is a cubic ``(n, n, n)`` array in numpy order ``[z, y, x]`` whose origin is the
  box centre ``n // 2``.
* Its Fourier transform is the **unitary** DFT (Parseval: ``Σ|x|² = Σ|X|²``) stored as the
  **half spectrum** of shape ``(n, n, n//2 + 1)``, i.e. the ``numpy.fft.rfftn`` layout.
  :func:`rfft_unitary` applies ``ifftshift`` first, so the FFT origin (index 0) is the box
  centre: a centred object has a smooth transform and the phases are those of an object at
  the origin. :func:`irfft_unitary` undoes both steps.
* Integer frequencies (units of ``1 / (n · voxel)``): ``kz, ky`` in ``fftfreq(n) * n`` order
  (``0, 1, …, -2, -1``; for even ``n`` index ``n/2`` is ``-n/2``), ``kx = 0 … n//2``.
  See :func:`freq_half`.
* A sum "over components" is over the **full** spectrum. On the half spectrum the planes
  ``kx = 0`` and, for even ``n``, ``kx = n/2`` count once and all others twice:
  ``Σ_full f(X) = Σ_half half_weights(n) · f(X)`` for any ``f`` with ``f(X̄) = f(X)``
  (``|X|²``, ``Re(X̄ Y)``, a centrosymmetric mask, …). See :func:`half_weights`.
* Fourier cropping (:func:`crop_half`, :func:`pad_half`) keeps each coefficient's value at
  the same integer frequency, so sums over a working set mean the same in the cropped box;
  the inverse transform of a cropped spectrum is then scaled by ``(n / n_new)^{3/2}``, which
  :func:`resample_volume` removes.
* Missing regions are defined in the particle (tomogram) frame with the beam along ``z``;
  see :class:`MissingRegion` for the exact sign conventions. Masks are float32 0/1 arrays in
  the half-spectrum layout, ``1`` = observed, and are exactly centrosymmetric
  (``w(-k) = w(k)``), so a masked spectrum is still the transform of a real volume.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "rfft_unitary",
    "irfft_unitary",
    "freq_half",
    "radius_half",
    "half_weights",
    "crop_half",
    "pad_half",
    "resample_volume",
    "shells_half",
    "fsc",
    "working_radius",
    "working_box",
    "MissingRegion",
    "parse_missing_region",
    "missing_region_mask",
    "weight_volume_mask",
    "observed_fraction",
]

# Tolerance (degrees) that makes the wedge limits closed intervals despite rounding in atan.
_ANGLE_EPS_DEG = 1e-7


# --------------------------------------------------------------------------------------------
# Transforms and grids
# --------------------------------------------------------------------------------------------


def _check_cube(vol: np.ndarray, name: str = "vol") -> int:
    if vol.ndim != 3 or not (vol.shape[0] == vol.shape[1] == vol.shape[2]):
        raise ValueError(f"{name} must be a cubic (n, n, n) array, got shape {vol.shape}")
    return vol.shape[0]


def _check_half(F: np.ndarray, n: int | None = None, name: str = "F") -> int:
    if n is None:
        n = F.shape[0] if F.ndim == 3 else -1
    if F.shape != (n, n, n // 2 + 1):
        raise ValueError(
            f"{name} must be a half spectrum of shape (n, n, n//2+1) = "
            f"({n}, {n}, {n // 2 + 1}), got {F.shape}"
        )
    return n


def rfft_unitary(vol: np.ndarray) -> np.ndarray:
    """Unitary half-spectrum DFT of a real volume centred at ``n // 2``.

    ``vol``: real ``(n, n, n)`` array, origin at index ``n // 2`` on every axis.
    Returns the complex ``(n, n, n//2 + 1)`` half spectrum, computed as
    ``rfftn(ifftshift(vol), norm="ortho")`` (so ``Σ|vol|² = Σ_half half_weights·|F|²``);
    complex128 for float64 input, complex64 otherwise.
    """
    vol = np.asarray(vol)
    _check_cube(vol)
    F = np.fft.rfftn(np.fft.ifftshift(vol), norm="ortho")
    return F.astype(np.complex128 if vol.dtype == np.float64 else np.complex64, copy=False)


def irfft_unitary(F: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`rfft_unitary`: half spectrum ``(n, n, n//2+1)`` -> real ``(n, n, n)``.

    The result has its origin at index ``n // 2``; float64 for complex128 input, float32
    otherwise. ``n`` is needed because ``n`` and ``n + 1`` share the half-spectrum width.
    """
    F = np.asarray(F)
    _check_half(F, n)
    vol = np.fft.fftshift(np.fft.irfftn(F, s=(n, n, n), axes=(0, 1, 2), norm="ortho"))
    return vol.astype(np.float64 if F.dtype == np.complex128 else np.float32, copy=False)


def _freq_1d(n: int) -> np.ndarray:
    """Integer frequencies of a full axis in FFT order: ``fftfreq(n) * n`` as int64."""
    return np.concatenate([np.arange(0, (n + 1) // 2), np.arange(-(n // 2), 0)]).astype(np.int64)


def freq_half(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer frequencies ``(kz, ky, kx)`` of the half spectrum of an ``n³`` box.

    Shapes ``(n, 1, 1)``, ``(1, n, 1)``, ``(1, 1, n//2+1)`` (int64), broadcastable to
    ``(n, n, n//2+1)``; units of ``1 / (n · voxel)``. ``kz, ky`` follow ``fftfreq(n) * n``
    (index ``n/2`` of an even axis is ``-n/2``), ``kx = 0 … n//2``.
    """
    k = _freq_1d(n)
    kx = np.arange(n // 2 + 1, dtype=np.int64)
    return k[:, None, None], k[None, :, None], kx[None, None, :]


def radius_half(n: int) -> np.ndarray:
    """``|k|`` in index units on the half spectrum: float64 ``(n, n, n//2+1)``."""
    kz, ky, kx = freq_half(n)
    return np.sqrt((kz * kz + ky * ky + kx * kx).astype(np.float64))


def half_weights(n: int) -> np.ndarray:
    """Multiplicity of each half-spectrum component in the full spectrum.

    float32 ``(n, n, n//2+1)``: 1 on the plane ``kx = 0`` and, for even ``n``, on
    ``kx = n/2``; 2 elsewhere. ``Σ half_weights · f(X)`` over the half spectrum equals
    ``Σ f`` over the full ``numpy.fft.fftn`` spectrum for every ``f`` with
    ``f(conj X) = f(X)`` (``|X|²``, ``Re(conj(X) Y)``, centrosymmetric masks).
    """
    w = np.full((n, n, n // 2 + 1), 2.0, dtype=np.float32)
    w[:, :, 0] = 1.0
    if n % 2 == 0:
        w[:, :, n // 2] = 1.0
    return w


def _mirror_plane(plane: np.ndarray) -> np.ndarray:
    """``plane[(-i) % n, (-j) % n]``: the partner of each component under ``k -> -k``."""
    return np.roll(np.flip(plane, axis=(0, 1)), 1, axis=(0, 1))


def _symmetrise_min(mask: np.ndarray) -> np.ndarray:
    """Make a half-spectrum mask Hermitian-consistent in place: ``w(k) = w(-k)``.

    Only the self-conjugate planes ``kx = 0`` and (even ``n``) ``kx = n/2`` hold both ``k``
    and ``-k``; there the smaller value wins (a component counts as observed only if both of
    its aliases are). Away from even-size Nyquist planes the geometric masks are already
    symmetric, so this only resolves the ``±n/2`` ambiguity.
    """
    n = mask.shape[0]
    planes = [0] + ([n // 2] if n % 2 == 0 and n > 0 else [])
    for p in planes:
        mask[:, :, p] = np.minimum(mask[:, :, p], _mirror_plane(mask[:, :, p]))
    return mask


# --------------------------------------------------------------------------------------------
# Fourier cropping and padding
# --------------------------------------------------------------------------------------------
#
# Scaling convention: the coefficient of integer frequency k (units of 1 / (n · voxel)) keeps
# its value. Cropping an n-box spectrum to n_new keeps exactly the components with
# |kz|, |ky|, kx < n_new / 2 and zeroes the Nyquist planes of an even n_new (they would alias
# +n_new/2 and -n_new/2). Hence Σ_half half_weights(n_new) · |crop_half(F, n_new)|² is the
# energy of the band |k_i| < n_new / 2, and irfft_unitary(crop_half(F, n_new), n_new) is the
# band-limited volume sampled on the coarser grid *multiplied by (n / n_new)^{3/2}* (the unitary
# normalisation n^{-3/2} changes with the box). resample_volume() removes that factor.


def _resize_axis(A: np.ndarray, axis: int, n: int, n_new: int, half: bool) -> np.ndarray:
    """Crop or zero-pad one frequency axis of size ``n`` (``n//2+1`` if ``half``) to ``n_new``.

    Frequencies ``|k| < min(n, n_new) / 2`` are copied unchanged. When padding an even ``n``,
    the source Nyquist coefficient (``±n/2`` alias) is split in halves between ``+n/2`` and
    ``-n/2`` (for the half axis only ``+n/2`` is stored; its mirror is implied). When cropping
    to an even ``n_new`` the new Nyquist stays zero.
    """
    shape = list(A.shape)
    shape[axis] = n_new // 2 + 1 if half else n_new
    out = np.zeros(shape, dtype=A.dtype)
    m = (min(n, n_new) - 1) // 2  # largest |k| strictly below both Nyquists
    k = np.arange(0, m + 1) if half else np.arange(-m, m + 1)
    src = [slice(None)] * A.ndim
    dst = [slice(None)] * A.ndim
    src[axis], dst[axis] = k % n, k % n_new
    out[tuple(dst)] = A[tuple(src)]
    if n_new > n and n % 2 == 0:
        h = n // 2
        src[axis] = h
        v = 0.5 * A[tuple(src)]
        for kk in (h,) if half else (h, -h):
            dst[axis] = kk % n_new
            out[tuple(dst)] = v
    return out


def _batch_n(F: np.ndarray) -> int:
    """Box size of a stack of half spectra ``(..., n, n, n//2+1)``."""
    n = F.shape[-2] if F.ndim >= 3 else -1
    if n < 1 or F.shape[-3:] != (n, n, n // 2 + 1):
        raise ValueError(f"expected half spectra of shape (..., n, n, n//2+1), got {F.shape}")
    return n


def _resize_half(F: np.ndarray, n_new: int) -> np.ndarray:
    n = _batch_n(F)
    if n_new < 1:
        raise ValueError(f"n_new must be positive, got {n_new}")
    if n_new == n:
        return F.copy()
    out = _resize_axis(F, F.ndim - 3, n, n_new, half=False)
    out = _resize_axis(out, F.ndim - 2, n, n_new, half=False)
    return _resize_axis(out, F.ndim - 1, n, n_new, half=True)


def crop_half(F: np.ndarray, n_new: int) -> np.ndarray:
    """Fourier-crop half spectra of an ``n³`` box to an ``n_new³`` box (``n_new ≤ n``).

    ``F``: complex or real ``(..., n, n, n//2+1)`` (leading axes are a batch, e.g. particles;
    masks and weights crop the same way). Returns ``(..., n_new, n_new, n_new//2+1)`` of the
    same dtype holding the unchanged coefficients of every frequency with
    ``|kz|, |ky|, kx < n_new / 2``; for even ``n_new < n`` the Nyquist planes are zero
    (``n_new == n`` returns an unchanged copy). See the scaling note above:
    ``irfft_unitary`` of the result is the low-passed volume on the coarse grid times
    ``(n / n_new)^{3/2}``; use :func:`resample_volume` for plain values.
    """
    F = np.asarray(F)
    n = _batch_n(F)
    if n_new > n:
        raise ValueError(f"crop_half: n_new = {n_new} exceeds the box size {n}; use pad_half")
    return _resize_half(F, n_new)


def pad_half(F: np.ndarray, n_new: int) -> np.ndarray:
    """Zero-pad half spectra of an ``n³`` box to an ``n_new³`` box (``n_new ≥ n``).

    ``F``: ``(..., n, n, n//2+1)``. Coefficients keep their values and frequency index; new
    components are zero. For even ``n`` the source's Nyquist coefficients (which stand for
    both ``+n/2`` and ``-n/2``) are split in halves between the two, so the result is exactly
    Hermitian and ``irfft_unitary(pad_half(F, m), m)`` is the trigonometric interpolant of
    ``irfft_unitary(F, n)`` times ``(n / m)^{3/2}``. ``crop_half(pad_half(G, m), n) == G``
    whenever ``G`` has zero Nyquist planes (e.g. ``G = crop_half(F, n)`` from a larger box).
    """
    F = np.asarray(F)
    n = _batch_n(F)
    if n_new < n:
        raise ValueError(
            f"pad_half: n_new = {n_new} is smaller than the box size {n}; use crop_half"
        )
    return _resize_half(F, n_new)


def resample_volume(vol: np.ndarray, n_new: int) -> np.ndarray:
    """Resample a centred ``(n, n, n)`` volume to ``(n_new, n_new, n_new)`` by Fourier crop/pad.

    The field of view is unchanged, so the voxel size becomes ``voxel · n / n_new``; the centre
    ``n // 2`` maps to ``n_new // 2``. Values are those of the band-limited volume at the new
    sample points (the ``(n_new / n)^{3/2}`` factor of the unitary transform is applied), so
    the integral ``Σ vol · voxel³`` is preserved. Output dtype follows :func:`irfft_unitary`.
    """
    vol = np.asarray(vol)
    n = _check_cube(vol)
    F = rfft_unitary(vol)
    G = crop_half(F, n_new) if n_new <= n else pad_half(F, n_new)
    out = irfft_unitary(G, n_new)
    return (out * (n_new / n) ** 1.5).astype(out.dtype, copy=False)


# --------------------------------------------------------------------------------------------
# Shells, FSC and the working resolution
# --------------------------------------------------------------------------------------------


def shells_half(n: int) -> np.ndarray:
    """Shell index ``round(|k|)`` of each half-spectrum component: int32 ``(n, n, n//2+1)``.

    Shell ``s`` has resolution ``n · voxel / s`` Å; shells beyond ``n // 2`` are the corners.
    """
    return np.rint(radius_half(n)).astype(np.int32)


def fsc(a_half: np.ndarray, b_half: np.ndarray, n: int) -> np.ndarray:
    """Fourier shell correlation of two half spectra of an ``n³`` box.

    Returns float64 ``(n//2 + 1,)``: shell ``s = round(|k|)`` for ``s = 0 … n//2``, computed
    over the full spectrum (:func:`half_weights`) as
    ``Σ Re(a b̄) / sqrt(Σ|a|² Σ|b|²)``; 0 where a shell has no energy.
    """
    a_half, b_half = np.asarray(a_half), np.asarray(b_half)
    _check_half(a_half, n, name="a_half")
    _check_half(b_half, n, name="b_half")
    hw = half_weights(n).astype(np.float64).ravel()
    s = shells_half(n).ravel()
    a, b = a_half.ravel(), b_half.ravel()
    nb = n // 2 + 1
    keep = s < nb
    s, hw, a, b = s[keep], hw[keep], a[keep], b[keep]
    num = np.bincount(s, hw * np.real(np.conj(a) * b), minlength=nb)
    ea = np.bincount(s, hw * np.abs(a) ** 2, minlength=nb)
    eb = np.bincount(s, hw * np.abs(b) ** 2, minlength=nb)
    den = np.sqrt(ea * eb)
    out = np.zeros(nb, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def working_radius(
    n: int, voxel_size_angstrom: float, max_resolution_angstrom: float | None = None
) -> float:
    """Radius (index units of the ``n`` box) of the working set of Fourier components.

    Default (``max_resolution_angstrom=None``): the full box, ``n/2 - 1``. Otherwise
    ``n · voxel / max_resolution``, capped at ``n/2 - 1``. A resolution finer than Nyquist
    (``2 · voxel``) or a non-positive size raises ``ValueError`` (the voxel size is only
    needed, and only checked, when a resolution is given).
    """
    full = n / 2.0 - 1.0
    if max_resolution_angstrom is None:
        return full
    if voxel_size_angstrom is None or not voxel_size_angstrom > 0:
        raise ValueError(f"voxel size must be positive, got {voxel_size_angstrom} Å")
    if not max_resolution_angstrom > 0:
        raise ValueError(f"max resolution must be positive, got {max_resolution_angstrom} Å")
    if max_resolution_angstrom < 2.0 * voxel_size_angstrom * (1.0 - 1e-9):
        raise ValueError(
            f"max resolution {max_resolution_angstrom:g} Å is finer than Nyquist "
            f"({2.0 * voxel_size_angstrom:g} Å for {voxel_size_angstrom:g} Å voxels)"
        )
    return min(full, n * voxel_size_angstrom / max_resolution_angstrom)


def _is_235(m: int) -> bool:
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    return m == 1


def working_box(n: int, radius: float) -> int:
    """Smallest even FFT-friendly (factors 2, 3, 5) box ``n_w ≤ n`` with ``radius ≤ n_w/2 - 1``.

    Returns ``n`` itself when no smaller box qualifies (no cropping helps). ``radius`` is in
    index units, which are the same in the ``n`` and ``n_w`` boxes (coefficients keep their
    frequency index under :func:`crop_half`).
    """
    need = max(2, int(math.ceil(2.0 * (radius + 1.0) - 1e-9)))
    m = need + (need % 2)
    while m < n:
        if _is_235(m):
            return m
        m += 2
    return n


# --------------------------------------------------------------------------------------------
# Missing regions
# --------------------------------------------------------------------------------------------

_N_PARAMS = {"none": 0, "wedge_y": 2, "wedge_x": 2, "pyramid": 4, "cone": 1}


def _fmt(x: float) -> str:
    s = f"{x:g}"
    return s if float(s) == x else repr(float(x))


@dataclass(frozen=True)
class MissingRegion:
    """Geometry of the unobserved part of Fourier space, in the particle (tomogram) frame.

    The beam is along ``z``; angles are in degrees; ``k = (kx, ky, kz)``.

    * ``wedge_y θ0 θF`` — single-axis tilt series about ``y``. The projection direction of
      tilt ``θ`` is ``d(θ) = R_y(θ) ẑ = (sin θ, 0, cos θ)`` (right-handed about ``+y``) and
      that image fills the central plane ``k · d(θ) = 0``. ``k`` is observed iff
      ``θ* = -atan(kz / kx)`` (taken in ``(-90°, 90°]``) lies in ``[θ0, θF]``; the ``ky`` axis
      (``kx = kz = 0``) is always observed. Example ``wedge_y:-54:66``: ``k = (1, 0, -2)``
      (``θ* = +63.4°``) is observed, ``k = (1, 0, 2)`` (``θ* = -63.4°``) is not.
    * ``wedge_x θ0 θF`` — tilt about ``x``: ``d(θ) = R_x(θ) ẑ = (0, -sin θ, cos θ)``;
      observed iff ``θ* = atan(kz / ky) ∈ [θ0, θF]``; the ``kx`` axis is always observed.
    * ``pyramid ya yb xa xb`` — dual-axis: observed by the ``y`` series ``[ya, yb]`` OR the
      ``x`` series ``[xa, xb]``.
    * ``cone θt`` — random conical tilt: observed iff the angle between ``k`` and the ``kz``
      axis is at least ``90° - θt`` (``|kz| ≤ |k| sin θt``).
    * ``none`` — everything observed.

    The DC component is always observed. Tilt limits must lie in ``[-90, 90]`` with lower
    ≤ upper; ``θt`` in ``[0, 90]``. Text form: ``str(region)``, e.g. ``"wedge_y:-60:60"``,
    parsed back by :func:`parse_missing_region`.
    """

    kind: str
    params: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        kind = str(self.kind).strip().lower()
        if kind not in _N_PARAMS:
            raise ValueError(
                f"unknown missing-region kind {self.kind!r}; expected one of "
                f"{', '.join(_N_PARAMS)}"
            )
        try:
            params = tuple(float(p) for p in self.params)
        except (TypeError, ValueError):
            raise ValueError(f"{kind}: parameters must be numbers, got {self.params!r}") from None
        if len(params) != _N_PARAMS[kind]:
            raise ValueError(
                f"{kind} takes {_N_PARAMS[kind]} angle(s), got {len(params)}: {self.params!r}"
            )
        if not all(math.isfinite(p) for p in params):
            raise ValueError(f"{kind}: angles must be finite, got {params}")
        if kind == "cone":
            if not 0.0 <= params[0] <= 90.0:
                raise ValueError(f"cone: tilt angle must lie in [0, 90] degrees, got {params[0]}")
        else:
            for lo, hi in zip(params[0::2], params[1::2]):
                if not (-90.0 <= lo <= 90.0 and -90.0 <= hi <= 90.0):
                    raise ValueError(
                        f"{kind}: tilt limits must lie in [-90, 90] degrees, got {lo}:{hi}"
                    )
                if lo > hi:
                    raise ValueError(f"{kind}: lower tilt limit {lo} exceeds upper limit {hi}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "params", params)

    def __str__(self) -> str:
        return ":".join([self.kind, *(_fmt(p) for p in self.params)])


def parse_missing_region(text: str | MissingRegion) -> MissingRegion:
    """Parse ``"none"``, ``"wedge_y:-60:60"``, ``"wedge_x:-55:65"``, ``"pyramid:ya:yb:xa:xb"``
    or ``"cone:THETA"`` (angles in degrees; fields separated by ``:`` or whitespace, kind is
    case-insensitive). A :class:`MissingRegion` is returned unchanged.

    Raises ``ValueError`` with a one-line message for unknown kinds, wrong numbers of
    angles, non-numbers and impossible angles.
    """
    if isinstance(text, MissingRegion):
        return text
    if not isinstance(text, str):
        raise ValueError(f"missing region must be a string, got {type(text).__name__}")
    fields = [f for f in re.split(r"[:\s]+", text.strip()) if f]
    if not fields:
        raise ValueError("empty missing-region description")
    kind, rest = fields[0], fields[1:]
    params = []
    for f in rest:
        try:
            params.append(float(f))
        except ValueError:
            raise ValueError(f"missing region {text!r}: {f!r} is not a number") from None
    return MissingRegion(kind, tuple(params))


def _wedge_2d(k_tilt: np.ndarray, kz: np.ndarray, lo: float, hi: float, sign: float) -> np.ndarray:
    """Observed flag of a single-axis wedge on the (kz, k_tilt) grid.

    ``θ* = sign · atan(kz / k_tilt)`` in ``(-90°, 90°]`` (``sign = -1`` for ``wedge_y`` with
    ``k_tilt = kx``, ``+1`` for ``wedge_x`` with ``k_tilt = ky``). Where ``k_tilt = 0`` and
    ``kz ≠ 0``, ``θ* = 90° ≡ -90°``; where both vanish (the tilt axis) the component is
    observed.
    """
    kt = k_tilt.astype(np.float64)
    kzf = kz.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = sign * np.degrees(np.arctan(kzf / kt))
    vertical = kt == 0
    theta = np.where(vertical, 90.0, theta)
    theta = np.where(theta <= -90.0 + _ANGLE_EPS_DEG, 90.0, theta)  # fold -90 onto +90
    eps = _ANGLE_EPS_DEG
    obs = (theta >= lo - eps) & (theta <= hi + eps)
    obs |= (theta >= 90.0 - eps) & ((lo <= -90.0 + eps) | (hi >= 90.0 - eps))
    obs |= vertical & (kz == 0)
    return obs


def _wedge_y(n: int, lo: float, hi: float) -> np.ndarray:
    k = _freq_1d(n)
    kx = np.arange(n // 2 + 1, dtype=np.int64)
    obs = _wedge_2d(kx[None, :], k[:, None], lo, hi, sign=-1.0)  # (n, n//2+1) over (kz, kx)
    return np.broadcast_to(obs[:, None, :], (n, n, n // 2 + 1))


def _wedge_x(n: int, lo: float, hi: float) -> np.ndarray:
    k = _freq_1d(n)
    obs = _wedge_2d(k[None, :], k[:, None], lo, hi, sign=+1.0)  # (n, n) over (kz, ky)
    return np.broadcast_to(obs[:, :, None], (n, n, n // 2 + 1))


def missing_region_mask(region: MissingRegion | str, n: int) -> np.ndarray:
    """Observed-component mask of ``region`` for an ``n³`` box.

    ``region``: a :class:`MissingRegion` or its text form. Returns float32
    ``(n, n, n//2+1)`` in the half-spectrum layout of :func:`rfft_unitary`, 1 = observed,
    0 = missing; centrosymmetric, DC observed. On the Nyquist planes of an even box, where
    ``+n/2`` and ``-n/2`` alias, a component is observed only if both aliases are.
    """
    region = parse_missing_region(region)
    p = region.params
    shape = (n, n, n // 2 + 1)
    if region.kind == "none":
        return np.ones(shape, dtype=np.float32)
    if region.kind == "wedge_y":
        obs = _wedge_y(n, p[0], p[1])
    elif region.kind == "wedge_x":
        obs = _wedge_x(n, p[0], p[1])
    elif region.kind == "pyramid":
        obs = _wedge_y(n, p[0], p[1]) | _wedge_x(n, p[2], p[3])
    else:  # cone
        kz, ky, kx = freq_half(n)
        k2 = (kz * kz + ky * ky + kx * kx).astype(np.float64)
        s = math.sin(math.radians(p[0]))
        obs = (kz * kz).astype(np.float64) <= k2 * s * s * (1.0 + 1e-12)
    mask = np.ascontiguousarray(obs, dtype=np.float32)
    mask[0, 0, 0] = 1.0
    return _symmetrise_min(mask)


WEIGHT_LAYOUTS = ("centred", "origin", "half")


def weight_volume_half(weights: np.ndarray, layout: str) -> np.ndarray:
    """A weight volume of an ``n³`` box in the half-spectrum layout ``(n, n, n//2+1)`` (float64).

    ``layout``: ``"centred"``, shape ``(n, n, n)``, index ``n//2 + k`` holds frequency ``k``
    (RELION's full-size CTF volume; RELION reads it at ``-k``, identical for the
    centrosymmetric weights physical CTF volumes are); ``"origin"``, shape ``(n, n, n)``,
    frequency ``k`` at index ``k mod n`` (STOPGAP, cryoCAT, TOM); ``"half"``, shape
    ``(n, n, n//2+1)``, origin at index 0 (RELION's FFTW-sized volume, :func:`rfft_unitary`).
    """
    w = np.asarray(weights)
    if w.ndim != 3 or w.shape[0] != w.shape[1] or np.iscomplexobj(w):
        raise ValueError(f"weights must be a real (n, n, n) or (n, n, n//2+1) array, got {w.shape}")
    n = w.shape[0]
    if layout in ("centred", "origin"):
        if w.shape[2] != n:
            raise ValueError(f"{layout} weights must have shape ({n}, {n}, {n}), got {w.shape}")
        w = np.fft.ifftshift(w) if layout == "centred" else w
        return np.ascontiguousarray(w[:, :, : n // 2 + 1], dtype=np.float64)
    if layout == "half":
        _check_half(w, n, name="weights")
        return w.astype(np.float64)
    raise ValueError(f"weight layout must be one of {', '.join(WEIGHT_LAYOUTS)}, got {layout!r}")


def detect_weight_layout(weights: np.ndarray, spectrum: np.ndarray, margin: float = 0.1) -> str:
    """The layout of a full ``(n, n, n)`` weight volume, read off a particle that uses it: the
    layout whose weights' magnitudes correlate best with the particle's log power ``log|X(k)|²`` (a missing
    region and CTF zeros leave their mark in the data), by at least ``margin``; a half-size
    volume is ``"half"``. Raises ``ValueError`` when neither layout is clearly better."""
    w = np.asarray(weights)
    n = w.shape[0]
    if w.ndim == 3 and w.shape[2] == n // 2 + 1 and n > 2:
        return "half"
    power = np.log(np.abs(np.asarray(spectrum)) ** 2 + 1e-30 + 1e-12 * float(np.max(np.abs(spectrum)) ** 2))
    halves = {layout: np.abs(weight_volume_half(w, layout)) for layout in ("centred", "origin")}
    if np.allclose(halves["centred"], halves["origin"]):
        return "centred"  # the same either way (e.g. constant)
    hw = half_weights(n).astype(np.float64)
    hw[0, 0, 0] = 0.0  # the DC component says nothing about the layout
    score = {}
    for layout, h in halves.items():
        mw, mp = np.average(h, weights=hw), np.average(power, weights=hw)
        cov = np.average((h - mw) * (power - mp), weights=hw)
        var = np.average((h - mw) ** 2, weights=hw) * np.average((power - mp) ** 2, weights=hw)
        score[layout] = float(cov / np.sqrt(var)) if var > 0 else 0.0
    best, other = sorted(score, key=score.get, reverse=True)
    if score[best] - score[other] < margin:
        raise ValueError(f"cannot tell whether the weights are centred or have their origin at index 0 "
                         f"(correlation with the particle's power {score['centred']:.2f} vs {score['origin']:.2f}): "
                         f"give --weight-layout centred or origin")
    return best


def ctf_weights(ctf_half: np.ndarray, threshold: float | None = None,
                kind: str = "ctf") -> tuple[np.ndarray | None, np.ndarray]:
    """``(divisor, w)`` of a weight volume (half layout) for a particle ``X``.

    ``kind="ctf"``: the volume is the CTF ``c`` that multiplies the reference (RELION 3's
    ``rlnCtfImage``), ``X = c·A + n``, so ``Σ|X − c A|² = Σ c² |X/c − A|²``: the particle is
    divided by ``divisor = c`` and weighted by ``w = c² / max c²``. ``kind="ctf2"``: the volume
    is a CTF² sum ``W`` and ``X = Σ CTF·P`` is CTF-premultiplied (RELION 4's pseudo-subtomogram),
    ``X = W A + n`` with noise power ∝ W, so ``Σ|X − W A|²/W = Σ W |X/W − A|²``: divided by
    ``W``, weighted by ``W / max W``. Components where ``|c|`` (or ``W``) is under 1e-3 of its
    maximum are unobserved; the scale goes into σ². With ``threshold`` the binary mask of
    earlier versions instead: observed where the volume exceeds ``threshold``, no division
    (``divisor`` None). Centrosymmetric, DC observed."""
    c = np.asarray(ctf_half, dtype=np.float64)
    if kind not in ("ctf", "ctf2"):
        raise ValueError(f"weight kind must be ctf or ctf2, got {kind!r}")
    if threshold is not None:
        mask = (c > threshold).astype(np.float32)
        mask[0, 0, 0] = 1.0
        return None, _symmetrise_min(mask)
    cmax = float(np.max(np.abs(c)))
    if not cmax > 0:
        raise ValueError("weight volume is zero everywhere: no observed Fourier components")
    if kind == "ctf2" and np.any(c < -1e-6 * cmax):
        raise ValueError("a CTF² weight volume has negative values: is it a CTF (use --weight-kind ctf)?")
    keep = np.abs(c) > 1e-3 * cmax
    w = np.where(keep, (c / cmax) ** 2 if kind == "ctf" else c / cmax, 0.0).astype(np.float32)
    w = _symmetrise_min(w)
    divisor = np.where(w > 0, c, 0.0)
    if divisor[0, 0, 0] == 0:  # the DC counts as observed (SPEC §1)
        divisor[0, 0, 0], w[0, 0, 0] = cmax, 1.0
    return divisor, w


def weight_volume_mask(
    weights: np.ndarray, threshold: float | None = None, layout: str | None = None
) -> np.ndarray:
    """Binary observed mask from a weight volume: observed where the weight exceeds
    ``threshold`` (default half the volume's maximum), centrosymmetric, DC observed.
    ``layout`` as :func:`weight_volume_half` (``"full"`` is ``"centred"``; None: ``"centred"``
    when the last axis has length ``n``, else ``"half"``). Returns float32 ``(n, n, n//2+1)``."""
    w = np.asarray(weights)
    if w.ndim != 3 or w.shape[0] != w.shape[1] or np.iscomplexobj(w):
        raise ValueError(f"weights must be a real (n, n, n) or (n, n, n//2+1) array, got {w.shape}")
    n = w.shape[0]
    if layout is None:
        layout = "centred" if w.shape[2] == n else "half"
    h = weight_volume_half(w, "centred" if layout == "full" else layout)
    if threshold is None:
        threshold = 0.5 * float(np.max(h))
    return ctf_weights(h, threshold)[1]


def observed_fraction(mask: np.ndarray, radius: float | None = None) -> float:
    """Fraction of the full spectrum that ``mask`` (half layout, 0/1) marks observed.

    Components are counted with :func:`half_weights`; with ``radius`` (index units) only
    components with ``|k| ≤ radius`` are counted, in numerator and denominator.
    """
    mask = np.asarray(mask)
    n = _check_half(mask, name="mask")
    hw = half_weights(n).astype(np.float64)
    if radius is not None:
        hw = hw * (radius_half(n) <= radius)
    total = hw.sum()
    return float((hw * mask).sum() / total) if total > 0 else 0.0
