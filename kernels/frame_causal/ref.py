"""Reference frame-causal attention: the spec, the CPU path and the test oracle.

Plain PyTorch, readable first; computes in ``upcast(q)`` (fp32 for fp16/bf16/fp32 inputs, fp64 for
fp64 inputs, which makes it the test oracle). Shapes:
    q, k, v:    [B, N, H, D]
    frame_ids:  [B', N] integer, B' = 1 (shared by the batch) or B
    out:        [B, N, H, D]

Token i attends to token j iff frame_ids[j] <= frame_ids[i]. The dense [B', N, N] mask below is the
spec, used only by this reference; the Triton path never builds it.
"""

from __future__ import annotations

import math

import torch

from kernels._numerics import upcast


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """[D/2] fp32 inverse frequencies theta^(-2i/D) (computed in fp64, rounded once to fp32).
    Shared by the reference and the Triton launcher so both see bit-identical angles."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    return torch.pow(float(theta), -2.0 * i / head_dim).to(torch.float32)


def rope_1d_ref(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dim with one position per token.

    x: [B, N, H, D]; positions: [B', N] integer. For i < D/2 and angle = p * theta^(-2i/D) (fp32):
    (x_i, x_{i+D/2}) -> (x_i cos - x_{i+D/2} sin, x_{i+D/2} cos + x_i sin). This equals
    ``kernels.rope3d`` with rope_dims=(D, 0, 0) and the frame id as the time coordinate.
    Returns upcast(x) dtype (no rounding back: the caller decides).
    """
    half = x.shape[-1] // 2
    inv_freq = rope_inv_freq(x.shape[-1], theta).to(positions.device)
    angle = positions.to(torch.float32)[..., None] * inv_freq          # [B', N, D/2], fp32
    xc = upcast(x)
    angle = angle.to(xc.dtype)[:, :, None, :]                           # [B', N, 1, D/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = xc[..., :half], xc[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def frame_causal_mask(frame_ids: torch.Tensor) -> torch.Tensor:
    """[B', N] ids -> [B', N, N] bool, True where query i (dim 1) may see key j (dim 2)."""
    return frame_ids[:, None, :] <= frame_ids[:, :, None]


def frame_causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               frame_ids: torch.Tensor, rope_theta: float | None = None,
                               scale: float | None = None, permute: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with the frame-causal mask; ``permute`` is ignored (it is a
    hint for the Triton path). frame_ids: [N] or [B', N]."""
    ids = frame_ids if frame_ids.dim() == 2 else frame_ids[None]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qc, kc, vc = upcast(q), upcast(k), upcast(v)
    if rope_theta is not None:
        qc, kc = rope_1d_ref(qc, ids, rope_theta), rope_1d_ref(kc, ids, rope_theta)
    scores = torch.einsum("bihd,bjhd->bhij", qc, kc) * scale           # [B, H, N, N]
    visible = frame_causal_mask(ids)[:, None]                           # [B', 1, N, N]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # every row sees at least its own token: no empty rows
    out = torch.einsum("bhij,bjhd->bihd", probs, vc)                   # [B, N, H, D]
    return out.to(q.dtype)
