"""FrameVAE over a tiny random AutoencoderKL saved to disk (safetensors) and reloaded."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from avatar_models.conditioning.vae import FrameVAE


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # 4 levels: 3 downsamples, factor 8
        scaling_factor=0.5, sample_size=32)
    path = tmp_path_factory.mktemp("vae")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    return FrameVAE.from_pretrained(vae_dir)


def test_load_reads_config(vae, vae_dir):
    assert (vae_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert vae.scaling_factor == 0.5 and vae.shift_factor == 0.0
    assert vae.downsample_factor == 8 and vae.latent_channels == 4
    assert not any(p.requires_grad for p in vae.model.parameters())
    assert not vae.model.training


def test_encode_decode_shapes_and_scaling(vae):
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(2, 3, 3, 32, 48, generator=g) * 2 - 1
    z = vae.encode(frames)
    assert z.shape == (2, 3, 4, 4, 6) and z.dtype == torch.float32
    with torch.no_grad():
        ref = vae.model.encode(frames.reshape(6, 3, 32, 48)).latent_dist.mean * 0.5
    torch.testing.assert_close(z.reshape(6, 4, 4, 6), ref)
    x = vae.decode(z)
    assert x.shape == frames.shape
    assert x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        raw = vae.model.decode(ref / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(x.reshape(6, 3, 32, 48), raw)


def test_chunking_does_not_change_results(vae):
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(1, 7, 3, 16, 16, generator=g) * 2 - 1
    whole = vae.encode(frames, frames_per_chunk=64)
    sliced = vae.encode(frames, frames_per_chunk=3)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
    a = vae.encode(frames, sample=True, generator=torch.Generator().manual_seed(5),
                   frames_per_chunk=2)
    b = vae.encode(frames, sample=True, generator=torch.Generator().manual_seed(5),
                   frames_per_chunk=7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, whole)  # sampling really adds noise
    torch.testing.assert_close(vae.decode(whole, frames_per_chunk=1),
                               vae.decode(whole, frames_per_chunk=8), rtol=1e-4, atol=2e-5)


def test_decode_passes_gradients_to_latents(vae):
    z = torch.randn(1, 2, 4, 2, 2, requires_grad=True)
    vae.decode(z, clamp=False).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_bad_input_is_named(vae):
    with pytest.raises(ValueError, match=r"frames must be \[B, T, 3, H, W\]"):
        vae.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"frames must be \[B, T, 3, H, W\] with 3 at dim 2"):
        vae.encode(torch.zeros(1, 2, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8, got H=12, W=16"):
        vae.encode(torch.zeros(1, 1, 3, 12, 16))
    with pytest.raises(TypeError, match="frames must be a floating-point tensor"):
        vae.encode(torch.zeros(1, 1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"latents must be \[B, T, 4, h, w\]"):
        vae.decode(torch.zeros(1, 1, 3, 2, 2))
    with pytest.raises(ValueError, match="frames_per_chunk must be > 0"):
        vae.encode(torch.zeros(1, 1, 3, 16, 16), frames_per_chunk=0)


def test_missing_or_incomplete_folder(tmp_path, vae_dir):
    missing = tmp_path / "no_vae_here"
    with pytest.raises(FileNotFoundError, match="no_vae_here.*AutoencoderKL"):
        FrameVAE.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((vae_dir / "config.json").read_text())
    (empty / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \.safetensors weights.*\.bin"):
        FrameVAE.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="config.json"):
        FrameVAE.from_pretrained(tmp_path, subfolder=None)


def test_subfolder_and_env_home(tmp_path, vae_dir, monkeypatch):
    import shutil

    shutil.copytree(vae_dir, tmp_path / "sd" / "vae")
    assert FrameVAE.from_pretrained(tmp_path / "sd", subfolder="vae").scaling_factor == 0.5
    monkeypatch.setenv("AVATAR_MODELS_HOME", str(tmp_path / "sd"))
    assert FrameVAE.from_pretrained(None).latent_channels == 4
    monkeypatch.delenv("AVATAR_MODELS_HOME")
    with pytest.raises(FileNotFoundError, match="AVATAR_MODELS_HOME"):
        FrameVAE.from_pretrained(None)
