"""Reference adaLN modulation and gated residual: the spec, the CPU path and the test oracle.

Plain PyTorch, fp32 inside, readable first. Shapes:
    x, y:               [B, N, C]
    shift, scale, gate: [B, C] (per sample) or [B, T, C] (per frame; frame t owns tokens
                        [t*N/T, (t+1)*N/T))
"""

from __future__ import annotations

import torch

from kernels._numerics import upcast


def expand_modulation(mod: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, C] or [B, T, C] -> [B, N, C], each frame's vector repeated over its N/T tokens."""
    if mod.dim() == 2:
        return mod[:, None, :].expand(-1, tokens, -1)
    frames = mod.shape[1]
    return mod.repeat_interleave(tokens // frames, dim=1)  # [B, N, C]


def adaln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) over C without affine, then * (1 + scale) + shift."""
    n = x.shape[1]
    x32 = upcast(x)
    mean = x32.mean(dim=-1, keepdim=True)                        # [B, N, 1]
    var = (x32 - mean).square().mean(dim=-1, keepdim=True)       # biased, as nn.LayerNorm
    x_hat = (x32 - mean) * torch.rsqrt(var + eps)                # [B, N, C]
    scale_e = expand_modulation(upcast(scale), n)
    shift_e = expand_modulation(upcast(shift), n)
    return (x_hat * (1.0 + scale_e) + shift_e).to(x.dtype)


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y."""
    gate_e = expand_modulation(upcast(gate), x.shape[1])
    return (upcast(x) + gate_e * upcast(y)).to(x.dtype)
