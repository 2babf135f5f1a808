"""Attention processors that run diffusers' video transformers on :func:`kernels.attention3d`.

    from kernels.integrations.diffusers import use_attention3d
    use_attention3d(pipe.transformer)     # WanTransformer3DModel or CogVideoXTransformer3DModel

Self-attention goes through ``attention3d`` with the model's interleaved 3D RoPE applied inside
the kernel from token positions (``interleaved=True``); cross-attention (Wan's text and image
context) goes through ``attention3d`` without RoPE. Where the positions come from (see README):
- Wan: from the latent grid, captured by a forward pre-hook on the model (the model's own RoPE is
  the integer (frame, row, column) of each patch);
- CogVideoX: from the pipeline's ``image_rotary_emb`` tables, which the processor inverts once per
  table tensor (the pipeline may crop and rescale the grid, so the model alone cannot know them);
  the text tokens, which share the sequence, get position (0, 0, 0): a rotation by angle 0, so
  they stay unrotated.

diffusers is imported only inside these functions; ``import kernels`` never imports it.
"""

from __future__ import annotations

import math
import sys

import torch

from kernels.attention.op import attention3d
from kernels.attention.ref import rope_inv_freq

# the theta of WanRotaryPosEmbed and of get_3d_rotary_pos_embed as the models call them
ROPE_THETA = 10000.0


def use_attention3d(model):
    """Swap, in place, every attention processor of a diffusers ``WanTransformer3DModel`` or
    ``CogVideoXTransformer3DModel`` for one that runs :func:`kernels.attention3d` (backend chosen
    by :mod:`kernels.registry`, e.g. ``with kernels.backend("triton"):``). Returns ``model``.

    Raises:
        TypeError: ``model`` is neither of those classes (the message names its class).
    """
    supported = _supported_classes()
    if isinstance(model, supported.get("wan", ())):
        grid = getattr(model, "_attention3d_grid", None)
        if grid is None:  # (a second call reuses the hook installed by the first)
            grid = model._attention3d_grid = _LatentGrid()
            model.register_forward_pre_hook(grid.capture_wan, with_kwargs=True)
        model.set_attn_processor(WanAttention3DProcessor(grid))
        return model
    if isinstance(model, supported.get("cogvideox", ())):
        model.set_attn_processor(CogVideoXAttention3DProcessor())
        return model
    raise TypeError("use_attention3d supports diffusers' WanTransformer3DModel and "
                    f"CogVideoXTransformer3DModel, got {type(model).__name__}")


def _supported_classes() -> dict[str, type]:
    if "diffusers" not in sys.modules:  # a diffusers model implies diffusers was imported
        return {}
    from diffusers.models.transformers.cogvideox_transformer_3d import (
        CogVideoXTransformer3DModel,
    )
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
    return {"wan": WanTransformer3DModel, "cogvideox": CogVideoXTransformer3DModel}


def grid_positions(frames: int, height: int, width: int, device) -> torch.Tensor:
    """int32 [frames*height*width, 3] (t, y, x) in the row-major token order of a patchified
    video latent."""
    t, y, x = torch.meshgrid(torch.arange(frames, device=device, dtype=torch.int32),
                             torch.arange(height, device=device, dtype=torch.int32),
                             torch.arange(width, device=device, dtype=torch.int32), indexing="ij")
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------
# Wan


class _LatentGrid:
    """The post-patch latent grid (frames, height, width) of the model's current forward."""

    def __init__(self) -> None:
        self.grid: tuple[int, int, int] | None = None
        self._positions: dict[tuple, torch.Tensor] = {}

    def capture_wan(self, model, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape                      # [B, C, F, H, W]
        p_t, p_h, p_w = model.config.patch_size
        self.grid = (frames // p_t, height // p_h, width // p_w)

    def positions(self, device) -> torch.Tensor:
        if self.grid is None:
            raise RuntimeError("the Wan attention3d processor runs inside "
                               "WanTransformer3DModel.forward (its pre-hook captures the grid)")
        key = (self.grid, str(device))
        if key not in self._positions:
            if len(self._positions) > 8:
                self._positions.clear()
            self._positions[key] = grid_positions(*self.grid, device)
        return self._positions[key]


def _wan_rope_dims(head_dim: int) -> tuple[int, int, int]:
    """WanRotaryPosEmbed's split: h = w = 2 * (D // 6), t takes the rest."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _no_mask(attention_mask) -> None:
    if attention_mask is not None:
        raise ValueError("attention3d processors take no attention_mask (attention3d is "
                         f"unmasked), got a tensor of shape {tuple(attention_mask.shape)}")


class WanAttention3DProcessor:
    """diffusers' ``WanAttnProcessor`` with attention3d: same projections, norms and output
    layers; RoPE from the captured latent grid, in the kernel."""

    def __init__(self, grid: _LatentGrid) -> None:
        self.grid = grid

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        from diffusers.models.transformers.transformer_wan import (
            _get_added_kv_projections,
            _get_qkv_projections,
        )

        _no_mask(attention_mask)
        context_img = None
        if attn.add_k_proj is not None:  # I2V: image tokens, then 512 text tokens (as diffusers)
            image_len = encoder_hidden_states.shape[1] - 512
            context_img = encoder_hidden_states[:, :image_len]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))        # [B, N, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))            # [B, Nk, H, D]
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:  # self-attention over the video tokens
            positions = self.grid.positions(query.device)
            if positions.shape[0] != query.shape[1]:
                raise ValueError(f"hidden_states has {query.shape[1]} tokens but the captured "
                                 f"latent grid {self.grid.grid} has {positions.shape[0]}")
            out = attention3d(query, key, value, positions=positions,
                              rope_dims=_wan_rope_dims(query.shape[-1]), rope_theta=ROPE_THETA,
                              interleaved=True)
        else:  # cross-attention to the text: nothing is rotated
            out = attention3d(query, key, value)
        out = out.flatten(2, 3).type_as(query)                           # [B, N, H*D]

        if context_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, context_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            out = out + attention3d(query, key_img, value_img).flatten(2, 3).type_as(query)

        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# ----------------------------------------------------------------------------------------------
# CogVideoX


def _cogvideox_rope_dims(head_dim: int) -> tuple[int, int, int]:
    """get_3d_rotary_pos_embed's split: t = D // 4, h = w = D // 8 * 3."""
    return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def positions_from_rope_tables(cos: torch.Tensor, sin: torch.Tensor, rope_dims, theta: float,
                               *, tolerance: float = 1e-3) -> torch.Tensor:
    """float32 [N, 3] positions (t, y, x) whose interleaved 3D RoPE is the tables cos/sin [N, D].

    Per axis of size d, pair i holds angle pos * f_i with f_i = theta^(-2i/d), known modulo 2 pi.
    The lowest frequency gives pos directly while |pos * f_min| < pi (pos up to ~1e4 at d = 16);
    each higher frequency then fixes its own 2 pi wrap from the previous estimate (the ratio of
    neighbouring frequencies is theta^(2/d), small enough that the estimate's error never
    reaches half a turn), ending with f_0 = 1, where fp32 tables give pos to ~1e-7 * |pos|.

    Raises:
        ValueError: the tables are not such a RoPE (checked by rebuilding them).
    """
    angles = torch.atan2(sin[:, 0::2].double(), cos[:, 0::2].double())   # [N, D/2]
    columns, start = [], 0
    for d in rope_dims:
        freq = rope_inv_freq(d, theta, torch.float64, angles.device)     # [d/2], decreasing
        part = angles[:, start // 2:(start + d) // 2]
        pos = part[:, -1] / freq[-1]
        for i in range(d // 2 - 2, -1, -1):
            turns = torch.round((pos * freq[i] - part[:, i]) / (2 * math.pi))
            pos = (part[:, i] + 2 * math.pi * turns) / freq[i]
        columns.append(pos)
        start += d
    positions = torch.stack(columns, dim=-1)                             # [N, 3]

    angle = torch.cat([positions[:, axis:axis + 1] * rope_inv_freq(d, theta, torch.float64,
                                                                  angles.device)
                       for axis, d in enumerate(rope_dims)], dim=-1)     # [N, sum(d)/2]
    used = sum(rope_dims) // 2
    error = max((torch.cos(angle) - cos[:, 0:2 * used:2].double()).abs().max().item(),
                (torch.sin(angle) - sin[:, 0:2 * used:2].double()).abs().max().item())
    if not error <= tolerance:
        raise ValueError(f"image_rotary_emb is not the interleaved 3D RoPE of rope_dims="
                         f"{tuple(rope_dims)} and theta={theta} of any positions (tables "
                         f"rebuilt from the best positions differ by {error:.2e})")
    return positions.float()


class CogVideoXAttention3DProcessor:
    """diffusers' ``CogVideoXAttnProcessor2_0`` with attention3d over [text; video] tokens; the
    video tokens' RoPE is applied in the kernel from positions recovered from the tables."""

    def __init__(self) -> None:
        self._tables_key: tuple | None = None
        self._positions: torch.Tensor | None = None

    def _video_positions(self, tables: tuple[torch.Tensor, torch.Tensor],
                         head_dim: int) -> torch.Tensor:
        cos, sin = tables
        # the pipeline builds the tables once per generation and every block and step reuses
        # them: invert (one host sync for the check) once per table tensor
        key = (cos.data_ptr(), sin.data_ptr(), tuple(cos.shape), cos._version, sin._version,
               head_dim)
        if key != self._tables_key:
            if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[-1] != head_dim:
                raise ValueError(f"image_rotary_emb must be (cos, sin) of shape [N, {head_dim}], "
                                 f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
            self._positions = positions_from_rope_tables(
                cos, sin, _cogvideox_rope_dims(head_dim), ROPE_THETA)
            self._tables_key = key
        return self._positions

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        _no_mask(attention_mask)
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, N, C]
        batch, n, _ = hidden_states.shape
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = (attn.to_q(hidden_states), attn.to_k(hidden_states),
                                 attn.to_v(hidden_states))
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, n, attn.heads, head_dim)              # [B, N, H, D]
        key = key.view(batch, n, attn.heads, head_dim)
        value = value.view(batch, n, attn.heads, head_dim)
        if attn.norm_q is not None:  # LayerNorm over the head dim: any layout
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            video = self._video_positions(image_rotary_emb, head_dim).to(query.device)
            if video.shape[0] != n - text_len:
                raise ValueError(f"image_rotary_emb covers {video.shape[0]} tokens, the video "
                                 f"has {n - text_len}")
            positions = torch.cat([video.new_zeros(text_len, 3), video])  # text: angle 0
            if attn.is_cross_attention:  # diffusers rotates only the queries then
                positions = (positions, torch.zeros_like(positions))
            out = attention3d(query, key, value, positions=positions,
                              rope_dims=_cogvideox_rope_dims(head_dim), rope_theta=ROPE_THETA,
                              interleaved=True)
        else:
            out = attention3d(query, key, value)
        out = out.reshape(batch, n, attn.heads * head_dim)               # [B, N, H*D]
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text_len, n - text_len], dim=1)
        return hidden_states, encoder_hidden_states
