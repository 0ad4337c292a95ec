"""Time per (particle, class, rotation) of the pruned shift kernel against one bare inverse FFT
of the same working box and count, measured in the same run (alternating repeats, medians), and
optionally the whole E-step per iteration on bench_iteration.py's workload with either kernel.

    python bench/bench_kernel.py                   # 32³ ±1, ±3, ±5 and 64³ ±3, one thread
    python bench/bench_kernel.py --estep           # + E-step seconds per iteration, fft vs pruned (minutes)

Prints one JSON line: per configuration the kernel's and the c2r's microseconds per map, their
ratio and the cost model's ratio (what ``kernel="auto"`` decides on), the FFTW build, the
machine's load average before and after. Target (issue 13): kernel / c2r ≤ 0.4 at 32³, ±3 voxels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def kernel_vs_c2r(n: int, max_shift: int, count: int, repeats: int, threads: int) -> dict:
    """Medians over alternating repeats of `count` c2r and `count` pruned-kernel maps."""
    from mltomo import _core

    t_fft, t_kernel, d = [], [], {}
    for _ in range(repeats):
        t_fft.append(_core.bench_c2r(n, count, threads))
        d = _core.bench_shift_scores(n, n / 2 - 1, max_shift, count, threads)
        t_kernel.append(d["seconds"])
    us_fft = statistics.median(t_fft) / count * 1e6
    us_kernel = statistics.median(t_kernel) / count * 1e6
    return {"box": n, "max_shift": max_shift, "shifts": (2 * max_shift + 1) ** 3, "count": count,
            "us_per_map_kernel": round(us_kernel, 2), "us_per_map_c2r": round(us_fft, 2),
            "ratio": round(us_kernel / us_fft, 4), "model_ratio": round(d["cost"] / d["fft_cost"], 4)}


def estep_per_iteration(args, threads: int) -> dict:
    """Per kernel, per iteration (lists over the alternating repeats): run_em's seconds_estep and
    the core's seconds in rotate / score / accumulate, on the standard workload (``Config.kernel``
    picks the kernel; mltomo.estep.estep is wrapped where the EM driver calls it to read the
    core's counters, which the iteration's stats do not carry)."""
    import dataclasses

    import mltomo.em as em
    import mltomo.initial as initial
    from mltomo.estep import estep
    from mltomo.model import Config
    from mltomo.particles import particles_from_arrays
    from mltomo.simulate import builtin_phantoms, simulate

    sim = simulate(builtin_phantoms()[: args.classes], args.particles, 32, args.voxel_size, args.resolution,
                   args.snr, missing_region=args.missing, max_shift_voxels=3, seed=0)
    parts = particles_from_arrays(sim.volumes, sim.voxel_size, sim.missing_region)
    cfg = Config(n_classes=args.classes, iterations=args.estep_iterations, angular_sampling_deg=args.sampling,
                 max_shift_voxels=3, threads=threads, seed=0, eps=0, auto_stop="off")
    keys = ("seconds_estep", "seconds_rotate", "seconds_score", "seconds_accumulate")
    out = {k: {"iterations": [{key: [] for key in keys} for _ in range(args.estep_iterations)],
               "maps_pruned_kernel": 0} for k in ("fft", "pruned")}
    for _ in range(args.estep_repeats):
        for kernel in ("fft", "pruned"):
            calls = []

            def counted(*a, calls=calls, **kw):
                res = estep(*a, **kw)
                calls.append(res[2])
                return res

            def collect(stats, model, results, store=out[kernel], calls=calls):
                it = store["iterations"][stats.iteration - 1]
                it["seconds_estep"].append(round(stats.seconds_estep, 2))
                for key in keys[1:]:
                    it[key].append(round(sum(c[key] for c in calls), 2))
                store["maps_pruned_kernel"] += sum(c["maps_pruned_kernel"] for c in calls)
                store["rotations"] = stats.n_rotations
                calls.clear()

            em.estep, initial.estep = counted, counted
            try:
                em.run_em(parts, dataclasses.replace(cfg, kernel=kernel), callback=collect)
            finally:
                em.estep, initial.estep = estep, estep
    last = [out[k]["iterations"][-1]["seconds_estep"] for k in ("fft", "pruned")]
    out["speedup_last_iteration"] = round(statistics.median(last[0]) / statistics.median(last[1]), 2)
    out["workload"] = {"box": 32, "particles": args.particles, "classes": args.classes, "sampling_deg": args.sampling,
                       "max_shift": 3, "iterations": args.estep_iterations, "repeats": args.estep_repeats,
                       "threads": threads}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="32:3,32:1,32:5,64:3", help="box:max_shift, comma separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--maps", type=int, default=8000, help="maps per measurement at 32³ (scaled by (32/n)³)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--estep", action="store_true", help="also time the E-step per iteration, fft vs pruned")
    ap.add_argument("--estep-threads", type=int, default=0)
    ap.add_argument("--estep-iterations", type=int, default=2)
    ap.add_argument("--estep-repeats", type=int, default=1)
    ap.add_argument("--particles", type=int, default=200)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--sampling", type=float, default=15.0)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--voxel-size", type=float, default=8.0)
    ap.add_argument("--resolution", type=float, default=25.0)
    ap.add_argument("--missing", default="wedge_y:-60:60")
    args = ap.parse_args(argv)

    import mltomo
    from mltomo import _core

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    configs = []
    for item in args.configs.split(","):
        n, m = (int(v) for v in item.split(":"))
        count = max(100, int(args.maps * (32 / n) ** 3))
        configs.append(kernel_vs_c2r(n, m, count, args.repeats, args.threads))
    result = {"bench": "kernel", "fftw": mltomo.fftw_version(), "threads": args.threads,
              "repeats": args.repeats, "configs": configs}
    if args.estep:
        result["estep"] = estep_per_iteration(args, args.estep_threads or _core.max_threads())
    result["loadavg_before"] = [round(v, 2) for v in load_before]
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
