"""Does stopping a single-class refinement at convergence (``--auto-stop``, mltomo.convergence)
change its answer? One run of ``--iter`` iterations per condition with the stop off, recording
after every iteration the median angular error against the simulated truth, the resolution, the
log-likelihood and whether the auto-stop rule held (the run with the stop on is this run cut at
that iteration: the rule changes nothing before it).

    python bench/bench_autostop.py                                   # GroEL14 and GroEL14-GroES7
    python bench/bench_autostop.py --snrs 0.02 0.05 0.2 --seeds 1 2 3 --start reference lowpass

Data: ``--particles`` of 32³ (8 Å voxels, 25 Å maps), ±60° wedge, moderate preferred
orientation, shifts ±3 voxels; GroEL14 (1OEL, D7) or GroEL14-GroES7 (1AON, C7), errors modulo
the symmetry. ``--start free`` is reference-free, ``lowpass`` starts from the
true map low-passed to 40 Å (what a user with a published map does). Prints one JSON line per
run: ``stop_iteration`` (None: the rule never held), the error there and at the last iteration,
the lowest error of the run, and per-iteration lists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PHANTOMS = ("groel14", "groel14-groes7")


def recorder(rows, sim, group):
    """A ``run_em`` callback appending (iteration, median angular error, resolution,
    log-likelihood, whether the auto-stop rule held) to ``rows``."""
    import numpy as np

    from mltomo.evaluate import angular_errors
    from mltomo.geometry import euler_to_matrix

    def record(stats, model, results):
        e = angular_errors(np.asarray(sim.rotations), euler_to_matrix(*results.angles.T), results.classes,
                           group=group, true_classes=np.asarray(sim.classes))
        rows.append((stats.iteration, float(np.median(e)), stats.resolution_angstrom, stats.log_likelihood,
                     stats.converged))

    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--phantoms", nargs="+", default=list(PHANTOMS), choices=PHANTOMS)
    ap.add_argument("--snrs", nargs="+", type=float, default=[0.02, 0.05])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--start", nargs="+", default=["lowpass", "free"], choices=("lowpass", "free"))
    ap.add_argument("--particles", type=int, default=100)
    ap.add_argument("--sampling", type=float, default=15.0)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    import numpy as np

    import mltomo
    from mltomo.em import run_em
    from mltomo.model import Config
    from mltomo.particles import particles_from_arrays
    from mltomo.reference import lowpass
    from mltomo.simulate import default_data_dir, groel_models, groel_symmetry_groups, simulate

    for phantom in args.phantoms:
        data_dir = default_data_dir() if args.data_dir is None else args.data_dir
        if data_dir is None:
            raise SystemExit("bench_autostop: ../shared/data not found; pass --data-dir")
        k = PHANTOMS.index(phantom)
        models = groel_models(data_dir)
        group = [list(groel_symmetry_groups(models))[k]]
        models = models[k : k + 1]
        for snr in args.snrs:
            for seed in args.seeds:
                sim = simulate(models, args.particles, 32, 8.0, 25.0, snr=snr, missing_region="wedge_y:-60:60",
                               max_shift_voxels=3, preferred_orientation="moderate", seed=seed)
                parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
                for start in args.start:
                    refs = None
                    if start == "lowpass":
                        refs = np.stack([lowpass(np.asarray(sim.references[0], dtype=np.float64), 32 * 8.0 / 40.0)])
                    cfg = Config(n_classes=1, iterations=args.iterations, angular_sampling_deg=args.sampling,
                                 missing=sim.missing_region, threads=args.threads, seed=seed, eps=0.0,
                                 auto_stop="off", initial_lowpass_angstrom=40.0 if refs is not None else None)
                    rows = []
                    t0 = time.perf_counter()
                    run_em(parts, cfg, refs=refs, callback=recorder(rows, sim, group))
                    err = [r[1] for r in rows]
                    stop = next((r[0] for r in rows if r[4]), None)
                    print(json.dumps({
                        "bench": "autostop", "phantom": phantom, "snr": snr, "seed": seed, "start": start,
                        "particles": args.particles, "sampling_deg": args.sampling,
                        "stop_iteration": stop,
                        "error_at_stop_deg": round(err[stop - 1], 2) if stop else None,
                        "error_last_deg": round(err[-1], 2), "error_min_deg": round(min(err), 2),
                        "errors_deg": [round(x, 1) for x in err],
                        "resolution_angstrom": [round(r[2], 1) for r in rows],
                        "log_likelihood": [round(r[3], 1) for r in rows],
                        "seconds": round(time.perf_counter() - t0, 1), "fftw": mltomo.fftw_version(),
                        "loadavg": [round(v, 2) for v in os.getloadavg()]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
