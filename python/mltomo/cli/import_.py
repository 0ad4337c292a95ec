"""Convert a Dynamo, TOM/AV3, STOPGAP or PyTom particle table to a STAR table mltomo reads.

Poses become mltomo's (and RELION's) ZYZ angles and rlnOriginX/Y/ZAngst (conventions and their
sources: mltomo.io.tables). The format is told by the extension (.tbl, .em, .star, .xml) or the
content; --format overrides.

$ mltomo import particles.tbl -o particles.star --voxel-size 6.8 --images data/particle_%05d.em
$ mltomo import allmotl_1.em -o particles.star --voxel-size 10 --images parts/particle_%d.em
$ mltomo import allmotl_3.star -o particles.star --voxel-size 4.4 --images subtomograms/subtomo_%d.mrc
$ mltomo import particleList.xml -o particles.star --voxel-size 5 --tomo-names 1=TS_01
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from mltomo.cli import UserError

log = logging.getLogger("mltomo")


def add_args(p):
    from mltomo.io.tables import FORMATS

    p.add_argument("input", metavar="INPUT", help="the particle table: Dynamo .tbl, TOM/AV3 .em motive list, "
                   "STOPGAP .star motive list or PyTom .xml particle list")
    p.add_argument("-o", "--out", required=True, metavar="OUT.star", help="the STAR table to write")
    p.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                   help="table format (default auto: by extension, then content)")
    p.add_argument("--images", metavar="TEMPLATE",
                   help="particle volume names, relative to OUT's directory: one integer field for the particle "
                        "number (Dynamo tag, motl row 4, STOPGAP subtomo_num), e.g. data/particle_%%05d.em, or "
                        "fields {tag} {index} {tomo} (default: Dynamo particle_%%05d.em, AV3 particle_%%d.em, "
                        "STOPGAP subtomo_%%d.mrc, PyTom's own Filename)")
    p.add_argument("--voxel-size", type=float, metavar="A",
                   help="voxel size in Å: shifts are in voxels, rlnOriginX/Y/ZAngst in Å (default: the first "
                        "particle volume's header)")
    p.add_argument("--tomo-names", nargs="+", metavar="ITEM",
                   help="rlnTomoName of each tomogram: N=NAME items, or one file of 'N NAME' lines (a Dynamo "
                        "table map); default the tomogram number (PyTom: the PickPosition Origin's stem)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="only warnings")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def _tomo_names(items) -> dict:
    if not items:
        return {}
    if len(items) == 1 and "=" not in items[0]:
        path = Path(items[0])
        if not path.is_file():
            raise UserError(f"--tomo-names {items[0]}: neither N=NAME nor an existing file")
        out = {}
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) < 2:
                raise UserError(f"{path}: line {lineno}: expected 'NUMBER NAME'")
            out[_key(fields[0])] = fields[1]
        return out
    out = {}
    for item in items:
        key, sep, name = item.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise UserError(f"--tomo-names {item!r}: expected N=NAME")
        out[_key(key.strip())] = name.strip()
    return out


def _key(text: str) -> str:
    """Tomogram numbers are keyed as the readers write them (``"3"`` for 3, 3.0, 003)."""
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _check(args):
    from mltomo.io.tables import check_template

    if args.voxel_size is not None and not (args.voxel_size > 0 and math.isfinite(args.voxel_size)):
        raise UserError(f"--voxel-size must be a positive number, got {args.voxel_size}")
    if args.images is not None:
        try:
            check_template(args.images)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    src, out = Path(args.input), Path(args.out)
    if out.suffix.lower() != ".star":
        raise UserError(f"-o {out}: the output must be a .star file")
    if out.is_dir():
        raise UserError(f"-o {out}: is a directory")
    if out.exists() and not args.overwrite:
        raise UserError(f"-o {out}: exists (use --overwrite to replace it)")
    if not out.resolve().parent.is_dir():
        raise UserError(f"-o {out}: directory {out.parent} does not exist")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise UserError(f"-o {out}: is the input table")


def _voxel_size(args, poses, names, out: Path) -> float | None:
    """``--voxel-size``, else the first particle volume's header, else None."""
    if args.voxel_size is not None:
        return float(args.voxel_size)
    from mltomo.io import read_volume_any, resolve_image_name

    try:
        path, _ = resolve_image_name(names[0], out.parent)
        if path.exists():
            _, vs = read_volume_any(names[0], out.parent)
            if vs > 0:
                log.info("voxel size %.4g Å from the header of %s", vs, path)
                return float(vs)
    except ValueError:
        pass
    if np.any(np.asarray(poses.shifts_voxels) != 0):
        raise UserError(f"{args.input}: shifts are in voxels and {names[0]} gives no voxel size: give --voxel-size")
    return None


def _blocks(df, voxel):
    import pandas as pd

    if voxel is None:
        return {"particles": df}
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [voxel]})
    df = df.copy()
    df["rlnOpticsGroup"] = 1
    return {"optics": optics, "particles": df}


def run(args) -> int:
    from mltomo.io.star import write_star
    from mltomo.io.tables import (
        TableFormatError,
        default_images,
        detect_format,
        format_names,
        read_table,
        to_dataframe,
    )

    _check(args)
    tomo_names = _tomo_names(args.tomo_names)
    try:
        fmt = detect_format(args.input) if args.format == "auto" else args.format
        if not Path(args.input).is_file():
            raise TableFormatError(f"{args.input}: no such file")
        poses = read_table(args.input, fmt)
    except TableFormatError as exc:
        raise UserError(str(exc)) from None
    out = Path(args.out)
    if args.images:
        names = format_names(args.images, poses)
    elif poses.image_names is not None:
        names = list(poses.image_names)
    else:
        names = format_names(default_images(fmt), poses)
    voxel = _voxel_size(args, poses, names, out)
    df = to_dataframe(poses, voxel, names, tomo_names)
    write_star(out, _blocks(df, voxel))
    regions = sorted({r for r in (poses.missing_regions or ()) if r})
    untranslated = sum(1 for r in (poses.missing_regions or ()) if not r)
    log.info("imported %d particles from %s (%s) into %s%s; missing regions: %s", len(poses), args.input, fmt, out,
             "" if voxel is None else f" at {voxel:g} Å/voxel", ", ".join(regions) or "none given (use --missing)")
    if untranslated and regions:
        log.warning("%d particles have a missing region mltomo cannot translate: refine's --missing applies "
                    "to them", untranslated)
    return 0
