"""When a single-class refinement stops: at convergence, as RELION's auto-refine does
(``--auto-stop``, by default on for one class refined from a given reference; README, "Refine").

A refinement of one class against a reference is not a fixed number of iterations in the
field: RELION's 3D auto-refine iterates until the half-set resolution has stopped improving and
the poses have stopped changing, and a user expects ``--iter`` to be a ceiling, not a schedule.
Iterating on past that point does not help and can hurt: the references are rebuilt every
iteration from the particles at their current poses, each particle's noise is part of the map it
is aligned to next, and on few, noisy particles the poses then walk away from the best ones while
the log-likelihood stays flat (the 40 real ribosomes of ``shared/data/relion5_stacks``: median
error 10.7° at iteration 3, 16.3° at 5, 19.7° at 25; README, "From RELION 5").

After iteration ``j`` of the adaptive scheme (the only one with a resolution measure: the
half-set FSC, :mod:`mltomo.ssnr`) the run counts the iterations since the resolution shell last
rose above the best one reached, ``g_j``, and stops when

    g_j ≥ NO_GAIN_ITERATIONS   and   moved_j ≤ MOVED_FRACTION

where ``moved_j`` is the share of the particles whose best rotation moved by more than
``MOVED_STEPS`` angular steps since iteration ``j − 1`` (after taking out the map's common change
of frame, :func:`mltomo.narrowing.moved_fraction`; the same measure ``--search auto`` narrows on). The
first iteration is never a stop (no earlier poses), nor an iteration whose poses were not free
(the tied and seeded iterations of a reference-free start). The count and the best shell are
kept in the model (``mltomoBestResolutionShell``, ``mltomoIterationsWithoutGain``), so a run
continued after a kill stops where the uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import replace

NO_GAIN_ITERATIONS = 2  # stop once the resolution has not improved for this many iterations ...
MOVED_FRACTION = 0.05  # ... and at most this share of the particles moved their best rotation
MOVED_STEPS = 1.5  # ... by more than this many angular steps


def tracked(config) -> bool:
    """Whether the run has what the rule needs: the adaptive scheme's resolution, searched poses.
    Every such run keeps the count and records when the rule holds (``IterationStats.converged``),
    whether or not it stops there."""
    return config.scheme == "adaptive" and not (config.no_align or config.no_rotate)


def resolve(config, given_refs: bool):
    """``config`` with ``--auto-stop auto`` made ``on`` or ``off``: on for a single-class
    refinement from given references (RELION's auto-refine needs one too), off otherwise. A
    reference-free run keeps its ``--iter``: its poses organise slowly from a featureless start
    and keep improving after the rule first holds (``bench/bench_autostop.py``: GroEL14 at SNR
    0.02, 8.0° when it first held at iteration 7 against 5.5° at 25)."""
    if config.auto_stop != "auto":
        return config
    return replace(config, auto_stop="on" if config.n_classes == 1 and given_refs else "off")


def applies(config) -> bool:
    """Whether the run stops at convergence (``config`` from :func:`resolve`; ``auto`` left
    unresolved counts as off). Raises for an unknown value."""
    if config.auto_stop not in ("auto", "on", "off"):
        raise ValueError(f"unknown --auto-stop {config.auto_stop!r}: use auto, on or off")
    return config.auto_stop == "on" and tracked(config)


def step(model, counts, prev, results, config, group, n_total: int, comm, eligible: bool):
    """``(model, message)``: the model with the resolution count brought up to this iteration,
    and why the run stops now (None: it goes on). ``counts``: the last model's ``(best shell,
    iterations without gain)`` (the M-step makes a new model); ``prev``, ``results``: this process's
    particles' poses in the previous and this iteration; ``eligible``: this iteration's poses
    were free (collective: every rank calls it)."""
    from mltomo.narrowing import moved_fraction

    shell = int(model.shells.resolution_shell) if model.shells is not None else 0
    best, without = counts
    gained = shell > best
    model = replace(model, best_resolution_shell=max(shell, best), iterations_without_gain=0 if gained else without + 1)
    if prev is None or not eligible or model.iterations_without_gain < NO_GAIN_ITERATIONS:
        return model, None
    moved = moved_fraction(prev, results, group, config, n_total, comm, MOVED_STEPS)
    if moved > MOVED_FRACTION:
        return model, None
    return model, (f"converged: the resolution has not improved for {model.iterations_without_gain} iterations and "
                   f"{100 * moved:.1f}% of the particles moved more than {MOVED_STEPS:g} angular steps "
                   "(--auto-stop off runs every --iter)")
