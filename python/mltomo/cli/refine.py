"""Align and classify subtomograms by maximum likelihood (Scheres et al. 2009).

$ mltomo refine particles.star --out run1 --classes 2 --iter 25 --angular-sampling 15 --missing wedge_y:-60:60
$ mltomo refine particles.star --out run2 --classes 1 --ref start.mrc --angular-sampling 10 --angular-range 50
$ mpiexec -n 4 mltomo refine particles.star --out run3 --classes 3 --threads 2
$ mltomo refine --continue run1 --iter 40
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mltomo.cli import UserError

log = logging.getLogger("mltomo")


def add_args(p):
    from mltomo.model import Config

    p.add_argument("particles", nargs="?", help="particle table (RELION STAR: rlnImageName, optional priors and regions)")
    p.add_argument("--out", help="output directory (created; must be empty or absent)")
    p.add_argument("--continue", dest="cont", metavar="DIR",
                   help="continue the run in DIR after its last complete iteration (options from DIR/run_config.json; "
                        "--iter and --threads may be changed)")
    g = p.add_argument_group("model")
    g.add_argument("--classes", type=int, default=2, help="number of classes K (default 2)")
    g.add_argument("--iter", type=int, default=None,
                   help="number of iterations (default 25; the paper ran 40; with --continue: the run's own)")
    g.add_argument("--mode", choices=("ml", "ml-wa", "cc"), default="ml",
                   help="ml: ML with imputation of missing data (default, the paper's method); ml-wa: ML posteriors with "
                        "weighted averaging; cc: hard assignment by constrained cross-correlation")
    g.add_argument("--scheme", choices=("adaptive", "paper"), default="adaptive",
                   help="classification scheme (default adaptive: references Wiener-filtered by their half-set FSC and "
                        "each particle's self-fit to its own class removed from the class priors; a reference-free run "
                        "aligns with one class for --reg-steps iterations, then splits along the residuals' principal "
                        "component; paper: the "
                        "paper's EM on the whole working box, as Xmipp's ml_tomo)")
    g.add_argument("--ref", nargs="+", metavar="MAP", help="initial references, MRC or .em (one per class; default: reference-free start "
                   "from random subsets in random orientations)")
    g.add_argument("--initial-lowpass", type=float, metavar="A", help="low-pass the initial references to A Å (default: none for --ref maps, 8 voxels for a reference-free "
                   "start; paper: 40 for p53)")
    g.add_argument("--impute-iter", type=int, default=1, help="imputation iterations m in the ML M-step (default 1)")
    g.add_argument("--wa-threshold", type=float, default=0.1,
                   help="tau: weighted averaging sets components observed by fewer than tau particles to 0 (default 0.1, the paper's; "
                        "Xmipp used 1.0)")
    g.add_argument("--reg0", type=float, default=5.0, help="initial regularisation (theta = reg*N/K^2; default 5, the paper's)")
    g.add_argument("--regF", type=float, default=0.0, help="final regularisation (default 0, the paper's)")
    g.add_argument("--reg-steps", type=int, default=5, help="iterations over which reg goes from reg0 to regF (default 5; the adaptive scheme's "
                   "reference-free runs align with one class during them)")
    g.add_argument("--fix-sigma", type=float, metavar="S", help="fix the noise standard deviation to S (default: estimated every iteration; the paper's near-delta "
                   "runs: sigma/100)")
    g.add_argument("--fix-xi", action="store_true", help="do not update the translation prior width xi (default: updated every iteration)")
    g.add_argument("--fix-fractions", action="store_true", help="do not update the class fractions alpha (default: updated every iteration)")
    g.add_argument("--sym", default="C1", help="point group Cn, Dn, T, O or I (default C1)")
    g = p.add_argument_group("search")
    g.add_argument("--angular-sampling", type=float, default=15.0, help="rotation grid step in degrees (default 15, the paper's)")
    g.add_argument("--angular-range", type=float, metavar="DEG",
                   help="local search within DEG of each particle's previous pose (default: exhaustive search; paper: 50 with "
                        "10 deg sampling)")
    g.add_argument("--search", choices=("global", "auto"), default="global",
                   help="auto: search locally (within 2 angular steps of each particle's pose) once the poses have "
                        "converged, globally again when the local search stops holding them (default: global)")
    g.add_argument("--coarse", choices=("on", "off"), default="on" if Config.coarse_to_fine else "off",
                   help="on: a global search scores a grid twice as coarse at low resolution first and searches only "
                        "the fine rotations near the coarse ones within --coarse-window of each particle's best, "
                        "checked every iteration on a few particles searched exhaustively (default: %(default)s)")
    g.add_argument("--coarse-window", type=float, default=Config.coarse_window, metavar="NATS",
                   help="coarse rotations kept: log posterior within NATS of the particle's best (default %(default)g)")
    g.add_argument("--resolution-schedule", choices=("on", "off"), default="on" if Config.resolution_schedule else "off",
                   help="on (adaptive scheme): rotate and score only to a few shells beyond the classes' FSC-0.143 "
                        "resolution, where the filtered references are 0, while the sums keep every shell "
                        "(default: %(default)s)")
    g.add_argument("--no-perturb", action="store_true", help="do not re-orient the rotation grid randomly every iteration (default: re-oriented, as in the paper's runs)")
    g.add_argument("--no-rotate", action="store_true", help="keep each particle's rotation; search shifts and classes only (default: off)")
    g.add_argument("--no-align", action="store_true", help="keep rotations and shifts (classification only, paper Fig. 1E; default: off)")
    g.add_argument("--max-shift", type=float, metavar="VOX", help="largest shift searched, in voxels (default: min(n/4, max(1, ceil(3 xi))) "
                   "for each iteration's xi, so it follows the estimate)")
    g.add_argument("--xi0", type=float, default=2.0, help="initial translation prior width xi in voxels (default 2)")
    g = p.add_argument_group("data")
    g.add_argument("--missing", default="none",
                   help="missing region for particles whose table gives none: none, wedge_y:A:B (tilt about y from A to B deg), "
                        "wedge_x:A:B, pyramid:YA:YB:XA:XB, cone:T (default none)")
    g.add_argument("--weight-threshold", type=float, help="for rlnCtfImage CTF volumes: a binary mask, observed where the volume > this "
                   "(default: continuous CTF² weights, the particle divided by the CTF)")
    g.add_argument("--weight-layout", default="auto", choices=("auto", "centred", "origin", "half"),
                   help="layout of rlnCtfImage volumes: centred (n/2 is frequency 0: RELION), origin (index 0 is frequency 0: "
                        "STOPGAP, cryoCAT, TOM) or half (n x n x n/2+1); default auto: detected from each particle's power spectrum")
    g.add_argument("--tomograms", metavar="STAR",
                   help="RELION 5 tomograms table of a 2D tilt-stack particle table (default: the one its optimisation set "
                        "names, else <table>_tomograms.star beside it)")
    g.add_argument("--weight-kind", default="auto", choices=("auto", "ctf", "ctf2"),
                   help="rlnCtfImage volumes hold: ctf (the CTF that multiplies the reference, RELION 3) or ctf2 (a CTF² sum of "
                        "CTF-premultiplied data, RELION 4 pseudo-subtomograms); default auto: ctf2 for RELION 4's 2n-slice weights, else ctf")
    g.add_argument("--noise", default="auto", choices=("auto", "white", "shell"),
                   help="noise model: white (one sigma, the paper's) or shell (sigma^2 per resolution shell and noise group, "
                        "estimated every iteration: real subtomograms); default auto: shell for continuous weights "
                        "(CTF volumes, tilt stacks), white for binary missing regions")
    g.add_argument("--no-scale-correction", action="store_true",
                   help="do not bring --ref to the particles' intensity scale, nor estimate a scale per mask group (default: both)")
    g.add_argument("--max-resolution", type=float, metavar="A", help="work to this resolution in Å (crops the Fourier transform; default: full box)")
    g.add_argument("--particle-diameter", type=float, metavar="A", help="soft spherical mask of this diameter on the references (default: box - 2 voxels with a soft edge outside when classifying, none with --classes 1 or --scheme paper; 0: no mask)")
    g.add_argument("--mask", metavar="MRC", help="focused mask multiplied into the references (with --no-align: focused classification; default: none)")
    g.add_argument("--padding", type=float, default=2.0, help="Fourier padding factor of the references (default 2; 3 for particles that fill the box)")
    g = p.add_argument_group("run")
    g.add_argument("--eps", type=float, default=1e-5, help="stop when every class changes by less than this (relative; default 1e-5)")
    g.add_argument("--auto-stop", choices=["auto", "on", "off"], default="auto",
                   help="stop at convergence, as RELION's auto-refine: once the half-set resolution has not improved "
                        "for 2 iterations and at most 5%% of the particles moved by more than 1.5 angular steps "
                        "(--iter is then a ceiling); auto (default): on for --classes 1 with --ref, off for classification and reference-free runs")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--threads", type=int, default=0, help="threads per process (default: all cores, or OMP_NUM_THREADS)")
    g.add_argument("--memory-budget", type=float, metavar="GB",
                   help="hold each process's particle spectra in memory up to this many GB, else stream them from "
                        "a memory-mapped cache in --cache-dir; also bounds the E-step's chunk (default: all in memory)")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="directory of the spectra cache (an unlinked temporary file; default: the system's temporary "
                        "directory)")
    g.add_argument("--quiet", action="store_true", help="no progress bar (default: a progress bar when stderr is a terminal)")
    g.add_argument("--verbose", action="store_true", help="debug logging (default: one line per iteration)")


def config_from_args(args):
    from mltomo.model import Config

    return Config(
        n_classes=args.classes, iterations=args.iter or Config.iterations, mode=args.mode, scheme=args.scheme,
        angular_sampling_deg=args.angular_sampling,
        angular_range_deg=args.angular_range, search=args.search,
        coarse_to_fine=args.coarse == "on", coarse_window=args.coarse_window,
        resolution_schedule=args.resolution_schedule == "on", perturb=not args.no_perturb, no_rotate=args.no_rotate,
        no_align=args.no_align, max_shift_voxels=args.max_shift, xi0_voxels=args.xi0, missing=args.missing,
        weight_threshold=args.weight_threshold, weight_layout=args.weight_layout, weight_kind=args.weight_kind, tomograms=args.tomograms,
        noise=args.noise,
        scale_correction=not args.no_scale_correction, impute_iter=args.impute_iter, wa_threshold=args.wa_threshold,
        reg0=args.reg0, regF=args.regF, reg_steps=args.reg_steps, fix_sigma=args.fix_sigma, fix_xi=args.fix_xi,
        fix_fractions=args.fix_fractions, max_resolution_angstrom=args.max_resolution, padding=args.padding,
        particle_diameter_angstrom=args.particle_diameter, mask=args.mask, sym=args.sym, eps=args.eps,
        auto_stop=args.auto_stop,
        seed=args.seed, threads=args.threads, initial_lowpass_angstrom=args.initial_lowpass,
        **_memory_options(args),
    )


def _memory_options(args) -> dict:
    """Config fields of --memory-budget and --cache-dir."""
    from mltomo.model import Config

    if args.memory_budget is None:
        return {"cache_dir": args.cache_dir}
    budget = args.memory_budget * 1e9
    return {"spectra_budget_bytes": budget, "memory_budget_bytes": int(min(Config.memory_budget_bytes, budget / 4)),
            "cache_dir": args.cache_dir}


def check_args(args) -> None:
    """Reject impossible option values before anything is read or written (one-line UserError)."""
    import math

    from mltomo.fourier import parse_missing_region
    from mltomo.geometry import symmetry_group

    def need(ok, option, value, what):
        if not ok:
            raise UserError(f"{option} {value}: {what}")

    def positive(option, value, allow_none=True):
        if value is None and allow_none:
            return
        need(value is not None and math.isfinite(value) and value > 0, option, value, "must be a positive number")

    need(args.classes >= 1, "--classes", args.classes, "need at least one class")
    need(args.iter is None or args.iter >= 1, "--iter", args.iter, "need at least one iteration")
    need(args.threads >= 0, "--threads", args.threads, "must be 0 (all cores) or a positive count")
    need(args.impute_iter >= 1, "--impute-iter", args.impute_iter, "need at least one imputation iteration")
    need(args.reg_steps >= 0, "--reg-steps", args.reg_steps, "must not be negative")
    positive("--coarse-window", args.coarse_window, allow_none=False)
    for option, value in (("--reg0", args.reg0), ("--regF", args.regF), ("--wa-threshold", args.wa_threshold)):
        need(math.isfinite(value) and value >= 0, option, value, "must be a non-negative number")
    positive("--angular-sampling", args.angular_sampling, allow_none=False)
    positive("--angular-range", args.angular_range)
    positive("--xi0", args.xi0, allow_none=False)
    positive("--fix-sigma", args.fix_sigma)
    positive("--memory-budget", args.memory_budget)
    need(args.cache_dir is None or Path(args.cache_dir).is_dir(), "--cache-dir", args.cache_dir,
         "is not an existing directory")
    positive("--initial-lowpass", args.initial_lowpass)
    positive("--max-resolution", args.max_resolution)
    if args.particle_diameter is not None:  # 0 turns the default mask off
        need(math.isfinite(args.particle_diameter) and args.particle_diameter >= 0, "--particle-diameter",
             args.particle_diameter, "must be a non-negative number of Å (0: no mask)")
    positive("--eps", args.eps, allow_none=False)
    if args.max_shift is not None:
        need(math.isfinite(args.max_shift) and args.max_shift >= 0, "--max-shift", args.max_shift,
             "must be a non-negative number of voxels")
    need(math.isfinite(args.padding) and args.padding >= 1, "--padding", args.padding, "must be at least 1")
    try:
        symmetry_group(args.sym)
    except ValueError as exc:
        raise UserError(f"--sym {args.sym}: {exc}") from None
    try:
        parse_missing_region(args.missing)
    except ValueError as exc:
        raise UserError(f"--missing {args.missing}: {exc}") from None
    if args.mask:
        from mltomo.io import FileFormatError, read_volume

        try:
            read_volume(args.mask)
        except FileFormatError as exc:
            raise UserError(f"--mask: {exc}") from None


def run(args) -> int:
    from mltomo.cli.runner import refine_files

    check_args(args)
    if args.cont:
        if args.particles or args.out:
            raise UserError("--continue DIR takes no particle table or --out")
    else:
        if not args.particles:
            raise UserError("a particle table is required (or --continue DIR)")
        if not args.out:
            raise UserError("--out DIR is required")
    show = not args.quiet and sys.stderr.isatty()
    refine_files(
        args.particles, args.out, None if args.cont else config_from_args(args), refs=args.ref,
        continue_dir=args.cont, iterations=args.iter if args.cont else None,
        threads=args.threads if args.cont else None, progress=show,
    )
    return 0
