"""What a refinement writes, and how a stopped one is continued.

Per iteration ``it`` (rank 0, every file written to a temporary name then renamed):

* ``run_itNNN_classKKK.mrc``: the references;
* ``run_itNNN_data.star``: the input table with, per particle, ``rlnClassNumber``,
  ``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/Y/ZAngst`` (SPEC §1 convention),
  ``rlnMaxValueProbDistribution``, ``rlnNrOfSignificantSamples``, ``rlnLogLikeliContribution``,
  and (ML) ``mltomoClassPosterior1..K``, each particle's class posterior;
* ``run_itNNN_optimisation_set.star`` (RELION 5 tilt-stack input only): names that
  ``_data.star`` and the input's tomograms table, as RELION 5's refinements do, so the
  table reads back with its tilt series (``rlnAngle*`` keep RELION 5's meaning, relative to
  ``rlnTomoSubtomogramRot/Tilt/Psi``, which pass through unchanged: see :mod:`mltomo.io.relion5`);
* ``run_itNNN_model.star``, written last, so its presence marks a complete iteration:
  ``data_model_general`` (log-likelihood, σ, ξ, ...) and ``data_model_classes``
  (class map, fraction α_k, relative change).

``run_config.json`` (written once) records the input table and every option, so that
``mltomo refine --continue DIR`` can pick up after the last complete iteration. Every random
choice is seeded by (seed, iteration), so a continued run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from mltomo.model import Config, Model, ParticleResults
from mltomo.reference import particle_diameter


def iteration_prefix(out_dir, it: int) -> Path:
    return Path(out_dir) / f"run_it{it:03d}"


def write_run_config(out_dir, star_path: str, config: Config, extra: dict | None = None) -> None:
    from mltomo.io.atomic import atomic_write_text

    d = {"particles": str(star_path), "config": config.to_dict()}
    if extra:
        d.update(extra)
    atomic_write_text(Path(out_dir) / "run_config.json", json.dumps(d, indent=2, sort_keys=True))


def read_run_config(out_dir) -> tuple[str, Config, dict]:
    path = Path(out_dir) / "run_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run to continue here (run_config.json is missing)")
    d = json.loads(path.read_text())
    return d["particles"], Config(**d["config"]), d


def write_iteration(out_dir, model: Model, results: ParticleResults, particles, config: Config, geo, stats) -> None:
    import pandas as pd

    from mltomo.io.mrc import write_volume
    from mltomo.io.star import write_star

    it = model.iteration
    prefix = iteration_prefix(out_dir, it)
    voxel = particles.voxel_size_angstrom
    maps = []
    for k, a in enumerate(model.refs):
        path = Path(f"{prefix}_class{k + 1:03d}.mrc")
        write_volume(path, np.asarray(a, dtype=np.float32), voxel)
        maps.append(path.name)

    table = particles.table
    if table is None:
        table = pd.DataFrame({"rlnImageName": list(particles.names)})
    df = table.copy()
    order = np.argsort(results.indices)
    idx = results.indices[order]
    if len(idx) != len(df) or np.any(idx != np.arange(len(df))):
        raise RuntimeError("per-particle results do not cover the table")
    cols = {
        "rlnClassNumber": results.classes[order].astype(int),
        "rlnAngleRot": results.angles[order, 0],
        "rlnAngleTilt": results.angles[order, 1],
        "rlnAnglePsi": results.angles[order, 2],
        "rlnOriginXAngst": results.shifts_angstrom[order, 0],
        "rlnOriginYAngst": results.shifts_angstrom[order, 1],
        "rlnOriginZAngst": results.shifts_angstrom[order, 2],
        "rlnMaxValueProbDistribution": results.max_post[order],
        "rlnNrOfSignificantSamples": results.n_significant[order].astype(int),
        "rlnLogLikeliContribution": results.log_likelihood[order],
    }
    if results.class_posteriors is not None:  # the next iteration's self-fit offsets (resume)
        for k in range(results.class_posteriors.shape[1]):
            cols[f"mltomoClassPosterior{k + 1}"] = results.class_posteriors[order, k]
    for k, v in cols.items():
        df[k] = v
    write_star(f"{prefix}_data.star", data_blocks(particles, df), float_format="%.10g")
    if getattr(particles, "tomograms_file", None):  # RELION 5 tilt stacks: the entry point for what follows
        write_star(f"{prefix}_optimisation_set.star", {"": {
            "rlnTomoParticlesFile": f"{prefix.name}_data.star",
            "rlnTomoTomogramsFile": str(Path(particles.tomograms_file).resolve())}})

    general = {
        "rlnCurrentIteration": it,
        "rlnNrClasses": len(model.refs),
        "rlnLogLikelihood": repr(float(model.log_likelihood)),
        "mltomoSigmaNoise": repr(float(np.sqrt(model.sigma2))),
        "mltomoSigma2Noise": repr(float(model.sigma2)),
        "rlnSigmaOffsetsAngst": repr(float(np.sqrt(model.xi2_voxels) * voxel)),
        "mltomoXi2Voxels": repr(float(model.xi2_voxels)),
        "rlnPixelSize": repr(float(voxel)),
        "rlnOriginalImageSize": particles.box,
        "mltomoWorkingBox": geo.n_w,
        "mltomoWorkingRadius": repr(float(geo.radius)),
        "mltomoScoreRadius": repr(float(stats.score_radius)),
        "mltomoRotations": stats.n_rotations,
        "mltomoSearch": stats.search,
        "mltomoRotationsPerParticle": repr(float(stats.rotations_searched)),
        "mltomoNextSearchLocal": int(bool(model.search_local)),
        "mltomoSearchNoise": repr(float(model.search_noise)),
        "mltomoCoarseRotations": int(stats.coarse_rotations),
        "mltomoCoarseWindow": repr(float(stats.coarse_window)),
        "mltomoCoarseMissedNats": repr(float(stats.coarse_missed)),
        "mltomoCoarseNeededWindow": repr(float(stats.coarse_needed)),
        "mltomoNextCoarseWindow": repr(float(model.coarse_window)),
        "mltomoCoarseSkip": int(model.coarse_skip),
        "mltomoBestResolutionShell": int(model.best_resolution_shell),
        "mltomoIterationsWithoutGain": int(model.iterations_without_gain),
        "mltomoConverged": int(bool(stats.converged)),
        "mltomoTranslations": stats.n_shifts,
        "mltomoMaxShiftVoxels": repr(float(geo.max_shift_w * geo.scale)),
        "mltomoPrunedFraction": repr(float(stats.pruned_fraction)),
        "mltomoSecondsIteration": repr(float(stats.seconds_total)),
    }
    general["mltomoScheme"] = config.scheme
    general["mltomoMaskDiameterAngst"] = repr(float(particle_diameter(config, particles.box, voxel) or 0.0))
    classes = pd.DataFrame({
        "rlnReferenceImage": maps,
        "rlnClassDistribution": [repr(float(a)) for a in model.alpha],
        "mltomoRelativeChange": [repr(float(c)) for c in model.changes],
        "mltomoClassWeight": [repr(float(w)) for w in model.weights(particles.n_total)],
    })
    blocks = {"model_general": general, "model_classes": classes}
    if model.shells is not None:
        general["rlnCurrentResolution"] = repr(model.shells.resolution_angstrom(particles.box, voxel))
        general["mltomoResolutionShell"] = int(model.shells.resolution_shell)
        blocks["model_shells"] = _shells_table(model, particles.box, voxel)
    if model.noise is not None:
        blocks["model_groups"], blocks["model_noise"] = _noise_tables(model, particles, voxel)
    write_star(f"{prefix}_model.star", blocks)


def _noise_tables(model: Model, particles, voxel: float):
    """``model_groups`` (each noise group's name and intensity scale, RELION's
    ``rlnGroupScaleCorrection``) and ``model_noise`` (σ²(shell) per group: ``rlnSigma2Noise``,
    per real degree of freedom, with the shape ``c_g`` the E-step divides the weights by)."""
    import pandas as pd

    noise = model.noise
    G, S = noise.shape.shape
    groups = pd.DataFrame({
        "rlnGroupNumber": np.arange(1, G + 1),
        "rlnGroupName": [str(r).replace(" ", "_") for r in noise.labels] if len(noise.labels) == G
        else [f"group{g + 1}" for g in range(G)],
        "rlnGroupScaleCorrection": [repr(float(x)) for x in noise.scale],
    })
    sig = noise.sigma2_shells(model.sigma2)
    s = np.tile(np.arange(S), G)
    n = particles.box
    table = pd.DataFrame({
        "rlnGroupNumber": np.repeat(np.arange(1, G + 1), S),
        "rlnSpectralIndex": s,
        "rlnResolution": [repr(float(x)) for x in s / (n * voxel)],
        "rlnSigma2Noise": [repr(float(x)) for x in sig.ravel()],
        "mltomoNoiseShape": [repr(float(x)) for x in noise.shape.ravel()],
    })
    return groups, table


def _read_noise(blocks):
    from mltomo.noise import NoiseModel

    if "model_groups" not in blocks or "model_noise" not in blocks:
        return None
    g, t = blocks["model_groups"], blocks["model_noise"]
    scale = g["rlnGroupScaleCorrection"].to_numpy(np.float64)
    shape = t["mltomoNoiseShape"].to_numpy(np.float64).reshape(len(scale), -1)
    return NoiseModel(scale=scale, shape=shape)  # run_em names the groups


def data_blocks(particles, table) -> dict:
    """The blocks of a ``_data.star``: the input file's other blocks (``data_general``,
    ``data_optics``, ...) unchanged and in their order, the particle block ``table`` where the
    input's stood (named ``particles``, RELION's name)."""
    blocks = {}
    for name, block in particles.star_blocks:
        if block is None:
            blocks["particles"] = table
        elif name != "particles":
            blocks[name] = block
    blocks.setdefault("particles", table)  # arrays in memory: no input file
    return blocks


def _shells_table(model: Model, n: int, voxel: float):
    """Per-shell statistics of the adaptive scheme (RELION's names where RELION has one):
    the class-averaged half-set FSC, the full-set SSNR, the signal power per component
    ``τ²(s) = SSNR·σ²/W̄`` (W̄ the mean class weight), the Wiener filter applied to every
    reference, and each class's own half-set FSC."""
    import pandas as pd

    sh = model.shells
    s = np.arange(len(sh.fsc))
    w_mean = float(np.mean(model.weights(0))) if model.class_weights is not None else 1.0
    cols = {
        "rlnSpectralIndex": s,
        "rlnResolution": [repr(float(x)) for x in s / (n * voxel)],
        "rlnAngstromResolution": [repr(float(n * voxel / x)) if x else "999.0" for x in s],
        "rlnFourierShellCorrelation": [repr(float(x)) for x in sh.fsc],
        "rlnSsnrMap": [repr(float(x)) for x in sh.ssnr],
        "rlnReferenceTau2": [repr(float(x)) for x in sh.ssnr * model.sigma2 / max(w_mean, 1e-30)],
        "mltomoWienerFilter": [repr(float(x)) for x in sh.filter],
    }
    for k, f in enumerate(sh.fsc_classes):
        cols[f"mltomoFscClass{k + 1:03d}"] = [repr(float(x)) for x in f]
    return pd.DataFrame(cols)


def _read_shells(blocks, general):
    from mltomo.ssnr import ShellStats

    if "model_shells" not in blocks:
        return None
    t = blocks["model_shells"]
    per_class = [c for c in t.columns if c.startswith("mltomoFscClass")]
    return ShellStats(
        fsc_classes=np.stack([t[c].to_numpy(np.float64) for c in sorted(per_class)]),
        fsc=t["rlnFourierShellCorrelation"].to_numpy(np.float64),
        filter=t["mltomoWienerFilter"].to_numpy(np.float64),
        resolution_shell=int(general["mltomoResolutionShell"]),
    )


def last_complete_iteration(out_dir) -> int:
    its = []
    for p in Path(out_dir).glob("run_it*_model.star"):
        m = re.fullmatch(r"run_it(\d+)_model\.star", p.name)
        if m:
            its.append(int(m.group(1)))
    return max(its) if its else 0


def read_iteration(out_dir, it: int, particle_indices=None) -> tuple[Model, ParticleResults]:
    """The model and per-particle results written for iteration ``it``."""
    from mltomo.io.mrc import read_volume
    from mltomo.io.star import read_star

    prefix = iteration_prefix(out_dir, it)
    blocks = read_star(f"{prefix}_model.star")
    gen = blocks["model_general"]
    if hasattr(gen, "iloc"):
        gen = {c: gen[c].iloc[0] for c in gen.columns}
    cls = blocks["model_classes"]
    refs = np.stack([read_volume(Path(out_dir) / name)[0] for name in cls["rlnReferenceImage"]])
    model = Model(
        refs=refs.astype(np.float32),
        alpha=np.array([float(a) for a in cls["rlnClassDistribution"]]),
        sigma2=float(gen["mltomoSigma2Noise"]),
        xi2_voxels=float(gen["mltomoXi2Voxels"]),
        iteration=int(gen["rlnCurrentIteration"]),
        log_likelihood=float(gen["rlnLogLikelihood"]),
        changes=np.array([float(c) for c in cls["mltomoRelativeChange"]]),
        class_weights=(np.array([float(w) for w in cls["mltomoClassWeight"]])
                       if "mltomoClassWeight" in cls.columns else None),
        shells=_read_shells(blocks, gen),
        noise=_read_noise(blocks),
        search_local=bool(int(gen.get("mltomoNextSearchLocal", 0))),
        search_noise=float(gen.get("mltomoSearchNoise", 0.0)),
        coarse_window=float(gen.get("mltomoNextCoarseWindow", 0.0)),
        coarse_skip=int(gen.get("mltomoCoarseSkip", 0)),
        best_resolution_shell=int(gen.get("mltomoBestResolutionShell", 0)),
        iterations_without_gain=int(gen.get("mltomoIterationsWithoutGain", 0)),
    )
    df = read_star(f"{prefix}_data.star")["particles"]
    idx = np.arange(len(df)) if particle_indices is None else np.asarray(particle_indices)
    sub = df.iloc[idx]
    res = ParticleResults(
        indices=idx,
        classes=sub["rlnClassNumber"].to_numpy(np.int64),
        angles=sub[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64),
        shifts_angstrom=sub[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(np.float64),
        max_post=sub["rlnMaxValueProbDistribution"].to_numpy(np.float64),
        n_significant=sub["rlnNrOfSignificantSamples"].to_numpy(np.int64),
        log_likelihood=sub["rlnLogLikeliContribution"].to_numpy(np.float64),
        class_posteriors=_read_posteriors(sub, len(refs)),
    )
    return model, res


def _read_posteriors(table, K: int):
    """``(N, K)`` the ``mltomoClassPosterior1..K`` columns, or None where a table lacks them."""
    names = [f"mltomoClassPosterior{k + 1}" for k in range(K)]
    if not all(c in table.columns for c in names):
        return None
    return table[names].to_numpy(np.float64)


def remove_incomplete(out_dir, last_complete: int) -> None:
    """Delete our own files of iterations after ``last_complete`` (a killed run's leftovers)."""
    for p in Path(out_dir).glob("run_it*"):
        m = re.match(r"run_it(\d+)_", p.name)
        if m and int(m.group(1)) > last_complete:
            os.remove(p)
