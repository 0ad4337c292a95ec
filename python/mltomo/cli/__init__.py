"""Command-line entry point: ``mltomo <subcommand> ...``.

Each subcommand is a module of this package with a docstring (first line: the help,
``$ mltomo ...`` lines: the examples), ``add_args(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import keyword
import logging
import sys

SUBCOMMANDS = ("simulate", "refine", "demo", "report", "import")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def _load(name):
    module = f"mltomo.cli.{name}_" if keyword.iskeyword(name) else f"mltomo.cli.{name}"  # import -> import_
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:  # a subcommand not written yet
        if exc.name == module:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mltomo",
        description="Maximum-likelihood alignment and classification of subtomograms "
        "with missing regions (Scheres et al. 2009).",
    )
    from mltomo import __version__

    parser.add_argument("--version", action="version", version=f"mltomo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        doc = (mod.__doc__ or name).strip()
        first, _, rest = doc.partition("\n")
        examples = "\n".join(line for line in rest.splitlines() if line.strip().startswith("$"))
        p = sub.add_parser(
            name,
            help=first,
            description=first,
            epilog=("examples:\n" + examples) if examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_args(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    elif not getattr(args, "quiet", False):
        level = logging.INFO
    logging.basicConfig(level=level, format="%(message)s", force=True)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        if not getattr(exc, "quiet", False):
            print(f"mltomo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not (exc.filename and exc.strerror):
            raise
        # A full disk, a quota or a file-size limit (the writers name the destination).
        print(f"mltomo {args.command}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mltomo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
