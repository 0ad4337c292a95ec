"""Figures of a refinement: what ``mltomo report DIR`` writes (PNG, into ``DIR/report/``).

* ``classes.png`` -- the class averages of the last iteration: central xy, xz and yz slices
  (one row per class, its fraction α_k in the label);
* ``classes_over_iterations.png`` -- the same three slices side by side for every class
  (columns) and iteration (rows; at most :data:`MAX_STRIP_ROWS`, evenly spaced, first and
  last always included);
* ``convergence.png`` -- log-likelihood, noise σ, translation prior width ξ, class
  fractions α_k, relative change of each class, and the percentage of particles that changed
  class, over iterations;
* ``orientations.png`` -- the viewing directions of the last iteration in a Mollweide
  projection (longitude ``rlnAngleRot``, latitude ``90° - rlnAngleTilt``), one colour per
  class;
* ``posteriors.png`` -- histograms of ``rlnMaxValueProbDistribution`` (per class) and of
  ``rlnNrOfSignificantSamples``;
* ``noise.png`` -- the noise power σ²(shell) of every noise group of the last iteration
  (``data_model_noise``; flat for ``--noise white``).

Slices are taken through voxel ``n // 2`` (the rotation centre, see :mod:`mltomo.geometry`)
and shown with density bright, ``x`` (or ``y`` for yz) to the right and ``y`` (or ``z``)
up; each volume is scaled to its own 1st-99.5th percentile.

matplotlib is imported inside the functions and used through its object-oriented API on an
Agg canvas: no pyplot, no global backend switch, no state changed by importing mltomo.
Every PNG is written to a temporary name and renamed, so a reader never sees half a figure.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

__all__ = ["ReportError", "iterations_of", "write_demo_report", "write_report"]

MAX_STRIP_ROWS = 10
DPI = 100


class ReportError(ValueError):
    """The run directory cannot be reported on (one line, names the directory)."""


# ------------------------------------------------------------------------------ reading a run


def iterations_of(run_dir) -> list[int]:
    """The complete iterations of a run (those whose ``run_itNNN_model.star`` exists), sorted."""
    its = []
    for p in Path(run_dir).glob("run_it*_model.star"):
        m = re.fullmatch(r"run_it(\d+)_model\.star", p.name)
        if m:
            its.append(int(m.group(1)))
    return sorted(its)


def _check_run_dir(run_dir) -> list[int]:
    d = Path(run_dir)
    if not d.exists():
        raise ReportError(f"{d}: no such directory")
    if not d.is_dir():
        raise ReportError(f"{d}: not a directory (give the --out directory of mltomo refine)")
    its = iterations_of(d)
    if not its:
        raise ReportError(f"{d}: no complete iteration of a refinement here (no run_itNNN_model.star)")
    return its


def _read_model(run_dir, it: int) -> dict:
    from mltomo.io.star import read_star
    from mltomo.outputs import iteration_prefix

    path = Path(f"{iteration_prefix(run_dir, it)}_model.star")
    blocks = read_star(path)
    gen, cls = blocks.get("model_general"), blocks.get("model_classes")
    if gen is None or cls is None or not hasattr(cls, "columns"):
        raise ReportError(
            f"{path}: not a model file of mltomo refine (needs data_model_general and data_model_classes)")
    if hasattr(gen, "iloc"):
        gen = {c: gen[c].iloc[0] for c in gen.columns}

    def number(key):
        try:
            return float(gen[key])
        except (KeyError, TypeError, ValueError):
            return float("nan")

    def column(key):
        if key not in cls.columns:
            return np.full(len(cls), np.nan)
        return np.asarray(cls[key], dtype=np.float64)

    maps = [Path(run_dir) / str(m) for m in cls["rlnReferenceImage"]]
    for m in maps:
        if not m.is_file():
            raise ReportError(f"{m}: no such file (named in {path.name})")
    noise = blocks.get("model_noise")
    return {
        "iteration": it,
        "noise": noise if noise is not None and hasattr(noise, "columns") else None,
        "log_likelihood": number("rlnLogLikelihood"),
        "sigma": number("mltomoSigmaNoise"),
        "xi_angstrom": number("rlnSigmaOffsetsAngst"),
        "alpha": column("rlnClassDistribution"),
        "change": column("mltomoRelativeChange"),
        "maps": maps,
    }


def _read_data(run_dir, it: int):
    from mltomo.io.star import read_star
    from mltomo.outputs import iteration_prefix

    path = Path(f"{iteration_prefix(run_dir, it)}_data.star")
    blocks = read_star(path)
    df = blocks.get("particles")
    if df is None or not hasattr(df, "columns"):
        df = next((b for b in blocks.values() if hasattr(b, "columns")), None)
    need = ("rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnMaxValueProbDistribution")
    if df is None or any(c not in df.columns for c in need):
        raise ReportError(f"{path}: not a particle file of mltomo refine (needs {', '.join(need)})")
    return df


def _read_map(path) -> np.ndarray:
    from mltomo.io.mrc import read_volume

    return read_volume(path)[0]


# ---------------------------------------------------------------------------------- drawing


def _figure(width_in: float, height_in: float, **kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    from mltomo.io.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def central_slices(vol: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xy, xz, yz)`` central slices of a ``[z, y, x]`` volume through voxel ``n // 2``;
    rows are y, z, z and columns x, x, y (draw with ``origin="lower"``)."""
    vol = np.asarray(vol)
    cz, cy, cx = (s // 2 for s in vol.shape)
    return vol[cz, :, :], vol[:, cy, :], vol[:, :, cx]


def _limits(vol: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(vol, [1.0, 99.5])
    if not hi > lo:
        lo, hi = float(vol.min()), float(vol.max())
        if not hi > lo:
            lo, hi = lo - 1.0, hi + 1.0
    return float(lo), float(hi)


def _montage(vol: np.ndarray) -> np.ndarray:
    """xy | xz | yz side by side with one blank (NaN) column between them."""
    xy, xz, yz = central_slices(vol)
    gap = np.full((xy.shape[0], 1), np.nan)
    return np.concatenate([xy, gap, xz, gap, yz], axis=1)


def _cmap():
    import matplotlib

    return matplotlib.colormaps["gray"].with_extremes(bad="white")


def _clean(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def _slice_row(axes, vol, label=None, titles=True):
    lo, hi = _limits(vol)
    names = ("xy", "xz", "yz")
    for ax, sl, name in zip(axes, central_slices(vol), names):
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        _clean(ax)
        if titles:
            ax.set_title(name, fontsize=9)
    if label:
        axes[0].set_ylabel(label, fontsize=9)


def _class_colours(K: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if K <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(K)]


def plot_classes(run_dir, model: dict, path) -> Path:
    """The last iteration's class averages: one row of xy/xz/yz slices per class."""
    K = len(model["maps"])
    fig = _figure(6.4, max(2.2 * K + 0.6, 3.0), layout="constrained")
    axes = fig.subplots(K, 3, squeeze=False)
    for k, p in enumerate(model["maps"]):
        alpha = model["alpha"][k]
        label = f"class {k + 1}" + (f"\nα = {alpha:.2f}" if np.isfinite(alpha) else "")
        _slice_row(axes[k], _read_map(p), label, titles=(k == 0))
    fig.suptitle(f"{Path(run_dir).name}: class averages, iteration {model['iteration']} (central slices)", fontsize=10)
    return _save(fig, path)


def _strip_iterations(its: list[int]) -> list[int]:
    if len(its) <= MAX_STRIP_ROWS:
        return list(its)
    pick = np.unique(np.round(np.linspace(0, len(its) - 1, MAX_STRIP_ROWS)).astype(int))
    return [its[i] for i in pick]


def plot_classes_over_iterations(run_dir, models: list[dict], path) -> Path:
    """Rows: iterations (at most MAX_STRIP_ROWS), columns: classes; each cell xy | xz | yz."""
    shown = _strip_iterations([m["iteration"] for m in models])
    by_it = {m["iteration"]: m for m in models}
    K = max(len(m["maps"]) for m in models)
    rows = len(shown)
    fig = _figure(max(2.6 * K + 0.8, 4.0), max(0.95 * rows + 0.9, 3.0), layout="constrained")
    axes = fig.subplots(rows, K, squeeze=False)
    cmap = _cmap()
    for r, it in enumerate(shown):
        m = by_it[it]
        for k in range(K):
            ax = axes[r, k]
            _clean(ax)
            if k < len(m["maps"]):
                vol = _read_map(m["maps"][k])
                lo, hi = _limits(vol)
                ax.imshow(_montage(vol), cmap=cmap, vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            else:
                ax.set_axis_off()
            if r == 0:
                ax.set_title(f"class {k + 1}", fontsize=9)
            if k == 0:
                ax.set_ylabel(f"it {it}", fontsize=9)
    every = "" if len(shown) == len(models) else f" ({len(shown)} of {len(models)})"
    fig.suptitle(f"class averages over iterations{every}: xy | xz | yz", fontsize=10)
    return _save(fig, path)


def _class_changes(run_dir, its: list[int]) -> np.ndarray:
    """Percentage of particles whose class differs from the previous iteration (NaN for the first)."""
    out = np.full(len(its), np.nan)
    prev = None
    for i, it in enumerate(its):
        try:
            cls = _read_data(run_dir, it)["rlnClassNumber"].to_numpy()
        except (ValueError, OSError):
            prev = None
            continue
        if prev is not None and len(prev) == len(cls) and len(cls):
            out[i] = 100.0 * np.mean(prev != cls)
        prev = cls
    return out


def plot_convergence(run_dir, models: list[dict], path) -> Path:
    its = np.array([m["iteration"] for m in models])
    K = max(len(m["alpha"]) for m in models)
    colours = _class_colours(K)

    def per_class(key):
        a = np.full((len(models), K), np.nan)
        for i, m in enumerate(models):
            a[i, : len(m[key])] = m[key]
        return a

    fig = _figure(11.0, 6.0, layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    panels = [
        (axes[0], np.array([m["log_likelihood"] for m in models]), "log-likelihood"),
        (axes[1], np.array([m["sigma"] for m in models]), "noise σ"),
        (axes[2], np.array([m["xi_angstrom"] for m in models]), "translation prior ξ (Å)"),
    ]
    for ax, y, title in panels:
        ax.plot(its, y, "o-", color="black", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    alpha, change = per_class("alpha"), per_class("change")
    for k in range(K):
        axes[3].plot(its, alpha[:, k], "o-", color=colours[k], markersize=3, label=f"class {k + 1}")
        axes[4].plot(its, change[:, k], "o-", color=colours[k], markersize=3, label=f"class {k + 1}")
    axes[3].set_title("class fractions α", fontsize=10)
    axes[3].set_ylim(0, max(1.0, float(np.nanmax(alpha)) if np.isfinite(alpha).any() else 1.0) * 1.05)
    if K <= 10:
        axes[3].legend(fontsize=8, loc="best")
    axes[4].set_title("relative change of each class", fontsize=10)
    if np.any(np.isfinite(change) & (change > 0)):
        axes[4].set_yscale("log")
    changes = _class_changes(run_dir, list(its))
    axes[5].plot(its, changes, "o-", color="black", markersize=3)
    axes[5].set_title("particles that changed class (%)", fontsize=10)
    axes[5].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("iteration", fontsize=9)
        ax.tick_params(labelsize=8)
        if len(its) <= 12:
            ax.set_xticks(its)
    fig.suptitle(f"{Path(run_dir).name}: convergence", fontsize=11)
    return _save(fig, path)


def plot_orientations(run_dir, df, it: int, path) -> Path:
    """Viewing directions (rot, tilt) of the last iteration, Mollweide projection."""
    rot = np.radians(((df["rlnAngleRot"].to_numpy(np.float64) + 180.0) % 360.0) - 180.0)
    lat = np.radians(90.0 - df["rlnAngleTilt"].to_numpy(np.float64))
    cls = df["rlnClassNumber"].to_numpy(np.int64)
    classes = np.unique(cls)
    colours = _class_colours(int(classes.max()) if len(classes) else 1)
    N = len(df)
    size = float(np.clip(2000.0 / max(N, 1), 1.0, 30.0))
    fig = _figure(8.0, 4.8, layout="constrained")
    ax = fig.add_subplot(projection="mollweide")
    for c in classes:
        sel = cls == c
        ax.scatter(rot[sel], lat[sel], s=size, color=colours[(c - 1) % len(colours)], alpha=0.7, linewidths=0,
                   label=f"class {c} ({int(sel.sum())})")
    ax.grid(True, alpha=0.4)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("rot (°)", fontsize=9)
    ax.set_ylabel("90° − tilt (°)", fontsize=9)
    if 0 < len(classes) <= 10:
        ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, -0.12), markerscale=max(1.0, 20.0 / size) ** 0.5)
    ax.set_title(f"viewing directions, iteration {it} ({N} particles)", fontsize=10, pad=14)
    return _save(fig, path)


def plot_posteriors(run_dir, df, it: int, path) -> Path:
    """Histograms of the maximum posterior probability (per class) and of significant samples."""
    pmax = df["rlnMaxValueProbDistribution"].to_numpy(np.float64)
    cls = df["rlnClassNumber"].to_numpy(np.int64)
    classes = np.unique(cls)
    colours = _class_colours(int(classes.max()) if len(classes) else 1)
    fig = _figure(10.0, 4.0, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    bins = np.linspace(0.0, 1.0, 26)
    data = [np.clip(pmax[cls == c], 0.0, 1.0) for c in classes]
    ax1.hist(data, bins=bins, stacked=True, color=[colours[(c - 1) % len(colours)] for c in classes],
             label=[f"class {c}" for c in classes])
    if len(pmax):
        med = float(np.median(pmax))
        ax1.axvline(med, color="black", linestyle="--", linewidth=1, label=f"median {med:.2f}")
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("maximum posterior probability (rlnMaxValueProbDistribution)", fontsize=9)
    ax1.set_ylabel("particles", fontsize=9)
    ax1.legend(fontsize=8)
    ax1.set_title(f"how sure each assignment is, iteration {it}", fontsize=10)
    if "rlnNrOfSignificantSamples" in df.columns:
        ns = df["rlnNrOfSignificantSamples"].to_numpy(np.float64)
        ns = ns[np.isfinite(ns)]
        if len(ns):
            hi = max(float(ns.max()), 1.0)
            ax2.hist(ns, bins=np.unique(np.round(np.geomspace(1, hi + 1, 26))) - 0.5, color="grey")
            if hi > 20:
                ax2.set_xscale("log")
        ax2.set_xlabel("significant samples per particle (rlnNrOfSignificantSamples)", fontsize=9)
        ax2.set_ylabel("particles", fontsize=9)
        ax2.set_title("spread of each posterior", fontsize=10)
    else:
        ax2.set_axis_off()
    return _save(fig, path)


# ----------------------------------------------------------------------------------- entry points


def write_report(run_dir, out_dir=None) -> list[Path]:
    """Write the figures of a refinement's directory (see the module docstring) into
    ``out_dir`` (default ``run_dir/report``, created) and return their paths.

    Raises :class:`ReportError` (or :class:`mltomo.io.FileFormatError`, a ``ValueError``) with a
    one-line message if ``run_dir`` holds no complete iteration or its files cannot be read.
    """
    its = _check_run_dir(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    models = [_read_model(run_dir, it) for it in its]
    last = its[-1]
    df = _read_data(run_dir, last)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"{out}: cannot create the report directory ({exc.strerror or exc})") from None
    return [
        plot_classes(run_dir, models[-1], out / "classes.png"),
        plot_classes_over_iterations(run_dir, models, out / "classes_over_iterations.png"),
        plot_convergence(run_dir, models, out / "convergence.png"),
        plot_orientations(run_dir, df, last, out / "orientations.png"),
        plot_posteriors(run_dir, df, last, out / "posteriors.png"),
    ] + ([plot_noise(run_dir, models[-1], out / "noise.png")] if models[-1]["noise"] is not None else [])


def plot_noise(run_dir, model: dict, path) -> Path:
    """σ²(shell) of every noise group (``model_noise``) against resolution, log scale."""
    t = model["noise"]
    groups = np.asarray(t["rlnGroupNumber"], dtype=np.int64)
    res = np.asarray(t["rlnResolution"], dtype=np.float64)
    sig = np.asarray(t["rlnSigma2Noise"], dtype=np.float64)
    fig = _figure(6.0, 4.0, layout="constrained")
    ax = fig.subplots()
    ids = np.unique(groups)
    colours = _class_colours(min(len(ids), 10))
    for j, g in enumerate(ids[:10]):
        sel = (groups == g) & (res > 0)
        ax.plot(res[sel], sig[sel], "o-", markersize=2, color=colours[j], label=f"group {g}")
    if len(ids) > 10:
        for g in ids[10:]:
            sel = (groups == g) & (res > 0)
            ax.plot(res[sel], sig[sel], "-", color="0.7", linewidth=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("resolution (1/Å)", fontsize=9)
    ax.set_ylabel("σ² per Fourier component", fontsize=9)
    ax.set_title(f"{Path(run_dir).name}: noise power, iteration {model['iteration']}"
                 + (f" ({len(ids)} groups, first 10 coloured)" if len(ids) > 10 else ""), fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _class_frame(R_found: np.ndarray, R_true: np.ndarray) -> np.ndarray:
    """The rotation ``Q`` with ``R_true ≈ R_found Q`` for one class (the candidate
    ``R_foundᵀ R_true`` of a member that minimises the median error; see mltomo.evaluate)."""
    from mltomo.geometry import geodesic_distance_deg

    best, best_med = np.eye(3), np.inf
    cand = np.linspace(0, len(R_found) - 1, min(len(R_found), 100)).astype(int)
    for j in cand:
        Q = R_found[j].T @ R_true[j]
        med = float(np.median(geodesic_distance_deg(R_found @ Q, R_true)))
        if med < best_med:
            best, best_med = Q, med
    return best


def write_demo_report(run_dir, truth_star, references, out_png, metrics: dict, *, align: bool = True) -> Path:
    """One figure for a demo on simulated data: each found class average (last iteration)
    next to the true reference it mostly holds, central xy/xz/yz slices, and a text box with
    ``metrics`` (e.g. ``{"class purity": 0.98, "median angular error (°)": 4.1}``).

    ``truth_star`` is the ``truth.star`` of :func:`mltomo.simulate.write_dataset` (matched to
    the run's particles by ``rlnImageName``); ``references`` the true maps, class 1 first.
    With ``align`` (and true angles in ``truth_star``), each class average is turned from its
    own frame into the truth's (``a_true ≈ a_found`` rotated by ``Qᵀ`` with ``R_true = R_found Q``)
    so the slices are comparable; a reference-free run otherwise finds each class in an arbitrary
    orientation.
    """
    from mltomo.geometry import euler_to_matrix
    from mltomo.io.star import read_star
    from mltomo.reference import rotate_volume

    its = _check_run_dir(run_dir)
    model = _read_model(run_dir, its[-1])
    df = _read_data(run_dir, its[-1])
    truth_blocks = read_star(truth_star)
    truth = truth_blocks.get("particles")
    if truth is None or not hasattr(truth, "columns") or "rlnImageName" not in truth.columns:
        raise ReportError(f"{truth_star}: no particle table with rlnImageName")
    truth = truth.set_index(truth["rlnImageName"].astype(str))
    names = df["rlnImageName"].astype(str) if "rlnImageName" in df.columns else None
    if names is None or not names.isin(truth.index).all():
        raise ReportError(f"{truth_star}: does not describe the particles of {run_dir}")
    truth = truth.loc[names.to_numpy()]
    refs_true = [_read_map(p) for p in references]
    found = df["rlnClassNumber"].to_numpy(np.int64)
    true_cls = (truth["rlnClassNumber"].to_numpy(np.int64) if "rlnClassNumber" in truth.columns
                else np.ones(len(truth), np.int64))
    angle_cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    can_align = align and all(c in truth.columns for c in angle_cols) and all(c in df.columns for c in angle_cols)
    if can_align:
        R_found = euler_to_matrix(*df[angle_cols].to_numpy(np.float64).T)
        R_true = euler_to_matrix(*truth[angle_cols].to_numpy(np.float64).T)

    K = len(model["maps"])
    fig = _figure(12.0, max(2.0 * K + 1.6, 4.0), layout="constrained")
    grid = fig.add_gridspec(K + 1, 6, height_ratios=[1.0] * K + [0.55])
    for k, p in enumerate(model["maps"]):
        vol = _read_map(p)
        members = found == k + 1
        match = int(np.bincount(true_cls[members]).argmax()) if members.any() else None
        if can_align and members.sum() >= 1:
            Q = _class_frame(R_found[members], R_true[members])
            vol = rotate_volume(vol.astype(np.float64), Q.T)
        row = [fig.add_subplot(grid[k, j]) for j in range(6)]
        alpha = model["alpha"][k]
        _slice_row(row[:3], vol, f"class {k + 1}\n{int(members.sum())} particles"
                   + (f"\nα = {alpha:.2f}" if np.isfinite(alpha) else ""), titles=(k == 0))
        if match is not None and 1 <= match <= len(refs_true):
            _slice_row(row[3:], refs_true[match - 1], f"true class {match}", titles=(k == 0))
            row[3].yaxis.set_label_position("left")
        else:
            for ax in row[3:]:
                ax.set_axis_off()
    text_ax = fig.add_subplot(grid[K, :])
    text_ax.set_axis_off()
    lines = [f"{key}: {_fmt_metric(value)}" for key, value in metrics.items()]
    text_ax.text(0.5, 0.5, "\n".join(lines) if lines else "(no metrics)", ha="center", va="center", fontsize=11,
                 family="monospace", transform=text_ax.transAxes,
                 bbox={"boxstyle": "round", "facecolor": "#f2f2f2", "edgecolor": "#999999"})
    frame = " (turned into the truth's frame)" if can_align else ""
    fig.suptitle(f"found class averages{frame} | true references — iteration {its[-1]}", fontsize=11)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)


def _fmt_metric(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    return str(value)
