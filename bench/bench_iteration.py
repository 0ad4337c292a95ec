"""Seconds per EM iteration on a standard workload, split into E-step, M-step and the rest,
and the E-step time over the time of the same number of bare batched inverse FFTs measured in
the same run (the E-step's floor: one c2r per particle, class and rotation).

    python bench/bench_iteration.py                      # 200 × 32³, K=2, 15°, ±3 voxels
    python bench/bench_iteration.py --particles 50 --sampling 20 --iterations 2

Prints one JSON line per iteration. Targets (SPEC §6 / issue 3): E-step / bare FFTs ≤ 1.5,
M-step ≤ 30 % of the E-step.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--particles", type=int, default=200)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--sampling", type=float, default=15.0)
    ap.add_argument("--max-shift", type=int, default=3)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--voxel-size", type=float, default=8.0)
    ap.add_argument("--resolution", type=float, default=25.0)
    ap.add_argument("--missing", default="wedge_y:-60:60")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import mltomo
    from mltomo import _core
    from mltomo.em import run_em
    from mltomo.model import Config
    from mltomo.particles import particles_from_arrays
    from mltomo.simulate import builtin_phantoms, simulate

    threads = args.threads or _core.max_threads()
    t0 = time.perf_counter()
    sim = simulate(builtin_phantoms()[: args.classes], args.particles, args.box, args.voxel_size, args.resolution,
                   args.snr, missing_region=args.missing, max_shift_voxels=args.max_shift, seed=args.seed)
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    t_sim = time.perf_counter() - t0
    cfg = Config(n_classes=args.classes, iterations=args.iterations, angular_sampling_deg=args.sampling,
                 max_shift_voxels=args.max_shift, threads=threads, seed=args.seed, eps=0,
                 auto_stop="off")

    def report(stats, model, results):
        n_w = args.box  # no resolution limit here: the working box is the box
        count = stats.samples // stats.n_shifts  # one c2r per (particle, class, rotation)
        fft = _core.bench_c2r(n_w, count, threads)
        rest = stats.seconds_total - stats.seconds_estep - stats.seconds_mstep
        print(json.dumps({
            "bench": "iteration", "box": args.box, "particles": args.particles, "classes": args.classes,
            "sampling_deg": args.sampling, "rotations": stats.n_rotations, "shifts": stats.n_shifts,
            "threads": threads, "fftw": mltomo.fftw_version(), "iteration": stats.iteration,
            "seconds_total": round(stats.seconds_total, 3), "seconds_estep": round(stats.seconds_estep, 3),
            "seconds_mstep": round(stats.seconds_mstep, 3), "seconds_rest": round(rest, 3),
            "c2r_count": int(count), "seconds_bare_c2r": round(fft, 3),
            "estep_over_bare_fft": round(stats.seconds_estep / fft, 3),
            "mstep_over_estep": round(stats.seconds_mstep / stats.seconds_estep, 4),
            "pruned_fraction": round(stats.pruned_fraction, 5), "seconds_simulate": round(t_sim, 2),
        }), flush=True)

    run_em(parts, cfg, callback=report)


if __name__ == "__main__":
    main()
