"""Non-uniform plans, reorder, the anchored loop and the MultiDiffusion baseline."""

from __future__ import annotations

import pytest
import torch

from avatar_models.anchored_diffusion import Conditions, SDiT, SDiTConfig
from samplers.anchored import anchored_sample, decode_video, sdit_denoiser
from samplers.multidiffusion import multidiffusion_sample, uniform_windows
from samplers.nonuniform import gather_frames, nonuniform_plan, override_anchor, reorder
from samplers.schedules import guided, make_scheduler, plain_sample, scheduler_step


@pytest.mark.parametrize("n,t", [(13, 4), (9, 3), (10, 4), (2, 3), (3, 5), (25, 8), (1, 2)])
@pytest.mark.parametrize("mode", ["random", "strided"])
def test_plan_covers_every_frame_once(n, t, mode):
    plan = nonuniform_plan(n, t, mode=mode, generator=torch.Generator().manual_seed(n))
    b = plan.batch
    assert plan.indices.shape == (b, t) and b == max(1, -(-(n - 1) // (t - 1)))
    others = torch.cat([plan.indices[:, :t // 2], plan.indices[:, t // 2 + 1:]], 1)
    assert (others.diff(dim=1) >= 0).all()                            # sorted in time
    assert (plan.anchor_pos == t // 2).all()                          # one column (Eq. 1)
    assert (plan.indices[:, t // 2] == n // 2).all()
    assert ((plan.indices == n // 2) & plan.owner).sum() == 1         # anchor kept once
    assert plan.owner[0, plan.anchor_pos[0]]                          # ... from sequence 0
    kept = plan.indices[plan.owner]
    assert sorted(kept.tolist()) == list(range(n))                    # every frame exactly once
    if (n - 1) % (t - 1) == 0:                                        # exact partition: no padding
        assert plan.owner.sum() == n and plan.owner.sum(1).tolist()[1:] == [t - 1] * (b - 1)
    video = reorder(plan.indices.float()[..., None] * 10, plan)       # tag slots by frame index
    assert video[:, 0].tolist() == [10.0 * i for i in range(n)]


@pytest.mark.parametrize("mode", ["random", "strided"])
def test_anchor_slot_is_the_same_column_in_every_sequence(mode):
    """Eq. 1 and 3: the anchor sits in one common column, so the anchor tokens that the override
    copies from sequence 0 carry the temporal encoding of the slot they land in; the other
    frames of each sequence stay sorted around it."""
    for slot in (0, 2, 4):
        plan = nonuniform_plan(23, 5, mode=mode, anchor_slot=slot,
                               generator=torch.Generator().manual_seed(slot))
        assert plan.anchor_pos.tolist() == [slot] * plan.batch
        assert plan.indices[:, slot].tolist() == [11] * plan.batch
        rest = torch.cat([plan.indices[:, :slot], plan.indices[:, slot + 1:]], 1)
        assert (rest.diff(dim=1) >= 0).all() and not (rest == 11).any()
        x = torch.randn(plan.batch, 5, 2)
        y = override_anchor(x, plan.anchor_pos)
        assert torch.equal(y[:, slot], x[:1, slot].expand(plan.batch, 2))
    with pytest.raises(ValueError, match=r"anchor_slot must be in \[0, 5\), got 5"):
        nonuniform_plan(23, 5, anchor_slot=5)


def test_strided_sequences_span_the_video():
    plan = nonuniform_plan(25, 4, mode="strided")
    assert plan.indices[:, 0].tolist() == list(range(8))
    assert plan.indices.tolist()[0] == [0, 8, 12, 17]


def test_plan_and_reorder_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        nonuniform_plan(9, 3, mode="uniform")
    with pytest.raises(ValueError, match=r"anchor must be in \[0, 9\), got 9"):
        nonuniform_plan(9, 3, anchor=9)
    with pytest.raises(ValueError, match="frames_per_sequence >= 2"):
        nonuniform_plan(9, 1)
    plan = nonuniform_plan(9, 3)
    with pytest.raises(ValueError, match=r"frames must be \[B, T, ...\]"):
        reorder(torch.zeros(2, 3), plan)
    x = torch.randn(4, 3, 2)
    assert gather_frames(torch.arange(9), plan).tolist() == plan.indices.tolist()
    y = override_anchor(x, plan.anchor_pos)
    assert torch.equal(y[3, plan.anchor_pos[3]], x[0, plan.anchor_pos[0]])


def test_uniform_windows():
    assert uniform_windows(10, 4).tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7],
                                               [6, 7, 8, 9]]
    assert uniform_windows(9, 4, stride=3).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [5, 6, 7, 8]]
    assert uniform_windows(3, 4).tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="stride must be in"):
        uniform_windows(9, 4, stride=5)


def _tiny_model() -> SDiT:
    model = SDiT(SDiTConfig.from_name("tiny", frames=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("kind,guidance", [("ddpm", 1.0), ("ddim", 2.0)])
def test_anchor_latents_identical_after_every_step(kind, guidance):
    model = _tiny_model()
    cfg = model.config
    n = 10
    plan = nonuniform_plan(n, 4, mode="random")
    lm = torch.randn(n, cfg.control_dim)                                # driving "landmarks"
    cond = Conditions(torch.randn(1, cfg.global_dim).expand(plan.batch, -1),
                      gather_frames(lm, plan))
    scheduler = make_scheduler(kind, num_inference_steps=6)
    steps = []

    def check(i, t, x):
        a = x[torch.arange(plan.batch), plan.anchor_pos]
        assert (a == a[0]).all(), f"anchor latents differ after step {i}"
        steps.append(t)

    den = sdit_denoiser(model, cond, guidance=guidance)
    calls = []

    def spy(x, t, pos):  # the model output itself is already anchored (override in every layer)
        out = den(x, t, pos)
        a = out[torch.arange(plan.batch), pos]
        calls.append(bool((a == a[0]).all()))
        return out

    lat = anchored_sample(spy, scheduler, plan, (cfg.in_channels, 8, 8),
                          generator=torch.Generator().manual_seed(0), progress=False,
                          callback=check)
    assert len(steps) == 6 and all(calls)
    assert torch.isfinite(lat).all()
    video = decode_video(lat, plan, decode=lambda z: z[:, :3] * 2, chunk=3)
    assert video.shape == (n, 3, 8, 8)
    slot = plan.owner.nonzero()[plan.indices[plan.owner].argsort()]     # chronological owners
    assert torch.equal(video[4], lat[slot[4, 0], slot[4, 1], :3] * 2)


def test_multidiffusion_one_window_equals_plain_sampling():
    model = _tiny_model()
    cfg = model.config
    cond = Conditions(torch.randn(1, cfg.global_dim), torch.randn(1, 4, cfg.control_dim))
    den = sdit_denoiser(model, cond)
    noise = torch.randn(1, 4, cfg.in_channels, 8, 8)
    for kind in ("ddim", "ddpm"):
        a = plain_sample(den, make_scheduler(kind, num_inference_steps=5), noise.shape,
                         noise=noise.clone(), generator=torch.Generator().manual_seed(1))
        b = multidiffusion_sample(den, make_scheduler(kind, num_inference_steps=5),
                                  uniform_windows(4, 4), 4, (cfg.in_channels, 8, 8),
                                  noise=noise[0].clone(), progress=False,
                                  generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(b, a[0], rtol=0, atol=0)


def test_multidiffusion_averages_overlaps():
    """Denoiser that predicts eps = window id: shared frames get the mean of their windows."""
    windows = uniform_windows(6, 4)                                     # [[0..3], [2..5]]

    def den(x, t, pos):
        return torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1, 1, 1).expand_as(x)

    sched = make_scheduler("ddim", num_inference_steps=1)
    x0 = torch.zeros(6, 1, 1, 1)
    got = multidiffusion_sample(den, sched, windows, 6, (1, 1, 1), noise=x0.clone(),
                                progress=False)
    eps = torch.tensor([0, 0, 0.5, 0.5, 1, 1]).view(6, 1, 1, 1)
    ref = scheduler_step(make_scheduler("ddim", num_inference_steps=1), eps,
                         sched.timesteps[0], x0)
    torch.testing.assert_close(got, ref)


def test_guidance_and_step_channel_handling():
    c, u = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    c[:, 2:] = 7.0
    g = guided(c, u, 3.0, channels=2)
    assert g[:, :2].eq(3.0).all() and g[:, 2:].eq(7.0).all()
    sched = make_scheduler("ddim", num_inference_steps=2)
    x = torch.randn(3, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="must have C=2 or 2C=4 channels"):
        scheduler_step(sched, torch.zeros(3, 2, 3, 4, 4), sched.timesteps[0], x)
    with pytest.raises(ValueError, match="scheduler kind must be one of"):
        make_scheduler("euler")
