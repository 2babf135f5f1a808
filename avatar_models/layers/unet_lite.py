"""UNet-lite blocks with Stable Diffusion 1.5's block structure, in plain torch.

``ResBlock`` (GroupNorm-SiLU-conv, timestep embedding added, GroupNorm-SiLU-conv, 1x1 skip when
the width changes), ``Downsample`` (stride-2 conv), ``Upsample`` (nearest x2 then conv): the
ResnetBlock2D / Downsample2D / Upsample2D of diffusers' UNet2DConditionModel, same order of
operations, so an SD-shaped UNet-lite has the same stages, widths and resolutions. Attention is
the system's business (it decides what enters the keys and values).
"""

from __future__ import annotations

import torch
from torch import nn


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with SD's 32 groups, fewer when the width is not a multiple of 32 (tiny)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=eps)


class ResBlock(nn.Module):
    """x [B, Cin, H, W], temb [B, T] -> [B, Cout, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))                 # [B, Cout, H, W]
        h = h + self.temb(nn.functional.silu(temb))[:, :, None, None]     # [B, Cout, H, W]
        h = self.conv2(nn.functional.silu(self.norm2(h)))                 # [B, Cout, H, W]
        return self.skip(x) + h


class Downsample(nn.Module):
    """[B, C, H, W] -> [B, C, H/2, W/2] (stride-2 3x3 conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C, 2H, 2W] (nearest, then 3x3 conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class GegluFeedForward(nn.Module):
    """SD's transformer feed-forward (diffusers' FeedForward with GEGLU): x [B, N, C] ->
    Linear(C, 2 hidden) -> value * GELU(gate) (exact GELU) -> Linear(hidden, C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)                       # [B, N, hidden] each
        return self.out(value * nn.functional.gelu(gate))                # [B, N, C]
