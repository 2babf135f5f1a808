"""SD1.5 weights for MCDM's denoiser: a key map from a local diffusers ``UNet2DConditionModel``
(``<folder>/unet`` or the unet folder itself) into :class:`avatar_models.mcdm.Denoiser` built with
``unet_layout="sd15"`` (the ``paper`` config). The generic parts (folder, config fields, weight
file, the map's application with key and shape checks) are :mod:`avatar_models.sd15_weights`.

Map (diffusers name -> ours, under ``denoiser.``):

- ``conv_in`` -> ``conv_in``; ``time_embedding.linear_1`` / ``linear_2`` -> ``t_embed.mlp.0`` /
  ``mlp.2`` (linear_1's [cos, sin] input columns swapped to ``sincos_1d``'s [sin, cos]);
- ``down_blocks.i.resnets.j`` / ``attentions.j`` -> ``down.i.0.j.0`` / ``down.i.0.j.1``;
  ``down_blocks.i.downsamplers.0.conv`` -> ``down.i.1.conv``; ``mid_block.resnets.0`` /
  ``attentions.0`` / ``resnets.1`` -> ``mid.0`` / ``mid.1`` / ``mid.2``; ``up_blocks.i.*`` ->
  ``up.i.0.j.*``, ``up_blocks.i.upsamplers.0.conv`` -> ``up.i.1.conv``; ``conv_norm_out`` /
  ``conv_out`` -> ``norm_out`` / ``conv_out``. Resnets, down- and upsamplers are diffusers'
  own modules: every parameter under the same name.
- a transformer (``attentions.j`` -> :class:`avatar_models.mcdm.MCDMTransformer`): ``norm`` ->
  ``norm_in``; ``proj_in`` / ``proj_out`` (1x1 convs in SD1.5) -> linears; in
  ``transformer_blocks.0``: ``norm1`` -> ``norm_self``, ``attn1.to_q`` + ``to_k`` + ``to_v`` ->
  ``self_attn.qkv`` (stacked; SD has no q/k/v bias: ours is set to 0), ``attn1.to_out.0`` ->
  ``self_attn.proj``, ``norm3`` -> ``norm_ff``, ``ff.net.0.proj`` / ``ff.net.2`` -> ``ff.proj`` /
  ``ff.out``.

**The two reference attentions (CHOSEN initialisation).** SD1.5's text cross-attention (``norm2``,
``attn2``) sits where MCDM's archived-clip and present-clip reference attentions are. Their query
side reads the same hidden states, so both take ``norm2`` -> ``norm`` and ``attn2.to_q`` -> ``q``
(bias 0). Their keys / values (``kv``) keep their init: SD's ``to_k`` / ``to_v`` read CLIP text
embeddings (768-d), ours read F_ac / motion tokens; in the ``paper`` config the shapes happen to
agree (d = dm = 768), the meaning does not. Their output projections keep their init too, so the
loaded denoiser computes SD1.5's UNet without text: the archived-clip attention's ``proj`` is
zero-initialised (it adds 0 until stage 1 trains it) and the present-clip attention reaches the
stream only through the temporal layer.

**The temporal layer** (``temporal.*``) keeps its init: zero output projection, the identity.

**SD weights with no place** (ignored, by design, listed in the load record's ``sd_unused``):
every ``attn2.to_k`` / ``to_v`` / ``to_out.0`` (the text cross-attention's). Any other key the
folder holds, any key the map needs that it lacks, and any shape that differs raise
``ValueError`` naming the key, the expected and the received shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from avatar_models.mcdm import MCDM, Denoiser, MCDMConfig
from avatar_models.sd15_weights import (
    KeyMap,
    MappedWeight,
    SD15Mapping,
    check_sd15_fields,
    load_sd15_unet,
    map_sd15_weights,
    sd15_layout_expectations,
)

# SD weights that have no place in MCDM (the text cross-attention's keys, values and output)
IGNORED = re.compile(r".*\.attn2\.(to_k\.weight|to_v\.weight|to_out\.0\.(weight|bias))$")
PREFIX = "denoiser"


def denoiser_key_map(denoiser: Denoiser, *, flip_sin_to_cos: bool = True) -> list[MappedWeight]:
    """The map for an ``unet_layout="sd15"`` denoiser (targets relative to it), in its order."""
    cfg = denoiser.config
    if cfg.unet_layout != "sd15":
        raise ValueError(f"SD1.5 weights need unet_layout='sd15' (the paper config's), got "
                         f"{cfg.unet_layout!r} (config {cfg.name!r})")
    km = KeyMap()

    def transformer(ours: str, sd: str) -> None:
        tb = f"{sd}.transformer_blocks.0"
        km.linear(f"{ours}.norm_in", f"{sd}.norm")
        km.linear(f"{ours}.proj_in", f"{sd}.proj_in", op="conv1x1")
        km.linear(f"{ours}.norm_self", f"{tb}.norm1")
        km.add(f"{ours}.self_attn.qkv.weight",
               [f"{tb}.attn1.to_{x}.weight" for x in "qkv"], "stack")
        km.add(f"{ours}.self_attn.qkv.bias", (), "zeros")
        km.linear(f"{ours}.self_attn.proj", f"{tb}.attn1.to_out.0")
        for ref in ("archived_attn", "present_attn"):
            km.linear(f"{ours}.{ref}.norm", f"{tb}.norm2")
            km.linear(f"{ours}.{ref}.q", f"{tb}.attn2.to_q", bias=False)
            km.add(f"{ours}.{ref}.q.bias", (), "zeros")
        km.linear(f"{ours}.norm_ff", f"{tb}.norm3")
        km.linear(f"{ours}.ff.proj", f"{tb}.ff.net.0.proj")
        km.linear(f"{ours}.ff.out", f"{tb}.ff.net.2")
        km.linear(f"{ours}.proj_out", f"{sd}.proj_out", op="conv1x1")

    def pairs(ours: str, sd: str, layers) -> None:
        for j, layer in enumerate(layers):
            km.same_names(f"{ours}.{j}.0", f"{sd}.resnets.{j}", layer[0])
            if len(layer) > 1:
                transformer(f"{ours}.{j}.1", f"{sd}.attentions.{j}")

    km.stem(flip_sin_to_cos=flip_sin_to_cos)
    for i, (layers, sample) in enumerate(denoiser.down):
        pairs(f"down.{i}.0", f"down_blocks.{i}", layers)
        km.same_names(f"down.{i}.1", f"down_blocks.{i}.downsamplers.0", sample)
    km.same_names("mid.0", "mid_block.resnets.0", denoiser.mid[0])
    transformer("mid.1", "mid_block.attentions.0")
    km.same_names("mid.2", "mid_block.resnets.1", denoiser.mid[2])
    for i, (layers, sample) in enumerate(denoiser.up):
        pairs(f"up.{i}.0", f"up_blocks.{i}", layers)
        km.same_names(f"up.{i}.1", f"up_blocks.{i}.upsamplers.0", sample)
    km.head()
    return km.entries


def sd15_mapping(model: MCDM, sd_state: Mapping[str, torch.Tensor], *,
                 flip_sin_to_cos: bool = True) -> SD15Mapping:
    """SD UNet state dict -> :class:`avatar_models.sd15_weights.SD15Mapping` onto ``model``'s
    parameters (``denoiser.*`` names). ValueError naming the key for a missing key, a shape
    that differs or a key with no place; works on meta tensors (no weights allocated)."""
    entries = [MappedWeight(f"{PREFIX}.{e.target}", e.sources, e.op)
               for e in denoiser_key_map(model.denoiser, flip_sin_to_cos=flip_sin_to_cos)]
    return map_sd15_weights(dict(model.named_parameters()), sd_state, entries, ignored=IGNORED,
                            owner="MCDM's denoiser")


def check_sd15_config(cfg: MCDMConfig, sd_config: dict, where: str = "config.json") -> None:
    """ValueError naming the field, the value ``cfg`` needs and the folder's, when the SD UNet's
    config.json does not describe the denoiser of ``cfg``."""
    if cfg.unet_layout != "sd15":
        raise ValueError(f"SD1.5 weights need unet_layout='sd15' (the paper config's), got "
                         f"{cfg.unet_layout!r} (config {cfg.name!r})")
    expectations = sd15_layout_expectations(
        in_channels=cfg.in_channels, channels=cfg.channels,
        layers_per_block=cfg.layers_per_level, attention_levels=cfg.levels_with_attention,
        groups=cfg.groups)
    check_sd15_fields(sd_config, expectations, heads=cfg.heads, levels=len(cfg.channels),
                      where=where, owner=f"this MCDM config ({cfg.name})")


def load_sd15_denoiser(model: MCDM, path: str | os.PathLike) -> dict:
    """Copy a local SD1.5 UNet's weights into ``model.denoiser`` (nothing downloads). The config
    is checked first, then every key and shape (ValueError naming it); the model is only written
    once everything matched. Returns the record of
    :func:`avatar_models.sd15_weights.load_sd15_unet` (``folder``, ``file``, ``loaded``,
    ``zeroed``, ``kept_init``, ``sd_used``, ``sd_unused``)."""
    return load_sd15_unet(
        model, path,
        check_config=lambda sd_config, where: check_sd15_config(model.config, sd_config, where),
        convert=lambda state, sd_config: sd15_mapping(
            model, state, flip_sin_to_cos=sd_config.get("flip_sin_to_cos", True)),
        unet_prefixes=(f"{PREFIX}.",))
