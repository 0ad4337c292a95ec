"""Atomic models (PDB and mmCIF, ``.gz`` too) as point clouds, read with gemmi.

gemmi (the field's library) parses both formats and their biological assemblies (PDB
``REMARK 350 BIOMT``, mmCIF ``pdbx_struct_assembly_gen``/``pdbx_struct_oper_list``); this
module only turns a model into arrays for :mod:`mltomo.simulate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mltomo.io import FileFormatError


def _atoms(model, include_water: bool):
    """``(coords (M, 3), weights (M,), chains (M,), subchains (M,))`` of a gemmi model."""
    coords, weights, chains, subchains = [], [], [], []
    for chain in model:
        for res in chain:
            if not include_water and res.is_water():
                continue
            for atom in res:
                if atom.is_hydrogen():
                    continue
                z = atom.element.atomic_number
                if z == 0:
                    raise ValueError(f"unknown element of atom {atom.name!r} in {res.name} {chain.name}{res.seqid}")
                coords.append(atom.pos.tolist())
                weights.append(z)
                chains.append(chain.name)
                subchains.append(res.subchain)
    return (np.array(coords, dtype=np.float64).reshape(-1, 3), np.array(weights, dtype=np.float64),
            np.array(chains, dtype=object), np.array(subchains, dtype=object))


def _assembly(assembly, xyz, w, ch, sub):
    """The copies of the assembly's generators: each operator applied to the chains (PDB) or
    subchains (mmCIF) it names; a copy made by an operator other than "1" is labelled "A/k"."""
    out_c, out_w, out_ch = [], [], []
    for gen in assembly.generators:
        sel = np.ones(len(w), bool)
        if gen.chains:
            sel &= np.isin(ch, list(gen.chains))
        if gen.subchains:
            sel &= np.isin(sub, list(gen.subchains))
        for op in gen.operators:
            R = np.array(op.transform.mat.tolist())
            t = np.array(op.transform.vec.tolist())
            out_c.append(xyz[sel] @ R.T + t)
            out_w.append(w[sel])
            out_ch.append(ch[sel] if op.name == "1" else np.array([f"{c}/{op.name}" for c in ch[sel]], dtype=object))
    if not out_c:
        return xyz[:0], w[:0], ch[:0]
    return np.concatenate(out_c), np.concatenate(out_w), np.concatenate(out_ch)


def read_structure(path, apply_biomt: bool = True, include_water: bool = True, return_chains: bool = False):
    """Atoms of a PDB or mmCIF file as a point cloud: ``(coords (M, 3) Å (x, y, z), weights (M,))``.

    Reads the first model. The weight of an atom is its atomic number; hydrogens and
    deuteriums are skipped; of alternate locations only the first conformer is kept.
    ``include_water=False`` drops waters.

    ``apply_biomt=True`` builds biological assembly 1 (for PDB 1OEL: 2 operators on chains A–G
    -> GroEL14, 54,156 atoms). Without an assembly the file's atoms are returned as they are.

    ``return_chains=True`` adds a third array ``(M,)`` of chain labels; copies made by
    operator ``k`` other than the first (``"1"``) are labelled ``"A/k"``.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise FileFormatError(f"{path}: cannot be read ({exc})") from None
    if len(st) == 0:
        raise FileFormatError(f"{path}: no ATOM/HETATM records")
    st.remove_alternative_conformations()
    try:
        xyz, w, ch, sub = _atoms(st[0], include_water)
    except ValueError as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    if len(w) == 0:
        raise FileFormatError(f"{path}: no ATOM/HETATM records")
    if apply_biomt and len(st.assemblies) > 0:
        xyz, w, ch = _assembly(st.assemblies[0], xyz, w, ch, sub)
        if len(w) == 0:
            raise FileFormatError(f"{path}: assembly 1 selects no atoms (chain names do not match)")
    if return_chains:
        return xyz, w, ch.astype(str)
    return xyz, w
