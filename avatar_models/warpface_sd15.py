"""SD1.5 weights for WarpFace's two UNets: a key map from a local diffusers
``UNet2DConditionModel`` (``<folder>/unet``) into the UNet-lite of ``avatar_models/warpface.py``.

The UNet-lite has SD1.5's stages, widths and order of operations, so with a config whose shapes
are SD's (``paper``: ``feed_forward="geglu"``, ``transformer_norm_eps=1e-6``) every pretrained
weight has a place. Per UNet (diffusers name -> this project's name):

- ``conv_in`` -> ``conv_in``; ``time_embedding.linear_1`` / ``linear_2`` -> ``t_embed.mlp.0`` /
  ``mlp.2`` (*);
- ``down_blocks.i.resnets.j`` / ``attentions.j`` -> ``down.i.layers.j.0`` (ResBlock) /
  ``down.i.layers.j.1`` (Transformer); ``down_blocks.i.downsamplers.0.conv`` ->
  ``down.i.down.conv``;
- ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1`` -> ``mid_res1`` / ``mid_attn`` /
  ``mid_res2``;
- ``up_blocks.i.resnets.j`` / ``attentions.j`` / ``upsamplers.0.conv`` -> ``up.i.layers.j.0`` /
  ``up.i.layers.j.1`` / ``up.i.up.conv``; ``conv_norm_out`` / ``conv_out`` -> ``norm_out`` /
  ``conv_out``;
- inside a ResBlock: ``norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut`` -> ``norm1 conv1
  temb norm2 conv2 skip``;
- inside a Transformer: ``norm``; ``proj_in`` / ``proj_out`` (1x1 convs in SD1.5, reshaped to
  our linear layers); ``transformer_blocks.0.`` ``norm1``, ``attn1.to_q`` -> ``attn.q``,
  ``attn1.to_k`` and ``to_v`` -> ``attn.kv`` (stacked), ``attn1.to_out.0`` -> ``attn.proj``,
  ``norm3``, ``ff.net.0.proj`` / ``ff.net.2`` -> ``ff.proj`` / ``ff.out``; where the transformer
  holds WarpCA (DenoisingNet's middle and up blocks) also ``norm2`` -> ``motion.norm`` and
  ``attn2.to_q`` -> ``motion.q`` (the hidden states stay the queries; SD's to_q has no bias,
  ours stays 0).

(*) diffusers' sinusoid is [cos, sin] when ``flip_sin_to_cos`` (SD1.5), ``sincos_1d``'s is
[sin, cos]: the two halves of ``linear_1``'s input columns are swapped.

**Not loaded, the new parts keep their initialisation** (``reset_parameters``): WarpCA's K/V
projections (SD's ``attn2.to_k`` / ``to_v`` read 768-d text, the motion tokens are D_k-d), the
time modulation (zero), the group embedding, the flow and occlusion MLPs (last layers zero /
``occlusion_init_logit``), plain CA's output projection (zero: the CA arm starts as the
pretrained UNet without its text cross-attention) and MGME. ReferenceNet takes the same weights
as DenoisingNet's down and middle part; it has no up blocks.

**SD weights with no place** (ignored, by design): every ``attn2.to_k`` / ``to_v`` /
``to_out.0`` (text cross-attention is replaced), and ``norm2`` / ``attn2.to_q`` of the down
blocks (no cross-attention there, section 4.1). Any other key the folder holds, any key the map
needs that it lacks, and any shape that differs raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from avatar_models.layers.unet_lite import ResBlock
from avatar_models.sd15_weights import (
    KeyMap,
    MappedWeight,
    check_sd15_fields,
    load_sd15_unet,
    map_sd15_weights,
    sd15_layout_expectations,
)
from avatar_models.warpface import LatentUNet, Transformer, WarpFace, WarpFaceConfig

# SD weights that have no place in WarpFace (see the module docstring)
IGNORED = re.compile(r".*\.attn2\.(to_k|to_v|to_out\.0)\.(weight|bias)$"
                     r"|down_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.0\."
                     r"(norm2\.(weight|bias)|attn2\.to_q\.weight)$")
UNETS = ("reference_net", "denoising_net")


def unet_key_map(net: LatentUNet, *, flip_sin_to_cos: bool = True) -> list[MappedWeight]:
    """The map for one UNet-lite (``role`` reference or denoising), in its parameter order."""
    km = KeyMap()

    def resblock(ours: str, sd: str, block: ResBlock) -> None:
        for mine, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("temb", "time_emb_proj"),
                             ("norm2", "norm2"), ("conv2", "conv2")):
            km.linear(f"{ours}.{mine}", f"{sd}.{theirs}")
        if not isinstance(block.skip, nn.Identity):
            km.linear(f"{ours}.skip", f"{sd}.conv_shortcut")

    def transformer(ours: str, sd: str, block: Transformer) -> None:
        tb = f"{sd}.transformer_blocks.0"
        km.linear(f"{ours}.norm", f"{sd}.norm")
        km.linear(f"{ours}.proj_in", f"{sd}.proj_in", op="conv1x1")
        km.linear(f"{ours}.norm1", f"{tb}.norm1")
        km.linear(f"{ours}.attn.q", f"{tb}.attn1.to_q", bias=False)
        km.add(f"{ours}.attn.kv.weight", (f"{tb}.attn1.to_k.weight", f"{tb}.attn1.to_v.weight"),
               "stack")
        km.linear(f"{ours}.attn.proj", f"{tb}.attn1.to_out.0")
        if block.motion is not None:
            km.linear(f"{ours}.motion.norm", f"{tb}.norm2")
            km.linear(f"{ours}.motion.q", f"{tb}.attn2.to_q", bias=False)
        km.linear(f"{ours}.norm3", f"{tb}.norm3")
        km.linear(f"{ours}.ff.proj", f"{tb}.ff.net.0.proj")
        km.linear(f"{ours}.ff.out", f"{tb}.ff.net.2")
        km.linear(f"{ours}.proj_out", f"{sd}.proj_out", op="conv1x1")

    def layer_pairs(ours: str, sd: str, layers) -> None:
        for j, (res, attn) in enumerate(layers):
            resblock(f"{ours}.layers.{j}.0", f"{sd}.resnets.{j}", res)
            if isinstance(attn, Transformer):
                transformer(f"{ours}.layers.{j}.1", f"{sd}.attentions.{j}", attn)

    km.stem(flip_sin_to_cos=flip_sin_to_cos)
    for i, stage in enumerate(net.down):
        layer_pairs(f"down.{i}", f"down_blocks.{i}", stage["layers"])
        if "down" in stage:
            km.linear(f"down.{i}.down.conv", f"down_blocks.{i}.downsamplers.0.conv")
    resblock("mid_res1", "mid_block.resnets.0", net.mid_res1)
    transformer("mid_attn", "mid_block.attentions.0", net.mid_attn)
    if net.role == "denoising":
        resblock("mid_res2", "mid_block.resnets.1", net.mid_res2)
        for i, stage in enumerate(net.up):
            layer_pairs(f"up.{i}", f"up_blocks.{i}", stage["layers"])
            if "up" in stage:
                km.linear(f"up.{i}.up.conv", f"up_blocks.{i}.upsamplers.0.conv")
        km.head()
    return km.entries


def convert_sd15_state_dict(model: WarpFace, sd_state: Mapping[str, torch.Tensor], *,
                            flip_sin_to_cos: bool = True) -> dict[str, torch.Tensor]:
    """SD UNet state dict -> {WarpFace parameter name: tensor} for both UNets.

    Raises ValueError naming the key when the SD state lacks a key the map needs, holds a key
    with no place (other than the documented ``IGNORED`` ones), or when a shape differs
    (expected: ours, received: SD's). Works on meta tensors (shape checks without weights)."""
    return _mapping(model, sd_state, flip_sin_to_cos).tensors


def _mapping(model: WarpFace, sd_state: Mapping[str, torch.Tensor], flip_sin_to_cos: bool):
    entries = [dataclasses.replace(e, target=f"{prefix}.{e.target}") for prefix in UNETS
               for e in unet_key_map(getattr(model, prefix), flip_sin_to_cos=flip_sin_to_cos)]
    return map_sd15_weights(dict(model.named_parameters()), sd_state, entries, ignored=IGNORED,
                            owner="WarpFace's UNets")


def check_sd15_config(cfg: WarpFaceConfig, sd_config: dict, where: str = "config.json") -> None:
    """Raise ValueError naming the field, the value WarpFace's config needs and the folder's,
    when the SD UNet's config.json does not describe the UNet-lite of ``cfg``."""
    if cfg.feed_forward != "geglu" or cfg.transformer_norm_eps != 1e-6:
        raise ValueError(f"SD1.5 weights need feed_forward='geglu' and transformer_norm_eps=1e-6 "
                         f"(the paper config), got {cfg.feed_forward!r} and "
                         f"{cfg.transformer_norm_eps}")
    if any(c % 32 for c in cfg.channels):
        raise ValueError(f"SD's GroupNorm has 32 groups: every width must be a multiple of 32, "
                         f"got channels {list(cfg.channels)}")
    expectations = sd15_layout_expectations(
        in_channels=cfg.in_channels, channels=cfg.channels,
        layers_per_block=cfg.layers_per_block, attention_levels=cfg.attention_levels)
    check_sd15_fields(sd_config, expectations, heads=cfg.heads, levels=len(cfg.channels),
                      where=where, owner=f"this WarpFace config ({cfg.name})")


def load_sd15_unets(model: WarpFace, path: str | os.PathLike) -> dict:
    """Copy a local SD1.5 UNet's weights into ``model``'s ReferenceNet and DenoisingNet (nothing
    downloads). The config is checked first, then every key and shape (ValueError naming it);
    the model is only written once everything matched. Returns a record for the checkpoint
    (:func:`avatar_models.sd15_weights.load_sd15_unet`): ``folder``, ``file`` and the number of
    parameters loaded and kept at their init."""
    return load_sd15_unet(
        model, path,
        check_config=lambda sd_config, where: check_sd15_config(model.config, sd_config, where),
        convert=lambda state, sd_config: _mapping(model, state,
                                                  sd_config.get("flip_sin_to_cos", True)),
        unet_prefixes=UNETS)
