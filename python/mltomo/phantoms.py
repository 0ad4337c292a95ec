"""Phantoms for simulations: point clouds in Å, built in (unions of spheres, file-free) or
from the GroEL atomic models (PDB 1OEL and 1AON, read with :mod:`mltomo.io.structure`), in
one common frame, with their point groups."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mltomo.io.structure import read_structure


class PointCloud(NamedTuple):
    """A phantom: ``coords`` ``(M, 3)`` in Å as ``(x, y, z)``, ``weights`` ``(M,)``."""

    coords: np.ndarray
    weights: np.ndarray



# Built-in phantoms: unions of spheres filled with points on a cubic lattice, in Å.
_LATTICE_A = 2.5
_PROTEIN_ELECTRONS_PER_A3 = 0.44  # so the maps have the scale of PDB maps (weight = Z)


def _groel_like_spheres(cap: bool) -> list[tuple[float, float, float, float]]:
    """Spheres ``(x, y, z, radius)`` of the built-in phantoms; the 7-fold axis is ``z``.

    Class 2 mimics what GroES binding does to GroEL (1AON vs 1OEL): the cis (upper) ring
    elongates, its apical domains swing up and out, and the dome caps it. As for the real
    models, the two maps then differ by about 40 % (relative L2 at 25-30 Å), not only by
    the 8 % of mass GroES adds.
    """
    # Per subunit: (radius from axis, azimuth offset deg, height, sphere radius)
    trans = (
        (45.0, 0.0, 20.0, 20.0),  # equatorial
        (60.0, 8.0, 45.0, 10.0),  # intermediate
        (50.0, 16.0, 60.0, 16.0),  # apical (twisted: the phantom is chiral)
    )
    cis = (
        (45.0, 0.0, 20.0, 20.0),
        (62.0, 14.0, 52.0, 11.0),  # intermediate domain tilted down and out
        (58.0, 40.0, 80.0, 16.0),  # apical domain raised and twisted (opened cis ring)
    )
    spheres = []
    for j in range(7):
        phi0 = 360.0 * j / 7.0
        for r, dphi, z, rad in (cis if cap else trans):
            phi = math.radians(phi0 + dphi)
            spheres.append((r * math.cos(phi), r * math.sin(phi), z, rad))
        for r, dphi, z, rad in trans:  # lower ring: 2-fold about x (GroEL's D7)
            phi = math.radians(phi0 + dphi)
            spheres.append((r * math.cos(phi), -r * math.sin(phi), -z, rad))
    spheres.append((72.0, 0.0, 20.0, 9.0))  # a tag on subunit 1 of the upper ring: no symmetry left
    if cap:  # GroES-like dome on the raised cis ring: 7 blobs and a roof, ~80 Å wide, ~30 Å tall
        for j in range(7):
            phi = math.radians(360.0 * j / 7.0 + 25.0)
            spheres.append((29.0 * math.cos(phi), 29.0 * math.sin(phi), 105.0, 12.0))
        spheres.append((0.0, 0.0, 115.0, 13.0))
    return spheres


def _fill_spheres(spheres, spacing: float) -> np.ndarray:
    s = np.asarray(spheres, dtype=np.float64)  # (S, 4)
    lo = np.floor((s[:, :3] - s[:, 3:]).min(axis=0) / spacing) * spacing
    hi = (s[:, :3] + s[:, 3:]).max(axis=0)
    axes = [np.arange(lo[i], hi[i] + spacing, spacing) for i in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)  # (L, 3)
    inside = np.zeros(pts.shape[0], dtype=bool)
    for cx, cy, cz, r in s:
        inside |= ((pts[:, 0] - cx) ** 2 + (pts[:, 1] - cy) ** 2 + (pts[:, 2] - cz) ** 2) <= r * r
    return pts[inside]


def builtin_phantoms() -> list[PointCloud]:
    """Two file-free phantoms in the spirit of the paper's GroEL14 / GroEL14-GroES7.

    Class 1: a GroEL-like hollow double ring -- two stacked rings of 7 subunits (three
    domains each, the apical ones twisted), about 145 Å wide and 150 Å tall, with its 7-fold
    axis along ``z`` and the rings related by a 2-fold axis along ``x``; one small tag on one
    subunit removes every symmetry, so poses are unique. Class 2: the same points plus a
    GroES-like dome (about 80 Å wide and 30 Å tall) capping the ``+z`` end. The volumes are
    filled with points on a 2.5 Å lattice, weight 0.44 e/Å³ × 2.5³ Å³ each (the electron
    density of protein), so the maps have the scale of the PDB maps. Deterministic.
    """
    w = _PROTEIN_ELECTRONS_PER_A3 * _LATTICE_A**3
    out = []
    for cap in (False, True):
        pts = _fill_spheres(_groel_like_spheres(cap), _LATTICE_A)
        out.append(PointCloud(pts, np.full(pts.shape[0], w)))
    return out


def default_data_dir() -> Path | None:
    """``../shared/data`` next to the repository (or the current directory), if it exists."""
    here = Path(__file__).resolve()
    candidates = [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    if len(here.parents) > 3:
        candidates.insert(0, here.parents[3] / "shared" / "data")  # <repo>/python/mltomo/simulate.py
    for c in candidates:
        if (c / "models").is_dir():
            return c
    return None


def _frame_from_ring(ring_centroids: np.ndarray, centre: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Rows ``(x', y', z')``: ``z'`` the normal of the ring's plane pointing along ``up``,
    ``x'`` towards the first ring subunit."""
    _, _, vt = np.linalg.svd(ring_centroids - ring_centroids.mean(axis=0))
    z = vt[2]
    if np.dot(z, up) < 0:
        z = -z
    x = ring_centroids[0] - centre
    x = x - np.dot(x, z) * z
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z])  # (3, 3)


def _groel_frame(coords, weights, chains, ring, body, cap=None) -> PointCloud:
    chains = np.asarray(chains)
    cent = np.array([np.average(coords[chains == c], axis=0, weights=weights[chains == c]) for c in ring])
    sel = np.isin(chains, body)
    centre = np.average(coords[sel], axis=0, weights=weights[sel])
    if cap is not None:
        up = np.average(coords[np.isin(chains, cap)], axis=0) - centre
    else:
        up = cent.mean(axis=0) - centre
    M = _frame_from_ring(cent, centre, up)
    return PointCloud((coords - centre) @ M.T, weights.copy())


def groel_models(data_dir=None) -> list[PointCloud]:
    """GroEL14 (PDB 1OEL, assembly from BIOMT) and GroEL14-GroES7 (PDB 1AON) point clouds.

    Both are put in one frame: origin at the centre of mass of the 14 GroEL subunits, the
    7-fold axis along ``z`` (from the plane of one ring's subunit centroids), ``+z`` towards
    the GroES cap of 1AON (its cis ring, chains A–G) and towards ring A–G of 1OEL, ``+x``
    towards subunit A. Crystallographic waters are left out. ``data_dir`` holds
    ``models/1oel.pdb.gz`` and ``models/1aon.pdb.gz`` (default :func:`default_data_dir`).
    """
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    if d is None:
        from mltomo.io import FileFormatError

        raise FileFormatError("../shared/data: not found; pass the directory holding models/1oel.pdb.gz")
    ring1 = list("ABCDEFG")
    c, w, ch = read_structure(d / "models" / "1oel.pdb.gz", include_water=False, return_chains=True)
    groel = _groel_frame(c, w, ch, ring1, ring1 + [f"{x}/2" for x in ring1])
    c, w, ch = read_structure(d / "models" / "1aon.pdb.gz", include_water=False, return_chains=True)
    complex_ = _groel_frame(c, w, ch, ring1, list("ABCDEFGHIJKLMN"), cap=list("OPQRSTU"))
    return [groel, complex_]


def groel_symmetry_groups(models) -> list[np.ndarray]:
    """Point groups ``[(14, 3, 3), (7, 3, 3)]`` of the two :func:`groel_models`, in their frame.

    GroEL14 (1OEL) is D7: the 7-fold along ``z`` and a 2-fold in the ``xy`` plane, which is
    read off the assembly itself -- its second half is the BIOMT copy of the first, so the
    least-squares rotation between the halves (Kabsch) is that 2-fold. GroEL14-GroES7 (1AON)
    is C7 about ``z`` (GroES on one ring removes the 2-fold). Raises ``ValueError`` when the
    first cloud is not such a two-copy assembly (odd size, RMS misfit > 1 Å, or not a 2-fold
    perpendicular to ``z``).
    """
    from mltomo.geometry import rotation_z, symmetry_group

    c = np.asarray(models[0][0], dtype=np.float64)
    m = c.shape[0] // 2
    if c.shape[0] != 2 * m or m == 0:
        raise ValueError("GroEL14 cloud: expected two BIOMT copies of equal size")
    X, Y = c[:m], c[m:]
    xc, yc = X.mean(0), Y.mean(0)
    U, _, Vt = np.linalg.svd((Y - yc).T @ (X - xc))  # Y ≈ R X
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    rms = float(np.sqrt(np.mean(np.sum((Y - yc - (X - xc) @ R.T) ** 2, axis=1))))
    w, v = np.linalg.eigh(0.5 * (R + R.T))  # a 2-fold: R = 2 a aᵀ − I, eigenvalue 1 along a
    axis = v[:, np.argmax(w)]
    if rms > 1.0 or np.trace(R) > -0.99 or abs(axis[2]) > 0.05:
        raise ValueError(f"GroEL14 cloud: the halves are not related by a 2-fold perpendicular to z "
                         f"(RMS {rms:.2f} Å, trace {np.trace(R):.3f}, axis z {axis[2]:.3f})")
    phi = float(np.degrees(np.arctan2(axis[1], axis[0])))
    Q = rotation_z(phi)  # D7 has its 2-fold along x; turn it onto the axis found
    d7 = Q @ symmetry_group("D7") @ Q.T
    return [d7, symmetry_group("C7")]
