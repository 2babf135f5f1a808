"""SD1.5 weights into MCDM's denoiser (avatar_models/mcdm_sd15.py), on a tiny random diffusers
UNet2DConditionModel saved to a tmp folder (no network), and the paper config's map on the meta
device (no weights allocated)."""

from __future__ import annotations

import json

import pytest
import torch

from avatar_models.mcdm import MCDM, MCDMConfig
from avatar_models.mcdm_sd15 import (
    IGNORED,
    check_sd15_config,
    denoiser_key_map,
    load_sd15_denoiser,
    sd15_mapping,
)

# a two-level SD-layout UNet in tiny's shapes: attention at level 0 only (as SD's last level)
TINY_SD = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
               layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
               attention_head_dim=2, norm_num_groups=8)
# SD1.5's unet/config.json (the values that set shapes)
SD15 = dict(sample_size=64, in_channels=4, out_channels=4,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8)
# what has no SD1.5 counterpart in a transformer: the reference attentions' keys / values and
# output projections, and the temporal layer
KEPT = ("archived_attn.kv.", "archived_attn.proj.", "present_attn.kv.", "present_attn.proj.",
        "temporal.")


def _cfg(**kw) -> MCDMConfig:
    return MCDMConfig.from_name("tiny", **{"unet_layout": "sd15",
                                           "attention_levels": (True, False), **kw})


def _model(cfg: MCDMConfig | None = None, seed: int = 1) -> MCDM:
    torch.manual_seed(seed)
    return MCDM(cfg or _cfg(), attention_backend="ref").eval()


@pytest.fixture(scope="module")
def sd_dir(random_sd15_folder):
    return random_sd15_folder(TINY_SD)


def test_weights_land_bitwise_and_the_rest_keeps_its_values(sd_dir, random_sd_unet):
    sd = random_sd_unet(TINY_SD).state_dict()
    model, fresh = _model(), _model()
    record = load_sd15_denoiser(model, sd_dir)
    assert record["folder"] == str((sd_dir / "unet").resolve())
    params = dict(model.named_parameters())
    d = "denoiser"
    # every plain copy is its SD tensor, bitwise
    copies = [e for e in denoiser_key_map(model.denoiser) if e.op == "copy"]
    assert len(copies) > 100
    for e in copies:
        assert torch.equal(params[f"{d}.{e.target}"], sd[e.sources[0]]), e.target
    # the converted ones, against independent expressions
    tb = "down_blocks.0.attentions.0.transformer_blocks.0"
    qkv = torch.cat([sd[f"{tb}.attn1.to_{x}.weight"] for x in "qkv"])
    assert torch.equal(params[f"{d}.down.0.0.0.1.self_attn.qkv.weight"], qkv)
    assert not params[f"{d}.down.0.0.0.1.self_attn.qkv.bias"].any()
    assert torch.equal(params[f"{d}.down.0.0.0.1.proj_in.weight"],
                       sd["down_blocks.0.attentions.0.proj_in.weight"][:, :, 0, 0])
    assert torch.equal(params[f"{d}.mid.1.proj_out.weight"],
                       sd["mid_block.attentions.0.proj_out.weight"][:, :, 0, 0])
    lin1 = sd["time_embedding.linear_1.weight"]                          # [cos | sin] columns
    assert torch.equal(params[f"{d}.t_embed.mlp.0.weight"],
                       torch.cat([lin1[:, 16:], lin1[:, :16]], dim=1))
    assert torch.equal(params[f"{d}.down.0.1.conv.weight"],
                       sd["down_blocks.0.downsamplers.0.conv.weight"])
    assert torch.equal(params[f"{d}.up.0.1.conv.weight"],
                       sd["up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(params[f"{d}.up.1.0.1.0.conv_shortcut.weight"],
                       sd["up_blocks.1.resnets.1.conv_shortcut.weight"])
    # the reference attentions' query side is SD's text cross-attention's (the chosen init)
    tb = "up_blocks.1.attentions.1.transformer_blocks.0"
    for ref in ("archived_attn", "present_attn"):
        assert torch.equal(params[f"{d}.up.1.0.1.1.{ref}.q.weight"],
                           sd[f"{tb}.attn2.to_q.weight"])
        assert torch.equal(params[f"{d}.up.1.0.1.1.{ref}.norm.bias"], sd[f"{tb}.norm2.bias"])
        assert not params[f"{d}.up.1.0.1.1.{ref}.q.bias"].any()
    # everything else keeps its values: the denoiser's parts without a counterpart and the rest
    # of MCDM; the archived attention and the temporal layer still add 0 (zero output projection)
    same = {n for n, p in fresh.named_parameters() if torch.equal(p, params[n])}
    zeroed = {f"{d}.{e.target}" for e in denoiser_key_map(model.denoiser) if e.op == "zeros"}
    kept = [n for n in same if n.startswith(f"{d}.") and n not in zeroed]  # zeroed: 0 before too
    assert sorted(kept) == sorted(n for n in params if n.startswith(f"{d}.")
                                  and any(k in n for k in KEPT))
    assert record["kept_init"] == len(kept)
    assert all(n in same for n in params if not n.startswith(f"{d}."))
    for block in model.denoiser.transformers():
        assert not block.archived_attn.proj.weight.any() and not block.temporal.proj.weight.any()
    # the record: what was used and what, by design, was not
    sd_keys = set(sd)
    assert record["sd_used"] + len(record["sd_unused"]) == len(sd_keys)
    assert record["sd_unused"] and all(IGNORED.fullmatch(k) for k in record["sd_unused"])
    assert {k.rsplit(".attn2.", 1)[1] for k in record["sd_unused"]} == {
        "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    assert record["zeroed"] == 4 * 3     # 4 transformers (down 1, mid 1, up 2) x (qkv, 2 q) biases


def test_loaded_denoiser_computes_what_the_diffusers_unet_computes(tmp_path, random_sd_unet):
    """With SD's text cross-attention zeroed, and the reference attentions and the temporal
    layer at their identity init, the loaded denoiser is the diffusers UNet frame by frame,
    whatever F_ac and F_pc hold."""
    unet = random_sd_unet(TINY_SD, zero_text_attention=True)
    unet.save_pretrained(tmp_path, safe_serialization=True)
    model = _model()
    load_sd15_denoiser(model, tmp_path)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, cfg.clip_frames, 3, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    f_ac = torch.randn(2, cfg.archived_frames, cfg.prior_queries, cfg.prior_dim, generator=g)
    f_pc = torch.randn(2, cfg.clip_frames, cfg.motion_tokens, cfg.motion_dim, generator=g)
    text = torch.randn(2 * cfg.clip_frames, 3, 24, generator=g)
    with torch.no_grad():
        want = unet(z.flatten(0, 1), t.repeat_interleave(cfg.clip_frames),
                    encoder_hidden_states=text).sample
        got = model.denoiser(z, t, f_ac, f_pc)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got.flatten(0, 1), want, atol=2e-5, rtol=1e-4)
    # one resnet and one transformer on the same input as their diffusers counterparts
    h = torch.randn(cfg.clip_frames, 32, 16, 16, generator=g)
    temb = torch.randn(cfg.clip_frames, 128, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser.down[0][0][0][0](h, temb),
                                   unet.down_blocks[0].resnets[0](h, temb), atol=0, rtol=0)
        ours = model.denoiser.down[0][0][0][1](h, cfg.clip_frames, f_ac[:1].flatten(1, 2),
                                               f_pc[:1])
        theirs = unet.down_blocks[0].attentions[0](h, encoder_hidden_states=text[:4]).sample
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_the_paper_map_covers_every_denoiser_parameter_with_a_counterpart():
    """The paper config against SD1.5's UNet, both on the meta device (nothing allocated):
    config check passes, every SD1.5 tensor but the text cross-attention's has a place, and every
    denoiser parameter without one is a reference attention's K/V / output or the temporal
    layer's."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15)
        model = MCDM(MCDMConfig.from_name("paper"))
    check_sd15_config(model.config, json.loads(sd.to_json_string()))
    mapping = sd15_mapping(model, sd.state_dict())
    denoiser = [n for n, _ in model.named_parameters() if n.startswith("denoiser.")]
    missing = sorted(set(denoiser) - set(mapping.tensors))
    assert missing and all(any(k in n for k in KEPT) for n in missing)
    assert len(missing) == 16 * 14            # SD1.5's 16 transformers x 14 tensors each
    assert len(mapping.unused) == 16 * 4 and all(IGNORED.fullmatch(k) for k in mapping.unused)
    assert mapping.tensors["denoiser.mid.1.ff.proj.weight"].shape == (10240, 1280)
    assert mapping.tensors["denoiser.t_embed.mlp.0.weight"].shape == (1280, 320)


def test_mismatches_raise_value_errors_naming_the_field_or_key(sd_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match=r"layers_per_block must be 2 .* got 1"):
        load_sd15_denoiser(_model(_cfg(layers_per_level=2)), sd_dir)
    with pytest.raises(ValueError, match=r"unet_layout='sd15' .* got 'lite'"):
        load_sd15_denoiser(_model(MCDMConfig.from_name("tiny")), sd_dir)
    with pytest.raises(ValueError, match=r"down_block_types must be \['CrossAttnDownBlock2D', "
                                         r"'CrossAttnDownBlock2D'\]"):
        load_sd15_denoiser(_model(_cfg(attention_levels=())), sd_dir)
    with pytest.raises(FileNotFoundError, match="SD1.5 UNet model folder not found"):
        load_sd15_denoiser(_model(), tmp_path / "nothing")
    config = json.loads((sd_dir / "unet" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"attention heads \(attention_head_dim\) must be 2"):
        check_sd15_config(_cfg(), {**config, "attention_head_dim": 4})
    with pytest.raises(ValueError, match=r"norm_num_groups must be 8 .* got 32"):
        check_sd15_config(_cfg(), {**config, "norm_num_groups": 32})
    # config right, tensors wrong: the key, the expected and the received shape; nothing written
    state = load_file(str(sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))

    def folder_with(name: str, tensors: dict):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps(config))
        save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
        return bad

    key = "up_blocks.1.resnets.0.conv1.weight"
    model = _model()
    before = model.denoiser.conv_in.weight.clone()
    with pytest.raises(ValueError, match=rf"'{key}' -> denoiser.up.1.0.0.0.conv1.weight: "
                                         r"expected shape \[32, 96, 3, 3\], received "
                                         r"\[32, 96, 3, 1\]"):
        load_sd15_denoiser(model, folder_with("shape", {**state, key: torch.zeros(32, 96, 3, 1)}))
    assert torch.equal(model.denoiser.conv_in.weight, before)
    gone = "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight"
    with pytest.raises(ValueError, match=rf"lack '{gone}' \(needed for "
                                         r"denoiser.mid.1.self_attn.qkv.weight\)"):
        load_sd15_denoiser(model, folder_with("missing", {k: v for k, v in state.items()
                                                           if k != gone}))
    with pytest.raises(ValueError, match=r"1 key\(s\) with no place in MCDM's denoiser, first "
                                         r"'extra.weight' \(shape \[2\]\)"):
        load_sd15_denoiser(model, folder_with("extra", {**state, "extra.weight": torch.zeros(2)}))
    assert torch.equal(model.denoiser.conv_in.weight, before)


def test_sd15_layout_config_checks():
    with pytest.raises(ValueError, match="unet_layout must be one of"):
        MCDMConfig.from_name("tiny", unet_layout="sd21")
    with pytest.raises(ValueError, match="attention_levels must be empty .* got \\(True,\\)"):
        MCDMConfig.from_name("tiny", attention_levels=(True,))
    cfg = MCDMConfig.from_name("paper")
    assert cfg.levels_with_attention == (True, True, True, False)
    assert MCDMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert MCDMConfig.from_name("tiny").levels_with_attention == (True, True)


def test_train_stage_1_starts_the_denoiser_from_a_local_sd15_folder(sd_dir, tmp_path, capsys,
                                                                    random_sd_unet):
    """`train mcdm --stage 1 --sd15 DIR` (samplers/commands/mcdm.py): the weights are loaded
    before training and recorded in the checkpoint; wrong stage or config: exit 2, named."""
    from avatar_models.checkpoint import load_checkpoint
    from samplers.cli import main

    common = ["--steps", "1", "--batch-size", "1", "--ema-decay", "0", "--no-progress",
              "--device", "cpu"]
    s0, s1, lite = (tmp_path / f"{n}.safetensors" for n in ("s0", "s1", "lite"))
    assert main(["train", "mcdm", "--stage", "0", "--set", "unet_layout=sd15", "--set",
                 "attention_levels=[true,false]", "--out", str(s0), *common]) == 0
    assert main(["train", "mcdm", "--stage", "1", "--init", str(s0), "--sd15", str(sd_dir),
                 "--out", str(s1), *common]) == 0
    assert "loaded 196 SD1.5 tensors" in capsys.readouterr().err
    ckpt = load_checkpoint(s1)
    assert ckpt.extra["sd15"] == str((sd_dir / "unet").resolve())
    record = ckpt.extra["sd15_load"]
    assert (record["loaded"], record["zeroed"], len(record["sd_unused"])) == (196, 12, 16)
    # stage 1 does not train the present-clip attention: it still holds SD's attn2 query
    sd = random_sd_unet(TINY_SD).state_dict()
    assert torch.equal(ckpt.weights("ema")["denoiser.mid.1.present_attn.q.weight"],
                       sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight"])
    assert main(["train", "mcdm", "--stage", "2", "--init", str(s1), "--sd15", str(sd_dir),
                 "--out", str(tmp_path / "x.safetensors"), *common]) == 2
    assert "--sd15 sets the denoiser's starting weights, which stage 1" in capsys.readouterr().err
    assert main(["train", "mcdm", "--stage", "0", "--out", str(lite), *common]) == 0
    capsys.readouterr()
    assert main(["train", "mcdm", "--stage", "1", "--init", str(lite), "--sd15", str(sd_dir),
                 "--out", str(tmp_path / "x.safetensors"), *common]) == 2
    assert "--sd15: SD1.5 weights need unet_layout='sd15'" in capsys.readouterr().err
