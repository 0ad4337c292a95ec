"""Resolution schedule (mltomo.resolution): the tail power against a brute-force sum, when the
schedule applies, and a refinement that scores fewer shells with the answer of one that scores
them all."""

import dataclasses

import numpy as np
import pytest

from mltomo import geometry, resolution
from mltomo.em import run_em
from mltomo.evaluate import angular_errors, class_purity
from mltomo.fourier import radius_half, rfft_unitary
from mltomo.model import Config
from mltomo.noise import NoiseModel
from mltomo.particles import particles_from_arrays
from mltomo.simulate import simulate
from mltomo.ssnr import ShellStats, apply_filter


def _brute_tail(refs, sigma2, radius, factor):
    """max over refs and groups of Σ_{m < |k| ≤ radius} h |A|² f(round|k|) / 2σ², on the FULL spectrum."""
    n = refs.shape[1]
    f = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    kk = np.sqrt(kx**2 + ky**2 + kz**2)
    shells = np.minimum(np.rint(kk).astype(int), factor.shape[1] - 1)
    out = np.zeros(n // 2 + 1)
    for a in refs:
        p = np.abs(np.fft.fftn(a, norm="ortho")) ** 2
        for fq in factor:
            e = p * fq[shells]
            t = np.array([e[(kk > m + 1e-9) & (kk <= radius + 1e-9)].sum() for m in range(n // 2 + 1)])
            out = np.maximum(out, t / (2 * sigma2))
    return out


@pytest.mark.parametrize("coloured", [False, True])
def test_tail_power_matches_brute_force(coloured):
    rng = np.random.default_rng(3)
    n = 10
    refs = rng.normal(size=(2, n, n, n))
    noise = None
    factor = np.ones((1, n // 2 + 1))
    if coloured:
        noise = NoiseModel(np.array([1.0, 2.0]), rng.uniform(0.5, 2.0, size=(2, n // 2 + 1)), ("a", "b"))
        factor = noise.scale[:, None] ** 2 / noise.shape
    got = resolution.tail_nats(refs, 3.0, 3.7, noise)
    np.testing.assert_allclose(got, _brute_tail(refs, 3.0, 3.7, factor), rtol=1e-9, atol=1e-12)
    assert got[0] > got[3] > 0 and got[4] == 0.0


class _Sampling:
    radius = 11.0


def _model(refs, res_shell, sigma2=1.0):
    from types import SimpleNamespace

    shells = ShellStats(fsc_classes=np.ones((len(refs), 13)), fsc=np.ones(13), filter=np.ones(13),
                        resolution_shell=res_shell)
    return SimpleNamespace(refs=refs, sigma2=sigma2, shells=shells)


def test_score_radius_follows_the_resolution_and_the_reference_tail():
    rng = np.random.default_rng(1)
    n = 24
    raw = rng.normal(size=(2, n, n, n))
    filt = (np.arange(n // 2 + 1) <= 5).astype(float)
    band = apply_filter(raw, filt)  # 0 beyond shell 5
    cfg = Config()
    assert resolution.score_radius(_model(band, 5), _Sampling, cfg) == 5 + resolution.MARGIN
    # power beyond the margin (as a real-space mask would leave) pushes the radius out
    leaky = apply_filter(raw, (np.arange(n // 2 + 1) <= 9).astype(float))
    r = resolution.score_radius(_model(leaky, 5, sigma2=1e-3), _Sampling, cfg)
    assert r is None or r > 9
    tail = resolution.tail_nats(leaky, 1e-3, _Sampling.radius)
    if r is not None:
        assert tail[int(r)] <= resolution.TAIL_NATS
    # a resolution at the working radius, no FSC yet, the paper's scheme, CC or off: every shell
    assert resolution.score_radius(_model(band, 10), _Sampling, cfg) is None
    assert resolution.score_radius(_model(band, 5), _Sampling, dataclasses.replace(cfg, scheme="paper")) is None
    assert resolution.score_radius(_model(band, 5), _Sampling, dataclasses.replace(cfg, mode="cc")) is None
    off = dataclasses.replace(cfg, resolution_schedule=False)
    assert resolution.score_radius(_model(band, 5), _Sampling, off) is None
    m = _model(band, 5)
    m.shells = None
    assert resolution.score_radius(m, _Sampling, cfg) is None


def test_filtered_references_are_zero_beyond_their_shell():
    """What the schedule rests on: the adaptive filter leaves no power beyond the resolution shell."""
    rng = np.random.default_rng(2)
    n = 16
    out = apply_filter(rng.normal(size=(1, n, n, n)), (np.arange(n // 2 + 1) <= 4).astype(float))
    F = rfft_unitary(out[0])
    assert np.abs(F[np.rint(radius_half(n)) > 4]).max() < 1e-10 * np.abs(F).max()


def _two_classes(seed, n_particles, snr):
    from conftest import blob_cloud

    sim = simulate([blob_cloud(7), blob_cloud(8)], n_particles, 24, 10.0, 30.0, snr,
                   missing_region="wedge_y:-60:60", seed=seed, max_shift_voxels=2)
    return sim, particles_from_arrays(sim.volumes, 10.0, missing=sim.missing_region)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scheduled_run_gives_the_answer_of_every_shell(seed, tmp_path):
    """Scoring only to a few shells beyond the classes' resolution classifies and aligns the
    particles as scoring every shell does. The first scheduled iteration's log-likelihood is
    within 0.5 nat per particle of the full one (what is left out is the interpolation ringing
    of the references beyond the scored radius); the model file records the radius scored."""
    sim, parts = _two_classes(seed, 60, 0.5)
    cfg = Config(n_classes=2, iterations=10, angular_sampling_deg=30.0, seed=seed, max_shift_voxels=2, eps=0.0,
                 resolution_schedule=False)
    full = run_em(parts, cfg)
    sched = run_em(parts, dataclasses.replace(cfg, resolution_schedule=True), out_dir=tmp_path)
    radii = [h.score_radius for h in sched.history]
    assert radii[0] == full.history[0].score_radius  # no FSC before the first M-step
    assert max(radii[1:]) < full.history[-1].score_radius  # fewer shells from then on
    N = len(sim.classes)
    assert sched.history[0].log_likelihood == pytest.approx(full.history[0].log_likelihood, abs=1e-6 * N)
    assert abs(sched.history[1].log_likelihood - full.history[1].log_likelihood) <= 0.5 * N
    assert abs(sched.model.log_likelihood - full.model.log_likelihood) <= 3.0 * N
    truth = np.asarray(sim.classes)
    assert class_purity(truth, sched.particles.classes) >= class_purity(truth, full.particles.classes) - 0.02
    err = [np.median(angular_errors(sim.rotations, geometry.euler_to_matrix(*r.particles.angles.T),
                                    r.particles.classes)) for r in (full, sched)]
    assert err[1] <= err[0] + 1.0, err
    from mltomo.io.star import read_star
    from mltomo.outputs import iteration_prefix

    gen = read_star(f"{iteration_prefix(tmp_path, cfg.iterations)}_model.star")["model_general"]
    value = gen["mltomoScoreRadius"].iloc[0] if hasattr(gen, "iloc") else gen["mltomoScoreRadius"]
    assert float(value) == pytest.approx(radii[-1])
    # the default mask is recorded: a soft sphere (box - 2 voxels) across with the adaptive scheme
    diameter = gen["mltomoMaskDiameterAngst"].iloc[0] if hasattr(gen, "iloc") else gen["mltomoMaskDiameterAngst"]
    assert float(diameter) == pytest.approx((parts.box - 2) * parts.voxel_size_angstrom)
