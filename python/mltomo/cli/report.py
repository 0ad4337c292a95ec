"""Draw the figures of a refinement (class averages, convergence, orientations, posteriors) as PNG.

$ mltomo report run1
$ mltomo report run1 --out run1_figures

Writes classes.png (last iteration: central xy, xz, yz slices of every class),
classes_over_iterations.png, convergence.png (log-likelihood, sigma, xi, class fractions,
changes), orientations.png (viewing directions of the last iteration) and posteriors.png
(maximum posterior per particle) into DIR/report/, and prints their paths.
"""

from __future__ import annotations

from mltomo.cli import UserError


def add_args(p):
    p.add_argument("run_dir", metavar="DIR", help="the --out directory of mltomo refine")
    p.add_argument("--out", metavar="DIR", help="where to write the PNG files (default DIR/report; created)")


def run(args) -> int:
    from mltomo.report import write_report

    try:
        paths = write_report(args.run_dir, args.out)
    except ValueError as exc:  # ReportError, FileFormatError: one line naming the file
        raise UserError(str(exc)) from None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise UserError(f"{where}{exc.strerror or exc}") from None
    for p in paths:
        print(p)
    return 0
