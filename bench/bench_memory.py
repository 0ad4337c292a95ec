"""A data set bigger than the memory budget (issue 13, item 4): particles streamed from a
memory-mapped cache (:mod:`mltomo.spectra_cache`), peak resident memory and seconds per iteration.

    python bench/bench_memory.py                                  # 10,000 x 64³, 2 GB budget
    python bench/bench_memory.py --particles 400 --box 32 --budget 0.01   # a quick check

The particles are built block by block straight into the cache, so the run never holds all of
them: ``--pool`` noise-free particles of the built-in phantoms (two classes, random poses,
shifts within ±3 voxels, ±60° wedge; :func:`mltomo.simulate.simulate`) are rendered once, and
particle ``i`` is pool member ``i mod pool`` plus its own white noise at ``--snr`` (the signal
variance of the pool over the noise variance), seen through the wedge. Rendering 10,000
particles of 64³ would take over an hour; the noise, which is what the classification has to
see through, is independent for every particle.

The refinement is mltomo's default (reference-free, K classes) at ``--sampling`` degrees with
``--max-resolution`` (a working box smaller than the box: the cropped spectra go to a second
cache). Prints one JSON line: the spectra's size against the budget, peak resident set
(``VmHWM``) after reading and at the end, seconds per iteration, purity, the FFTW build and the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def build_particles(args, cache_dir):
    """Particles (cached spectra) and their true classes."""
    import numpy as np

    from mltomo import spectra_cache
    from mltomo.fourier import missing_region_mask, rfft_unitary
    from mltomo.model import Particles
    from mltomo.simulate import builtin_phantoms, simulate

    n, N = args.box, args.particles
    voxel = args.voxel_size * 32 / n
    pool = simulate(builtin_phantoms(), min(args.pool, N), n, voxel, args.resolution, snr=float("inf"),
                    missing_region="none", max_shift_voxels=3, preferred_orientation="moderate", seed=args.seed)
    sigma = float(np.sqrt(np.mean(np.var(pool.volumes, axis=(1, 2, 3))) / args.snr))
    label = "wedge_y:-60:60"
    mask = missing_region_mask(label, n).astype(np.float32)
    signal = np.stack([rfft_unitary(v) for v in pool.volumes]) * mask[None]
    spectra = spectra_cache.allocate(N, n, args.budget * 1e9, cache_dir)
    rng = np.random.default_rng([args.seed, 1])
    for a in range(0, N, spectra_cache.RELEASE_ROWS):
        b = min(N, a + spectra_cache.RELEASE_ROWS)
        for i in range(a, b):
            g = rng.standard_normal((n, n, n), dtype=np.float32) * sigma
            spectra[i] = signal[i % len(signal)] + mask * rfft_unitary(g)
        spectra_cache.release(spectra, slice(a, b))
    classes = np.asarray(pool.classes)[np.arange(N) % len(signal)]
    parts = Particles(spectra=spectra, masks=mask[None], groups=np.zeros(N, np.int32), region_labels=(label,),
                      voxel_size_angstrom=voxel, names=tuple(f"p{i + 1}" for i in range(N)), indices=np.arange(N),
                      n_total=N)
    return parts, classes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=10000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--voxel-size", type=float, default=10.0, help="Å at 32³ (scaled with --box)")
    ap.add_argument("--resolution", type=float, default=20.0, help="Å of the simulated maps")
    ap.add_argument("--pool", type=int, default=400, help="noise-free particles rendered")
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--sampling", type=float, default=30.0)
    ap.add_argument("--max-resolution", type=float, default=None,
                    help="Å (default: 4 voxels of the box, a working box of half its size)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--budget", type=float, default=2.0, help="GB of spectra held in memory (--memory-budget)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np

    from mltomo import _core, spectra_cache
    from mltomo.em import run_em
    from mltomo.evaluate import class_purity
    from mltomo.model import Config

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    parts, truth = build_particles(args, args.cache_dir)
    t_build = time.perf_counter() - t0
    rss_read = peak_rss_mb()
    voxel = parts.voxel_size_angstrom
    max_res = args.max_resolution or 4.0 * voxel
    budget = args.budget * 1e9
    cfg = Config(n_classes=args.classes, iterations=args.iterations, angular_sampling_deg=args.sampling,
                 max_shift_voxels=3, missing="wedge_y:-60:60", threads=args.threads, seed=args.seed, eps=0.0,
                 auto_stop="off",
                 max_resolution_angstrom=max_res, spectra_budget_bytes=budget,
                 memory_budget_bytes=int(min(Config.memory_budget_bytes, budget / 4)), cache_dir=args.cache_dir)
    t1 = time.perf_counter()
    res = run_em(parts, cfg)
    seconds = time.perf_counter() - t1
    print(json.dumps({
        "bench": "memory", "particles": args.particles, "box": args.box, "classes": args.classes,
        "sampling_deg": args.sampling, "max_resolution_angstrom": round(max_res, 1),
        "spectra_gb": round(spectra_cache.spectra_nbytes(args.particles, args.box) / 1e9, 2),
        "budget_gb": args.budget, "cached": spectra_cache.is_cached(parts.spectra),
        "peak_rss_mb_after_reading": round(rss_read, 0), "peak_rss_mb": round(peak_rss_mb(), 0),
        "seconds_building_particles": round(t_build, 1), "seconds_refining": round(seconds, 1),
        "seconds_per_iteration": [round(h.seconds_total, 1) for h in res.history],
        "purity": round(float(class_purity(truth, res.particles.classes)), 4),
        "class_sizes": np.bincount(res.particles.classes - 1, minlength=args.classes).tolist(),
        "fftw": _core.fftw_version(), "threads": args.threads or _core.max_threads(),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
