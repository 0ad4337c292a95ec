"""RELION STAR files (via the ``starfile`` package) and image names.

Blocks are a ``dict`` from block name (without ``data_``) to a ``pandas.DataFrame`` (a
``loop_``) or a ``dict`` (a simple ``key value`` block), in file order.

Image names (``rlnImageName``, ``rlnCtfImage``, ``rlnReferenceImage``) are either a path
(``Particles/p1.mrc``) or ``i@stack.mrcs`` with a 1-based index ``i``. A relative path is
resolved against the directory of the STAR file; if nothing exists there but the path exists
relative to the current directory (RELION's convention: names relative to the project
directory), that file is used instead.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["parse_image_name", "read_star", "resolve_image_name", "write_star"]

# Columns that hold names, read as strings even when they look like numbers ("1", "001").
STRING_COLUMNS = (
    "rlnImageName",
    "rlnTomoName",
    "rlnMicrographName",
    "rlnCtfImage",
    "rlnReferenceImage",
    "rlnOpticsGroupName",
    "mltomoMissingRegion",
)

_STACK_NAME = re.compile(r"^\s*(\d+)@(.+?)\s*$")


def _error(path, problem: str):
    from mltomo.io import FileFormatError

    return FileFormatError(f"{path}: {problem}")


def read_star(path) -> dict:
    """All data blocks of a STAR file: ``{name: DataFrame | dict}`` (``data_`` stripped)."""
    import starfile

    path = Path(path)
    if not path.exists():
        raise _error(path, "no such file")
    if path.is_dir():
        raise _error(path, "is a directory, not a STAR file")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=list(STRING_COLUMNS))
    except UnicodeDecodeError:
        raise _error(path, "not a STAR file (not text)") from None
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - starfile/pandas parse errors have many types
        msg = str(exc).strip().splitlines()
        raise _error(path, f"not a readable STAR file ({msg[0] if msg else type(exc).__name__})") from None
    if not blocks:
        raise _error(path, "not a STAR file (no data_ blocks found)")
    return dict(blocks)


def write_star(path, blocks: dict, float_format: str = "%.10g") -> None:
    """Write ``{name: DataFrame | dict}`` as a STAR file, atomically.

    Block names are written as ``data_<name>``; floats with ``float_format`` (default keeps 10
    significant digits, enough to round-trip float32 and angles). The input is not modified.
    """
    import starfile

    from mltomo.io.atomic import atomic_path

    path = Path(path)
    if not isinstance(blocks, dict) or not blocks:
        raise ValueError(f"{path}: write_star needs a non-empty dict of blocks")
    with atomic_path(path) as tmp:
        starfile.write(dict(blocks), tmp, float_format=float_format)


def parse_image_name(name) -> tuple[str, int | None]:
    """``"12@stack.mrcs"`` -> ``("stack.mrcs", 12)``; ``"p.mrc"`` -> ``("p.mrc", None)``."""
    text = str(name).strip()
    m = _STACK_NAME.match(text)
    if m:
        return m.group(2), int(m.group(1))
    if "@" in text.split("/")[-1] and text.split("@", 1)[0].strip().lstrip("-").isdigit():
        from mltomo.io import FileFormatError

        raise FileFormatError(f"{text}: stack index must be an integer >= 1 (i@file, 1-based)")
    return text, None


def resolve_image_name(name, star_dir=None) -> tuple[Path, int | None]:
    """Resolve an image name to ``(path, index1 or None)``.

    ``star_dir`` is the directory of the STAR file naming the image (``None``: the current
    directory). See the module docstring for the search order.
    """
    file_part, index1 = parse_image_name(name)
    if index1 is not None and index1 < 1:
        from mltomo.io import FileFormatError

        raise FileFormatError(f"{name}: stack index must be >= 1 (i@file, 1-based)")
    p = Path(file_part).expanduser()
    if p.is_absolute() or star_dir is None:
        return p, index1
    candidate = Path(star_dir) / p
    if not candidate.exists() and p.exists():
        return p, index1
    return candidate, index1
