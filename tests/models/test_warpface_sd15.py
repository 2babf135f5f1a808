"""SD1.5 weights into WarpFace's ReferenceNet and DenoisingNet (avatar_models/warpface_sd15.py),
on a tiny random diffusers UNet2DConditionModel saved to a tmp folder (no network)."""

from __future__ import annotations

import json

import pytest
import torch

from avatar_models.warpface import WarpFace, WarpFaceConfig
from avatar_models.warpface_sd15 import (
    check_sd15_config,
    convert_sd15_state_dict,
    load_sd15_unets,
)

REF = dict(attention_backend="ref", warp_backend="ref")
# a two-level SD-layout UNet: attention in level 0 only (as SD's last level has none)
TINY_SD = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
               layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
               attention_head_dim=2, norm_num_groups=32)
# SD1.5's unet/config.json (the values that set shapes)
SD15 = dict(sample_size=64, in_channels=4, out_channels=4,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8)


def _cfg(**kw) -> WarpFaceConfig:
    return WarpFaceConfig.from_name(
        "tiny", in_channels=4, channels=(32, 64), attention_levels=(True, False), heads=2,
        feed_forward="geglu", transformer_norm_eps=1e-6, **kw)


@pytest.fixture(scope="module")
def sd_dir(random_sd15_folder):
    return random_sd15_folder(TINY_SD)


def test_weights_land_in_both_unets_and_new_parts_keep_their_init(sd_dir, random_sd_unet):
    unet = random_sd_unet(TINY_SD)
    sd = unet.state_dict()
    torch.manual_seed(1)
    model = WarpFace(_cfg(), **REF)
    torch.manual_seed(1)
    fresh = WarpFace(_cfg(), **REF)
    record = load_sd15_unets(model, sd_dir)
    assert record["folder"] == str((sd_dir / "unet").resolve())
    params = dict(model.named_parameters())
    for net in ("reference_net", "denoising_net"):
        assert torch.equal(params[f"{net}.conv_in.weight"], sd["conv_in.weight"])
        assert torch.equal(params[f"{net}.down.0.layers.0.0.temb.weight"],
                           sd["down_blocks.0.resnets.0.time_emb_proj.weight"])
        tb = "down_blocks.0.attentions.0.transformer_blocks.0"
        kv = torch.cat([sd[f"{tb}.attn1.to_k.weight"], sd[f"{tb}.attn1.to_v.weight"]])
        assert torch.equal(params[f"{net}.down.0.layers.0.1.attn.kv.weight"], kv)
        assert torch.equal(params[f"{net}.down.0.layers.0.1.proj_in.weight"],
                           sd["down_blocks.0.attentions.0.proj_in.weight"][:, :, 0, 0])
        assert torch.equal(params[f"{net}.mid_attn.ff.proj.weight"],
                           sd["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"])
        lin1 = sd["time_embedding.linear_1.weight"]                       # [cos | sin] columns
        assert torch.equal(params[f"{net}.t_embed.mlp.0.weight"],
                           torch.cat([lin1[:, 16:], lin1[:, :16]], dim=1))
    tb = "up_blocks.1.attentions.1.transformer_blocks.0"
    assert torch.equal(params["denoising_net.up.1.layers.1.1.motion.q.weight"],
                       sd[f"{tb}.attn2.to_q.weight"])
    assert torch.equal(params["denoising_net.up.1.layers.1.1.motion.norm.weight"],
                       sd[f"{tb}.norm2.weight"])
    assert torch.equal(params["denoising_net.conv_out.weight"], sd["conv_out.weight"])
    # every parameter outside the map is exactly the fresh model's: MGME, WarpCA's K/V, the
    # zero-initialised time modulation and flow MLP, the occlusion MLP's -4 bias
    new = {n: p for n, p in fresh.named_parameters() if torch.equal(p, params[n])}
    kept = [n for n in new if n.startswith(("reference_net.", "denoising_net."))]
    assert len(kept) == record["kept_init"] > 0
    assert all(".motion." in n for n in kept)                           # only WarpCA's parts
    assert all(n in new for n in params if n.startswith("mgme."))
    flow_mlp = "denoising_net.mid_attn.motion.flow_mlp.2.weight"
    assert flow_mlp in new and not params[flow_mlp].any()
    gamma = "denoising_net.up.1.layers.1.1.motion.motion.modulation.gamma.weight"
    assert gamma in new and not params[gamma].any()
    assert "denoising_net.mid_attn.motion.kv.weight" in new
    assert torch.all(params["denoising_net.mid_attn.motion.occlusion_mlp.2.bias"] == -4.0)
    assert not params["denoising_net.mid_attn.motion.q.bias"].any()


def test_loaded_unets_compute_what_the_diffusers_unet_computes(tmp_path, random_sd_unet):
    """With SD's text cross-attention zeroed and the plain-CA arm (identity at init), the loaded
    DenoisingNet without reference tokens is the diffusers UNet; ReferenceNet's recorded tokens
    are the inputs of the UNet's self-attentions in the down and middle blocks."""
    unet = random_sd_unet(TINY_SD, zero_text_attention=True)
    unet.save_pretrained(tmp_path, safe_serialization=True)
    model = WarpFace(_cfg(motion_attention="cross"), **REF).eval()
    load_sd15_unets(model, tmp_path)
    z = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 700])
    text = torch.randn(2, 3, 24)
    with torch.no_grad():
        want = unet(z, t, encoder_hidden_states=text).sample
        got = model.denoising_net(z, t, torch.randn(2, model.config.motion_dim))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)

    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
             for name, m in unet.named_modules()
             if name.endswith("attn1") and not name.startswith("up_blocks")]
    with torch.no_grad():
        unet(z, torch.zeros(2), encoder_hidden_states=text)
        record = model.reference_features(z)
    for hook in hooks:
        hook.remove()
    assert len(record) == len(seen) == 2                                 # down.0 + mid
    for ours, theirs in zip(record, seen):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_paper_config_has_sd15_shapes():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15)
        model = WarpFace(WarpFaceConfig.from_name("paper"))
    check_sd15_config(model.config, json.loads(sd.to_json_string()))
    converted = convert_sd15_state_dict(model, sd.state_dict())
    unet_params = [n for n, _ in model.named_parameters() if n.startswith(("reference", "denois"))]
    assert len(converted) > 0.8 * len(unet_params)
    assert converted["denoising_net.mid_attn.ff.proj.weight"].shape == (10240, 1280)


def test_a_mismatching_folder_raises_a_clear_error(sd_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match=r"layers_per_block must be 2 .* got 1"):
        load_sd15_unets(WarpFace(_cfg(layers_per_block=2)), sd_dir)
    with pytest.raises(ValueError, match="feed_forward='geglu'"):
        load_sd15_unets(WarpFace(WarpFaceConfig.from_name("tiny")), sd_dir)
    with pytest.raises(FileNotFoundError, match="SD1.5 UNet model folder not found"):
        load_sd15_unets(WarpFace(_cfg()), tmp_path / "nothing")
    # config right, one tensor wrong: the key, the expected and the received shape
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((sd_dir / "unet" / "config.json").read_text())
    state = load_file(str(sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "up_blocks.1.resnets.0.conv1.weight"
    state[key] = torch.zeros(32, 96, 3, 1)
    save_file(state, str(bad / "diffusion_pytorch_model.safetensors"))
    model = WarpFace(_cfg(), **REF)
    before = model.denoising_net.conv_in.weight.clone()
    with pytest.raises(ValueError, match=rf"'{key}' -> denoising_net.up.1.layers.0.0.conv1.weight"
                                         r": expected shape \[32, 96, 3, 3\], received "
                                         r"\[32, 96, 3, 1\]"):
        load_sd15_unets(model, bad)
    assert torch.equal(model.denoising_net.conv_in.weight, before)       # nothing written
    config = json.loads((sd_dir / "unet" / "config.json").read_text())
    with pytest.raises(ValueError, match="attention_head_dim"):
        check_sd15_config(_cfg(), {**config, "attention_head_dim": 4})
