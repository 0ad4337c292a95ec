"""Reading a particle table into :class:`~mltomo.model.Particles`.

The table is a RELION-style STAR file. Columns used:

* ``rlnImageName`` (required): an MRC/``.em`` volume, or ``n@stack.mrcs``, relative to the
  STAR file's directory (for a run's ``run_itNNN_data.star``: its input table's, see
  :func:`image_dir`);
* the missing region of each particle, first found of: ``rlnCtfImage`` (a RELION 3 CTF
  volume ``c``, which multiplies the reference: the particle is divided by ``c`` and weighted by
  the continuous ``c²``; or, ``--weight-kind ctf2`` and for RELION 4 pseudo-subtomograms, a
  CTF² sum ``W`` of premultiplied data: divided by and weighted with ``W``;
  :func:`mltomo.fourier.ctf_weights`; with ``--weight-threshold`` a binary mask instead; its
  layout, centred or origin at index 0, by ``--weight-layout``, default detected from the
  particle's power spectrum),
  ``mltomoMissingRegion`` (text such as ``wedge_y:-60:60``), the region of the particle's
  ``rlnTomoName`` in a ``data_tomograms`` block (columns ``rlnTomoName``,
  ``mltomoMissingRegion``), else the command line's ``--missing``;
* optional priors: ``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/Y/ZAngst``, ``rlnClassNumber``;
* the voxel size: ``rlnImagePixelSize`` in ``data_optics`` if present, else the volumes'
  headers (all must agree).

A RELION 5 optimisation set, or a table of 2D tilt stacks (``rlnTomoSubTomosAre2DStacks 1``),
is read by :mod:`mltomo.io.relion5` instead: one pseudo-subtomogram and one weight per particle.

Each process reads only its own contiguous block of rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mltomo import spectra_cache
from mltomo.model import Particles
from mltomo.parallel import SerialComm, split_range


class ParticleTableError(ValueError):
    """A problem with the particle table or a file it names (one line, names the file)."""


def is_optimisation_set(blocks: dict) -> bool:
    """True if a block of the STAR file names ``rlnTomoParticlesFile`` (a RELION 5 optimisation set)."""
    return any(star_value(b, "rlnTomoParticlesFile") is not None for b in blocks.values())


def is_stack_table(blocks: dict) -> bool:
    """True if ``data_general`` says ``rlnTomoSubTomosAre2DStacks 1`` (RELION 5 2D tilt stacks)."""
    value = star_value(blocks.get("general"), "rlnTomoSubTomosAre2DStacks")
    try:
        return value is not None and int(float(value)) == 1
    except (TypeError, ValueError):
        return False


def star_value(block, name):
    """The value of ``name`` in a simple block (dict) or the first row of a loop, else None."""
    if isinstance(block, dict):
        return block.get(name)
    if block is not None and hasattr(block, "columns") and name in block.columns and len(block):
        return block[name].iloc[0]
    return None


def _particle_block(blocks, path) -> str:
    """The name of the particle table: ``particles`` if it is one, else the first ``loop_``
    with an ``rlnImageName`` column."""
    tables = [name for name, b in blocks.items() if hasattr(b, "columns") and "rlnImageName" in b.columns]
    if "particles" in tables:
        return "particles"
    if tables:
        return tables[0]
    raise ParticleTableError(f"{path}: no loop_ table with an rlnImageName column")


def image_dir(star_path) -> Path:
    """The directory the image names of a particle table are relative to: the table's own, except
    for a refinement's ``run_itNNN_data.star``, which copies its input table's names unchanged;
    those are relative to the input table's directory (``run_config.json`` records it), followed
    through runs continued from such a file and through RELION 5 optimisation sets (to the
    particle table they name)."""
    path = Path(star_path)
    seen = set()
    while path not in seen:
        seen.add(path)
        if re.fullmatch(r"run_it\d+_data\.star", path.name):
            try:
                source = Path(json.loads((path.parent / "run_config.json").read_text())["particles"])
            except (OSError, ValueError, KeyError, TypeError):
                break
            path = source if source.is_absolute() else path.parent / source
            continue
        named = _optimisation_set_particles(path)
        if named is None:
            break
        path = named
    return path.parent


def _optimisation_set_particles(path: Path) -> Path | None:
    """The particle table an optimisation set names (relative to the set, else the current
    directory), or None if ``path`` is not one (only the file's first 4 kB are looked at)."""
    try:
        with open(path, errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return None
    m = re.search(r"^\s*_rlnTomoParticlesFile[ \t]+([^\s#]\S*)", head, re.MULTILINE)
    if m is None:
        return None
    named = Path(m.group(1).strip("'\""))
    if named.is_absolute() or (path.parent / named).exists() or not named.exists():
        return path.parent / named
    return named


def read_particles(star_path, *, missing: str = "none", weight_threshold: float | None = None,
                   weight_layout: str = "auto", weight_kind: str = "auto", tomograms=None,
                   comm=None, memory_budget_bytes: float | None = None, cache_dir=None) -> Particles:
    """This rank's block of the STAR table ``star_path``: spectra, missing-region masks (by
    ``--missing``, the table's ``mltomoMissingRegion``, a tomograms block or weight volumes),
    priors. A bad table or particle is one error line (``ParticleTableError``) on every rank.

    A RELION 5 optimisation set, or a particle table of 2D tilt stacks
    (``rlnTomoSubTomosAre2DStacks 1``; its tomograms table is ``tomograms``), becomes
    pseudo-subtomograms with one weight per particle: see :mod:`mltomo.io.relion5`.

    Spectra larger than ``memory_budget_bytes`` are written to a memory-mapped cache in
    ``cache_dir`` as they are read (:mod:`mltomo.spectra_cache`).
    """
    comm = comm or SerialComm()
    path = Path(star_path)
    blocks = _read_blocks(path, comm)
    if is_optimisation_set(blocks) or is_stack_table(blocks):
        from mltomo.io import relion5

        return _normalised_weights(relion5.read_stack_particles(path, blocks, tomograms=tomograms, comm=comm,
                                                                memory_budget_bytes=memory_budget_bytes,
                                                                cache_dir=cache_dir), comm)
    df, table_name = _read_table(path, blocks, comm)
    star_dir = image_dir(path)
    optics = blocks.get("optics")
    voxel = None
    if optics is not None and hasattr(optics, "columns") and "rlnImagePixelSize" in optics.columns:
        voxel = float(optics["rlnImagePixelSize"].iloc[0])
    tomo_regions = {}
    tomos = blocks.get("tomograms")
    if tomos is not None and hasattr(tomos, "columns") and {"rlnTomoName", "mltomoMissingRegion"} <= set(tomos.columns):
        tomo_regions = dict(zip(tomos["rlnTomoName"].astype(str), tomos["mltomoMissingRegion"].astype(str)))

    N = len(df)
    a, b = split_range(N, comm.rank, comm.size)
    spectra, labels, names, masks, box, header_voxel = _read_block(
        df, a, b, star_dir, missing, (weight_threshold, weight_layout, weight_kind), tomo_regions, voxel, comm,
        (memory_budget_bytes, cache_dir))

    # Every rank must agree on the box and voxel size.
    info = comm.gather((box, header_voxel))
    info = comm.bcast(info)
    boxes = {bx for bx, _ in info if bx is not None}
    if len(boxes) > 1:
        comm.check(f"{path}: particles have different box sizes {sorted(boxes)}")
    box = boxes.pop() if boxes else box
    if voxel is None:
        vs = [v for _, v in info if v]
        voxel = float(vs[0]) if vs else 1.0

    label_list = sorted(masks)
    group_of = {lab: g for g, lab in enumerate(label_list)}
    groups = np.array([group_of[lab] for lab in labels], dtype=np.int32)
    mask_arr = (np.stack([masks[lab] for lab in label_list]).astype(np.float32) if label_list
                else np.ones((1, box, box, box // 2 + 1), np.float32))

    def cols(names_):
        if all(c in df.columns for c in names_):
            return df[list(names_)].to_numpy(np.float64)[a:b]
        return None

    prior_classes = df["rlnClassNumber"].to_numpy(np.int64)[a:b] if "rlnClassNumber" in df.columns else None
    return Particles(
        spectra=spectra if spectra is not None else np.empty((0, box, box, box // 2 + 1), np.complex64),
        masks=mask_arr,
        groups=groups,
        region_labels=tuple(label_list),
        voxel_size_angstrom=float(voxel),
        names=tuple(names),
        indices=np.arange(a, b),
        n_total=N,
        table=df,
        star_blocks=_other_blocks(blocks, table_name),
        prior_angles=cols(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")),
        prior_shifts_angstrom=cols(("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")),
        prior_classes=prior_classes,
    )


def _normalised_weights(particles: Particles, comm) -> Particles:
    """The particles with their weights divided by the largest of all particles' (all ranks):
    ``w ≤ 1``, as the imputation M-step needs; the common factor goes into σ². In place: the
    weights are this reader's own array, and a copy would hold them twice."""
    local = float(np.max(particles.masks)) if particles.masks.size else 0.0
    top = max(comm.bcast(comm.gather(local)))
    if top > 0:
        np.divide(particles.masks, np.float32(top), out=particles.masks)
    return particles


def _other_blocks(blocks: dict, table_name: str) -> tuple:
    """``(name, block)`` of every block of the file but the particle table, in file order, and
    ``(name, None)`` where the table stood (see :attr:`mltomo.model.Particles.star_blocks`)."""
    return tuple((name, None if name == table_name else block) for name, block in blocks.items())


def _read_blocks(path: Path, comm) -> dict:
    """Every block of the STAR file, or one error line on every rank."""
    from mltomo.io.star import read_star

    error = blocks = None
    try:
        if not path.is_file():
            raise ParticleTableError(f"{path}: no such file")
        try:
            blocks = read_star(path)
        except ValueError as exc:
            raise ParticleTableError(str(exc)) from exc
    except (ParticleTableError, OSError) as exc:
        error = str(exc)
    comm.check(error)
    return blocks


def _read_table(path: Path, blocks: dict, comm):
    """``(particle table, its block name)`` of the STAR file's blocks, or one error line on every rank."""
    error = None
    df = table_name = None
    try:
        table_name = _particle_block(blocks, path)
        df = blocks[table_name].reset_index(drop=True)
        if len(df) == 0:
            raise ParticleTableError(f"{path}: the particle table is empty")
    except ParticleTableError as exc:
        error = str(exc)
    comm.check(error)
    return df, table_name


def _read_block(df, a, b, star_dir, missing, weighting, tomo_regions, voxel, comm, storage=(None, None)):
    """This rank's rows ``a:b``: spectra, region labels, names, masks by label, box and the
    first particle's header voxel size; a bad file is one error line on every rank.
    ``weighting``: ``(threshold, layout, kind)`` of weight volumes; ``storage``: ``(memory
    budget, cache directory)`` of the spectra (:func:`mltomo.spectra_cache.allocate`)."""
    from mltomo.fourier import parse_missing_region, rfft_unitary
    from mltomo.io import read_volume_any

    spectra = None  # (b - a, box, box, box//2+1) complex64, allocated with the first particle's box
    labels, names = [], []
    masks, divisors = {}, {}
    box = None
    header_voxel = None
    error = None
    try:
        try:
            parse_missing_region(missing)
        except ValueError as exc:
            raise ParticleTableError(f"--missing {missing}: {exc}") from exc
        for i in range(a, b):
            row = df.iloc[i]
            name = str(row["rlnImageName"])
            vol, vs = read_volume_any(name, star_dir)
            if vol.ndim != 3 or len(set(vol.shape)) != 1:
                raise ParticleTableError(f"{name}: volume is {vol.shape}, particles must be cubic")
            if box is None:
                box, header_voxel = vol.shape[0], vs
                spectra = spectra_cache.allocate(b - a, box, *storage)
            elif vol.shape[0] != box:
                raise ParticleTableError(f"{name}: box {vol.shape[0]} differs from the first particle's {box}")
            if voxel is None and vs and header_voxel and abs(vs - header_voxel) > 1e-3 * header_voxel:
                raise ParticleTableError(
                    f"{name}: voxel size {vs:g} Å differs from the first particle's {header_voxel:g} Å")
            if not np.all(np.isfinite(vol)):
                raise ParticleTableError(f"{name}: contains NaN or infinite voxels")
            label = _region_label(row, df.columns, tomo_regions, missing)
            spectrum = rfft_unitary(vol.astype(np.float32))
            if label not in masks:
                masks[label], divisors[label] = _region_mask(label, name, box, star_dir, weighting, spectrum)
            if divisors[label] is not None:
                d = divisors[label]
                spectrum = np.where(d != 0, spectrum / np.where(d != 0, d, 1.0), 0).astype(np.complex64)
            labels.append(label)
            spectra[i - a] = spectrum
            names.append(name)
            spectra_cache.after_row(spectra, i - a)
        if spectra is not None:
            spectra_cache.release(spectra, slice(None))
    except (ParticleTableError, OSError, ValueError) as exc:
        error = str(exc)
    comm.check(error)
    return spectra, labels, names, masks, box, header_voxel


def _region_label(row, columns, tomo_regions: dict, missing: str) -> str:
    """The missing region of a table row: its weight volume (``rlnCtfImage``), its own
    ``mltomoMissingRegion``, its tomogram's, else the command line's default."""
    if "rlnCtfImage" in columns and str(row["rlnCtfImage"]) not in ("", "nan", "None"):
        return "weights:" + str(row["rlnCtfImage"])
    if "mltomoMissingRegion" in columns and str(row["mltomoMissingRegion"]) not in ("", "nan"):
        return str(row["mltomoMissingRegion"])
    if "rlnTomoName" in columns and str(row["rlnTomoName"]) in tomo_regions:
        return tomo_regions[str(row["rlnTomoName"])]
    return missing


def _region_mask(label: str, name: str, box: int, star_dir, weighting, spectrum):
    """``(mask (box, box, box//2+1), divisor or None)`` of a region label (``name``, ``spectrum``:
    the first particle using it; ``weighting``: (threshold, layout, kind) of weight volumes)."""
    from mltomo.fourier import missing_region_mask, parse_missing_region
    from mltomo.io import read_volume_any

    divisor = None
    if label.startswith("weights:"):
        wname = label[len("weights:"):]
        wvol, _ = read_volume_any(wname, star_dir, cubic=False)
        threshold, layout, kind = weighting
        try:
            mask, divisor = _weights(wvol, box, spectrum, threshold, layout, kind)
        except ValueError as exc:
            raise ParticleTableError(f"{wname}: {exc}") from exc
    else:
        try:
            mask = missing_region_mask(parse_missing_region(label), box)
        except ValueError as exc:
            raise ParticleTableError(f"{name}: missing region {label!r}: {exc}") from exc
    source = label.removeprefix("weights:")
    if mask.sum() <= 1:  # the origin alone (a geometric region keeps a plane)
        raise ParticleTableError(f"{source}: missing region of {name} leaves no observed Fourier "
                                 f"components besides the origin")
    return mask, divisor


def _weights(wvol, box: int, spectrum, threshold, layout, kind="auto"):
    """``(w, divisor)`` of a weight volume for ``box``³ particles (:func:`mltomo.fourier.ctf_weights`).
    A RELION 4 pseudo-subtomogram's weight (CTF² sum with its multiplicity concatenated along
    z, ``2·box`` slices) is a CTF² sum; any other is a CTF unless ``kind`` says otherwise."""
    from mltomo.fourier import WEIGHT_LAYOUTS, ctf_weights, detect_weight_layout, weight_volume_half

    shape = "×".join(map(str, wvol.shape))
    relion4 = wvol.ndim == 3 and wvol.shape[0] == 2 * box and wvol.shape[1] == box
    if relion4:
        wvol = wvol[:box]
    if kind == "auto":
        kind = "ctf2" if relion4 else "ctf"
    if wvol.ndim != 3 or wvol.shape[:2] != (box, box) or wvol.shape[2] not in (box, box // 2 + 1):
        raise ValueError(f"weight volume is {shape}, the particles are {box}³ "
                         f"(a weight volume must be {box}³, or {box}×{box}×{box // 2 + 1} for the half layout)")
    half_shape = wvol.shape[2] == box // 2 + 1 and box > 2
    if layout == "auto":
        layout = detect_weight_layout(wvol, spectrum)
    elif layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"--weight-layout {layout}: use auto, {', '.join(WEIGHT_LAYOUTS)}")
    elif (layout == "half") != half_shape:
        raise ValueError(f"weight volume is {shape}, which --weight-layout {layout} "
                         f"does not fit (use --weight-layout {'half' if half_shape else 'centred or origin'})")
    divisor, w = ctf_weights(weight_volume_half(wvol, layout), threshold, kind)
    return w, divisor


def particles_from_arrays(volumes, voxel_size_angstrom: float, missing="none", names=None,
                          comm=None, memory_budget_bytes: float | None = None, cache_dir=None) -> Particles:
    """Particles from in-memory volumes ``(N, n, n, n)`` sharing one missing region (e.g. a
    :class:`mltomo.simulate.SimulatedData`'s ``volumes`` and ``missing_region``).

    With ``comm`` (:func:`mltomo.parallel.get_comm`), every rank passes all ``N`` volumes and
    keeps its own contiguous block of them, as :func:`read_particles` does with a table.
    Spectra larger than ``memory_budget_bytes`` go to a memory-mapped cache in ``cache_dir``.
    """
    from mltomo.fourier import missing_region_mask, parse_missing_region, rfft_unitary

    vols = np.asarray(volumes, dtype=np.float32)
    if vols.ndim != 4 or len(set(vols.shape[1:])) != 1:
        raise ValueError(f"volumes must be (N, n, n, n), got {vols.shape}")
    if not np.all(np.isfinite(vols)):
        raise ValueError("volumes contain NaN or infinite voxels")
    N, n = vols.shape[0], vols.shape[1]
    comm = comm or SerialComm()
    a, b = split_range(N, comm.rank, comm.size)
    label = str(parse_missing_region(missing))
    mask = missing_region_mask(label, n)
    spectra = spectra_cache.allocate(b - a, n, memory_budget_bytes, cache_dir)
    for j in range(a, b):
        spectra[j - a] = rfft_unitary(vols[j])
    spectra_cache.release(spectra, slice(None))
    names = tuple(names) if names is not None else tuple(f"particle{i + 1}" for i in range(N))
    return Particles(
        spectra=spectra, masks=mask[None].astype(np.float32), groups=np.zeros(b - a, np.int32),
        region_labels=(label,), voxel_size_angstrom=float(voxel_size_angstrom),
        names=names[a:b], indices=np.arange(a, b), n_total=N,
    )
