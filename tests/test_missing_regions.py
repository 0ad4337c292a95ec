"""Missing-region masks: parsing, geometry, observed fractions, and the sign convention."""

import math

import numpy as np
import pytest

from mltomo import fourier as ft
from mltomo.fourier import MissingRegion, missing_region_mask, parse_missing_region


def _at(mask, n, kx, ky, kz):
    """Mask value at integer frequency (kx, ky, kz), using Hermitian symmetry if kx < 0."""
    if kx < 0:
        kx, ky, kz = -kx, -ky, -kz
    return mask[kz % n, ky % n, kx]


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text",
    ["none", "wedge_y:-60:60", "wedge_x:-55:65", "pyramid:-60:60:-50:55", "cone:45",
     "wedge_y:-54.5:66.25"],
)
def test_parse_round_trip(text):
    r = parse_missing_region(text)
    assert str(r) == text
    assert parse_missing_region(str(r)) == r


def test_parse_accepts_spaces_and_case():
    assert parse_missing_region(" Wedge_Y -54 66 ") == MissingRegion("wedge_y", (-54.0, 66.0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("wedge_z:-60:60", "unknown"),
        ("wedge_y:60", "takes 2"),
        ("wedge_y:-60:60:3", "takes 2"),
        ("wedge_y:60:-60", "exceeds"),
        ("wedge_x:-95:60", r"\[-90, 90\]"),
        ("pyramid:-60:60:-50", "takes 4"),
        ("pyramid:-60:60:50:-50", "exceeds"),
        ("cone:100", r"\[0, 90\]"),
        ("cone:-5", r"\[0, 90\]"),
        ("wedge_y:a:60", "not a number"),
        ("wedge_y:nan:60", "finite"),
        ("none:3", "takes 0"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_missing_region(text)
    assert "\n" not in str(info.value)


def test_dataclass_validates_and_is_frozen():
    with pytest.raises(ValueError):
        MissingRegion("wedge_y", (60, -60))
    r = MissingRegion("wedge_y", (-60, 60))
    with pytest.raises(AttributeError):
        r.kind = "cone"


# ---------------------------------------------------------------- specific components


def test_wedge_y_asymmetric_components():
    n = 16
    m = missing_region_mask("wedge_y:-54:66", n)
    assert _at(m, n, 1, 0, -1) == 1  # θ* = +45
    assert _at(m, n, 1, 0, 1) == 1  # θ* = -45
    assert _at(m, n, 1, 0, -3) == 0  # θ* = +71.6 > 66
    assert _at(m, n, 1, 0, 3) == 0  # θ* = -71.6 < -54
    assert _at(m, n, 1, 0, -2) == 1  # θ* = +63.4
    assert _at(m, n, 1, 0, 2) == 0  # θ* = -63.4 < -54
    assert _at(m, n, -1, 0, 2) == 1  # same plane as (1, 0, -2)
    assert _at(m, n, 1, 5, -2) == 1 and _at(m, n, 1, 5, 2) == 0  # independent of ky
    assert _at(m, n, 0, 3, 0) == 1  # ky axis observed
    assert _at(m, n, 0, 0, 3) == 0  # kz axis (θ* = 90) missing
    assert _at(m, n, 4, 2, 0) == 1  # θ* = 0 observed
    assert m[0, 0, 0] == 1


def test_wedge_x_asymmetric_components():
    n = 16
    m = missing_region_mask("wedge_x:-54:66", n)
    assert _at(m, n, 0, 1, 2) == 1  # θ* = atan(2) = +63.4
    assert _at(m, n, 0, 1, -2) == 0  # θ* = -63.4
    assert _at(m, n, 0, 1, 3) == 0 and _at(m, n, 0, 1, -3) == 0
    assert _at(m, n, 3, 1, 2) == 1 and _at(m, n, 3, 1, -2) == 0  # independent of kx
    assert _at(m, n, 3, 0, 0) == 1  # kx axis observed
    assert _at(m, n, 0, 0, 3) == 0


def test_symmetric_wedge_and_limits():
    n = 16
    m = missing_region_mask("wedge_y:-45:45", n)
    assert _at(m, n, 1, 0, 1) == 1 and _at(m, n, 1, 0, -1) == 1  # closed interval
    assert _at(m, n, 2, 0, 3) == 0 and _at(m, n, 2, 0, -3) == 0
    full = missing_region_mask("wedge_y:-90:90", n)
    assert full.min() == 1  # the whole range observes everything, kz axis included
    edge = missing_region_mask("wedge_y:0:90", n)
    assert _at(edge, n, 0, 0, 5) == 1 and _at(edge, n, 1, 0, -5) == 1 and _at(edge, n, 1, 0, 5) == 0


def test_pyramid_contains_both_wedges_and_none_is_all():
    n = 20
    y = missing_region_mask("wedge_y:-50:60", n)
    x = missing_region_mask("wedge_x:-40:55", n)
    p = missing_region_mask("pyramid:-50:60:-40:55", n)
    np.testing.assert_array_equal(p, np.maximum(x, y))
    assert (p >= y).all() and (p >= x).all() and p.sum() > max(x.sum(), y.sum())
    assert missing_region_mask("none", n).min() == 1


def test_cone_components():
    n = 16
    m = missing_region_mask("cone:45", n)
    assert _at(m, n, 1, 0, 1) == 1  # exactly 45° from kz
    assert _at(m, n, 1, 0, 2) == 0 and _at(m, n, 0, 2, -1) == 1 and _at(m, n, 0, 0, 3) == 0


# ---------------------------------------------------------------- symmetry and dtype


REGIONS = ["none", "wedge_y:-54:66", "wedge_x:-70:35", "pyramid:-60:50:-45:65", "cone:37"]


@pytest.mark.parametrize("n", [16, 17])
@pytest.mark.parametrize("text", REGIONS)
def test_masks_are_centrosymmetric(text, n):
    m = missing_region_mask(text, n)
    assert m.shape == (n, n, n // 2 + 1) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0} and m[0, 0, 0] == 1
    for p in [0] + ([n // 2] if n % 2 == 0 else []):  # the self-conjugate planes
        plane = m[:, :, p]
        np.testing.assert_array_equal(plane, np.roll(np.flip(plane, (0, 1)), 1, (0, 1)))
    # a masked real volume stays real: irfft -> rfft reproduces the masked spectrum
    rng = np.random.default_rng(1)
    F = ft.rfft_unitary(rng.standard_normal((n, n, n))) * m
    np.testing.assert_allclose(ft.rfft_unitary(ft.irfft_unitary(F, n)), F, atol=1e-10)


# ---------------------------------------------------------------- observed fractions


def _pyramid_fraction(tm):
    """Continuous observed fraction of a symmetric dual-axis ±tm: 1 - (2/π) asin(cos² tm)."""
    return 1.0 - 2.0 / math.pi * math.asin(math.cos(math.radians(tm)) ** 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("wedge_y:-60:60", 120 / 180),
        ("wedge_y:-54:66", 120 / 180),
        ("wedge_x:-45:30", 75 / 180),
        ("pyramid:-60:60:-60:60", _pyramid_fraction(60)),
        ("pyramid:-45:45:-45:45", _pyramid_fraction(45)),
        ("cone:45", math.sin(math.radians(45))),
        ("cone:20", math.sin(math.radians(20))),
        ("none", 1.0),
    ],
)
def test_observed_fraction_matches_geometry(text, expected):
    n = 64
    frac = ft.observed_fraction(missing_region_mask(text, n), radius=n / 2 - 1)
    assert abs(frac - expected) < 0.02, (text, frac, expected)


def test_observed_fraction_counts_full_spectrum():
    n = 8
    m = missing_region_mask("wedge_y:-30:60", n)
    # brute force on the full spectrum using the geometric definition
    k = np.round(np.fft.fftfreq(n) * n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        th = np.where(kx == 0, 90.0, -np.degrees(np.arctan(kz / kx)))
    obs = ((th >= -30 - 1e-9) & (th <= 60 + 1e-9)) | ((kx == 0) & (kz == 0))
    interior = (np.abs(kz) < n / 2) & (np.abs(kx) < n / 2)  # away from aliased Nyquist planes
    half_sel = interior[:, :, : n // 2 + 1]
    np.testing.assert_array_equal(m[half_sel] == 1, obs[:, :, : n // 2 + 1][half_sel])
    assert np.isclose(ft.observed_fraction(m), (_full(m, n)).mean())


def _full(h, n):
    """Expand a centrosymmetric real half-spectrum array to the full FFT layout (n, n, n)."""
    full = np.empty((n, n, n), dtype=h.dtype)
    full[:, :, : n // 2 + 1] = h
    ix = np.arange(n // 2 + 1, n)
    mirror = np.roll(np.flip(h, axis=(0, 1)), 1, axis=(0, 1))
    full[:, :, ix] = mirror[:, :, n - ix]
    return full


# ---------------------------------------------------------------- weight volumes


@pytest.mark.parametrize("n", [12, 13])
def test_weight_volume_mask_half_and_full_layouts(n):
    wedge = missing_region_mask("wedge_y:-50:65", n)
    weights_half = 0.2 + 0.7 * wedge  # observed 0.9, missing 0.2: threshold 0.45
    m_half = ft.weight_volume_mask(weights_half)
    np.testing.assert_array_equal(m_half, wedge)
    weights_full = np.fft.fftshift(_full(weights_half, n))  # centred full volume
    np.testing.assert_array_equal(ft.weight_volume_mask(weights_full), wedge)
    np.testing.assert_array_equal(ft.weight_volume_mask(weights_full, layout="full"), wedge)
    assert ft.weight_volume_mask(weights_half, threshold=0.1).min() == 1
    with pytest.raises(ValueError):
        ft.weight_volume_mask(np.zeros((n, n, 3)))


# ---------------------------------------------------------------- the sign convention
#
# Independent of the mask code: simulate a single-axis tilt series by real-space rotation and
# projection, back-project it, and check where the reconstruction's Fourier energy lies. The
# rotation matrices are written here from SPEC §1 (d(θ) = R_y(θ) ẑ = (sin θ, 0, cos θ),
# d(θ) = R_x(θ) ẑ = (0, -sin θ, cos θ)), not taken from mltomo.geometry.

SIM_N = 48


def _rot_xyz(axis, deg):
    """Right-handed rotation about +axis by deg degrees, acting on (x, y, z) column vectors."""
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    if axis == "y":
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _blobs(n, centres_zyx, sigma=1.0):
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((n, n, n))
    for cz, cy, cx in centres_zyx:
        vol += np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
    return vol


def _project(vol, R):
    """Line integrals along d = R ẑ: rotate so that d maps onto the z axis, sum along z.

    out[z', y', x'] = vol[c + R (r' - c)] in (x, y, z) terms; the array axes are (z, y, x), so
    the matrix is R with both index orders reversed. Returns the (y', x') image.
    """
    from scipy import ndimage

    n = vol.shape[0]
    M = R[::-1, ::-1]
    cen = np.full(3, n // 2, dtype=float)
    return ndimage.affine_transform(vol, M, offset=cen - M @ cen, order=1).sum(axis=0)


def _back_project(image, R):
    """Smear a (y', x') image along d = R ẑ: a volume constant along z', rotated back by Rᵀ."""
    from scipy import ndimage

    n = image.shape[0]
    M = R[::-1, ::-1].T
    cen = np.full(3, n // 2, dtype=float)
    smear = np.broadcast_to(image, (n, n, n))
    return ndimage.affine_transform(smear, M, offset=cen - M @ cen, order=1)


def _tilt_series_reconstruction(axis, lo, hi, step=2.0):
    """Weighted back-projection of a tilt series about ``axis`` over [lo, hi] degrees."""
    n = SIM_N
    vol = _blobs(n, [(5, -7, 3), (-6, 4, 8), (2, 9, -5), (-3, -2, -9)])
    k = np.abs(np.fft.fftfreq(n))
    # ramp across the tilt axis (x' for tilts about y, y' for tilts about x): without it the
    # tilt axis, which every view fills, dominates the energy and leaks into its neighbours
    ramp = (k[None, :] if axis == "y" else k[:, None]) + 1.0 / n
    rec = np.zeros((n, n, n))
    for theta in np.arange(lo, hi + 1e-9, step):
        R = _rot_xyz(axis, theta)
        proj = _project(vol, R)
        proj = np.real(np.fft.ifft2(np.fft.fft2(proj) * ramp))
        rec += _back_project(proj, R)
    return rec


def _energy_outside(rec, mask):
    """Fraction of the Fourier energy (0 < |k| ≤ 0.8 Nyquist, full spectrum) where mask = 0."""
    n = rec.shape[0]
    F = np.fft.rfftn(np.fft.ifftshift(rec), norm="ortho")  # same layout, not ft.rfft_unitary
    k = np.round(np.fft.fftfreq(n) * n)
    kx = np.arange(n // 2 + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    mult = np.where((kx == 0) | (kx == n // 2), 1.0, 2.0)[None, None, :]
    e = mult * np.abs(F) ** 2 * ((r > 0) & (r <= 0.8 * n / 2))
    return float((e * (mask == 0)).sum() / e.sum())


def test_projector_projects_along_d():
    """The harness itself: a point on the line through the centre along d(θ) lands on the
    image centre for tilt θ and off it for -θ (so the harness cannot hide a flipped sign)."""
    n, c = SIM_N, SIM_N // 2
    np.testing.assert_allclose(_rot_xyz("y", 30) @ [0, 0, 1], [0.5, 0, math.cos(math.pi / 6)])
    np.testing.assert_allclose(_rot_xyz("x", 30) @ [0, 0, 1], [0, -0.5, math.cos(math.pi / 6)])
    for axis in "yx":
        d = _rot_xyz(axis, 30.0) @ [0.0, 0.0, 1.0]  # (x, y, z)
        vol = _blobs(n, [tuple(8.0 * d[::-1])])  # blob at 8·d, given in (z, y, x)
        peak = np.unravel_index(_project(vol, _rot_xyz(axis, 30.0)).argmax(), (n, n))
        assert peak == (c, c)
        peak = np.unravel_index(_project(vol, _rot_xyz(axis, -30.0)).argmax(), (n, n))
        assert max(abs(peak[0] - c), abs(peak[1] - c)) >= 6


@pytest.mark.parametrize("axis", ["y", "x"])
def test_wedge_sign_convention_against_simulated_tilt_series(axis):
    rec = _tilt_series_reconstruction(axis, -40.0, 70.0)
    n = rec.shape[0]
    right = _energy_outside(rec, missing_region_mask(f"wedge_{axis}:-40:70", n))
    mirrored = _energy_outside(rec, missing_region_mask(f"wedge_{axis}:-70:40", n))
    assert right < 0.05, right
    assert mirrored > 0.18, mirrored
