"""Reference 3D attention with anchor-token override and 3D RoPE: the spec, the CPU path and the
test oracle.

Plain PyTorch, computed in ``upcast(q)`` precision (fp32 for fp16/bf16/fp32, fp64 for fp64), with
the anchor override written out literally. Shapes:
    q:            [B, Nq, H, D]
    k, v:         [B, Nk, H, D]
    q_pos, k_pos: [B, Nq, 3], [B, Nk, 3] (t, y, x) per token, any real dtype, or None
    rope_dims:    (dt, dy, dx), even, dt + dy + dx <= D; columns past the sum are not rotated
    anchor:       (starts: list[int] of length B, length: int, source: int), or None

Inputs are assumed valid (:func:`kernels.attention3d` validates them once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kernels._numerics import upcast


def default_rope_dims(head_dim: int) -> tuple[int, int, int]:
    """(D - 4*(D//6), 2*(D//6), 2*(D//6)): the temporal part takes the remainder."""
    sixth = head_dim // 6
    return head_dim - 4 * sixth, 2 * sixth, 2 * sixth


def rope_inv_freq(d: int, theta: float, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[d/2] inverse frequencies theta^(-2i/d), evaluated in fp64 then rounded to ``dtype`` once
    (the Triton kernels load exactly these values)."""
    i = torch.arange(d // 2, dtype=torch.float64)
    return (float(theta) ** (-2.0 * i / d)).to(dtype=dtype, device=device)


def rope3d_ref(x: torch.Tensor, positions: torch.Tensor, rope_dims: Sequence[int],
               rope_theta: float = 10000.0, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [B, N, H, D] with positions [B, N, 3].

    Part a of size d covers columns [c, c + d) with c = sum of earlier parts. For i < d/2, with
    angle = p_a * theta^(-2i/d) (computed in the upcast dtype, fp32 for fp16/bf16/fp32), the pair
    (j1, j2) = (c+i, c+i+d/2) (rotate-half), or (c+2i, c+2i+1) when ``interleaved``, becomes
        out[j1] = x[j1] cos - x[j2] sin
        out[j2] = x[j2] cos + x[j1] sin
    """
    xf = upcast(x)
    pos = positions.to(dtype=xf.dtype, device=xf.device)                   # [B, N, 3]
    pieces, col = [], 0
    for axis, d in enumerate(rope_dims):
        if d == 0:
            continue
        half = d // 2
        angle = pos[:, :, axis, None] * rope_inv_freq(d, rope_theta, xf.dtype, xf.device)
        cos = angle.cos()[:, :, None, :]                                    # [B, N, 1, d/2]
        sin = angle.sin()[:, :, None, :]
        if interleaved:
            x1 = xf[..., col:col + d:2]                                     # [B, N, H, d/2]
            x2 = xf[..., col + 1:col + d:2]
            pair = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
            pieces.append(pair.flatten(-2))                                 # [B, N, H, d]
        else:
            x1 = xf[..., col:col + half]                                    # [B, N, H, d/2]
            x2 = xf[..., col + half:col + d]
            pieces += [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        col += d
    pieces.append(xf[..., col:])                                            # unrotated tail
    return torch.cat(pieces, dim=-1).to(x.dtype)


def anchor_override(x: torch.Tensor, starts: Sequence[int], length: int,
                    source: int) -> torch.Tensor:
    """For every b != source, rows [starts[b], starts[b]+length) of x [B, N, ...] become rows
    [starts[source], starts[source]+length) of sequence source. Autograd routes the gradient of
    every copy into source's rows; the replaced rows of b get none."""
    src = starts[source]
    frame = x[source, src:src + length]
    rows = []
    for b in range(x.shape[0]):
        s = starts[b]
        rows.append(x[b] if b == source else torch.cat([x[b, :s], frame, x[b, s + length:]]))
    return torch.stack(rows)


def attention3d_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                    rope_dims: Sequence[int] | None = None, rope_theta: float = 10000.0,
                    anchor: tuple[Sequence[int], int, int] | None = None,
                    scale: float | None = None, interleaved: bool = False) -> torch.Tensor:
    """softmax(RoPE(q) RoPE(k)^T * scale) v per (batch, head), with the anchor override.

    Anchor semantics (self-attention): (1) k, v rows of the anchor frame of every b != source are
    replaced by source's, (2) RoPE with each sequence's own positions, (3) full attention, (4) the
    anchor-frame output rows of every b != source are replaced by source's.
    """
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    rope_dims = default_rope_dims(head_dim) if rope_dims is None else rope_dims
    qf, kf, vf = upcast(q), upcast(k), upcast(v)
    if anchor is not None:
        starts, length, source = anchor
        kf = anchor_override(kf, starts, length, source)                    # (1)
        vf = anchor_override(vf, starts, length, source)
    if q_pos is not None:                                                   # (2)
        qf = rope3d_ref(qf, q_pos, rope_dims, rope_theta, interleaved)
        kf = rope3d_ref(kf, k_pos, rope_dims, rope_theta, interleaved)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale                # (3) [B, H, Nq, Nk]
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)                        # [B, Nq, H, D]
    if anchor is not None:
        out = anchor_override(out, starts, length, source)                  # (4)
    return out.to(q.dtype)
