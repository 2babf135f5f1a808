"""Lookahead Anchoring model and training system (tiny config, CPU, reference backends)."""

from __future__ import annotations

import pytest
import torch

import kernels
from avatar_models.data.speech import energy_features, speech_waveform
from avatar_models.lookahead import (
    LookaheadConfig,
    LookaheadDiT,
    LookaheadFaces,
    LookaheadTrainConfig,
    NoiseSchedule,
    draw_keyframe_offsets,
    lookahead_loss,
    lookahead_system,
    lookahead_time,
)

P = 16  # tiny: 8x8 latents, patch 2


@pytest.fixture
def spy(monkeypatch):
    """Records the positions of every self-attention call (a single tensor, not a q/k tuple)."""
    calls = []
    real = kernels.attention3d

    def recording(q, k, v, **kw):
        if isinstance(kw.get("positions"), torch.Tensor):
            calls.append(kw["positions"].detach().clone())
        return real(q, k, v, **kw)

    monkeypatch.setattr(kernels, "attention3d", recording)
    return calls


def _inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.frames, cfg.in_channels, cfg.input_height, cfg.input_width,
                    generator=g)
    kf = torch.randn(b, cfg.in_channels, cfg.input_height, cfg.input_width, generator=g)
    audio = torch.randn(b, cfg.frames * cfg.vae_temporal_ratio, cfg.audio_dim, generator=g)
    return x, kf, audio


def _randomise(model):
    """Non-zero weights everywhere (adaLN-Zero would otherwise keep the tokens independent)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _grid_yx():
    return torch.stack([torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)], -1)


def test_named_configs():
    wan = LookaheadConfig.from_name("wan-1.3b")
    assert wan.hidden // wan.heads == 128 and wan.heads == 12
    assert wan.tokens_per_frame == 1560 and wan.vae_temporal_ratio == 4
    tiny = LookaheadConfig.from_name("tiny")
    assert tiny.tokens_per_frame == P
    with pytest.raises(ValueError, match="unknown lookahead config 'huge'"):
        LookaheadConfig.from_name("huge")
    with pytest.raises(ValueError, match="objective must be one of"):
        LookaheadConfig.from_name("tiny", objective="x0")
    with pytest.raises(ValueError, match="unknown LookaheadConfig field"):
        LookaheadConfig.from_name("tiny", width=3)


@pytest.mark.parametrize("distance", [1, 5])
def test_keyframe_tokens_move_to_n_minus_1_plus_d(spy, distance):
    cfg = LookaheadConfig.from_name("tiny")
    model = LookaheadDiT(cfg)
    x, kf, audio = _inputs(cfg)
    ell = lookahead_time(cfg.frames, distance, cfg.vae_temporal_ratio)
    model(x, torch.full((2,), 500.0), audio, kf, ell)
    assert len(spy) == cfg.depth
    pos = spy[0]                                                   # [B, N, 3]
    n = cfg.frames
    assert pos.shape == (2, (n + 1) * P, 3)
    keyframe = pos[:, n * P:]
    assert torch.all(keyframe[..., 0] == n - 1 + distance)
    assert torch.equal(keyframe[0, :, 1:], pos[0, :P, 1:])        # the frames' (y, x)
    assert torch.equal(pos[0, :P, 1:], _grid_yx().float())
    # no copy left at index 0: only window frame 0's P tokens sit there
    assert int((pos[0, :, 0] == 0).sum()) == P
    for f in range(n):
        assert torch.all(pos[:, f * P:(f + 1) * P, 0] == f)


def test_reference_conditioning_sits_at_index_zero(spy):
    cfg = LookaheadConfig.from_name("tiny")
    x, kf, audio = _inputs(cfg)
    LookaheadDiT(cfg)(x, torch.full((2,), 10.0), audio, kf, 0)
    assert int((spy[0][0, :, 0] == 0).sum()) == 2 * P


def test_learned_time_ablation_keeps_rope_index_zero_and_uses_the_table(spy):
    cfg = LookaheadConfig.from_name("tiny", time_embedding="learned")
    model = _randomise(LookaheadDiT(cfg))
    x, kf, audio = _inputs(cfg)
    out_a = model(x, torch.full((2,), 10.0), audio, kf, 3)
    out_b = model(x, torch.full((2,), 10.0), audio, kf, 9)
    assert torch.all(spy[0][:, cfg.frames * P:, 0] == 0)
    assert torch.all(spy[-1][:, cfg.frames * P:, 0] == 0)
    assert out_a.shape == out_b.shape == x.shape
    assert not torch.equal(out_a, out_b)        # only the learned table tells 3 from 9
    with pytest.raises(ValueError, match="keyframe_time must lie in"):
        model(x, torch.full((2,), 10.0), audio, kf, 999)


def test_concat_starting_frames_precede_the_window(spy):
    cfg = LookaheadConfig.from_name("tiny", start_mode="concat")
    model = LookaheadDiT(cfg)
    x, kf, audio = _inputs(cfg)
    start = torch.randn(2, 2, *x.shape[2:])
    out = model(x, torch.full((2,), 10.0), audio, kf, 7, start=start)
    assert out.shape == x.shape
    times = spy[0][0, :, 0].view(-1, P)[:, 0]
    assert times.tolist() == [-2, -1, 0, 1, 2, 3, 7]


def test_replace_mode_uses_start_not_the_noisy_slots():
    cfg = LookaheadConfig.from_name("tiny")
    model = _randomise(LookaheadDiT(cfg))
    x, kf, audio = _inputs(cfg)
    start = torch.randn(2, 1, *x.shape[2:])
    t = torch.full((2,), 300.0)
    a = model(x, t, audio, kf, 5, start=start)
    x2 = x.clone()
    x2[:, :1] = 7.0                         # the replaced slot's noisy content is ignored
    assert torch.equal(a, model(x2, t, audio, kf, 5, start=start))
    assert not torch.equal(a, model(x, t, audio, kf, 5, start=start + 1))


def test_bad_inputs_name_the_argument():
    cfg = LookaheadConfig.from_name("tiny")
    model = LookaheadDiT(cfg)
    x, kf, audio = _inputs(cfg)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :, :2], torch.zeros(2), audio, kf, 0)
    with pytest.raises(ValueError, match="audio must be"):
        model(x, torch.zeros(2), audio[..., :2], kf, 0)
    with pytest.raises(ValueError, match="start must be"):
        model(x, torch.zeros(2), audio, kf, 0, start=torch.zeros(2, 1, 3, 4, 4))


@pytest.mark.parametrize("objective", ["flow", "v", "eps"])
def test_objective_round_trip(objective):
    sched = NoiseSchedule(objective)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 3, 4, 4, generator=g), torch.randn(3, 2, 3, 4, 4, generator=g)
    u = torch.tensor([0.1, 0.5, 0.9])
    xt = sched.noisy(x0, noise, u)
    x0_hat, eps_hat = sched.x0_eps(xt, sched.target(x0, noise, u), u)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=1e-4, rtol=1e-4)


def test_training_draws_ell_over_the_whole_range():
    cfg = LookaheadConfig.from_name("tiny")
    g = torch.Generator().manual_seed(0)
    ell, time = draw_keyframe_offsets(LookaheadTrainConfig(d_max=5), cfg, 4000, g)
    assert set(ell.tolist()) == set(range(cfg.frames + 5)) and torch.equal(ell, time)
    ell, time = draw_keyframe_offsets(LookaheadTrainConfig(stage="base", d_max=5), cfg, 500, g)
    assert set(ell.tolist()) == set(range(cfg.frames + 5)) and not time.any()
    ell, time = draw_keyframe_offsets(LookaheadTrainConfig(anchor="fixed", distance=6), cfg, 9, g)
    assert set(time.tolist()) == {cfg.frames - 1 + 6}
    ell, _ = draw_keyframe_offsets(LookaheadTrainConfig(anchor="past", past_max=3), cfg, 500, g)
    assert set(ell.tolist()) == {-3, -2, -1}


def _batch(cfg, train, b=2, seed=0):
    ds = LookaheadFaces(frames=cfg.frames, d_max=train.ahead_frames(cfg),
                        past=train.past_frames(cfg), size=cfg.input_height, seed=seed)
    items = [ds.sample(torch.Generator().manual_seed(seed + i)) for i in range(b)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_in_window_keyframe_is_reconstructed_in_place():
    """l < n: the keyframe is the window's own clean frame l, and slot l is a loss target."""
    cfg = LookaheadConfig.from_name("tiny")
    train = LookaheadTrainConfig(d_max=3, starting_frames=1, no_start_prob=0.0)
    batch = _batch(cfg, train, b=8)
    seen = []

    class Spy(LookaheadDiT):
        def forward(self, x, t, audio, keyframe, keyframe_time, **kw):
            seen.append((keyframe.clone(), keyframe_time.clone(), kw["start"]))
            return super().forward(x, t, audio, keyframe, keyframe_time, **kw)

    model = Spy(cfg)
    in_window = 0
    for seed in range(6):
        lookahead_loss(model, cfg, train, batch, torch.Generator().manual_seed(seed))
        keyframe, ell, start = seen[-1]
        for b in range(8):               # the window starts at clip frame 0 here
            assert torch.equal(keyframe[b], batch["frames"][b, int(ell[b])])
            in_window += int(ell[b]) < cfg.frames
        assert torch.equal(start, batch["frames"][:, :1])
    assert in_window > 0
    # the loss covers window slots s..n-1, so an in-window keyframe at l >= s is reconstructed
    model = _randomise(LookaheadDiT(cfg))
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["out"] = out

    model.final.register_forward_hook(keep)
    loss = lookahead_loss(model, cfg, train, batch, torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    grad = captured["out"].grad.view(8, cfg.frames + 1, P, -1).abs().sum((0, 2, 3))
    assert grad[0] == 0                     # starting slot: no loss
    assert torch.all(grad[1:cfg.frames] > 0)
    assert grad[cfg.frames] == 0            # keyframe tokens: no loss


def test_toy_audio_follows_the_mouth():
    mouth = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    wave = speech_waveform(mouth, fps=25.0, sample_rate=16000)
    assert wave.shape == (16000 * 6 // 25,)
    feats = energy_features(wave, 16000, 25.0, 6)
    assert feats.shape == (6, 4)
    energy = feats.mean(1)
    assert energy[2] > 5 * energy[0] and energy[3] > energy[5] > energy[4]


def test_engine_steps_lower_the_loss_on_a_fixed_batch():
    from avatar_models.training.engine import EngineConfig, train

    cfg = LookaheadConfig.from_name("tiny")
    tcfg = LookaheadTrainConfig(d_max=2, audio_drop=0.0, no_start_prob=0.0)
    batch = _batch(cfg, tcfg, b=4)
    items = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    torch.manual_seed(0)
    model = LookaheadDiT(cfg)

    def fixed_loss():
        with torch.no_grad():
            return float(lookahead_loss(model, cfg, tcfg, batch,
                                        torch.Generator().manual_seed(123))["loss"])

    before = fixed_loss()
    outcome = train(lookahead_system(model, items, tcfg),
                    EngineConfig(steps=12, batch_size=4, lr=3e-3, ema_decay=0.0, progress=False,
                                 device="cpu"))
    after = fixed_loss()
    assert len(outcome.losses) == 12
    assert after < 0.9 * before, (before, after)
