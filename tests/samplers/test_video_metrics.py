"""The shared video metrics: lip sync, dynamic degree, smoothness, seam jump, consistency."""

from __future__ import annotations

import pytest
import torch

from samplers.demo import video_metrics as V


def _speech(n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # bursts of mouth opening, smoothed noise clipped at 0 (like speech with pauses)
    x = torch.randn(n + 4, generator=g, dtype=torch.float64)
    return torch.nn.functional.avg_pool1d(x[None, None], 5, 1)[0, 0].clamp_min(0)


def test_lip_sync_high_for_synced_zero_for_shuffled():
    mouth = _speech()
    synced = V.lip_sync_score(2 * mouth + 0.1, mouth)
    assert synced["lag"] == 0 and synced["peak"] == pytest.approx(1.0)
    assert synced["peak_minus_median"] > 0.8
    assert len(synced["correlation"]) == 31
    shuffled = []
    for seed in range(8):
        perm = torch.randperm(mouth.numel(), generator=torch.Generator().manual_seed(seed))
        shuffled.append(V.lip_sync_score(mouth[perm], mouth)["peak_minus_median"])
    assert max(shuffled) < 0.35 and sum(shuffled) / 8 < synced["peak_minus_median"] / 3


def test_lip_sync_finds_the_lag_and_its_sign():
    mouth = _speech(seed=1)
    late = torch.cat([torch.zeros(4, dtype=torch.float64), mouth[:-4]])  # mouth 4 frames late
    out = V.lip_sync_score(mouth, late)
    assert out["lag"] == 4 and out["peak_minus_median"] > 0.8
    assert V.lip_sync_score(late, mouth)["lag"] == -4
    assert V.lip_sync_score(mouth, late, max_lag=2)["lag"] == 2  # peak outside the range


def test_lip_sync_bad_input():
    with pytest.raises(ValueError, match="equal lengths, got 20 and 19"):
        V.lip_sync_score(torch.ones(20), torch.ones(19))
    with pytest.raises(ValueError, match="at least max_lag \\+ 3 = 18 frames, got 10"):
        V.lip_sync_score(torch.ones(10), torch.ones(10))
    with pytest.raises(ValueError, match="max_lag: expected an int >= 0, got -1"):
        V.lip_sync_score(torch.ones(20), torch.ones(20), max_lag=-1)
    with pytest.raises(ValueError, match="mouth_open: expected a 1-D sequence"):
        V.lip_sync_score(torch.ones(20), torch.ones(20, 1))
    # constant sequences carry no sync (correlation defined as 0), not NaN
    assert V.lip_sync_score([1.0] * 20, list(range(20)), 3)["peak_minus_median"] == 0.0


def test_dynamic_degree():
    still = torch.ones(10, 5, 2)
    assert V.dynamic_degree(still) == 0.0
    t = torch.linspace(-1, 1, 50, dtype=torch.float64)
    moving = t[:, None, None].expand(50, 5, 2)
    d = V.dynamic_degree(moving)
    assert d == pytest.approx(t.var(unbiased=False).item())
    assert V.dynamic_degree(3 * moving) == pytest.approx(9 * d)
    with pytest.raises(ValueError, match=r"landmarks: expected shape \[N >= 2, K, 2\|3\]"):
        V.dynamic_degree(torch.ones(1, 5, 2))


def test_smoothness_error():
    t = torch.arange(6, dtype=torch.float64)
    linear = t[:, None, None] * torch.ones(6, 2, 2)
    assert V.smoothness_error(linear) == pytest.approx(0.0)
    jitter = linear.clone()
    jitter[2] += 1.0
    # frame 2 is off by 1 from its neighbours' mean; frames 1 and 3 by 0.5
    assert V.smoothness_error(jitter) == pytest.approx((0.5 + 1 + 0.5) / 4)
    with pytest.raises(ValueError, match=r"frames: expected \[N >= 3"):
        V.smoothness_error(torch.ones(2, 3))


def test_seam_jump():
    x = torch.zeros(9, 2)
    x[:, 0] = torch.arange(9.0) * 0.1
    x[6:] += 1.0                       # a jump at the start of the segment at frame 6
    out = V.seam_jump(x, [3, 6])
    assert out["interior"] == pytest.approx(0.05)
    # both columns jump by 1 at frame 6: (0.1 + 1 + 1) / 2 = 1.05 there, 0.05 at frame 3
    assert out["seam"] == pytest.approx((0.05 + 1.05) / 2)
    assert out["ratio"] == pytest.approx(11.0)
    with pytest.raises(ValueError, match=r"segment_starts: expected indices in 1..8"):
        V.seam_jump(x, [0])


def test_windowed_consistency_sees_drift():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=g, dtype=torch.float64)
    drift = base + torch.arange(50, dtype=torch.float64)[:, None] * 0.05 * torch.randn(
        16, generator=g, dtype=torch.float64)
    for kind, sign in (("cosine", -1), ("l2", 1)):
        out = V.windowed_consistency(drift, 10, reference=base, kind=kind)
        assert len(out["to_first"]) == len(out["to_reference"]) == 5
        assert len(out["to_previous"]) == 5
        ref = torch.tensor(out["to_reference"])
        assert bool((sign * ref.diff() > 0).all())       # monotone drift away from the reference
        assert out["reference_normalised"][0] == pytest.approx(1.0)
    still = V.windowed_consistency(base.expand(12, 16), 5, reference=base)
    assert still["to_reference"] == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match="kind: expected 'cosine' or 'l2', got 'dot'"):
        V.windowed_consistency(drift, 10, kind="dot")
    with pytest.raises(ValueError, match=r"reference: expected shape \(16,\), got \(3,\)"):
        V.windowed_consistency(drift, 10, reference=torch.ones(3))
