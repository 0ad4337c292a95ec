"""The paper's protocol end to end (issue 13, item 5): the default E-step against the exhaustive
FFT E-step, in one invocation, on the same simulated data.

    python bench/bench_protocol.py                           # W1: 200 x 32³, K = 2, 15°, 40 iterations
    python bench/bench_protocol.py --exhaustive-iterations 8 # time 8 FFT-kernel iterations, extrapolate
    python bench/bench_protocol.py --box 64 --particles 2000 --classes 4 --exhaustive-iterations 7 \
        --exhaustive-particles 20

W1 is the paper's Figure 1 protocol: simulated GroEL14 / GroEL14-GroES7 (1OEL / 1AON, 25 Å, 8 Å
voxels at 32³, the voxel scaled with ``--box``), ±60° wedge, moderate preferred orientation,
shifts ±3 voxels, SNR 0.05, reference-free K = 2 (the default scheme), 15° sampling, ±3 voxel
search, 40 iterations. ``--classes 3`` or ``4`` add the built-in phantoms (hollow double ring,
and the same with a cap) as further classes.

The runs differ in the E-step: ``default`` is mltomo's default (``kernel="auto"``, the pruned
separable transform where the cost model says it is cheaper, ``cpp/src/shift_scores.cpp``; and
the coarse-to-fine rotational search, ``mltomo.coarse``, unless ``--coarse off``; and the
resolution schedule, ``mltomo.resolution``, unless ``--schedule off``); ``exhaustive`` is the
E-step before issue 13 (``kernel="fft"``: one inverse FFT per particle, class, rotation; every
rotation searched, every shell scored). ``--fidelity`` adds ``every_rotation``: the default
kernel on every rotation and every shell, all iterations, to show what the coarse stage and the
schedule change. ``--search auto`` narrows the
default run once the poses have converged (``mltomo.narrowing``). With
``--exhaustive-iterations N`` the exhaustive run stops after N iterations and each remaining
iteration is counted at the seconds of its last measured one per class searched. The first six
iterations of the default scheme search one class per particle (the classes are tied until the
split after iteration 5, and iteration 6 scores each particle in the class the split seeded it
to), the later ones all K, and an exhaustive iteration's cost is linear in the classes it
searches; an N past the split (8 for W1, 7 at least) measures a K-class iteration directly
(``classes_searched`` lists the classes each measured iteration searched; the exhaustive
run's purity and error are then those after N iterations, marked ``"extrapolated": true``).
With ``--exhaustive-particles M`` it runs on the first M particles only and its seconds are
scaled by ``--particles`` / M as well (the E-step's cost is linear in the particles; the
M-step's, a few per cent of it, is not, so this overestimates the exhaustive run slightly).

Prints one JSON line: per run seconds end to end, seconds per iteration (mean, and of the last
iteration), purity, median angular error (modulo each class's symmetry), final log-likelihood;
the speed ratio; the FFTW build, threads and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def simulate_workload(args):
    import numpy as np

    from mltomo.simulate import builtin_phantoms, default_data_dir, groel_models, groel_symmetry_groups, simulate

    data_dir = default_data_dir() if args.data_dir is None else args.data_dir
    if data_dir is None:
        raise SystemExit("bench_protocol: ../shared/data not found; pass --data-dir (the folder holding models/)")
    models = groel_models(data_dir)
    groups = list(groel_symmetry_groups(models))
    models, groups = models + builtin_phantoms(), groups + [np.eye(3)[None]] * 2  # built-ins: no symmetry
    if not 1 <= args.classes <= len(models):
        raise SystemExit(f"bench_protocol: --classes must be 1 to {len(models)}")
    models, groups = models[: args.classes], groups[: args.classes]
    sim = simulate(models, args.particles, args.box, args.voxel_size * 32 / args.box, args.resolution,
                   snr=args.snr, missing_region="wedge_y:-60:60", max_shift_voxels=3,
                   preferred_orientation="moderate", seed=args.seed)
    return sim, groups


def run(name, kernel, iterations, sim, groups, args, threads, search="global", coarse=False, schedule=False,
        subset=None):
    """One refinement of ``sim`` (or of its particles ``subset``, an index array) scored against
    the truth."""
    import numpy as np

    from mltomo.em import run_em
    from mltomo.evaluate import angular_errors, class_purity
    from mltomo.geometry import euler_to_matrix
    from mltomo.model import Config
    from mltomo.particles import particles_from_arrays

    idx = np.arange(len(sim.volumes)) if subset is None else np.asarray(subset)
    parts = particles_from_arrays(sim.volumes[idx], sim.voxel_size, sim.missing_region)
    cfg = Config(n_classes=args.classes, iterations=iterations, angular_sampling_deg=args.sampling,
                 max_shift_voxels=3, missing=sim.missing_region, threads=threads, seed=args.seed, eps=0.0,
                 auto_stop="off",
                 scheme=args.scheme, search=search, kernel=kernel,
                 coarse_to_fine=coarse, resolution_schedule=schedule)
    t0 = time.perf_counter()
    res = run_em(parts, cfg)
    seconds = time.perf_counter() - t0
    per_iteration = [h.seconds_total for h in res.history]
    # the classes each iteration's E-step searched: samples = N K R T for an exhaustive iteration
    classes_searched = [round(h.samples / max(len(idx) * h.n_rotations * h.n_shifts, 1)) for h in res.history]
    local = [h.iteration for h in res.history if h.search == "local"]
    found = res.particles
    true_cls = np.asarray(sim.classes)[idx]
    err = angular_errors(np.asarray(sim.rotations)[idx], euler_to_matrix(*found.angles.T), found.classes,
                         group=groups, true_classes=true_cls)
    return {"run": name, "kernel": kernel, "iterations": len(per_iteration), "seconds": round(seconds, 1),
            "seconds_per_iteration": round(sum(per_iteration) / len(per_iteration), 2),
            "seconds_last_iteration": round(per_iteration[-1], 2),
            **({"classes_searched": classes_searched} if not coarse else {}),
            "purity": round(float(class_purity(true_cls, found.classes)), 4),
            "median_angular_error_deg": round(float(np.median(err)), 2),
            "log_likelihood": round(float(res.model.log_likelihood), 1),
            "class_sizes": np.bincount(found.classes - 1, minlength=args.classes).tolist(),
            "search": search, "local_iterations": local, "coarse_to_fine": coarse,
            "coarse_iterations": [h.iteration for h in res.history if h.search == "coarse-to-fine"],
            "coarse_missed_nats_max": round(max([h.coarse_missed for h in res.history if h.coarse_rotations]
                                                or [0.0]), 3),
            "rotations_per_particle_last": round(res.history[-1].rotations_searched, 1),
            "resolution_schedule": schedule,
            "score_radius": [round(h.score_radius, 1) for h in res.history]}


def extrapolate(measured: dict, iterations: int, classes: int, particle_scale: float) -> float:
    """End-to-end seconds of the whole exhaustive run from its first iterations: each remaining
    iteration searches every class and costs the last measured iteration's seconds per class
    searched; all of it scaled by the particles (the E-step is linear in both)."""
    n = measured["iterations"]
    per_class = measured["seconds_last_iteration"] / max(measured["classes_searched"][-1], 1)
    return round((measured["seconds"] + (iterations - n) * per_class * classes) * particle_scale, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--particles", type=int, default=200)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--voxel-size", type=float, default=8.0, help="Å at 32³ (scaled with --box)")
    ap.add_argument("--resolution", type=float, default=25.0, help="Å of the simulated maps")
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--sampling", type=float, default=15.0)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--exhaustive-iterations", type=int, default=None,
                    help="run the exhaustive E-step this many iterations only and extrapolate (default: all)")
    ap.add_argument("--exhaustive-particles", type=int, default=None,
                    help="run the exhaustive E-step on this many particles only (the first ones) and extrapolate "
                         "its seconds linearly to all (default: all; for the 64³ variant, whose exhaustive "
                         "iteration would take hours)")
    ap.add_argument("--scheme", default="adaptive", choices=("adaptive", "paper"))
    ap.add_argument("--search", default="global", choices=("global", "auto"),
                    help="rotational search of the default run (auto: local once converged)")
    ap.add_argument("--coarse", default="on", choices=("on", "off"),
                    help="coarse-to-fine search in the default run (mltomo.coarse; default on)")
    ap.add_argument("--schedule", default="on", choices=("on", "off"),
                    help="resolution schedule in the default run (mltomo.resolution; default on)")
    ap.add_argument("--fidelity", action="store_true",
                    help="also run the default kernel on every rotation and every shell, all iterations (do the "
                         "coarse stage and the resolution schedule change the answer?)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="default: all cores")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    if args.iterations < 1 or (args.exhaustive_iterations is not None and args.exhaustive_iterations < 1):
        raise SystemExit("bench_protocol: --iterations and --exhaustive-iterations must be >= 1")

    import mltomo
    from mltomo import _core

    threads = args.threads or _core.max_threads()
    load_before = os.getloadavg()
    sim, groups = simulate_workload(args)
    default = run("default", "auto", args.iterations, sim, groups, args, threads, search=args.search,
                  coarse=args.coarse == "on", schedule=args.schedule == "on")
    fidelity = None
    if args.fidelity:
        fidelity = run("every-rotation", "auto", args.iterations, sim, groups, args, threads, search=args.search)
    n_ex = min(args.exhaustive_iterations or args.iterations, args.iterations)
    n_sub = min(args.exhaustive_particles or args.particles, args.particles)
    exhaustive = run("exhaustive", "fft", n_ex, sim, groups, args, threads,
                     subset=None if n_sub == args.particles else range(n_sub))
    exhaustive["extrapolated"] = n_ex < args.iterations or n_sub < args.particles
    if exhaustive["extrapolated"]:
        exhaustive["seconds_measured"] = exhaustive["seconds"]
        exhaustive["particles_measured"] = n_sub
        exhaustive["seconds"] = extrapolate(exhaustive, args.iterations, args.classes, args.particles / n_sub)
    out = {"bench": "protocol",
           "workload": {"particles": args.particles, "box": args.box, "classes": args.classes,
                        "sampling_deg": args.sampling, "snr": args.snr, "iterations": args.iterations,
                        "scheme": args.scheme, "seed": args.seed, "search": args.search, "coarse": args.coarse,
                        "schedule": args.schedule},
           "default": default, "exhaustive": exhaustive, **({"every_rotation": fidelity} if fidelity else {}),
           "speed_ratio": round(exhaustive["seconds"] / default["seconds"], 2),
           "target": {"seconds": 120, "speed_ratio": 15},
           "fftw": mltomo.fftw_version(), "threads": threads,
           "loadavg_before": [round(v, 2) for v in load_before],
           "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
