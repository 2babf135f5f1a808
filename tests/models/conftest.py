"""Random diffusers models for the SD1.5 weight-loading tests (no network, seconds to build)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def random_sd_unet():
    """``random_sd_unet(config, zero_text_attention=False)``: a diffusers UNet2DConditionModel
    of ``config`` in eval mode, every weight moved off diffusers' init (zero convs, unit norms)
    by seeded noise; ``zero_text_attention``: the text cross-attention's output projection is 0,
    so the UNet computes what a model without text cross-attention computes."""
    from diffusers import UNet2DConditionModel

    def make(config: dict, zero_text_attention: bool = False) -> UNet2DConditionModel:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config).eval()
        with torch.no_grad():
            for name, p in unet.named_parameters():
                p.add_(torch.randn_like(p) * 0.05)
                if zero_text_attention and ".attn2.to_out.0." in name:
                    p.zero_()
        return unet

    return make


@pytest.fixture(scope="session")
def random_sd15_folder(tmp_path_factory, random_sd_unet):
    """``random_sd15_folder(config)``: a Stable Diffusion-style folder
    ``<root>/unet/{config.json, *.safetensors}`` holding ``random_sd_unet(config)``."""

    def make(config: dict):
        root = tmp_path_factory.mktemp("sd15")
        random_sd_unet(config).save_pretrained(root / "unet", safe_serialization=True)
        return root

    return make
