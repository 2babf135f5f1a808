"""WarpFace model, MGME, loss and training system (tiny config, CPU, reference backends)."""

from __future__ import annotations

import pytest
import torch

import kernels
from avatar_models.training.engine import EngineConfig, train
from avatar_models.warpface import (
    MotionEncoder,
    MotionTokens,
    TimeModulation,
    Transformer,
    WarpCA,
    WarpFace,
    WarpFaceConfig,
    WarpFacePairs,
    WarpFaceTrainConfig,
    adaptive_weight,
    appearance_jitter,
    condition_mask,
    modulation_trends,
    symmetry_loss,
    transfer,
    warpface_loss,
    warpface_system,
)
from kernels.flow_warp.ref import warp_occlusion_ref

REF = dict(attention_backend="ref", warp_backend="ref")


def _cfg(**kw) -> WarpFaceConfig:
    return WarpFaceConfig.from_name("tiny", **kw)


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _warpca(cfg=None, dim=32, seed=0):
    layer = WarpCA(cfg or _cfg(), dim, attention_backend="ref", warp_backend="ref")
    layer.reset_parameters()
    _randomise(layer, seed)
    return layer


@pytest.fixture
def warp_spy(monkeypatch):
    calls = []
    real = kernels.warp_occlusion

    def recording(h, flow, occlusion=None, **kw):
        out = real(h, flow, occlusion, **kw)
        calls.append({"h": h.detach().clone(), "flow": flow.detach().clone(),
                      "occlusion": occlusion.detach().clone(), "out": out.detach().clone()})
        return out

    monkeypatch.setattr(kernels, "warp_occlusion", recording)
    return calls


# ---- configs and MGME ----

def test_named_configs():
    paper = WarpFaceConfig.from_name("paper")
    assert (paper.groups, paper.codebook_size, paper.group_dim) == (4, 128, 256)
    assert (paper.vit_depth, paper.vit_width, paper.latent_size) == (6, 256, 32)  # 256 px / 8
    assert paper.channels == (320, 640, 1280, 1280) and paper.layers_per_block == 2
    assert WarpFaceConfig.from_dict(paper.to_dict()) == paper
    with pytest.raises(ValueError, match="unknown warpface config"):
        WarpFaceConfig.from_name("huge")


def test_paper_mgme_shapes():
    cfg = WarpFaceConfig.from_name("paper")
    mgme = MotionEncoder(cfg, attention_backend="ref")
    mgme.reset_parameters()
    code = mgme(torch.randn(1, 4, 32, 32))
    assert code.theta_sr.shape == code.theta_rs.shape == (1, 1024)
    assert code.alpha.shape == (1, 4, 128)
    q = mgme.orthonormal_codebooks()
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(128).expand(4, 128, 128),
                               atol=1e-5, rtol=0)


def test_codebook_larger_than_its_dimension_is_refused():
    with pytest.raises(ValueError, match="N_k=32, D_k=16"):
        _cfg(codebook_size=32, group_dim=16)
    mgme = MotionEncoder(_cfg())
    mgme.codebooks = torch.nn.Parameter(torch.randn(4, 8, 16))
    with pytest.raises(ValueError, match="N_k=16, D_k=8"):
        mgme.orthonormal_codebooks()


@pytest.mark.parametrize("autocast", [False, True])
def test_codebooks_orthonormal_after_qr(autocast):
    mgme = MotionEncoder(_cfg(), attention_backend="ref")
    mgme.reset_parameters()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        q = mgme.orthonormal_codebooks()
    assert q.dtype == torch.float32 and q.shape == (4, 16, 16)
    eye = torch.eye(16).expand(4, 16, 16)
    torch.testing.assert_close(q.transpose(1, 2) @ q, eye, atol=1e-5, rtol=0)


def test_motion_code_is_the_codebook_combination_of_alpha():
    cfg = _cfg()
    mgme = MotionEncoder(cfg, attention_backend="ref")
    _randomise(mgme)
    code = mgme(torch.randn(3, 8, 16, 16))
    q = mgme.orthonormal_codebooks()
    for k in range(cfg.groups):
        g_k = code.alpha[:, k] @ q[k].T                                   # sum_n alpha_kn c_kn
        torch.testing.assert_close(code.theta_rs[:, k * 16:(k + 1) * 16], g_k)
    assert code.theta_sr.shape == (3, cfg.motion_dim)


def test_only_mgme_output_projections_start_at_zero():
    mgme = MotionEncoder(_cfg())
    mgme.reset_parameters()
    for name, p in mgme.named_parameters():
        if name.startswith(("out1.", "out2.")):
            assert bool((p == 0).all()), name
        elif name.endswith("weight") and "norm" not in name or name in ("codebooks", "readout"):
            assert not bool((p == 0).all()), name            # the ViT and MLPs get gradients


def test_transfer_and_identical_driving_give_zero_motion():
    theta_rd, theta_rs = torch.randn(2, 64), torch.randn(2, 64)
    torch.testing.assert_close(transfer(theta_rd, theta_rs), theta_rd - theta_rs)
    # the loss's condition for a pair whose driving frame is its source, augmentation off
    model = WarpFace(_cfg(), **REF)
    _randomise(model.mgme)
    spy = _ThetaSpy(model)
    batch = _batch(2, jitter=0.0)
    batch["driving"], batch["driving_motion"] = batch["source"], batch["source_motion"]
    assert torch.equal(batch["source_motion"], batch["source"])
    warpface_loss(model, WarpFaceTrainConfig(condition_drop=0.0), batch, torch.Generator())
    assert torch.equal(spy.thetas[0], torch.zeros(2, 64))


class _ThetaSpy:
    """Records the theta DenoisingNet receives."""

    def __init__(self, model):
        self.thetas = []
        model.denoising_net.register_forward_pre_hook(
            lambda module, args: self.thetas.append(args[2].detach().clone()))


# ---- WarpCA ----

def test_warpca_output_is_warp_occlusion_of_its_own_flow_and_occlusion(warp_spy):
    layer = _warpca()
    x = torch.randn(2, 4 * 6, 32)
    out = layer(x, torch.randn(2, 64), torch.randn(2, 128), 4, 6)
    (call,) = warp_spy
    torch.testing.assert_close(call["h"], x.view(2, 4, 6, 32))       # the warp acts on H itself
    assert call["flow"].dtype == torch.float32 and call["flow"].shape == (2, 4, 6, 2)
    assert call["occlusion"].shape == (2, 4, 6, 1)
    assert bool((call["occlusion"] > 0).all() and (call["occlusion"] < 1).all())
    torch.testing.assert_close(call["flow"], layer.last_flow)
    expected = warp_occlusion_ref(call["h"], call["flow"], call["occlusion"], True)
    torch.testing.assert_close(out, expected.view(2, 24, 32))


def test_warpca_casts_flow_to_fp32_and_occlusion_to_h_dtype_under_autocast(warp_spy):
    layer = _warpca()
    x = torch.randn(1, 16, 32).bfloat16()               # tokens as autocast's linears give them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, torch.randn(1, 64), torch.randn(1, 128), 4, 4)
    (call,) = warp_spy
    assert call["flow"].dtype == torch.float32
    assert call["occlusion"].dtype == call["h"].dtype == out.dtype == torch.bfloat16


def test_warpca_with_zero_flow_and_zero_occlusion_is_the_identity():
    layer = _warpca()
    with torch.no_grad():
        layer.flow_mlp[2].weight.zero_()
        layer.flow_mlp[2].bias.zero_()
        layer.occlusion_mlp[2].weight.zero_()
        layer.occlusion_mlp[2].bias.fill_(-1e4)                           # sigmoid -> 0 exactly
    x = torch.randn(2, 16, 32)
    assert torch.equal(layer(x, torch.randn(2, 64), torch.randn(2, 128), 4, 4), x)


def test_new_parts_at_init_leave_the_hidden_states_nearly_unchanged():
    """Zero-init: Eq. 9 is exactly theta; plain CA exactly the identity; WarpCA's flow is
    exactly 0 and its occlusion sigmoid(occlusion_init_logit), so H -> (1 + O) H."""
    mod = TimeModulation(128, 64)
    mod.reset_parameters()
    theta = torch.randn(3, 64)
    assert torch.equal(mod(theta, torch.randn(3, 128)), theta)
    x = torch.randn(2, 16, 32)
    cross = WarpCA(_cfg(motion_attention="cross"), 32, attention_backend="ref")
    cross.reset_parameters()
    assert torch.equal(cross(x, torch.randn(2, 64), torch.randn(2, 128), 4, 4), x)
    warp = WarpCA(_cfg(), 32, attention_backend="ref", warp_backend="ref")
    warp.reset_parameters()
    out = warp(x, torch.randn(2, 64), torch.randn(2, 128), 4, 4)
    assert torch.equal(warp.last_flow, torch.zeros(2, 4, 4, 2))
    o = torch.sigmoid(torch.tensor(_cfg().occlusion_init_logit))
    torch.testing.assert_close(out, (1 + o) * x)


def test_flow_varies_across_pixels_with_k_tokens_but_not_with_one():
    """The stated deviation: one key gives every pixel the same attention output (softmax over
    one key is 1), hence one global flow; K tokens give a per-pixel flow."""
    x = torch.randn(2, 16, 32)
    layer = _warpca()
    layer(x, torch.randn(2, 64), torch.randn(2, 128), 4, 4)
    assert float(layer.last_flow.std(dim=(1, 2)).min()) > 1e-4
    single = _warpca(_cfg(groups=1, vit_width=64, codebook_size=16, group_dim=64))
    single(x, torch.randn(2, 64), torch.randn(2, 128), 4, 4)
    spread = single.last_flow - single.last_flow[:, :1, :1]
    assert float(spread.abs().max()) < 1e-5


def test_gradients_reach_the_flow_mlp_and_match_the_ref_backend(triton_device):
    x = torch.randn(2, 16, 32, device=triton_device)
    theta, temb = torch.randn(2, 64, device=triton_device), torch.randn(2, 128,
                                                                          device=triton_device)
    grads = {}
    for backend in ("ref", "triton"):
        layer = _warpca().to(triton_device)
        layer.warp_backend = backend
        layer(x, theta, temb, 4, 4).square().sum().backward()
        grads[backend] = [p.grad.clone() for p in layer.flow_mlp.parameters()]
    assert float(grads["ref"][-1].abs().sum()) > 0
    for a, b in zip(grads["ref"], grads["triton"]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_switches_change_the_path(warp_spy):
    z, t = torch.randn(1, 8, 16, 16), torch.tensor([500])
    for cfg, warps in ((_cfg(), True), (_cfg(motion_attention="cross"), False)):
        warp_spy.clear()
        model = WarpFace(cfg, **REF)
        ref = model.reference_features(z)
        model(z, t, torch.randn(1, 64), ref)
        motion_layers = len(model.denoising_net.transformers("mid")) + \
            len(model.denoising_net.transformers("up"))
        assert len(warp_spy) == (motion_layers if warps else 0)
        assert all((w.flow_mlp is not None) == warps for w in model.modules()
                   if isinstance(w, WarpCA))
    with_mod, without = MotionTokens(_cfg()), MotionTokens(_cfg(time_modulation=False))
    _randomise(with_mod)
    _randomise(without)
    theta = torch.randn(1, 64)
    a, b = torch.randn(1, 128), torch.randn(1, 128)
    assert not torch.equal(with_mod(theta, a), with_mod(theta, b))
    assert torch.equal(without(theta, a), without(theta, b)) and without.modulation is None


def test_reference_tokens_enter_down_and_middle_self_attention_only():
    model = WarpFace(_cfg(), **REF)
    _randomise(model, scale=0.05)
    z = torch.randn(1, 8, 16, 16)
    ref = model.reference_features(z)
    net = model.denoising_net
    assert len(ref) == len(net.transformers("down")) + len(net.transformers("mid"))
    assert all(t.motion is None for t in net.transformers("down"))
    assert all(isinstance(t.motion, WarpCA) for t in net.transformers("up"))
    seen = []
    for block in net.transformers("down") + net.transformers("mid") + net.transformers("up"):
        block.attn.register_forward_hook(lambda m, args, out: seen.append(len(args) > 1
                                                                          and args[1] is not None))
    theta, t = torch.randn(1, 64), torch.tensor([300])
    out = model(z, t, theta, ref)
    n_ref = len(ref)
    assert seen == [True] * n_ref + [False] * (len(seen) - n_ref)
    other = model.reference_features(torch.randn(1, 8, 16, 16))
    assert not torch.allclose(model(z, t, theta, other), out)
    assert isinstance(net.mid_attn, Transformer)
    with pytest.raises(ValueError, match="reference must hold 3 token tensors"):
        model(z, t, theta, ref[:2])
    with pytest.raises(ValueError, match=r"theta must be \[1, 64\]"):
        model(z, t, torch.randn(1, 32), ref)


# ---- loss ----

def test_adaptive_weight_matches_eq_12_on_a_hand_built_pair():
    z_s = torch.zeros(1, 2, 2, 2)
    z_d = torch.zeros(1, 2, 2, 2)
    z_d[0, :, 0, 1] = torch.tensor([0.6, 0.8])                            # delta 1
    z_d[0, 0, 1, 0] = 2.0                                                 # delta 2
    z_d[0, :, 1, 1] = torch.tensor([3.0, 4.0])                            # delta 5; mean 2
    w = adaptive_weight(z_s, z_d, tau=0.5, epsilon=2.0)
    expected = torch.tensor([[0.5, 0.5], [0.5, 0.5 * (1 + 2.0 * 5 / 2)]])
    torch.testing.assert_close(w[0, 0], expected)
    same = adaptive_weight(z_s, z_s)
    assert torch.equal(same, torch.full_like(same, 0.5))                  # mean 0: tau, finite


def test_symmetry_loss():
    code = MotionEncoder(_cfg())
    _randomise(code)
    c = code(torch.randn(3, 8, 16, 16))
    expected = ((c.theta_sr + c.theta_rs) ** 2).sum(1).mean()
    torch.testing.assert_close(symmetry_loss(c), expected)
    c.theta_sr = -c.theta_rs
    assert float(symmetry_loss(c).detach()) == 0.0


def test_condition_dropout_rate_and_branch():
    g = torch.Generator().manual_seed(0)
    rate = float(condition_mask(40000, 0.2, g).float().mean())
    assert abs(rate - 0.2) < 0.01

    model = WarpFace(_cfg(), **REF)
    _randomise(model.mgme)
    spy = _ThetaSpy(model)
    batch = _batch(2)
    warpface_loss(model, WarpFaceTrainConfig(condition_drop=1.0), batch, torch.Generator())
    warpface_loss(model, WarpFaceTrainConfig(condition_drop=0.0), batch, torch.Generator())
    assert torch.equal(spy.thetas[0], torch.zeros(2, 64))
    assert float(spy.thetas[1].detach().abs().sum()) > 0


# ---- data and training ----

def _batch(b: int, seed: int = 0, jitter: float = 0.15) -> dict:
    from avatar_models.data.patch_pca import PatchPCA
    from avatar_models.data.procedural_faces import autoencoder_fit_frames

    codec = PatchPCA.fit(autoencoder_fit_frames(32), 8, patch=4)
    data = iter(WarpFacePairs(codec, seed=seed, jitter=jitter))
    items = [next(data) for _ in range(b)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_pairs_are_same_identity_far_apart_and_jitter_only_motion_inputs():
    data = WarpFacePairs(None, min_gap=6, clip_frames=12, jitter=0.3, seed=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        i, j = data.pair_indices(g)
        assert abs(i - j) >= 6
    item = data.sample(torch.Generator().manual_seed(0))
    clean = WarpFacePairs(None, min_gap=6, clip_frames=12, jitter=0.0, seed=1)
    plain = clean.sample(torch.Generator().manual_seed(0))
    assert torch.equal(item["source"], plain["source"])              # targets never jittered
    assert torch.equal(plain["source_motion"], plain["source"])
    assert not torch.allclose(item["source_motion"], item["source"])
    x = torch.zeros(2, 3, 4, 4)
    jit = appearance_jitter(x, 0.3, torch.Generator().manual_seed(0))
    assert not torch.allclose(jit[0], jit[1])                            # independent per copy


def test_engine_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = WarpFace(_cfg(), **REF)
    tcfg = WarpFaceTrainConfig(condition_drop=0.0)
    batch = _batch(2)
    items = [{k: v[i] for k, v in batch.items()} for i in range(2)]

    def loss_now():
        with torch.no_grad():
            return float(warpface_loss(model, tcfg, batch,
                                       torch.Generator().manual_seed(5))["loss"])

    before = loss_now()
    train(warpface_system(model, items * 4, tcfg),
          EngineConfig(steps=16, batch_size=2, lr=2e-3, ema_decay=0.0, progress=False,
                       device="cpu"))
    assert loss_now() < 0.9 * before


def test_activation_checkpointing_step_and_modulation_trends():
    model = WarpFace(_cfg(), **REF)
    items = [{k: v[0] for k, v in _batch(1).items()}] * 2
    out = train(warpface_system(model, items, WarpFaceTrainConfig()),
                EngineConfig(steps=1, batch_size=2, ema_decay=0.0, progress=False, device="cpu",
                             activation_checkpointing=True))
    assert len(out.losses) == 1 and out.losses[0] == out.losses[0]
    fresh = WarpFace(_cfg(), **REF)
    trends = modulation_trends(fresh, torch.tensor([0, 500, 999]))
    assert torch.equal(trends["gamma"], torch.zeros(3))                  # zero-initialised
    layers = [m for m in fresh.modules() if isinstance(m, TimeModulation)]
    with torch.no_grad():
        layers[0].delta.bias.fill_(float(len(layers)))                  # mean over layers: 1
    torch.testing.assert_close(modulation_trends(fresh, torch.tensor([0, 999]))["delta"],
                               torch.ones(2))
    assert modulation_trends(WarpFace(_cfg(time_modulation=False), **REF),
                             torch.tensor([1])) == {}


@pytest.mark.parametrize("attention", ["warpca", "cross"])
def test_motion_out_init_std_gives_mgme_a_gradient_from_the_first_step(attention):
    """With every motion output layer at zero (the default), no gradient reaches MGME even once
    the denoiser's zero output conv has moved; motion_out_init_std > 0 (flow MLP's last weight,
    or plain CA's proj) gives it one."""
    torch.manual_seed(0)
    batch = next(iter(WarpFacePairs(None, size=16, seed=0)))
    grads = {}
    for std in (0.0, 0.02):
        torch.manual_seed(0)
        cfg = WarpFaceConfig.from_name("tiny", in_channels=3, motion_attention=attention,
                                       motion_out_init_std=std)
        model = WarpFace(cfg, **REF)
        with torch.no_grad():                       # as after a few steps: eps is no longer 0
            model.denoising_net.conv_out.weight.normal_(std=0.05)
        pair = {k: batch[k][None].repeat(2, 1, 1, 1) for k in
                ("source", "driving", "source_motion", "driving_motion")}
        pair["driving_motion"] = pair["driving_motion"].flip(-1)         # a different motion
        warpface_loss(model, WarpFaceTrainConfig(condition_drop=0.0), pair,
                      torch.Generator().manual_seed(0))["loss"].backward()
        grads[std] = float(model.mgme.out2.weight.grad.abs().sum())
    assert grads[0.0] == 0.0 and grads[0.02] > 0
    with pytest.raises(ValueError, match="motion_out_init_std must be >= 0, got -1"):
        WarpFaceConfig.from_name("tiny", motion_out_init_std=-1.0)
