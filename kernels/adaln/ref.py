"""Reference adaLN modulation and gated residual: the spec, the CPU path and the test oracle.

Plain PyTorch, fp32 inside (fp64 when given fp64), readable first. Shapes:
    x, y:               [B, N, C]
    shift, scale, gate: [B, C] (per sample) or [B, T, C] (per frame; frame t owns tokens
                        [t*N/T, (t+1)*N/T)); x's dtype or float32
    weight, bias:       [C] or None, LayerNorm's affine parameters
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


def layer_norm_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last dim, biased variance, overflow-safe.

    Each row is first scaled by 2^-k with 2^k <= max|x| < 2^(k+1) (k in [0, 126], a detached
    constant): LayerNorm(x, eps) == LayerNorm(x / 2^k, eps / 4^k), and multiplying by a power of
    two is exact, so ordinary rows give the textbook result bit for bit while rows of magnitude
    1e20 no longer overflow (x - mean)^2 to inf in fp32 (which would return ``shift``)."""
    if x.shape[-1] == 0:
        return x
    peak = x.detach().abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(peak)                      # peak = m * 2^exponent, m in [0.5, 1)
    down = torch.ldexp(torch.ones_like(peak), -(exponent - 1).clamp(0, 126))
    u = x * down                                                 # [B, N, C], max |u| < 2
    centered = u - u.mean(dim=-1, keepdim=True)
    var = centered.square().mean(dim=-1, keepdim=True)
    # floor: a constant row of huge values has var 0 and eps * 4^-k below the dtype's range
    return centered * torch.rsqrt((var + eps * down * down).clamp_min(torch.finfo(x.dtype).tiny))


def adaln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float = 1e-6, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """(LayerNorm(x) * weight + bias) * (1 + scale) + shift, LayerNorm over C; out in x's dtype."""
    n = x.shape[1]
    h = layer_norm_rows(upcast(x), eps)                          # [B, N, C]
    if weight is not None:
        h = h * upcast(weight)
    if bias is not None:
        h = h + upcast(bias)
    scale_e = expand_modulation(upcast(scale), n)
    shift_e = expand_modulation(upcast(shift), n)
    return (h * (1.0 + scale_e) + shift_e).to(x.dtype)


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y; out in x's dtype."""
    gate_e = expand_modulation(upcast(gate), x.shape[1])
    return (upcast(x) + gate_e * upcast(y)).to(x.dtype)
