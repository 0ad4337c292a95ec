"""Speed-up of MPI ranks and OpenMP threads over one process with one thread.

Writes a simulated two-class data set (MRC files and a STAR table) to a temporary directory,
refines it with every configuration ``RxT`` (R ranks × T threads; R > 1 runs under
``mpiexec -n R -bind-to core`` (``core:T`` for T > 1), R = 1 runs without a launcher) and prints one JSON line per
configuration: seconds per iteration (E-step: the slowest rank's; total: rank 0's wall time
of the iteration; iterations after the first, whose reference-free search is seeded with one
class per particle, when there are any), speed-up and efficiency over the first configuration, the FFTW version and
``other_load``, the fraction of the machine's cores other processes used meanwhile (anything
but ~0 skews the ratios; ``--repeats`` keeps the fastest of several interleaved runs).

    python bench/bench_scaling.py                          # 60 × 32³, K=2, 20°, ±3 voxels, 2 iterations
    python bench/bench_scaling.py --particles 200 --sampling 15 --iterations 1   # the standard workload
    python bench/bench_scaling.py --configs 1x1,2x1,4x1,2x2

Target: efficiency ≥ 85 % for 2×1 and 1×2 (SPEC §6).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_dataset(root: Path, n_particles: int, box: int, classes: int, max_shift: int, snr: float,
                  missing: str, voxel: float, seed: int) -> Path:
    """Smooth random blob phantoms, random rotations, integer shifts, noise at ``snr``, a missing region."""
    import pandas as pd

    from mltomo import geometry
    from mltomo.fourier import irfft_unitary, missing_region_mask, rfft_unitary
    from mltomo.io import write_star, write_volume
    from mltomo.reference import rotate_volume

    rng = np.random.default_rng(seed)
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    phantoms = []
    for _ in range(classes):
        v = np.zeros((box, box, box))
        for _ in range(8):
            p = rng.uniform(-box / 4, box / 4, 3)
            s = rng.uniform(0.06, 0.12) * box
            v += rng.uniform(0.5, 1.5) * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
        phantoms.append(v / v.std())
    mask = missing_region_mask(missing, box)
    rotations = geometry.random_rotations(n_particles, rng)
    (root / "particles").mkdir(parents=True)
    names = []
    for i in range(n_particles):
        v = np.roll(rotate_volume(phantoms[i % classes], rotations[i]),
                    tuple(rng.integers(-max_shift, max_shift + 1, 3)), axis=(0, 1, 2))
        v = v + rng.normal(scale=np.sqrt(1.0 / snr), size=v.shape)
        name = f"particles/p{i:04d}.mrc"
        write_volume(root / name, irfft_unitary(rfft_unitary(v) * mask, box).astype(np.float32), voxel)
        names.append(name)
    star = root / "particles.star"
    write_star(star, {"particles": pd.DataFrame({"rlnImageName": names})})
    return star


def worker(args) -> None:
    """One rank of one configuration: refine, then rank 0 prints the timings as JSON."""
    from mltomo.api import refine
    from mltomo.parallel import get_comm

    comm = get_comm()
    stats = []
    t0 = time.perf_counter()
    refine(args.worker, out=args.out, comm=comm, callback=lambda s, m, r: stats.append(s),
           n_classes=args.classes, iterations=args.iterations, angular_sampling_deg=args.sampling,
           max_shift_voxels=args.max_shift, missing=args.missing, threads=args.threads, seed=args.seed, eps=0)
    wall = time.perf_counter() - t0
    # The first iteration of a reference-free run searches only each particle's seed class:
    # time the full searches after it when there are any.
    timed = stats[1:] or stats
    estep = np.array([s.seconds_estep for s in timed])
    all_estep = comm.gather(estep)
    if comm.rank == 0:
        print(json.dumps({
            "seconds_estep": float(np.max(all_estep, axis=0).mean()),
            "seconds_estep_per_rank": [round(float(e.mean()), 3) for e in all_estep],
            "seconds_total": float(np.mean([s.seconds_total for s in timed])),
            "timed_iterations": [s.iteration for s in timed],
            "seconds_wall": wall,
            "rotations": timed[0].n_rotations, "shifts": timed[0].n_shifts,
            "pruned_fraction": timed[-1].pruned_fraction,
        }), flush=True)


def run_config(args, star: Path, ranks: int, threads: int, out: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(star), "--out", str(out),
           "--threads", str(threads), "--classes", str(args.classes), "--iterations", str(args.iterations),
           "--sampling", str(args.sampling), "--max-shift", str(args.max_shift), "--missing", args.missing,
           "--seed", str(args.seed)]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            raise SystemExit("bench_scaling: mpiexec is not on PATH (pip install '.[mpi]')")
        cmd = [mpiexec, "-n", str(ranks), "-bind-to", f"core:{threads}" if threads > 1 else "core", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    env["OMP_NUM_THREADS"] = str(threads)
    busy0, own0, t0 = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    busy1, own1, wall = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench_scaling: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    # CPU the rest of the machine used meanwhile, as a fraction of all cores: 0 on a quiet machine.
    r["other_load"] = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * os.cpu_count())
    return r


def _busy_cpu_seconds():
    """Non-idle CPU seconds of the whole machine since boot (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _children_cpu_seconds():
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--particles", type=int, default=60)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--sampling", type=float, default=20.0, help="angular sampling in degrees")
    ap.add_argument("--max-shift", type=int, default=3, help="voxels")
    ap.add_argument("--iterations", type=int, default=2, help="the first is timed only if it is the only one")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--missing", default="wedge_y:-60:60")
    ap.add_argument("--configs", default="1x1,2x1,1x2", help="RANKSxTHREADS,... (the first is the baseline)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", metavar="STAR", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    import mltomo

    configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",")]
    with tempfile.TemporaryDirectory(prefix="mltomo-bench-scaling-") as tmp:
        star = write_dataset(Path(tmp) / "data", args.particles, args.box, args.classes, args.max_shift, args.snr,
                             args.missing, 8.0, args.seed)
        # Configurations interleaved, the fastest of --repeats runs kept: on a shared machine the
        # minimum is the run least disturbed by other work.
        best = {}
        for rep in range(args.repeats):
            for i, (ranks, threads) in enumerate(configs):
                r = run_config(args, star, ranks, threads, Path(tmp) / f"run{rep}_{i}")
                if i not in best or r["seconds_total"] < best[i]["seconds_total"]:
                    best[i] = r
        base = best[0]
        for i, (ranks, threads) in enumerate(configs):
            r = best[i]
            speedup = base["seconds_total"] / r["seconds_total"]
            print(json.dumps({
                "bench": "scaling", "ranks": ranks, "threads": threads, "box": args.box,
                "particles": args.particles, "classes": args.classes, "sampling_deg": args.sampling,
                "rotations": r["rotations"], "shifts": r["shifts"], "timed_iterations": r["timed_iterations"],
                "repeats": args.repeats, "seconds_estep": round(r["seconds_estep"], 3),
                "seconds_total": round(r["seconds_total"], 3), "seconds_estep_per_rank": r["seconds_estep_per_rank"],
                "seconds_wall": round(r["seconds_wall"], 2), "speedup": round(speedup, 3),
                "efficiency": round(speedup / (ranks * threads), 3),
                "speedup_estep": round(base["seconds_estep"] / r["seconds_estep"], 3),
                "pruned_fraction": round(r["pruned_fraction"], 5),
                "other_load": None if r["other_load"] is None else round(r["other_load"], 3),
                "fftw": mltomo.fftw_version(),
            }), flush=True)


if __name__ == "__main__":
    main()
