"""Benchmark frame-causal attention (issue 6's targets on H100/H200, bf16: forward >= 1.5x
FlexAttention and >= 0.85x the unmasked SDPA-best TFLOP/s, backward >= 0.7x of it; mask metadata
<= 1% of kernel time).

Workloads (shapes from the papers):
- LaVieID temporal autoregressive module (seeds/004, sec. 3.3): 1350 tokens per frame, a chunk of
  4 frames plus the teacher-forcing frame (6750 tokens), 16 heads, D=64; with and without
  frame-index RoPE.
- Self-Forcing-style Wan: 1560 tokens per frame, 21 frames (32760 tokens), 12 heads, D=128.
- ``*_full``: the same token count as one frame (no mask). The unmasked SDPA backends (the upper
  bound) run only there, so their TFLOP/s count their real N^2 work; compare them with the masked
  rows by TFLOP/s.

TFLOP/s counts unmasked work only: 4 * B * H * D * (visible query-key pairs) for the forward,
2.5x that for the backward. Baselines: FlexAttention with the equivalent block mask (compiled on
CUDA, built once per shape), SDPA with a dense boolean mask, SDPA with no mask (flash / cuDNN /
efficient backends). ``triton_metadata`` times the O(N) metadata op alone (the 1% target).

    python -m bench.bench_frame_causal [--dtype bf16] [--mode fwd] [--workload lavieid] [--smoke]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from bench.harness import Provider, Workload, main, registry_providers
from kernels.frame_causal.ref import frame_causal_mask, rope_1d_ref

OP = "frame_causal_attention"
THETA = 10000.0
_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def _frame_ids(sizes: list[int], first: int, device: str) -> torch.Tensor:
    return torch.cat([torch.full((s,), first + t, dtype=torch.int64, device=device)
                      for t, s in enumerate(sizes)])


def _visible_pairs(sizes: list[int]) -> int:
    seen, pairs = 0, 0
    for s in sizes:
        seen += s
        pairs += s * seen
    return pairs


def _workload(name: str, sizes: list[int], heads: int, head_dim: int, theta: float | None,
              first: int = 0, batch: int = 1) -> Workload:
    def make_inputs(dtype, device, smoke):
        s, h, d = ([13, 27, 45][: len(sizes)] if len(sizes) > 1 else [85], 2, 32) if smoke \
            else (sizes, heads, head_dim)
        ids = _frame_ids(s, first, device)
        q, k, v = (torch.randn(batch, ids.shape[0], h, d, dtype=dtype, device=device,
                               requires_grad=True) for _ in range(3))
        return {"q": q, "k": k, "v": v, "frame_ids": ids, "rope_theta": theta}

    work = 4.0 * batch * heads * head_dim * _visible_pairs(sizes)
    tokens = sum(sizes)
    elem = 2  # bf16 bytes; compulsory traffic: q, k, v, o (+ do, dq, dk, dv backward)
    per_mode = {"fwd": 4, "bwd": 8, "fwd_bwd": 12}
    return Workload(
        name, {"B": batch, "N": tokens, "H": heads, "D": head_dim, "frames": len(sizes),
               "frame_tokens": sizes[0], "rope": theta is not None},
        make_inputs, flops=lambda mode: _MODE_FACTOR[mode] * work,
        bytes=lambda mode: per_mode[mode] * batch * tokens * heads * head_dim * elem)


WORKLOADS = [
    _workload("lavieid_tam_b1_h16_d64_5x1350", [1350] * 5, 16, 64, None, first=3),
    _workload("lavieid_tam_b1_h16_d64_5x1350_rope", [1350] * 5, 16, 64, THETA, first=3),
    _workload("lavieid_tam_b1_h16_d64_full", [6750], 16, 64, None),
    _workload("selfforcing_wan_b1_h12_d128_21x1560", [1560] * 21, 12, 128, None),
    _workload("selfforcing_wan_b1_h12_d128_full", [32760], 12, 128, None),
]
# `python -m bench --quick` (and `make gpu-evidence`) runs these only.
QUICK = ("lavieid_tam_b1_h16_d64_5x1350", "lavieid_tam_b1_h16_d64_full")


# ----------------------------------------------------------------------------------------------
# baselines: [B, N, H, D] in and out, RoPE (when asked) applied in eager PyTorch first


def _bhnd(*tensors):
    return [t.transpose(1, 2) for t in tensors]


def _rotated(q, k, frame_ids, rope_theta):
    if rope_theta is None:
        return q, k
    ids = frame_ids[None]
    return (rope_1d_ref(q, ids, rope_theta).to(q.dtype),
            rope_1d_ref(k, ids, rope_theta).to(k.dtype))


def _cached(cache: dict, frame_ids: torch.Tensor, build):
    key = (frame_ids.data_ptr(), frame_ids.shape[0], frame_ids.device)
    if key not in cache:  # built during warm-up, outside the timed calls
        cache.clear()
        cache[key] = build()
    return cache[key]


def flex_provider(device: str) -> Provider:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attend = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
    masks: dict = {}

    def fn(q, k, v, frame_ids, rope_theta):
        tokens = frame_ids.shape[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return frame_ids[kv_idx] <= frame_ids[q_idx]

        block_mask = _cached(masks, frame_ids, lambda: create_block_mask(
            mask_mod, None, None, tokens, tokens, device=q.device))
        if not torch.is_grad_enabled():  # CPU flex refuses inputs that require grad
            q, k, v = q.detach(), k.detach(), v.detach()
        q, k = _rotated(q, k, frame_ids, rope_theta)
        return attend(*_bhnd(q, k, v), block_mask=block_mask).transpose(1, 2)

    return Provider("flex_attention", fn)


def sdpa_dense_mask_provider() -> Provider:
    masks: dict = {}

    def fn(q, k, v, frame_ids, rope_theta):
        mask = _cached(masks, frame_ids, lambda: frame_causal_mask(frame_ids[None])[0])
        q, k = _rotated(q, k, frame_ids, rope_theta)
        return F.scaled_dot_product_attention(*_bhnd(q, k, v), attn_mask=mask).transpose(1, 2)

    def skip(workload, dtype):
        if workload.shape["N"] > 65536:
            return "dense [N, N] mask at N > 65536: too large"
        return None

    return Provider("sdpa_dense_mask", fn, skip=skip)


def sdpa_nomask_provider(name: str, backend, device: str) -> Provider:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, frame_ids, rope_theta):
        q, k = _rotated(q, k, frame_ids, rope_theta)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*_bhnd(q, k, v)).transpose(1, 2)

    def skip(workload, dtype):
        if not workload.name.endswith("_full"):
            return "upper bound: runs on the *_full workloads (unmasked work)"
        if device != "cuda":
            return "CUDA-only SDPA backend"
        return None

    return Provider(name, fn, skip=skip)


def metadata_provider() -> Provider:
    """The O(N) metadata op alone (what the Triton path adds on top of its kernels)."""
    from kernels.frame_causal import op  # registers the custom ops

    def fn(q, k, v, frame_ids, rope_theta):
        kv_end, _, _ = op._meta(frame_ids[None], False)
        return kv_end

    return Provider("triton_metadata", fn, modes=("fwd",))


def providers(device: str) -> list[Provider]:
    from torch.nn.attention import SDPBackend

    found = registry_providers(OP, kernels.frame_causal_attention, device)
    for prov in found:
        if prov.name == "ref":
            prov.skip = lambda wl, dt: ("dense O(N^2) fp32 reference: too large"
                                        if wl.shape["N"] > 8192 else None)
    extra = [flex_provider(device), sdpa_dense_mask_provider()]
    extra += [sdpa_nomask_provider(f"sdpa_nomask_{name}", backend, device) for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION))]
    if any(p.name == "triton" for p in found):
        extra.append(metadata_provider())
    return found + extra


if __name__ == "__main__":
    main(OP, WORKLOADS, providers)
