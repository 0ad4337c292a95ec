"""Simulate subtomograms of two classes with known truth (the paper's GroEL test data).

$ mltomo simulate --out sim1
$ mltomo simulate --out sim2 --phantom groel --particles 200 --snr 0.01 --preferred moderate
$ mltomo simulate --out sim3 --box 48 --voxel-size 6 --missing pyramid:-60:60:-60:60 --seed 7
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from mltomo.cli import UserError

log = logging.getLogger("mltomo")


def add_args(p):
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: particles/, references/, particles.star, truth.star "
                        "(must be empty or absent unless --overwrite)")
    p.add_argument("--phantom", choices=("builtin", "groel"), default="builtin",
                   help="builtin: GroEL-like double ring vs the same with a GroES-like cap (no files needed); "
                        "groel: PDB 1OEL (GroEL14) vs 1AON (GroEL14-GroES7) from --data-dir (default builtin)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="directory holding models/1oel.pdb.gz and models/1aon.pdb.gz (default ../shared/data if present)")
    p.add_argument("--particles", type=int, default=200, help="number of subtomograms (default 200, the paper's)")
    p.add_argument("--box", type=int, default=32, help="box size in voxels (default 32)")
    p.add_argument("--voxel-size", type=float, default=8.0, metavar="A", help="voxel size in Å (default 8)")
    p.add_argument("--resolution", type=float, default=25.0, metavar="A",
                   help="resolution of the maps in Å: Gaussian atoms of sigma = 0.225 x resolution (default 25, the paper's)")
    p.add_argument("--snr", type=float, default=0.1,
                   help="signal-to-noise ratio: mean particle variance over noise variance, before the "
                        "missing region (default 0.1; 'inf' for no noise)")
    p.add_argument("--missing", default="wedge_y:-60:60",
                   help="missing region: none, wedge_y:A:B, wedge_x:A:B, pyramid:YA:YB:XA:XB, cone:T (default wedge_y:-60:60)")
    p.add_argument("--max-shift", type=int, default=3, metavar="VOX",
                   help="shifts uniform in +-VOX voxels on each axis (default 3, the paper's)")
    p.add_argument("--preferred", choices=("none", "moderate", "severe"), default="none",
                   help="preferred orientation: leave out tilts in 60-120 deg (moderate) or 40-140 deg (severe) (default none)")
    p.add_argument("--fractions", metavar="F1,F2", help="class probabilities (default equal)")
    p.add_argument("--stack", action="store_true", help="write one particles/particles.mrcs volume stack instead of one file each")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    p.add_argument("--quiet", action="store_true", help="only warnings")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def _check(args):
    if args.particles < 1:
        raise UserError(f"--particles must be at least 1, got {args.particles}")
    if args.box < 4:
        raise UserError(f"--box must be at least 4 voxels, got {args.box}")
    for name in ("voxel_size", "resolution"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    if not args.snr > 0:
        raise UserError(f"--snr must be positive (inf for no noise), got {args.snr}")
    if args.max_shift < 0 or args.max_shift > args.box // 2:
        raise UserError(f"--max-shift must be between 0 and box/2 = {args.box // 2}, got {args.max_shift}")
    from mltomo.fourier import parse_missing_region

    try:
        parse_missing_region(args.missing)
    except ValueError as exc:
        raise UserError(f"--missing {args.missing}: {exc}") from None
    fractions = None
    if args.fractions:
        try:
            fractions = [float(x) for x in args.fractions.split(",")]
        except ValueError:
            raise UserError(f"--fractions must be numbers separated by commas, got {args.fractions}") from None
        if len(fractions) != 2 or min(fractions) < 0 or sum(fractions) <= 0:
            raise UserError(f"--fractions needs two non-negative numbers (two classes), got {args.fractions}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out}: directory is not empty (use --overwrite to replace a data set)")
    return fractions


def _models(args):
    from mltomo.io import FileFormatError
    from mltomo.simulate import builtin_phantoms, default_data_dir, groel_models

    if args.phantom == "builtin":
        return builtin_phantoms()
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if data_dir is None:
        raise UserError("--phantom groel: no ../shared/data found; give --data-dir DIR (holding models/1oel.pdb.gz, models/1aon.pdb.gz)")
    for name in ("1oel.pdb.gz", "1aon.pdb.gz"):
        if not (data_dir / "models" / name).is_file():
            raise UserError(f"--data-dir {data_dir}: models/{name} is missing")
    try:
        return groel_models(data_dir)
    except FileFormatError as exc:
        raise UserError(str(exc)) from None


def run(args) -> int:
    from mltomo.simulate import simulate, write_dataset

    fractions = _check(args)
    models = _models(args)
    t0 = time.perf_counter()
    sim = simulate(
        models, args.particles, args.box, args.voxel_size, args.resolution, args.snr,
        missing_region=args.missing, max_shift_voxels=args.max_shift,
        preferred_orientation=None if args.preferred == "none" else args.preferred,
        class_probabilities=fractions, seed=args.seed,
    )
    t1 = time.perf_counter()
    paths = write_dataset(sim, args.out, overwrite=args.overwrite, stack=args.stack)
    t2 = time.perf_counter()
    counts = [int((sim.classes == k + 1).sum()) for k in range(sim.references.shape[0])]
    log.info("simulated %d particles (%s per class) of %d³ at %g Å, %s phantom, SNR %g (noise sigma %.4g), "
             "missing region %s, preferred orientation %s, in %.1f s; wrote %s in %.1f s",
             sim.n_particles, "/".join(map(str, counts)), sim.box, sim.voxel_size, args.phantom, sim.snr,
             sim.noise_sigma, sim.missing_region, args.preferred, t1 - t0, args.out, t2 - t1)
    log.info("particles: %s   truth: %s", paths["particles"], paths["truth"])
    return 0
