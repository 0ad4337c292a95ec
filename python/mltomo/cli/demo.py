"""Simulate a small two-class data set, classify it reference-free and score it against the truth.

Needs no data files and no downloads: GroEL-like and GroEL-GroES-like built-in phantoms, a ±60°
missing wedge, the paper's moderate preferred orientation, random shifts and white noise.
Prints the class purity and the median angular error and writes a PNG report.

$ mltomo demo
$ mltomo demo --out demo2 --particles 200 --snr 0.2 --seed 3
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from mltomo.cli import UserError

log = logging.getLogger("mltomo")


def add_args(p):
    p.add_argument("--out", default="mltomo-demo", help="output directory (default mltomo-demo; must be new or empty)")
    p.add_argument("--particles", type=int, default=150, help="number of particles (default 150)")
    p.add_argument("--snr", type=float, default=0.5, help="signal-to-noise ratio (variance ratio; default 0.5)")
    p.add_argument("--iter", type=int, default=25,
                   help="iterations (default 25: classes separate after the 5 regularised ones)")
    p.add_argument("--angular-sampling", type=float, default=20.0, help="degrees (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the run (default 0)")
    p.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def run(args) -> int:
    import sys

    from mltomo.cli.runner import refine_files
    from mltomo.evaluate import angular_errors, class_purity
    from mltomo.geometry import euler_to_matrix, symmetry_group
    from mltomo.io.star import read_star
    from mltomo.model import Config
    from mltomo.report import write_demo_report
    from mltomo.simulate import builtin_phantoms, simulate, write_dataset

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not empty (choose another --out)")
    if args.particles < 4:
        raise UserError("--particles must be at least 4")
    t0 = time.perf_counter()
    box, voxel, resolution = 24, 10.0, 30.0
    sim = simulate(builtin_phantoms(), args.particles, box, voxel, resolution, snr=args.snr,
                   missing_region="wedge_y:-60:60", max_shift_voxels=2, preferred_orientation="moderate",
                   seed=args.seed)
    files = write_dataset(sim, out / "data")
    log.info(f"simulated {args.particles} particles ({box}³, {voxel:g} Å voxels, {resolution:g} Å, SNR {args.snr:g}, "
             f"±60° wedge, moderate preferred orientation) in {time.perf_counter() - t0:.1f} s -> {out / 'data'}")
    config = Config(n_classes=2, iterations=args.iter, angular_sampling_deg=args.angular_sampling,
                    max_shift_voxels=2, max_resolution_angstrom=resolution, particle_diameter_angstrom=220.0,
                    missing="wedge_y:-60:60", seed=args.seed, threads=args.threads, eps=0)
    run_dir = out / "run"
    result = refine_files(files["particles"], run_dir, config, progress=not args.quiet and sys.stderr.isatty())

    truth = read_star(files["truth"])["particles"]
    true_cls = truth["rlnClassNumber"].to_numpy(np.int64)
    R_true = euler_to_matrix(*truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64).T)
    found = result.particles
    purity = class_purity(true_cls, found.classes)
    err = angular_errors(R_true, euler_to_matrix(*found.angles.T), found.classes, group=symmetry_group("C7"))
    shift_err = float(np.median(np.linalg.norm(found.shifts_angstrom - sim.shifts_voxels * voxel, axis=1)))
    metrics = {
        "class purity": round(float(purity), 3),
        "median angular error (deg, modulo C7)": round(float(np.median(err)), 1),
        "median shift error (Å)": round(shift_err, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    png = write_demo_report(run_dir, files["truth"], files["references"], out / "demo_report.png", metrics)
    print(f"class purity {purity:.3f}  median angular error {np.median(err):.1f}° (modulo C7, "
          f"{args.angular_sampling:g}° sampling)  median shift error {shift_err:.1f} Å  "
          f"{metrics['seconds']:.0f} s")
    print(f"report: {png}   class averages: {run_dir}/run_it{args.iter:03d}_class00*.mrc")
    return 0
