"""Multi-head self-attention over all tokens of a clip, through ``kernels.attention3d``.

One module for every video DiT of the project: full 3D attention over T*P tokens, optional
3D RoPE (``positions``: (t, y, x) per token, applied inside the kernel), optional anchor override
(Anchored Diffusion) with the packed token layout of :mod:`avatar_models.layers.packing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import kernels
from avatar_models.layers.packing import AnchorPacking


class Attention(nn.Module):
    """qkv projection -> ``kernels.attention3d`` -> output projection.

    Args:
        dim: model width C; heads: H (C/H must be a multiple of 8, the kernel's head-dim rule).
        qkv_bias: bias on the fused qkv projection (DiT uses one).
        backend: forwarded to ``kernels.attention3d`` (None: the registry decides).
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True,
                 backend: str | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, packing: AnchorPacking | None = None,
                positions: torch.Tensor | None = None,
                rope_dims: Sequence[int] | None = None) -> torch.Tensor:
        """x: [B, N, C] tokens, or the packed [1, M, C] when ``packing`` is given. Same shape out.

        With ``packing``, the projections run on the packed rows only; the qkv rows are unpacked
        (a gather: the anchor rows of every b != source read the source's) for the attention
        kernel, which is told about the anchor, and its output is packed again.
        """
        qkv = self.qkv(x)                                          # [B|1, N|M, 3C]
        if packing is not None:
            qkv = packing.unpack_tokens(qkv)                       # [B, N, 3C]
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.heads, self.head_dim).unbind(2)  # [B, N, H, D] each
        anchor = None if packing is None else packing.anchor
        o = kernels.attention3d(q, k, v, positions=positions, rope_dims=rope_dims, anchor=anchor,
                                backend=self.backend)              # [B, N, H, D]
        o = o.reshape(b, n, self.heads * self.head_dim)            # [B, N, C]
        if packing is not None:
            o = packing.pack_tokens(o)                             # [1, M, C]
        return self.proj(o)
