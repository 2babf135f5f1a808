"""Loss math, checkpoints, and a short training run that must lower the loss."""

from __future__ import annotations

import pytest
import torch

from avatar_models.anchored_diffusion import SDiT, SDiTConfig, landmark_control
from avatar_models.checkpoint import load_checkpoint, save_checkpoint
from avatar_models.training.anchored import (
    TrainConfig,
    batches,
    lr_lambda,
    param_groups,
    train_anchored,
    train_step_loss,
)
from avatar_models.training.diffusion import DiffusionSchedule, GaussianDiffusion, normal_kl
from avatar_models.training.losses import dit_loss, expressive_weights
from avatar_models.training.synthetic import BlobSequences


def test_expressive_weights_area_resized():
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4, :4] = 1.0                                          # top-left quarter
    w = expressive_weights(mask, (4, 4), lambda_ex=1.0)
    assert w.shape == (2, 1, 4, 4)
    assert w[0, 0, :2, :2].eq(2.0).all() and w[0, 0, 2:, :].eq(1.0).all()
    w = expressive_weights(mask, (1, 1), lambda_ex=3.0)               # averages to 1/4
    assert torch.allclose(w, torch.full_like(w, 1.75))


def test_dit_loss_terms():
    diff = GaussianDiffusion()
    x0 = torch.rand(3, 2, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 999])
    xt = diff.q_sample(x0, t, noise)
    perfect = torch.cat([noise, torch.zeros_like(noise)], dim=2)      # exact eps, mid variance
    terms = dit_loss(diff, perfect, x0, xt, t, noise)
    assert torch.allclose(terms["mse"], torch.zeros(3))
    weight = torch.ones(3, 2, 1, 4, 4)
    weight[..., :2, :] = 2.0                                          # half the pixels weight 2
    off = torch.cat([noise + 1.0, torch.zeros_like(noise)], dim=2)
    assert torch.allclose(dit_loss(diff, off, x0, xt, t, noise, weight)["mse"],
                          torch.full((3,), 1.5))
    # vb at t > 0 is the KL between the true posterior and the learned-range p; at v = -1 the
    # variance equals the posterior's, so with the exact eps the KL is 0
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=2)
    assert dit_loss(diff, exact, x0, xt, t, noise)["vb"][1:].abs().max() < 1e-5
    assert torch.allclose(normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1),
                                    torch.zeros(1)), torch.tensor([0.5]))


def test_v_prediction_target_and_conversions():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0: the exact v gives zero MSE and a zero KL at the
    posterior variance, and converts back to the exact eps and x0 at every t."""
    diff = GaussianDiffusion(DiffusionSchedule(prediction_type="v_prediction"))
    x0 = torch.rand(4, 2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    xt = diff.q_sample(x0, t, noise)
    v = diff.training_target(x0, t, noise)
    abar = diff.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    assert torch.allclose(diff.epsilon(v, xt, t), noise, atol=1e-5)
    assert torch.allclose(diff.predict_x0(v, xt, t), x0, atol=1e-5)
    terms = dit_loss(diff, torch.cat([v, -torch.ones_like(v)], dim=2), x0, xt, t, noise)
    assert torch.allclose(terms["mse"], torch.zeros(4))
    assert terms["vb"][1:].abs().max() < 1e-4
    # the epsilon target is not the v target (they meet only as t -> 0): at mid and high
    # noise an epsilon answer is penalised under v
    assert (dit_loss(diff, torch.cat([noise, -torch.ones_like(v)], dim=2), x0, xt, t,
                     noise)["mse"][2:] > 0.1).all()
    eps_diff = GaussianDiffusion()
    assert eps_diff.training_target(x0, t, noise) is noise
    assert torch.allclose(eps_diff.predict_x0(noise, xt, t), x0, atol=1e-3)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionSchedule(prediction_type="sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_follow_the_schedules_prediction_type(prediction_type):
    """An oracle that knows x0 and answers in the schedule's parameterisation is denoised to
    x0 by the project's DDIM loop: the scheduler reads ``prediction_type`` from the schedule."""
    from samplers.schedules import make_scheduler, plain_sample

    schedule = DiffusionSchedule(prediction_type=prediction_type)
    diff = GaussianDiffusion(schedule)
    x0 = torch.rand(1, 2, 3, 4, 4) * 2 - 1

    def oracle(x, t, anchor):
        abar = diff.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return diff.training_target(x0, t, eps)

    def run(schedule_dict):
        return plain_sample(oracle, make_scheduler("ddim", schedule_dict, 10), tuple(x0.shape),
                            generator=torch.Generator().manual_seed(0))

    # DDIM stops at abar[0] = 0.9999 (set_alpha_to_one=False): ~0.01 of noise is left
    assert (run(schedule.to_dict()) - x0).abs().max() < 0.05
    # the first step's x0 estimate is exact under the schedule's type, wrong under the other
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for kind, close in ((prediction_type, True), (other, False)):
        scheduler = make_scheduler("ddim", {**schedule.to_dict(), "prediction_type": kind}, 10)
        t = scheduler.timesteps[0]
        answer = oracle(x, torch.tensor([int(t)]), None)
        first = scheduler.step(answer[0], t, x[0]).pred_original_sample
        assert torch.allclose(first, x0[0], atol=1e-3) == close


def test_lr_schedule_and_groups():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1)
    model = SDiT(SDiTConfig.from_name("tiny"))
    groups = param_groups(model, TrainConfig())
    assert groups[1]["lr"] == pytest.approx(6.4e-6) and groups[0]["lr"] == pytest.approx(6.4e-5)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_landmark_control():
    lm = torch.full((2, 478, 3), 0.5)
    lm[1] = float("nan")
    c = landmark_control(lm)
    assert c.shape == (2, 1434) and c[0, :2].eq(0).all() and c[0, 2] == 1.0 and c[1].eq(0).all()


def test_checkpoint_roundtrip(tmp_path):
    cfg = SDiTConfig.from_name("tiny")
    model = SDiT(cfg)
    ema = SDiT(cfg)
    with torch.no_grad():
        next(ema.parameters()).add_(1.0)
    path = save_checkpoint(tmp_path / "c.safetensors", model, system="anchored",
                           config=cfg.to_dict(), ema=ema, extra={"diffusion": {"a": 1}})
    ck = load_checkpoint(path, system="anchored")
    assert SDiTConfig.from_dict(ck.config) == cfg and ck.extra == {"diffusion": {"a": 1}}
    name = next(iter(model.state_dict()))
    assert torch.equal(ck.weights("ema")[name], ema.state_dict()[name])
    assert torch.equal(ck.weights("model")[name], model.state_dict()[name])
    with pytest.raises(ValueError, match="holds a 'anchored' model, expected 'mcdm'"):
        load_checkpoint(path, system="mcdm")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_batches_from_plain_iterable_and_errors():
    data = [{"a": torch.tensor([i])} for i in range(5)]
    it = batches(data, 2)
    assert next(it)["a"].tolist() == [[0], [1]]
    next(it)
    assert next(it)["a"].tolist() == [[0], [1]]                       # drop_last, restart
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        next(batches(data, 8))


def test_fifty_steps_lower_the_loss(tmp_path):
    data = BlobSequences(8, frames=3, channels=4, size=8)
    train = TrainConfig(steps=50, batch_size=8, lr=2e-3, warmup_steps=5, cond_drop=0.0,
                        ema_decay=0.9)
    fixed = next(batches(data, 8))
    diff = GaussianDiffusion(train.schedule)

    def eval_loss(model):
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return float(train_step_loss(model, diff, fixed, train, torch.device("cpu"),
                                         g)["loss"])

    torch.manual_seed(0)
    before = eval_loss(SDiT(SDiTConfig.from_name("tiny")))
    res = train_anchored("tiny", data, train, device="cpu", out=tmp_path / "t.safetensors",
                         progress=False)
    assert len(res.losses) == 50
    after = eval_loss(res.model)
    assert after < 0.7 * before, (before, after)
    ck = load_checkpoint(res.checkpoint)
    assert ck.extra["step"] == 50 and ck.extra["diffusion"]["num_train_timesteps"] == 1000
    assert ck.ema and ck.model
