"""The paper's classification scheme against the adaptive default, side by side on the same data.

    python bench/bench_classification.py                       # the README's tutorial data, 10 seeds
    python bench/bench_classification.py --phantom groel --box 32 --voxel-size 8 --resolution 25 \\
        --particles 200 --snr 0.01 --fixed-poses --seeds 10     # classification with the true poses
    python bench/bench_classification.py --classes 3 --seeds 3  # K = 3 on two-class data

For every seed it simulates one data set (:func:`mltomo.simulate.simulate`: two classes in equal
numbers, ±60° wedge about y, moderate preferred orientation, white noise at ``--snr``), runs
every scheme of ``--schemes`` on it with the same options, and prints one JSON line per (seed,
scheme): class purity, class sizes, median angular error (degrees, modulo each found class's
frame and the true class's point group), final log-likelihood, seconds. A last line per scheme
summarises: mean and minimum purity, runs ≥ 0.95, runs with an empty class.

With ``--fixed-poses`` the true angles and shifts are fixed (``no_align``: classification only);
``--truth`` adds a run that starts from the true maps (one E-step), the ceiling of any start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phantom", choices=("builtin", "groel"), default="builtin",
                   help="built-in GroEL-like phantoms (default) or PDB 1OEL/1AON from ../shared/data")
    p.add_argument("--particles", type=int, default=150)
    p.add_argument("--box", type=int, default=24)
    p.add_argument("--voxel-size", type=float, default=10.0)
    p.add_argument("--resolution", type=float, default=30.0, help="resolution of the rendered phantoms (Å)")
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--max-shift", type=int, default=2, help="shifts of the data and of the search (voxels)")
    p.add_argument("--default-search", action="store_true",
                   help="search mltomo's default shift range (min(n/4, 3 xi0)) instead of --max-shift")
    p.add_argument("--preferred", default="moderate", help="preferred orientation (moderate, severe, none)")
    p.add_argument("--classes", type=int, default=2, help="classes K of the refinement (the data have 2)")
    p.add_argument("--iterations", type=int, default=16)
    p.add_argument("--sampling", type=float, default=20.0)
    p.add_argument("--max-resolution", type=float, default=30.0, help="E-step resolution (Å; 0: whole box)")
    p.add_argument("--fixed-poses", action="store_true", help="true poses fixed (classification only)")
    p.add_argument("--truth", action="store_true", help="also classify once with the true maps")
    p.add_argument("--schemes", default="paper,adaptive")
    p.add_argument("--seeds", type=int, default=10, help="seeds 1..N (data and run)")
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def simulate_seed(args, models, seed):
    from mltomo.simulate import simulate

    return simulate(models, args.particles, args.box, args.voxel_size, args.resolution, snr=args.snr,
                    missing_region="wedge_y:-60:60", max_shift_voxels=args.max_shift,
                    preferred_orientation=None if args.preferred == "none" else args.preferred, seed=seed)


def run_one(args, sim, groups, seed, scheme, truth=False):
    from mltomo.em import run_em
    from mltomo.evaluate import angular_errors, class_purity
    from mltomo.geometry import euler_to_matrix
    from mltomo.model import Config
    from mltomo.particles import particles_from_arrays

    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    fixed = args.fixed_poses or truth
    if fixed:
        parts = dataclasses.replace(parts, prior_angles=np.asarray(sim.angles, np.float64),
                                    prior_shifts_angstrom=np.asarray(sim.shifts_voxels, np.float64) * sim.voxel_size)
    K = 2 if truth else args.classes
    cfg = Config(n_classes=K, iterations=1 if truth else args.iterations, angular_sampling_deg=args.sampling,
                 max_shift_voxels=None if args.default_search else args.max_shift, missing=sim.missing_region,
                 seed=seed, threads=args.threads,
                 max_resolution_angstrom=args.max_resolution or None, no_align=fixed, eps=0.0, scheme=scheme,
                 reg0=0.0 if truth else Config.reg0)
    by_iteration = []
    t0 = time.perf_counter()
    res = run_em(parts, cfg, refs=sim.references if truth else None,
                 callback=lambda stats, model, results: by_iteration.append(
                     round(float(class_purity(sim.classes, results.classes)), 3)))
    seconds = time.perf_counter() - t0
    found = res.particles
    sizes = np.bincount(found.classes - 1, minlength=K)
    purity = float(class_purity(sim.classes, found.classes))
    out = {"seed": seed, "scheme": "truth" if truth else scheme, "purity": round(purity, 4),
           "class_sizes": sizes.tolist(), "empty_class": bool(sizes.min() == 0),
           "alpha": [round(float(a), 3) for a in res.model.alpha],
           "log_likelihood": round(float(res.model.log_likelihood), 1),
           "log_likelihood_by_iteration": [round(float(h.log_likelihood), 1) for h in res.history],
           "purity_by_iteration": by_iteration,
           "resolution_angstrom": _finite(res.history[-1].resolution_angstrom),
           "seconds": round(seconds, 1)}
    if not fixed:
        err = angular_errors(sim.rotations, euler_to_matrix(*found.angles.T), found.classes, group=groups,
                             true_classes=sim.classes)
        out["median_angular_error_deg"] = round(float(np.median(err)), 1)
    return out


def _finite(x):
    """``x`` rounded, or None (JSON null) where the run estimated no resolution."""
    return round(float(x), 1) if np.isfinite(x) else None


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import mltomo
    from mltomo.geometry import symmetry_group
    from mltomo.phantoms import builtin_phantoms, groel_models, groel_symmetry_groups

    if args.phantom == "groel":
        models = groel_models()
        groups = groel_symmetry_groups(models)
    else:
        models = builtin_phantoms()
        groups = [symmetry_group("C7"), symmetry_group("C7")]
    schemes = [s for s in args.schemes.split(",") if s]
    print(json.dumps({"fftw": mltomo.fftw_version(), "args": vars(args)}), flush=True)
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        sim = simulate_seed(args, models, seed)
        if args.truth:
            r = run_one(args, sim, groups, seed, "paper", truth=True)
            rows.append(r)
            print(json.dumps(r), flush=True)
        for scheme in schemes:
            r = run_one(args, sim, groups, seed, scheme)
            rows.append(r)
            print(json.dumps(r), flush=True)
    for scheme in (["truth"] if args.truth else []) + schemes:
        sel = [r for r in rows if r["scheme"] == scheme]
        pur = np.array([r["purity"] for r in sel])
        summary = {"summary": scheme, "runs": len(sel), "purity_mean": round(float(pur.mean()), 3),
                   "purity_min": round(float(pur.min()), 3), "runs_ge_0.95": int(np.sum(pur >= 0.95)),
                   "runs_with_empty_class": int(sum(r["empty_class"] for r in sel)),
                   "seconds_mean": round(float(np.mean([r["seconds"] for r in sel])), 1)}
        if sel and "median_angular_error_deg" in sel[0]:
            errs = [r["median_angular_error_deg"] for r in sel]
            summary["median_angular_error_deg"] = round(float(np.median(errs)), 1)
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
