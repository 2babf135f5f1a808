"""Cross-attention from video tokens to a time-indexed condition (audio features per frame).

Queries are the video tokens, keys/values the condition tokens; both go through
``kernels.attention3d`` with temporal-only RoPE (``rope_dims = (dt, 0, 0)``), so a video token at
time t sees a condition token at time tau through their offset t - tau. Video frame j of a window
with VAE temporal ratio r sits at latent time j / r (fractional positions are allowed), which aligns
audio given per video frame with latent frames without pooling.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.attention.ref import default_rope_dims


class TemporalCrossAttention(nn.Module):
    """x + proj(attention3d(q(LN(x)), k(cond), v(cond))) with temporal RoPE; zero-initialised
    output projection, so an untrained layer is the identity.

    Args:
        dim: model width C; heads: H (C/H a multiple of 8); cond_dim: width of the condition.
    """

    def __init__(self, dim: int, heads: int, cond_dim: int, *, backend: str | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rope_dims = (default_rope_dims(self.head_dim)[0], 0, 0)

    def reset_parameters(self) -> None:
        """xavier-uniform q/kv, zero biases, unit LayerNorm, zero output projection."""
        for layer in (self.q, self.kv):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, x_time: torch.Tensor,
                cond_time: torch.Tensor) -> torch.Tensor:
        """x [B, N, C]; cond [B, M, Cc]; x_time [B, N] or [N]; cond_time [M] (latent frames)."""
        b, n, _ = x.shape
        m = cond.shape[1]
        q = self.q(self.norm(x)).view(b, n, self.heads, self.head_dim)        # [B, N, H, D]
        k, v = self.kv(cond).view(b, m, 2, self.heads, self.head_dim).unbind(2)  # [B, M, H, D]
        q_pos = torch.zeros(*x_time.shape, 3, device=x.device, dtype=torch.float32)
        q_pos[..., 0] = x_time
        k_pos = torch.zeros(m, 3, device=x.device, dtype=torch.float32)
        k_pos[:, 0] = cond_time
        o = kernels.attention3d(q, k.to(q.dtype), v.to(q.dtype), positions=(q_pos, k_pos),
                                rope_dims=self.rope_dims, backend=self.backend)  # [B, N, H, D]
        return x + self.proj(o.reshape(b, n, -1))                             # [B, N, C]
