"""Tiny model folders and media files for the CLI tests (random weights, seconds to build)."""

from __future__ import annotations

import pytest
import torch


def save_tiny_clip(folder) -> None:
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)) \
        .save_pretrained(folder, safe_serialization=True)


def save_tiny_vae(folder) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 16, 16), scaling_factor=0.5, sample_size=32) \
        .save_pretrained(folder, safe_serialization=True)


def save_tiny_wav2vec(folder) -> None:
    """A Wav2Vec2Model with hidden size 16 (stride 80 samples) and its preprocessor config."""
    import json

    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8, 8), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, vocab_size=10)) \
        .save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"sampling_rate": 16000, "do_normalize": True, "feature_size": 1}))


@pytest.fixture(scope="session")
def tiny_wav2vec_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "wav2vec2"
    save_tiny_wav2vec(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "clip"
    save_tiny_clip(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "vae"
    save_tiny_vae(folder)
    return folder


@pytest.fixture(scope="session")
def random_frames():
    """``random_frames(n, height, width, seed=0)``: uint8 [n, height, width, 3] noise (no face
    in it)."""
    def make(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(n, height, width, 3, generator=g) * 255).to(torch.uint8)
    return make
