"""Stable Diffusion 1.5 UNet weights from a local diffusers folder: what every system's key map
shares (WarpFace's in ``warpface_sd15.py``, MCDM's in ``mcdm_sd15.py``).

- the folder: ``<folder>/unet`` of a Stable Diffusion pipeline folder, or a
  ``UNet2DConditionModel`` folder itself (``config.json`` and the safetensors weights);
- ``config.json``: the fields SD1.5's layout fixes, checked against a model's config with an error
  naming the field, the value needed and the folder's;
- :class:`MappedWeight` / :class:`KeyMap`: one parameter of ours from SD tensors, with the few
  conversions the systems need; :func:`map_sd15_weights` applies a map with key and shape checks;
- :func:`load_sd15_unet`: folder -> checked config -> weights -> mapped -> copied, writing the model
  only once everything matched. Nothing downloads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from avatar_models.conditioning._checks import resolve_model_dir

EXPECTED = ("a diffusers UNet2DConditionModel folder (config.json, "
            "diffusion_pytorch_model.safetensors), or a Stable Diffusion folder holding it as "
            "unet/")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
MAP_OPS = ("copy", "stack", "conv1x1", "swap_halves", "zeros")


@dataclass(frozen=True)
class MappedWeight:
    """One parameter of ours (``target``) from SD tensors (``sources``): ``copy``; ``stack``
    (concatenate along dim 0: to_k + to_v -> kv, or to_q + to_k + to_v -> qkv); ``conv1x1`` (a
    [C, C, 1, 1] conv to a [C, C] linear; SD2's linear projections pass as they are);
    ``swap_halves`` (time_embedding.linear_1's [cos, sin] input columns to [sin, cos]); ``zeros``
    (no source: a bias SD does not have, set to 0 so the layer computes SD's function)."""

    target: str
    sources: tuple[str, ...]
    op: str = "copy"

    def __post_init__(self):
        if self.op not in MAP_OPS:
            raise ValueError(f"op must be one of {MAP_OPS}, got {self.op!r}")
        if (self.op == "zeros") != (not self.sources):
            raise ValueError(f"{self.target}: op 'zeros' and only it has no sources, got "
                             f"op={self.op!r}, sources={self.sources}")


class KeyMap:
    """Builder of a ``list[MappedWeight]`` (``entries``), in the order of the calls."""

    def __init__(self):
        self.entries: list[MappedWeight] = []

    def add(self, target: str, sources: Sequence[str], op: str = "copy") -> None:
        self.entries.append(MappedWeight(target, tuple(sources), op))

    def linear(self, ours: str, sd: str, *, bias: bool = True, op: str = "copy") -> None:
        """``ours.weight`` <- ``sd.weight`` (through ``op``) and ``ours.bias`` <- ``sd.bias``."""
        self.add(f"{ours}.weight", (f"{sd}.weight",), op)
        if bias:
            self.add(f"{ours}.bias", (f"{sd}.bias",))

    def same_names(self, ours: str, sd: str, module: nn.Module) -> None:
        """Every parameter of ``module`` (a diffusers block reused as it is: ResnetBlock2D,
        Downsample2D, Upsample2D) from the SD key of the same name."""
        for name, _ in module.named_parameters():
            self.add(f"{ours}.{name}", (f"{sd}.{name}",))

    def stem(self, *, conv_in: str = "conv_in", t_embed: str = "t_embed",
             flip_sin_to_cos: bool = True) -> None:
        """``conv_in`` and the timestep MLP (``avatar_models.layers.TimestepEmbedder``): its
        ``sincos_1d`` is [sin, cos], diffusers' is [cos, sin] when ``flip_sin_to_cos`` (SD1.5),
        so the halves of ``linear_1``'s input columns are swapped."""
        self.linear(conv_in, "conv_in")
        self.linear(f"{t_embed}.mlp.0", "time_embedding.linear_1",
                    op="swap_halves" if flip_sin_to_cos else "copy")
        self.linear(f"{t_embed}.mlp.2", "time_embedding.linear_2")

    def head(self, *, norm_out: str = "norm_out", conv_out: str = "conv_out") -> None:
        self.linear(norm_out, "conv_norm_out")
        self.linear(conv_out, "conv_out")


def convert_tensor(entry: MappedWeight, tensors: list[torch.Tensor],
                   target: torch.Tensor) -> torch.Tensor:
    """Apply ``entry.op`` to its source tensors (``target``: our parameter, for ``zeros``)."""
    if entry.op == "zeros":
        return torch.zeros(target.shape, dtype=target.dtype, device=target.device)
    if entry.op == "stack":
        return torch.cat(tensors, dim=0)
    (x,) = tensors
    if entry.op == "conv1x1" and x.dim() == 4 and x.shape[2:] == (1, 1):
        return x[:, :, 0, 0]
    if entry.op == "swap_halves":
        half = x.shape[1] // 2
        return torch.cat([x[:, half:], x[:, :half]], dim=1)
    return x


@dataclass(frozen=True)
class SD15Mapping:
    """The result of :func:`map_sd15_weights`: ``tensors`` (our parameter name -> value),
    ``zeroed`` (those of them set to 0: biases SD does not have), ``used`` (the SD keys that
    went somewhere) and ``unused`` (the SD keys with no place, all of them matched by the
    system's documented ``ignored`` pattern)."""

    tensors: dict[str, torch.Tensor]
    zeroed: tuple[str, ...]
    used: tuple[str, ...]
    unused: tuple[str, ...]


def map_sd15_weights(params: Mapping[str, torch.Tensor], sd_state: Mapping[str, torch.Tensor],
                     entries: Iterable[MappedWeight], *, ignored: re.Pattern,
                     owner: str) -> SD15Mapping:
    """Apply a key map to an SD UNet state dict; ``params``: our parameters by name.

    Raises ValueError naming the key when the SD state lacks a key the map needs, when a
    converted shape differs from ours (expected: ours, received: SD's), or when it holds a key
    that is neither used nor matched by ``ignored`` (the folder's architecture differs: ``owner``
    names what the weights were meant for). Works on meta tensors (shape checks only)."""
    entries = list(entries)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for entry in entries:
        missing = [k for k in entry.sources if k not in sd_state]
        if missing:
            raise ValueError(f"SD1.5 UNet weights lack {missing[0]!r} (needed for "
                             f"{entry.target}); is the folder an SD1.5-layout "
                             f"UNet2DConditionModel?")
        target = params[entry.target]
        value = convert_tensor(entry, [sd_state[k] for k in entry.sources], target)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"SD1.5 weight {' + '.join(map(repr, entry.sources))} -> "
                             f"{entry.target}: expected shape {list(target.shape)}, received "
                             f"{list(value.shape)}")
        out[entry.target] = value
        used.update(entry.sources)
    unused = sorted(k for k in sd_state if k not in used)
    extra = [k for k in unused if not ignored.fullmatch(k)]
    if extra:
        raise ValueError(f"SD1.5 UNet weights hold {len(extra)} key(s) with no place in {owner}, "
                         f"first {extra[0]!r} (shape {list(sd_state[extra[0]].shape)}): the "
                         f"folder's architecture differs from the config's")
    zeroed = tuple(e.target for e in entries if e.op == "zeros")
    return SD15Mapping(out, zeroed, tuple(sorted(used)), tuple(unused))


# ---- config.json ----

def sd15_layout_expectations(*, in_channels: int, channels: Sequence[int], layers_per_block: int,
                             attention_levels: Sequence[bool],
                             groups: int = 32) -> dict[str, tuple[object, object]]:
    """config.json field -> (the value a model of these shapes needs, diffusers' default when
    the field is absent), for SD1.5's layout (the fields not listed here set no shape we use)."""
    return {
        "_class_name": ("UNet2DConditionModel", None),
        "in_channels": (in_channels, 4),
        "out_channels": (in_channels, 4),
        "block_out_channels": (list(channels), [320, 640, 1280, 1280]),
        "layers_per_block": (layers_per_block, 2),
        "down_block_types": ([("CrossAttnDownBlock2D" if a else "DownBlock2D")
                              for a in attention_levels], None),
        "up_block_types": ([("CrossAttnUpBlock2D" if a else "UpBlock2D")
                            for a in reversed(attention_levels)], None),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
        "transformer_layers_per_block": (1, 1),
        "norm_num_groups": (groups, 32),
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


def check_sd15_fields(sd_config: dict, expectations: Mapping[str, tuple[object, object]], *,
                      heads: int, levels: int, where: str, owner: str) -> None:
    """ValueError naming the field, the value ``owner`` (e.g. "this MCDM config (paper)")
    needs and the folder's, for every expectation and for the attention heads."""
    for field, (expected, default) in expectations.items():
        got = sd_config.get(field, default)
        if isinstance(got, list) and field == "layers_per_block" and len(set(got)) == 1:
            got = got[0]
        if got != expected:
            raise ValueError(f"{where}: {field} must be {expected!r} for {owner}, got {got!r}")
    found = sd_config.get("num_attention_heads") or sd_config.get("attention_head_dim", 8)
    # diffusers' SD1.5 config names the number of heads attention_head_dim
    found = found if isinstance(found, list) else [found] * levels
    if any(h != heads for h in found):
        raise ValueError(f"{where}: the attention heads (attention_head_dim) must be "
                         f"{heads} at every level, got {found}")


# ---- the folder ----

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


def sd15_weight_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {str(folder)!r}; expected "
                            f"{EXPECTED}")


def load_sd15_unet(model: nn.Module, path: str | os.PathLike, *,
                   check_config: Callable[[dict, str], None],
                   convert: Callable[[Mapping[str, torch.Tensor], dict], SD15Mapping],
                   unet_prefixes: tuple[str, ...]) -> dict:
    """Copy a local SD UNet's weights into ``model``: ``check_config(sd_config, where)`` first,
    then ``convert(sd_state, sd_config)`` (every key and shape checked), and the model is only
    written once everything matched. Returns a record for the checkpoint: ``folder``, ``file``,
    ``loaded`` (our tensors from SD tensors), ``zeroed`` (our biases SD lacks, set to 0),
    ``kept_init`` (tensors under ``unet_prefixes`` with no SD counterpart, left as they were),
    ``sd_used`` (how many SD tensors went somewhere) and ``sd_unused`` (the SD keys with no
    place, by design)."""
    from safetensors.torch import load_file

    folder = sd15_unet_folder(path)
    sd_config = read_sd15_config(folder)
    check_config(sd_config, str(folder / "config.json"))
    weights = sd15_weight_file(folder)
    mapped = convert(load_file(str(weights)), sd_config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in mapped.tensors.items():
            params[name].copy_(value)
    zeroed = len(mapped.zeroed)
    unet_params = [n for n in params if n.startswith(unet_prefixes)]
    return {"folder": str(folder.resolve()), "file": weights.name,
            "loaded": len(mapped.tensors) - zeroed, "zeroed": zeroed,
            "kept_init": len(unet_params) - len(mapped.tensors), "sd_used": len(mapped.used),
            "sd_unused": list(mapped.unused)}
