"""Benchmark Performer (FAVOR+) attention on MCDM's temporal workloads (issue 5).

MCDM (seeds/002, sections 3.4 and B.3, Table 7) runs fast attention along time at every spatial
position: many short-to-very-long sequences, B*H = 4096 (512 positions x 8 heads), D in {40, 64},
M in {64, 256, round(D ln D)}, N in {16, 32, 300, 1800, 3600, 7200} frames, causal and not.

Targets (H100/H200): non-causal forward >= 3x plain-PyTorch FAVOR+; causal forward+backward
>= 1.5x the plain-PyTorch chunked-cumsum version; at N=7200 >= 4x faster than exact softmax
attention (SDPA, best backend); time linear in N (each doubling 1800 -> 3600 -> 7200 <= 2.1x).

Providers: the registry's backends, ``torch_favor`` (FAVOR+ in plain PyTorch, materialising
phi(q) and phi(k): einsum when non-causal, chunked cumsum over [chunk, M, D] when causal; the
forward+backward of the causal one keeps O(N*M*D) per head for autograd and may run out of
memory, which is recorded as an error row), ``torch_favor_compile`` (non-causal only) and
``sdpa`` (exact softmax attention at the same shapes).

    python -m bench.bench_performer [--dtype bf16] [--mode fwd] [--workload d64_m266] [--smoke]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels
from bench.harness import Provider, Workload, compiled_provider, main, registry_providers

OP = "performer_attention"
BATCH, HEADS = 512, 8          # B * H = 4096 sequences
CAUSAL_CHUNK = 32


def default_features(head_dim: int) -> int:
    return round(head_dim * math.log(head_dim))


def favor_torch(q, k, v, features, causal):
    """FAVOR+ as commonly written in PyTorch (Performer's stabilisers, phi materialised)."""
    d, m = q.shape[-1], features.shape[0]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # [B, H, N, D]
    scale = d ** -0.25

    def phi(x, is_query):
        proj = torch.einsum("bhnd,md->bhnm", x * scale, features)         # [B, H, N, M]
        diag = (x * x).sum(-1, keepdim=True) * (0.5 * scale * scale)
        dims = (-1,) if is_query else (-1, -2)
        stab = proj.amax(dim=dims, keepdim=True).detach()
        return torch.exp(proj - diag - stab) * m ** -0.5 + 1e-6

    pq, pk = phi(q, True), phi(k, False)
    if not causal:
        kv = torch.einsum("bhnm,bhnd->bhmd", pk, v)
        den = torch.einsum("bhnm,bhm->bhn", pq, pk.sum(dim=2))
        out = torch.einsum("bhnm,bhmd->bhnd", pq, kv) / den[..., None]
        return out.transpose(1, 2)
    state = q.new_zeros(*pk.shape[:2], m, v.shape[-1])
    norm = q.new_zeros(*pk.shape[:2], m)
    outs = []
    for s in range(0, q.shape[2], CAUSAL_CHUNK):
        rows = slice(s, s + CAUSAL_CHUNK)
        pqc, pkc, vc = pq[:, :, rows], pk[:, :, rows], v[:, :, rows]
        kv = torch.einsum("bhnm,bhnd->bhnmd", pkc, vc).cumsum(dim=2) + state[:, :, None]
        z = pkc.cumsum(dim=2) + norm[:, :, None]
        num = torch.einsum("bhnm,bhnmd->bhnd", pqc, kv)
        outs.append(num / torch.einsum("bhnm,bhnm->bhn", pqc, z)[..., None])
        state, norm = kv[:, :, -1], z[:, :, -1]
    return torch.cat(outs, dim=2).transpose(1, 2)


def sdpa(q, k, v, features, causal):
    """Exact softmax attention, best available SDPA backend, same [B, N, H, D] layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal)
    return out.transpose(1, 2)


def _workload(head_dim: int, n_features: int, seq_len: int, causal: bool) -> Workload:
    name = f"mcdm_temporal_d{head_dim}_m{n_features}_n{seq_len}" + ("_causal" if causal else "")

    def make_inputs(dtype, device, smoke):
        b, h, n = (1, 2, min(seq_len, 24)) if smoke else (BATCH, HEADS, seq_len)
        q, k, v = (torch.randn(b, n, h, head_dim, dtype=dtype, device=device, requires_grad=True)
                   for _ in range(3))
        gen = torch.Generator(device=device).manual_seed(0)
        features = kernels.orthogonal_features(n_features, head_dim, generator=gen,
                                               device=device, dtype=dtype)
        return {"q": q, "k": k, "v": v, "features": features, "causal": causal}

    tokens = BATCH * HEADS * seq_len
    # FAVOR+ matmul work: feature maps of q and k (2 x 2MD), state (2MD), readout (2MD) per
    # token-head forward; the backward recomputes the feature maps and doubles the rest.
    flops = {"fwd": 8, "bwd": 16, "fwd_bwd": 24}
    # Compulsory traffic, 2-byte elements: fwd reads q, k, v and writes out; bwd reads q, k, v,
    # out, dout and writes dq, dk, dv.
    touches = {"fwd": 4, "bwd": 8, "fwd_bwd": 12}
    return Workload(
        name, {"B": BATCH, "N": seq_len, "H": HEADS, "D": head_dim, "M": n_features,
               "causal": causal}, make_inputs,
        flops=lambda mode: flops[mode] * tokens * n_features * head_dim,
        bytes=lambda mode: touches[mode] * tokens * head_dim * 2,
        dtypes=("bf16", "fp16"))


WORKLOADS = [
    _workload(d, m, n, causal)
    for causal in (False, True)
    for d in (40, 64)
    for m in (64, 256, default_features(d))
    for n in (16, 32, 300, 1800, 3600, 7200)
]
# `python -m bench --quick` (and `make gpu-evidence`) runs these only.
QUICK = ("mcdm_temporal_d64_m266_n1800", "mcdm_temporal_d64_m266_n1800_causal")


def _ref_too_big(workload: Workload, dtype: str) -> str | None:
    s = workload.shape
    elems = s["B"] * s["H"] * s["N"] * s["M"]
    if elems > 2e9:  # the reference keeps several fp32 [B, H, N, M] tensors
        return f"ref materialises fp32 [B, H, N, M] tensors ({elems:.1e} elements each)"
    return None


def _noncausal_only(workload: Workload, dtype: str) -> str | None:
    return "compiled baseline is non-causal only" if workload.shape["causal"] else None


def providers(device: str) -> list[Provider]:
    def call(backend, q, k, v, features, causal):
        return kernels.performer_attention(q, k, v, features, causal=causal, backend=backend)

    registered = registry_providers(OP, call, device)
    for prov in registered:
        if prov.name == "ref":
            prov.skip = _ref_too_big
    compiled = compiled_provider("torch_favor_compile", favor_torch)
    compiled.skip = _noncausal_only
    return registered + [Provider("torch_favor", favor_torch), compiled, Provider("sdpa", sdpa)]


if __name__ == "__main__":
    main(OP, WORKLOADS, providers)
