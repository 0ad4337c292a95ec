"""References: the padded Fourier transforms the C++ core interpolates, and the real-space
operations on references (soft sphere, low-pass, rotation, symmetrisation, the
:class:`Constraints` every M-step applies).

A reference ``a`` (n³, centre at n//2) is held for the E-step as its transform on a box of
``P = pad·n`` voxels (zero-padded in real space), normalised like the unitary n-box transform,
so that padded grid point ``pad·k`` holds the coefficient of integer frequency ``k``. The core
reads a rotated reference by trilinear interpolation at ``pad·Rᵀk`` and rotates data back with
the exact adjoint (a scatter into the same grid).

Trilinear interpolation in Fourier space multiplies the real-space image by
``g(x) = Π sinc²(x_i / P)``; *gridding correction* divides it out beforehand
(``padded_transform(a / g)``), as RELION does. It is exact on average over sub-grid offsets,
not for rotations that land on grid points (e.g. the 24 cube rotations at ``pad=1``), where
``gridding=False`` makes the whole EM exact.

With pad 2 and gridding, the rotated reference has a relative L2 error below 1 % up to
0.8 × Nyquist for objects that fit inside a sphere of diameter 0.6·n (measured in
``tests/test_rotation.py``); use pad 3 for objects that fill the box.
"""

from __future__ import annotations

import numpy as np


def padded_size(n: int, pad: float) -> int:
    """The padded box ``P = pad·n`` (must be an even integer)."""
    P = int(round(pad * n))
    if abs(P - pad * n) > 1e-9 or P % 2:
        raise ValueError(f"pad·n must be an even integer, got pad={pad}, n={n}")
    return P


def gridding_kernel(n: int, pad: float) -> np.ndarray:
    """``g[z,y,x] = Π sinc²(offset/P)`` over the n³ box (offsets from n//2): what trilinear
    interpolation in the padded grid multiplies a real-space object by."""
    P = padded_size(n, pad)
    s = np.sinc((np.arange(n) - n // 2) / P) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).astype(np.float64)


def padded_transform(vol: np.ndarray, pad: float, gridding: bool = True, dtype=np.complex64) -> np.ndarray:
    """Padded half-spectrum ``(P, P, P//2+1)`` of a real n³ volume (see the module docstring)."""
    vol = np.asarray(vol, dtype=np.float64)
    n = vol.shape[0]
    P = padded_size(n, pad)
    if gridding:
        vol = vol / gridding_kernel(n, pad)
    big = np.zeros((P, P, P))
    o = P // 2 - n // 2
    big[o : o + n, o : o + n, o : o + n] = vol
    F = np.fft.rfftn(np.fft.ifftshift(big)) / n**1.5
    return F.astype(dtype, copy=False)


def volume_from_padded(F: np.ndarray, n: int, pad: float, gridding: bool = True) -> np.ndarray:
    """Inverse of :func:`padded_transform`: the n³ real volume (float64) whose padded transform
    is ``F`` (the central n³ of the padded inverse, times the gridding kernel if ``gridding``
    — the data side of a trilinear scatter carries the same kernel)."""
    P = F.shape[0]
    if F.shape != (P, P, P // 2 + 1):
        raise ValueError(f"padded transform has shape {F.shape}, expected ({P}, {P}, {P // 2 + 1})")
    big = np.fft.fftshift(np.fft.irfftn(F * n**1.5, s=(P, P, P), axes=(0, 1, 2)))
    o = P // 2 - n // 2
    vol = big[o : o + n, o : o + n, o : o + n]
    if gridding:
        vol = vol * gridding_kernel(n, pad)
    return vol


def crop_padded(F: np.ndarray, P_new: int) -> np.ndarray:
    """Keep the frequencies of half spectra ``(..., P, P, P//2+1)`` that fit a ``P_new`` box
    (values unchanged; any leading axes are kept)."""
    P = F.shape[-3]
    if P_new == P:
        return F
    if P_new > P or P_new % 2:
        raise ValueError(f"cannot crop a padded grid of {P} to {P_new}")
    idx = np.r_[0 : P_new // 2, P - P_new // 2 : P]
    return F[..., idx, :, :][..., :, idx, :][..., : P_new // 2 + 1]


def uncrop_padded(F: np.ndarray, P: int) -> np.ndarray:
    """Embed a cropped padded half spectrum back into a ``P`` box, zeros elsewhere."""
    Pc = F.shape[0]
    if Pc == P:
        return F
    out = np.zeros((P, P, P // 2 + 1), dtype=F.dtype)
    idx = np.r_[0 : Pc // 2, P - Pc // 2 : P]
    out[np.ix_(idx, idx, np.arange(Pc // 2 + 1))] = F
    return out


# ------------------------------------------------------------------------ real-space operations


def soft_sphere(n: int, radius_voxels: float, edge_voxels: float = 3.0) -> np.ndarray:
    """A spherical mask of the given radius with a raised-cosine edge, centred at n//2."""
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    m = np.clip((radius_voxels + edge_voxels - r) / edge_voxels, 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * m)


# The default mask of a classification when no particle diameter is given: a soft sphere
# (box - 2 voxels) across, its 3-voxel raised-cosine edge outside that (so only the box's corners
# and rim are zeroed). RELION's default is box - 5 voxels; it cuts particles that fill the box
# (the README's tutorial phantoms: fixed-pose purity 0.54 against 1.00), while box - 2 keeps them
# and gains as much on the Figure 1 data. Alignment alone (K = 1) keeps no mask: on the real
# RELION 5 ribosomes the mask moved the global search from 10.8° to 15.5° (README, "Classification").
DEFAULT_MASK_MARGIN_VOXELS = 2


def particle_diameter(config, box: int, voxel: float) -> float | None:
    """The diameter in Å of the soft spherical mask on the references, or None for no mask:
    ``config.particle_diameter_angstrom`` if given (0: no mask), else ``(box - 2) * voxel``
    when the adaptive scheme classifies (K ≥ 2), and no mask with K = 1 or the paper's scheme."""
    d = config.particle_diameter_angstrom
    if d is None and config.scheme == "adaptive" and config.n_classes >= 2:
        d = (box - DEFAULT_MASK_MARGIN_VOXELS) * voxel
    return d or None


def lowpass(vol: np.ndarray, radius: float) -> np.ndarray:
    """Zero the Fourier components of a volume beyond ``radius`` (frequency index units)."""
    from mltomo.fourier import freq_half

    n = vol.shape[0]
    F = np.fft.rfftn(vol)
    kz, ky, kx = freq_half(n)
    k2 = kz**2 + ky**2 + kx**2
    F[k2 > radius**2 + 1e-9] = 0
    return np.fft.irfftn(F, s=vol.shape, axes=(0, 1, 2))


def reference_transforms(refs, pad: float, P_w: int, gridding: bool = True) -> np.ndarray:
    """``(K, P_w, P_w, P_w//2+1)`` complex64 padded transforms of references, cropped to the
    working grid ``P_w`` (what the E-step reads)."""
    F = np.stack([crop_padded(padded_transform(a, pad, gridding=gridding), P_w) for a in refs])
    return np.ascontiguousarray(F, dtype=np.complex64)


def rotate_volume(vol: np.ndarray, R: np.ndarray, pad: float = 2.0) -> np.ndarray:
    """``vol`` rotated actively by ``R`` (x'(r) = x(Rᵀr)), by Fourier interpolation."""
    from mltomo import _core

    n = vol.shape[0]
    F = padded_transform(vol, pad, gridding=True)
    H = _core.rotate_forward(F, pad, np.ascontiguousarray(R, dtype=np.float64), n, n / 2 - 1)
    return np.fft.fftshift(np.fft.irfftn(H, s=(n, n, n), axes=(0, 1, 2), norm="ortho"))


def symmetrize(vol: np.ndarray, group: np.ndarray, pad: float = 2.0) -> np.ndarray:
    """Average of the volume over the point group's rotations."""
    if len(group) <= 1:
        return vol
    return np.mean([rotate_volume(vol, g, pad) for g in group], axis=0)


class Constraints:
    """What every reference satisfies after an M-step, in this order: the point group's
    symmetry, the soft spherical mask, the focused mask (arrays ``(n, n, n)`` or None), then
    the low-pass to the working radius."""

    def __init__(self, group: np.ndarray, radius: float, pad: float, sphere=None, focus=None):
        self.group = group
        self.radius = float(radius)
        self.pad = float(pad)
        self.sphere = sphere
        self.focus = focus

    @property
    def noise_fraction(self) -> float:
        """The fraction of a particle's (white) noise that the masks keep in a reference:
        ``mean(m)`` over the box of the product ``m`` of the sphere and the focused mask. Masking
        in real space convolves the spectrum with ``M = F(m)``, so the noise of component ``j``
        stays in component ``j`` with weight ``M_0 = mean(m)`` (the rest is spread over its
        neighbours, uncorrelated with it); 1 without masks."""
        m = 1.0
        for a in (self.sphere, self.focus):
            if a is not None:
                m = m * np.asarray(a, dtype=np.float64)
        return float(np.mean(m))

    def apply(self, refs) -> np.ndarray:
        """``(K, n, n, n)`` float32 constrained references."""
        out = []
        for a in refs:
            a = np.asarray(a, dtype=np.float64)
            if len(self.group) > 1:
                a = symmetrize(a, self.group, self.pad)
            if self.sphere is not None:
                a = a * self.sphere
            if self.focus is not None:
                a = a * self.focus
            out.append(lowpass(a, self.radius))
        return np.stack(out).astype(np.float32)
