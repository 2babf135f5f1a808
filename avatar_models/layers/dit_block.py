"""adaLN-Zero DiT block and final layer with per-frame modulation.

The conditioning ``c`` is ``[B, T, C]`` (one vector per frame; frame t owns tokens
``[t*N/T, (t+1)*N/T)``) or ``[B, C]`` (one per sample); the shift / scale / gate it produces are
applied by the fused ``kernels.adaln_modulate`` and ``kernels.gated_residual``. Works unchanged on
the packed anchor layout ``[1, M, C]`` with ``c`` ``[1, F, C]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import kernels
from avatar_models.layers.attention import Attention
from avatar_models.layers.packing import AnchorPacking


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, as in DiT / ViT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """x + gate_msa * Attn(mod(x)), then x + gate_mlp * MLP(mod(x)); adaLN-Zero init."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *,
                 attention_backend: str | None = None):
        super().__init__()
        self.attn = Attention(dim, heads, backend=attention_backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, *, packing: AnchorPacking | None = None,
                positions: torch.Tensor | None = None,
                rope_dims: Sequence[int] | None = None) -> torch.Tensor:
        """x [B, N, C] (or packed [1, M, C]); c [B, T, C] or [B, C] (packed: [1, F, C])."""
        mods = self.modulation(c).to(x.dtype).chunk(6, dim=-1)    # 6 x [B, T, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = kernels.adaln_modulate(x, shift_msa, scale_msa)       # [B, N, C]
        h = self.attn(h, packing=packing, positions=positions, rope_dims=rope_dims)
        x = kernels.gated_residual(x, h.to(x.dtype), gate_msa)    # [B, N, C]
        h = self.mlp(kernels.adaln_modulate(x, shift_mlp, scale_mlp))
        return kernels.gated_residual(x, h.to(x.dtype), gate_mlp)  # [B, N, C]

    def reset_parameters(self) -> None:
        """DiT init: xavier-uniform linears with zero bias; zero modulation (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)


class FinalLayer(nn.Module):
    """adaLN (shift, scale per frame) then a linear map to ``p*p*out_channels`` per token."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).to(x.dtype).chunk(2, dim=-1)  # [B, T, C] each
        return self.linear(kernels.adaln_modulate(x, shift, scale))    # [B, N, p*p*out]

    def reset_parameters(self) -> None:
        """DiT init: everything zero, so the untrained model predicts zero."""
        for layer in (self.modulation[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
