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
