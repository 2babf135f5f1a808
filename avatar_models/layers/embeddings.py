"""Token embeddings shared by the video DiTs: patchify, sin-cos positions, timestep embedder.

Layouts: a frame batch is ``[F, C, H, W]``; its tokens are ``[F, P, D]`` with ``P = (H/p)*(W/p)``
patches in row-major order (row i, column j -> token ``i*(W/p) + j``), as in DiT.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal encoding of (possibly fractional) positions: ``[...] -> [..., dim]``.

    The first half of the channels holds ``sin(pos * w_i)``, the second ``cos(pos * w_i)`` with
    ``w_i = max_period^(-i/(dim/2))``; an odd ``dim`` gets one trailing zero channel.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[..., None] * freqs.to(positions.device)  # [..., half]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb.float()


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """2D sin-cos position embedding of a ``grid_h x grid_w`` patch grid: ``[grid_h*grid_w, dim]``.

    Half the channels encode the row, half the column (DiT / MAE). ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # [P]
    cols = torch.arange(grid_w).repeat(grid_h)             # [P]
    return torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], dim=-1)


def temporal_sincos(frames: int | torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal temporal position encoding TPE_t: ``[T, dim]`` for ``t = 0..T-1`` (or for the
    given positions tensor, ``[...] -> [..., dim]``)."""
    positions = torch.arange(frames) if isinstance(frames, int) else frames
    return sincos_1d(positions, dim)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches of every frame, projected: [F, C, H, W] -> [F, P, D]."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, c, h, w = x.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"frames must have H and W divisible by the patch size {self.patch}, "
                             f"got H={h}, W={w}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [F, D, h, w] -> [F, P, D]

    def reset_parameters(self) -> None:
        """DiT init: the conv as a linear layer with xavier-uniform weights, zero bias."""
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


def unpatchify(tokens: torch.Tensor, channels: int, patch: int, grid_h: int,
               grid_w: int) -> torch.Tensor:
    """Inverse of patchify: [F, P, p*p*C] -> [F, C, grid_h*p, grid_w*p]."""
    f = tokens.shape[0]
    x = tokens.reshape(f, grid_h, grid_w, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)                            # [F, C, gh, p, gw, p]
    return x.reshape(f, channels, grid_h * patch, grid_w * patch)


class TimestepEmbedder(nn.Module):
    """Diffusion timestep -> vector: sinusoidal features (``freq_dim``) then a 2-layer SiLU MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = sincos_1d(t, self.freq_dim).to(self.mlp[0].weight.dtype)  # [B, freq_dim]
        return self.mlp(freq)                                             # [B, dim]

    def reset_parameters(self) -> None:
        """DiT init: normal(0, 0.02) weights, zero biases."""
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
