"""The tiny sDiT through the Triton kernels (interpreter on CPU) equals the ref backend."""

from __future__ import annotations

import pytest
import torch

import kernels
from avatar_models.anchored_diffusion import Conditions, SDiT, SDiTConfig


def test_packed_anchor_model_triton_matches_ref(triton_device):
    cfg = SDiTConfig.from_name("tiny", depth=1, hidden=32, heads=2, input_size=4, frames=3)
    model = SDiT(cfg).to(triton_device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    b = 2
    x = torch.randn(b, 3, cfg.in_channels, 4, 4, device=triton_device)
    t = torch.full((b,), 300.0, device=triton_device)
    cond = Conditions(torch.randn(b, cfg.global_dim, device=triton_device),
                      torch.randn(b, 3, cfg.control_dim, device=triton_device))
    anchor = model.make_anchor([1, 2])
    with kernels.backend("ref"):
        ref = model(x, t, cond, anchor=anchor)
    with kernels.backend("triton"):
        got = model(x, t, cond, anchor=anchor)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdit-b/4", "sdit-xl/2"])
def test_paper_size_packed_equals_override_bf16(name):
    """Real shapes (256 px latents, T=4, B=3) on the GPU, bf16 autocast, default backends."""
    cfg = SDiTConfig.from_name(name, frames=4, global_dim=768)
    model = SDiT(cfg).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    b = 3
    x = torch.randn(b, 4, 4, 32, 32, device="cuda")
    t = torch.full((b,), 500, device="cuda")
    cond = Conditions(torch.randn(b, 768, device="cuda"),
                      torch.randn(b, 4, cfg.control_dim, device="cuda"))
    anchor = model.make_anchor([2, 0, 3])
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(x, t, cond, anchor=anchor).float()
        ref = model(x, t, cond, anchor=anchor, anchor_mode="override").float()
    err = (packed - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, float(err)
    assert torch.equal(packed[1, 0], packed[0, 2]) and torch.equal(packed[2, 3], packed[0, 2])


@pytest.mark.gpu
def test_training_step_bf16_on_gpu(tmp_path):
    from avatar_models.training.anchored import TrainConfig, train_anchored
    from avatar_models.training.synthetic import BlobSequences

    data = BlobSequences(8, frames=4, channels=4, size=32, control_dim=1434, global_dim=768)
    cfg = SDiTConfig.from_name("sdit-b/4", frames=4)
    res = train_anchored(cfg, data, TrainConfig(steps=3, batch_size=4), device="cuda",
                         out=tmp_path / "b4.safetensors", progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
