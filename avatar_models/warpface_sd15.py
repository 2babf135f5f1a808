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

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from avatar_models.conditioning._checks import resolve_model_dir
from avatar_models.layers.unet_lite import ResBlock
from avatar_models.warpface import LatentUNet, Transformer, WarpFace, WarpFaceConfig

EXPECTED = ("a diffusers UNet2DConditionModel folder (config.json, "
            "diffusion_pytorch_model.safetensors), or a Stable Diffusion folder holding it as "
            "unet/")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
# SD weights that have no place in WarpFace (see the module docstring)
IGNORED = re.compile(r".*\.attn2\.(to_k|to_v|to_out\.0)\.(weight|bias)$"
                     r"|down_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.0\."
                     r"(norm2\.(weight|bias)|attn2\.to_q\.weight)$")


@dataclass(frozen=True)
class MappedWeight:
    """One parameter of ours from one or more SD tensors: ``copy``, ``stack`` (concatenate along
    dim 0: to_k + to_v -> kv), ``conv1x1`` (a [C, C, 1, 1] conv to a [C, C] linear; SD2's
    linear projections pass as they are) or ``swap_halves`` (linear_1's sin / cos columns)."""

    target: str
    sources: tuple[str, ...]
    op: str = "copy"


def unet_key_map(net: LatentUNet, *, flip_sin_to_cos: bool = True) -> list[MappedWeight]:
    """The map for one UNet-lite (``role`` reference or denoising), in its parameter order."""
    entries: list[MappedWeight] = []

    def linear(ours: str, sd: str, *, bias: bool = True, op: str = "copy") -> None:
        entries.append(MappedWeight(f"{ours}.weight", (f"{sd}.weight",), op))
        if bias:
            entries.append(MappedWeight(f"{ours}.bias", (f"{sd}.bias",)))

    def resblock(ours: str, sd: str, block: ResBlock) -> None:
        for mine, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("temb", "time_emb_proj"),
                             ("norm2", "norm2"), ("conv2", "conv2")):
            linear(f"{ours}.{mine}", f"{sd}.{theirs}")
        if not isinstance(block.skip, nn.Identity):
            linear(f"{ours}.skip", f"{sd}.conv_shortcut")

    def transformer(ours: str, sd: str, block: Transformer) -> None:
        tb = f"{sd}.transformer_blocks.0"
        linear(f"{ours}.norm", f"{sd}.norm")
        linear(f"{ours}.proj_in", f"{sd}.proj_in", op="conv1x1")
        linear(f"{ours}.norm1", f"{tb}.norm1")
        linear(f"{ours}.attn.q", f"{tb}.attn1.to_q", bias=False)
        entries.append(MappedWeight(f"{ours}.attn.kv.weight",
                                    (f"{tb}.attn1.to_k.weight", f"{tb}.attn1.to_v.weight"),
                                    "stack"))
        linear(f"{ours}.attn.proj", f"{tb}.attn1.to_out.0")
        if block.motion is not None:
            linear(f"{ours}.motion.norm", f"{tb}.norm2")
            linear(f"{ours}.motion.q", f"{tb}.attn2.to_q", bias=False)
        linear(f"{ours}.norm3", f"{tb}.norm3")
        linear(f"{ours}.ff.proj", f"{tb}.ff.net.0.proj")
        linear(f"{ours}.ff.out", f"{tb}.ff.net.2")
        linear(f"{ours}.proj_out", f"{sd}.proj_out", op="conv1x1")

    def layer_pairs(ours: str, sd: str, layers) -> None:
        for j, (res, attn) in enumerate(layers):
            resblock(f"{ours}.layers.{j}.0", f"{sd}.resnets.{j}", res)
            if isinstance(attn, Transformer):
                transformer(f"{ours}.layers.{j}.1", f"{sd}.attentions.{j}", attn)

    linear("conv_in", "conv_in")
    linear("t_embed.mlp.0", "time_embedding.linear_1")
    if flip_sin_to_cos:
        entries[-2] = MappedWeight("t_embed.mlp.0.weight", ("time_embedding.linear_1.weight",),
                                   "swap_halves")
    linear("t_embed.mlp.2", "time_embedding.linear_2")
    for i, stage in enumerate(net.down):
        layer_pairs(f"down.{i}", f"down_blocks.{i}", stage["layers"])
        if "down" in stage:
            linear(f"down.{i}.down.conv", f"down_blocks.{i}.downsamplers.0.conv")
    resblock("mid_res1", "mid_block.resnets.0", net.mid_res1)
    transformer("mid_attn", "mid_block.attentions.0", net.mid_attn)
    if net.role == "denoising":
        resblock("mid_res2", "mid_block.resnets.1", net.mid_res2)
        for i, stage in enumerate(net.up):
            layer_pairs(f"up.{i}", f"up_blocks.{i}", stage["layers"])
            if "up" in stage:
                linear(f"up.{i}.up.conv", f"up_blocks.{i}.upsamplers.0.conv")
        linear("norm_out", "conv_norm_out")
        linear("conv_out", "conv_out")
    return entries


def _convert(entry: MappedWeight, tensors: list[torch.Tensor]) -> torch.Tensor:
    if entry.op == "stack":
        return torch.cat(tensors, dim=0)
    (x,) = tensors
    if entry.op == "conv1x1" and x.dim() == 4 and x.shape[2:] == (1, 1):
        return x[:, :, 0, 0]
    if entry.op == "swap_halves":
        half = x.shape[1] // 2
        return torch.cat([x[:, half:], x[:, :half]], dim=1)
    return x


def convert_sd15_state_dict(model: WarpFace, sd_state: Mapping[str, torch.Tensor], *,
                            flip_sin_to_cos: bool = True) -> dict[str, torch.Tensor]:
    """SD UNet state dict -> {WarpFace parameter name: tensor} for both UNets.

    Raises ValueError naming the key when the SD state lacks a key the map needs, holds a key
    with no place (other than the documented ``IGNORED`` ones), or when a shape differs
    (expected: ours, received: SD's). Works on meta tensors (shape checks without weights)."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for prefix in ("reference_net", "denoising_net"):
        for entry in unet_key_map(getattr(model, prefix), flip_sin_to_cos=flip_sin_to_cos):
            missing = [k for k in entry.sources if k not in sd_state]
            if missing:
                raise ValueError(f"SD1.5 UNet weights lack {missing[0]!r} (needed for "
                                 f"{prefix}.{entry.target}); is the folder an SD1.5-layout "
                                 f"UNet2DConditionModel?")
            value = _convert(entry, [sd_state[k] for k in entry.sources])
            target = params[f"{prefix}.{entry.target}"]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"SD1.5 weight {' + '.join(map(repr, entry.sources))} -> "
                                 f"{prefix}.{entry.target}: expected shape "
                                 f"{list(target.shape)}, received {list(value.shape)}")
            out[f"{prefix}.{entry.target}"] = value
            used.update(entry.sources)
    extra = sorted(k for k in sd_state if k not in used and not IGNORED.fullmatch(k))
    if extra:
        raise ValueError(f"SD1.5 UNet weights hold {len(extra)} key(s) with no place in WarpFace's "
                         f"UNets, first {extra[0]!r} (shape {list(sd_state[extra[0]].shape)}): "
                         f"the folder's architecture differs from the config's")
    return out


def _config_expectations(cfg: WarpFaceConfig) -> dict[str, tuple[object, object]]:
    """config.json field -> (the value WarpFace needs, diffusers' default when absent)."""
    levels = cfg.attention_levels
    return {
        "_class_name": ("UNet2DConditionModel", None),
        "in_channels": (cfg.in_channels, 4),
        "out_channels": (cfg.in_channels, 4),
        "block_out_channels": (list(cfg.channels), [320, 640, 1280, 1280]),
        "layers_per_block": (cfg.layers_per_block, 2),
        "down_block_types": ([("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in levels],
                             None),
        "up_block_types": ([("CrossAttnUpBlock2D" if a else "UpBlock2D")
                            for a in reversed(levels)], None),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
        "transformer_layers_per_block": (1, 1),
        "norm_num_groups": (32, 32),
        "norm_eps": (1e-5, 1e-5),
        "act_fn": ("silu", "silu"),
        "freq_shift": (0, 0),
        "downsample_padding": (1, 1),
        "time_embedding_type": ("positional", "positional"),
        "time_embedding_dim": (None, None),
        "time_cond_proj_dim": (None, None),
        "timestep_post_act": (None, None),
        "class_embed_type": (None, None),
        "addition_embed_type": (None, None),
        "resnet_time_scale_shift": ("default", "default"),
        "only_cross_attention": (False, False),
        "dual_cross_attention": (False, False),
        "center_input_sample": (False, False),
        "conv_in_kernel": (3, 3),
        "conv_out_kernel": (3, 3),
    }


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
    for field, (expected, default) in _config_expectations(cfg).items():
        got = sd_config.get(field, default)
        if isinstance(got, list) and field == "layers_per_block" and len(set(got)) == 1:
            got = got[0]
        if got != expected:
            raise ValueError(f"{where}: {field} must be {expected!r} for this WarpFace config "
                             f"({cfg.name}), got {got!r}")
    heads = sd_config.get("num_attention_heads") or sd_config.get("attention_head_dim", 8)
    # diffusers' SD1.5 config names the number of heads attention_head_dim
    heads = heads if isinstance(heads, list) else [heads] * len(cfg.channels)
    if any(h != cfg.heads for h in heads):
        raise ValueError(f"{where}: the attention heads (attention_head_dim) must be "
                         f"{cfg.heads} at every level, got {heads}")


def sd15_unet_folder(path: str | os.PathLike) -> Path:
    """``path/unet`` when ``path`` is a Stable Diffusion folder, else ``path`` itself; checked
    (FileNotFoundError naming the folder and what it must hold)."""
    path = Path(path).expanduser()
    sub = "unet" if (path / "unet").is_dir() else None
    return resolve_model_dir(path, "SD1.5 UNet", EXPECTED, subfolder=sub)


def read_sd15_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{str(folder / 'config.json')!r} is not JSON; expected "
                         f"{EXPECTED}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(folder / 'config.json')!r} is not a JSON object")
    return config


def _weight_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {str(folder)!r}; expected "
                            f"{EXPECTED}")


def load_sd15_unets(model: WarpFace, path: str | os.PathLike) -> dict:
    """Copy a local SD1.5 UNet's weights into ``model``'s ReferenceNet and DenoisingNet (nothing
    downloads). The config is checked first, then every key and shape (ValueError naming it);
    the model is only written once everything matched. Returns a record for the checkpoint:
    ``folder``, ``file`` and the number of parameters loaded and kept at their init."""
    from safetensors.torch import load_file

    folder = sd15_unet_folder(path)
    sd_config = read_sd15_config(folder)
    check_sd15_config(model.config, sd_config, str(folder / "config.json"))
    weights = _weight_file(folder)
    converted = convert_sd15_state_dict(model, load_file(str(weights)),
                                        flip_sin_to_cos=sd_config.get("flip_sin_to_cos", True))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in converted.items():
            params[name].copy_(value)
    unet_params = [n for n in params if n.startswith(("reference_net.", "denoising_net."))]
    return {"folder": str(folder.resolve()), "file": weights.name, "loaded": len(converted),
            "kept_init": len(unet_params) - len(converted)}
