"""Reference Performer (FAVOR+) attention: the spec, the CPU path and the test oracle.

Plain PyTorch in ``upcast`` precision (fp32, or fp64 when given fp64). Shapes:
    q, k, v:   [B, N, H, D]
    features:  [M, D]  (rows w_m)
    out:       [B, N, H, D]

With qh = q * D^(-1/4), kh = k * D^(-1/4) and phi(x)_m = exp(w_m . x - |x|^2 / 2) / sqrt(M):
    out_i = sum_j (phi(qh_i) . phi(kh_j)) v_j / sum_j (phi(qh_i) . phi(kh_j)),   j <= i if causal.

Everything is computed from the logits a_im = w_m . qh_i and b_jm = w_m . kh_j - |kh_j|^2 / 2
(the |qh_i|^2 / 2 and 1 / sqrt(M) factors are common to numerator and denominator of row i and
cancel). Stabilisers are maxima of logits, detached: each one multiplies every term of a ratio by
the same constant, so it cancels in value and in gradient (see README.md).
"""

from __future__ import annotations

import torch

from kernels._numerics import upcast

CHUNK = 64  # tokens per step of the causal scan


def orthogonal_features_ref(num_features: int, head_dim: int, *,
                            generator: torch.Generator | None = None,
                            device: torch.device | str | None = None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian orthogonal random features [M, D]: blocks of D orthonormal rows (Q of the QR of a
    Gaussian D x D matrix, signs fixed so Q is Haar-distributed), the last block truncated, then
    each row scaled to the norm of an independent Gaussian D-vector (chi distribution)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        g = torch.randn(head_dim, head_dim, generator=generator, device=gen_device,
                        dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))[None, :]   # unique (Haar) choice of Q
        blocks.append(q.T)                                # rows are orthonormal
    rows = torch.cat(blocks, dim=0)[:num_features]        # [M, D]
    norms = torch.randn(num_features, head_dim, generator=generator, device=gen_device,
                        dtype=torch.float64).norm(dim=1)  # [M]
    return (rows * norms[:, None]).to(device=device or gen_device, dtype=dtype)


def favor_logits(q: torch.Tensor, k: torch.Tensor, features: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [B, H, N, M], b [B, H, N, M]): query logits w.qh and key logits w.kh - |kh|^2 / 2."""
    scale = q.shape[-1] ** -0.25
    a = torch.einsum("bnhd,md->bhnm", q, features) * scale
    b = torch.einsum("bnhd,md->bhnm", k, features) * scale
    half_sq = 0.5 * scale * scale * (k * k).sum(-1).transpose(1, 2)   # [B, H, N]
    return a, b - half_sq[..., None]


def performer_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            features: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """FAVOR+ attention; features are constants (never differentiated)."""
    work = torch.promote_types(upcast(q).dtype, features.dtype)
    qf, kf, vf = (t.to(work) for t in (q, k, v))
    w = features.detach().to(work)
    a, b = favor_logits(qf, kf, w)                # [B, H, N, M] each
    vt = vf.transpose(1, 2)                       # [B, H, N, D]
    out = _causal(a, b, vt) if causal else _noncausal(a, b, vt)
    return out.transpose(1, 2).to(q.dtype)        # [B, N, H, D]


def _noncausal(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Per-feature key stabiliser c_m = max_j b_jm: every weight exp(b - c) <= 1, each feature's
    # largest key weighs exactly 1.
    c = b.amax(dim=2, keepdim=True).detach()              # [B, H, 1, M]
    kw = torch.exp(b - c)                                 # [B, H, N, M]
    state = kw.transpose(2, 3) @ v                        # [B, H, M, D]
    norm = kw.sum(dim=2)                                  # [B, H, M]
    # Row i weighs feature m by exp(a_im + c_m); subtract the row max (cancels in the ratio).
    logits = a + c
    qw = torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())   # [B, H, N, M]
    return (qw @ state) / (qw @ norm[..., None])


def _causal(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Chunked scan with prefix-only stabilisers (the Triton kernel's scheme): the output of row i
    is bitwise independent of every key after i. State between chunks: S = sum_j exp(b_j - c) v_j
    [M, D] and z = sum_j exp(b_j - c) [M] with one scalar running max c (rescaled as it grows)."""
    batch, heads, n, m = a.shape
    qa = torch.exp(a - a.amax(-1, keepdim=True).detach())   # [B, H, N, M], row max 1
    s = b.amax(-1).detach()                                  # [B, H, N] per-key max
    kb = torch.exp(b - s[..., None])                         # [B, H, N, M], row max 1
    state = v.new_zeros(batch, heads, m, v.shape[-1])
    norm = v.new_zeros(batch, heads, m)
    c = v.new_full((batch, heads, 1), float("-inf"))
    outs = []
    for start in range(0, n, CHUNK):
        rows = slice(start, min(start + CHUNK, n))
        qc, kc, sc, vc = qa[:, :, rows], kb[:, :, rows], s[:, :, rows], v[:, :, rows]
        size = qc.shape[2]
        tri = torch.ones(size, size, dtype=torch.bool, device=v.device).tril()   # j <= i
        prefix = torch.where(tri, sc[:, :, None, :], float("-inf")).amax(-1)     # [B, H, C]
        sigma = torch.maximum(c, prefix)                                        # row stabiliser
        # exp of a masked exponent (not a masked exp) keeps inf out of the gradient.
        pair = torch.exp(torch.where(tri, sc[:, :, None, :] - sigma[..., None], float("-inf")))
        # Select (never multiply) by the mask, and multiply only finite values: 0 * NaN = NaN,
        # so a non-finite future k_j or v_j would otherwise reach every row of the chunk.
        intra = torch.where(tri, (qc @ kc.transpose(2, 3)) * pair, 0.0)         # [B, H, C, C]
        inter = torch.exp(c - sigma)                                            # [B, H, C]
        v_ok = torch.isfinite(vc).all(-1)                                       # [B, H, C]
        num = (qc @ state) * inter[..., None] + intra @ torch.where(v_ok[..., None], vc, 0.0)
        den = (qc @ norm[..., None])[..., 0] * inter + intra.sum(-1)
        # A non-finite v_j makes every row i >= j non-finite (NaN), as it would without masking.
        poisoned = (tri & ~v_ok[:, :, None, :]).any(-1)                          # [B, H, C]
        outs.append(torch.where(poisoned[..., None], float("nan"), num / den[..., None]))
        c_new = torch.maximum(c, sc.amax(-1, keepdim=True))
        kw = kc * torch.exp(sc - c_new)[..., None]                              # [B, H, C, M]
        decay = torch.exp(c - c_new)
        state = state * decay[..., None] + kw.transpose(2, 3) @ vc
        norm = norm * decay + kw.sum(2)
        c = c_new
    return torch.cat(outs, dim=2)
