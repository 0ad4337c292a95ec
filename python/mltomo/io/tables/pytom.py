"""PyTom XML particle lists (conventions and sources in :mod:`mltomo.io.tables`).

``<ParticleList><Particle Filename="...">`` with ``<Rotation Z1= Z2= X= Paradigm="ZXZ"/>``,
``<Shift X= Y= Z=/>``, ``<PickPosition X= Y= Z= Origin=.../>``, ``<Class Name=.../>`` and a
``<SingleTiltWedge Angle1= Angle2=>`` (or the older ``<WedgeInfo>``), as PyTom's
``pytom/basic/structures.py`` writes them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from mltomo.io.tables._common import ParticlePoses, TableFormatError, check_finite, parse_region, region_string
from mltomo.io.tables.motl import tom_angles, tom_matrix


def _floats(path, i: int, el, names, default=None) -> list[float]:
    out = []
    for name in names:
        text = el.get(name) if el is not None else None
        if text is None:
            if default is None:
                raise TableFormatError(f"{path}: particle {i}: <{el.tag if el is not None else '?'}> lacks {name}=")
            out.append(default)
            continue
        try:
            out.append(float(text))
        except ValueError:
            raise TableFormatError(f"{path}: particle {i}: <{el.tag} {name}={text!r}> is not a number") from None
    return out


def _wedge(path, i: int, p) -> str:
    """mltomo's missing region of a particle's ``SingleTiltWedge``: PyTom's angles are the
    half-openings of the missing wedge, so the tilt range is ``-(90 - Angle1) .. 90 - Angle2``."""
    w = p.find("SingleTiltWedge")
    if w is None:
        w = p.find("WedgeInfo")
    if w is None:
        w = p.find("Wedge/SingleTiltWedge")
    if w is None:
        return ""
    if w.get("Angle1") is None and w.get("Angle") is not None:
        a1 = a2 = _floats(path, i, w, ("Angle",))[0]
    else:
        a1, a2 = _floats(path, i, w, ("Angle1", "Angle2"), default=0.0)
    axis = w.find("TiltAxisRotation")
    if axis is not None and any(v != 0 for v in _floats(path, i, axis, ("Z1", "Z2", "X"), default=0.0)):
        return ""  # a tilt axis other than y: left to the command line's --missing
    if a1 == 0 and a2 == 0:
        return "none"
    return region_string("wedge_y", -(90.0 - a1), 90.0 - a2)


def _particle(path, i: int, p) -> dict:
    rot = p.find("Rotation")
    paradigm = rot.get("Paradigm", "ZXZ") if rot is not None else "ZXZ"
    if paradigm.upper() != "ZXZ":
        raise TableFormatError(f"{path}: particle {i}: Rotation Paradigm={paradigm!r}, only ZXZ is supported")
    z1, z2, x = _floats(path, i, rot, ("Z1", "Z2", "X"), default=0.0)
    shift = _floats(path, i, p.find("Shift"), ("X", "Y", "Z"), default=0.0)
    pick = p.find("PickPosition")
    xyz = _floats(path, i, pick, ("X", "Y", "Z"), default=0.0)
    origin = pick.get("Origin", "") if pick is not None else ""
    cls = p.find("Class")
    name = cls.get("Name", "") if cls is not None else ""
    try:
        klass = int(float(name))
    except ValueError:
        klass = 0
    return {"filename": p.get("Filename", ""), "angles": (z1, z2, x), "shift": shift, "xyz": xyz,
            "tomo": Path(origin).stem if origin else "", "class": klass, "region": _wedge(path, i, p)}


def read_pytom(path) -> ParticlePoses:
    """The particles of a PyTom XML particle list."""
    path = Path(path)
    if not path.is_file():
        raise TableFormatError(f"{path}: no such file" if not path.exists() else f"{path}: is not a file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise TableFormatError(f"{path}: malformed XML (line {line}, column {col + 1})") from None
    except OSError as exc:
        raise TableFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    particles = [root] if root.tag == "Particle" else list(root.iter("Particle"))
    if root.tag not in ("ParticleList", "Particle"):
        raise TableFormatError(f"{path}: XML root is <{root.tag}>, not a PyTom <ParticleList>")
    if not particles:
        raise TableFormatError(f"{path}: no <Particle> in the particle list")
    recs = [_particle(path, i + 1, p) for i, p in enumerate(particles)]
    ang = np.array([r["angles"] for r in recs], dtype=np.float64)  # (N, 3): Z1 = phi, Z2 = psi, X = theta
    shifts = np.array([r["shift"] for r in recs], dtype=np.float64)
    check_finite(path, "a Rotation angle", ang)
    check_finite(path, "a Shift", shifts)
    tomos = tuple(r["tomo"] for r in recs)
    return ParticlePoses(
        matrices=tom_matrix(ang[:, 0], ang[:, 1], ang[:, 2]), shifts_voxels=shifts,
        tags=np.arange(1, len(recs) + 1),
        coordinates=np.array([r["xyz"] for r in recs], dtype=np.float64) + 1.0,  # PyTom counts from 0
        tomograms=tomos if any(tomos) else None,
        classes=np.array([r["class"] for r in recs], dtype=np.int64),
        image_names=tuple(r["filename"] for r in recs) if all(r["filename"] for r in recs) else None,
        missing_regions=tuple(r["region"] for r in recs),
    )


def write_pytom(path, poses: ParticlePoses) -> None:
    """Write a PyTom particle list, atomically."""
    from mltomo.io.atomic import atomic_write_bytes

    phi, psi, theta = tom_angles(poses.matrices)
    n = len(poses)
    root = ET.Element("ParticleList")
    coords = poses.coordinates if poses.coordinates is not None else np.ones((n, 3))
    for i in range(n):
        name = poses.image_names[i] if poses.image_names else f"particle_{int(poses.tags[i])}.em"
        p = ET.SubElement(root, "Particle", Filename=name)
        ET.SubElement(p, "Rotation", Z1=f"{phi[i]:.10g}", Z2=f"{psi[i]:.10g}", X=f"{theta[i]:.10g}", Paradigm="ZXZ")
        sx, sy, sz = (f"{v:.10g}" for v in poses.shifts_voxels[i])
        ET.SubElement(p, "Shift", X=sx, Y=sy, Z=sz)
        px, py, pz = (f"{v - 1.0:.10g}" for v in coords[i])
        origin = poses.tomograms[i] if poses.tomograms else ""
        ET.SubElement(p, "PickPosition", X=px, Y=py, Z=pz, Origin=origin, Binning="1", RefMarkIndex="1")
        region = parse_region(poses.missing_regions[i]) if poses.missing_regions else None
        if region is not None and region[0] == "wedge_y":
            w = ET.SubElement(p, "SingleTiltWedge", Angle1=f"{90.0 + region[1]:g}", Angle2=f"{90.0 - region[2]:g}",
                              CutoffRadius="0.0", Smooth="0.0")
            ET.SubElement(w, "TiltAxisRotation", Z1="0.0", Z2="0.0", X="0.0")
        if poses.classes is not None:
            ET.SubElement(p, "Class", Name=str(int(poses.classes[i])))
    ET.indent(root)
    atomic_write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")
