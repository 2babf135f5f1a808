"""The demo's metrics: embedding, consistency, control estimator, landmark error."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from avatar_models.data import procedural_faces as pf
from samplers.demo import metrics as M


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clip(identity: int, motion: int = 3, n: int = 6) -> torch.Tensor:
    return pf.render(pf.sample_identity(identity), pf.sample_motion(motion, n))[0]


def test_embedding_shape_norm_determinism():
    frames = _clip(1)
    e = M.embed(frames)
    assert e.shape == (6, 640) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.equal(e, M.embed(frames.clone()))
    with pytest.raises(ValueError, match=r"frames: expected shape \[N, 3, H, W\], got \(3, 64"):
        M.embed(frames[0])


def test_embedding_sees_identity_more_than_pose():
    # frames of one identity across a clip are closer than the same pose on another identity
    for a, b in ((0, 1), (2, 3), (4, 5)):
        ea, eb = M.embed(_clip(a)).double(), M.embed(_clip(b)).double()
        within = (ea @ ea.T).min()
        across = (ea * eb).sum(1).max()
        assert within > across, (a, b)


def test_consistency_of_the_ideal_video_and_of_a_drifting_one():
    truth = _clip(1, n=8)
    ideal = M.consistency(truth, truth[0], truth)
    assert ideal["self_csim"] == 0.0
    assert ideal["min_pairwise_csim"] == ideal["min_pairwise_csim_ideal"]
    assert 0.5 < ideal["min_pairwise_csim"] <= 1.0
    drift = torch.cat([truth[:4], _clip(2, n=8)[4:]])  # identity changes half-way
    bad = M.consistency(drift, truth[0], truth)
    assert bad["self_csim"] > 0.05 and bad["csim"] < ideal["csim"] - 0.05


def test_landmark_error_in_pixels():
    p = pf.sample_motion(5, 4)
    assert M.landmark_error(p, p) == {"lmse_px": 0.0, "expressive_lmse_px": 0.0}
    q = p.clone()
    q[:, 0] = (q[:, 0] + 0.5).clamp(max=1)  # head_x: 6 px per unit, every landmark moves
    shift = (q[:, 0] - p[:, 0]) * 6
    err = M.landmark_error(q, p)
    assert err["lmse_px"] == pytest.approx(float(shift.mean()), abs=1e-4)
    q = p.clone()
    q[:, 5] = 1 - q[:, 5]  # mouth only: expressive points carry all of the error
    err = M.landmark_error(q, p)
    assert err["expressive_lmse_px"] > err["lmse_px"] > 0


def test_fit_recovers_pose_and_expression_from_frames():
    ident = pf.sample_identity(8)
    params = pf.sample_motion(9, 4)
    frames, _ = pf.render(ident, params)
    fitted = M.fit_params(ident, frames, steps=100)
    err = M.landmark_error(fitted, params)
    assert err["lmse_px"] < 0.3 and err["expressive_lmse_px"] < 0.3
    neutral = torch.tensor([0, 0, 0, 0.8, 0.8, 0.3, 0, 0.2]).repeat(4, 1)
    assert M.landmark_error(neutral, params)["lmse_px"] > 1.0


def test_fidelity():
    truth = _clip(1, n=2)
    assert M.fidelity(truth, truth)["mse"] == 0.0
    half = M.fidelity((truth + 0.1).clamp(0, 1), truth)
    assert 0 < half["mse"] <= 0.01 + 1e-9 and half["psnr_db"] >= 20 - 1e-6
    assert math.isfinite(M.fidelity(truth, truth)["psnr_db"])


# ---- long-video metrics (fixed before results) ----

def _fine_clip(identity: int = 2, motion: int = 5, n: int = 24, fine=None):
    ident = pf.sample_identity(identity, "fine")
    if fine is not None:
        ident = dataclasses.replace(ident, fine=fine)
    params = pf.sample_motion(motion, n)
    return ident, params, pf.render(ident, params)[0]


def _swapped_background(identity: int = 2, motion: int = 5, n: int = 24):
    """The ideal clip whose background pattern changes (other pattern, phase) half-way."""
    ident, params, ideal = _fine_clip(identity, motion, n)
    other = dataclasses.replace(ident.fine, bg_pattern=(ident.fine.bg_pattern + 1) % 3,
                                bg_phase=(0.5, 0.5), bg_period=ident.fine.bg_period + 2)
    swapped = pf.render(dataclasses.replace(ident, fine=other), params[n // 2:])[0]
    return ident, params, ideal, torch.cat([ideal[: n // 2], swapped])


def test_drift_is_zero_for_the_ideal_video_and_positive_after_a_background_swap():
    _, _, ideal, swapped = _swapped_background()
    assert drift_equal_zero(M.drift_by_distance(ideal, ideal))
    d = M.drift_by_distance(swapped, ideal)
    assert abs(d[0]) < 1e-12
    # pairs across the swap dominate large distances: drift grows with distance
    assert d[20:].mean() > 0.05 and d[20:].mean() > 3 * d[1:4].mean()
    curve = M.drift_curve(swapped, ideal, (1, 4, 16, 23))
    assert curve[-1] > curve[0] and curve[-1] > 0.05
    with pytest.raises(ValueError, match="distances"):
        M.drift_curve(swapped, ideal, (24,))
    with pytest.raises(ValueError, match="generated, ideal"):
        M.drift_by_distance(swapped[:3], ideal)


def drift_equal_zero(d: torch.Tensor) -> bool:
    return bool((d.abs() < 1e-12).all())


def test_appearance_readout_is_pose_invariant_and_sees_the_swap():
    ident, params, ideal, swapped = _swapped_background()
    regions = pf.region_masks(ident, params)
    readout = {k: regions[k] for k in ("background", "shirt")}
    r = M.appearance_readout(ideal, readout)
    assert r.shape == (24, 20)
    # the head moves, the readout regions do not see it: the ideal video barely changes
    # (the shirt moves with the torso by at most 1.8 px)
    ideal_stats = M.appearance_stability(ideal, ideal, readout, anchor=12)
    assert ideal_stats["readout_spread"] < 0.02 and ideal_stats["pixel_spread"] < 0.03
    assert ideal_stats["pixel_spread"] == ideal_stats["pixel_spread_ideal"]
    bad = M.appearance_stability(swapped, ideal, readout, anchor=12)
    assert bad["pixel_spread"] > 3 * ideal_stats["pixel_spread"] + 0.03
    assert bad["pixel_anchor_distance"] > bad["pixel_anchor_distance_ideal"] + 0.05
    assert bad["readout_spread"] > 3 * ideal_stats["readout_spread"]
    with pytest.raises(ValueError, match="regions"):
        M.appearance_readout(ideal, {"empty": torch.zeros(1, 64, 64, dtype=torch.bool)})


def test_flicker_and_masked_psnr():
    ident, params, ideal = _fine_clip(n=8)
    assert M.flicker(ideal, ideal) == 0.0
    noisy = (ideal + 0.1 * torch.randn(ideal.shape, generator=torch.Generator().manual_seed(0)))
    assert M.flicker(noisy.clamp(0, 1), ideal) > 0.03
    mask = pf.region_masks(ident, params)["face_hair"]
    hurt = ideal.clone()
    hurt[mask.expand_as(ideal).logical_not()] = 0.5  # errors only outside the mask
    assert M.masked_psnr(hurt, ideal, mask) > 100
    assert M.masked_psnr(noisy, ideal, mask) == pytest.approx(
        10 * math.log10(1 / (noisy.clamp(0, 1) - ideal)[mask.expand_as(ideal)].pow(2).mean()),
        rel=1e-5)


def test_anchor_transfer_separates_copying_from_not_copying():
    """Hand-built inputs: a 'copying' model invents one background (the anchor's) and every frame
    repeats it; a 'non-copying' model invents a new one per frame. An independent sample of the
    copying model invents another one."""
    n, anchor = 24, 12
    ident, params, ideal = _fine_clip(n=n)

    def with_background(seed):  # the background another identity seed would have
        bg = pf.sample_fine_attributes(seed)
        fine = dataclasses.replace(ident.fine, bg_pattern=bg.bg_pattern, bg_ink=bg.bg_ink,
                                   bg_angle=bg.bg_angle, bg_period=bg.bg_period,
                                   bg_phase=bg.bg_phase)
        return dataclasses.replace(ident, fine=fine)

    copying = pf.render(with_background(500), params)[0]
    other_run = pf.render(with_background(501), params)[0]
    independent = torch.cat([pf.render(with_background(600 + t), params[t:t + 1])[0]
                             for t in range(n)])
    frames = torch.ones(n, dtype=torch.bool)
    frames[anchor] = False
    yes = M.anchor_transfer(copying, ideal, anchor, frames, other_run[anchor])
    no = M.anchor_transfer(independent, ideal, anchor, frames, other_run[anchor])
    assert yes["anchor_transfer"] > 0.3 and yes["cos_to_anchor"] > 0.9
    assert abs(no["anchor_transfer"]) < 0.25 * yes["anchor_transfer"]
    with pytest.raises(ValueError, match="frames"):
        M.anchor_transfer(copying, ideal, anchor, torch.ones(n, dtype=torch.bool),
                          other_run[anchor])


def test_t_interval():
    assert M.t_quantile(0.975, 7) == pytest.approx(2.364624, abs=1e-5)
    assert M.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-4)
    assert M.t_quantile(0.975, 200) == pytest.approx(1.971896, abs=1e-5)
    ci = M.interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert ci["mean"] == 2.5 and ci["n"] == 4
    assert ci["low"] == pytest.approx(2.5 - half, abs=1e-5)
    assert ci["high"] == pytest.approx(2.5 + half, abs=1e-5)
    assert M.interval([3.0]) == {"mean": 3.0, "low": 3.0, "high": 3.0, "n": 1}
