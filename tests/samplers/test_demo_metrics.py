"""The demo's metrics: embedding, consistency, control estimator, landmark error."""

from __future__ import annotations

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
