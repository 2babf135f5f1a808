"""Public frame-causal attention: validation, dispatch, autograd and torch.library registration.

The Triton path is four opaque custom ops (``avatar_kernels::frame_causal_{meta,rope,fwd,bwd}``)
with fake implementations, wrapped in an ``autograd.Function``, so ``torch.compile`` traces through
the Function and sees each kernel as one graph node. The reference path is plain PyTorch.
"""

from __future__ import annotations

import math
import numbers

import torch

from kernels._validation import check_head_dim, check_same, check_shape, check_tensor
from kernels.frame_causal.ref import frame_causal_attention_ref
from kernels.registry import CallInfo, registry, resolve

OP = "frame_causal_attention"
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _triton():
    # Imported on first Triton call only, so the ref path never pays for importing triton.
    from kernels.frame_causal import triton_impl

    return triton_impl


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (the units torch.compile sees)


@torch.library.custom_op("avatar_kernels::frame_causal_meta", mutates_args=())
def _meta(frame_ids: torch.Tensor, permute: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().frame_causal_meta(frame_ids, permute)


@_meta.register_fake
def _(frame_ids, permute):
    rows, tokens = frame_ids.shape
    kv_end = frame_ids.new_empty(rows, tokens, dtype=torch.int32)
    perm = frame_ids.new_empty(rows, tokens if permute else 0, dtype=torch.int32)
    return kv_end, torch.empty_like(kv_end), perm


@torch.library.custom_op("avatar_kernels::frame_causal_rope", mutates_args=())
def _rope(x: torch.Tensor, frame_ids: torch.Tensor, theta: float,
          inverse: bool) -> torch.Tensor:
    return _triton().frame_rope(x, frame_ids, theta, inverse)


@_rope.register_fake
def _(x, frame_ids, theta, inverse):
    return x.new_empty(x.shape)


@torch.library.custom_op("avatar_kernels::frame_causal_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_end: torch.Tensor,
         perm: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton().frame_causal_fwd(q, k, v, kv_end, perm, scale)


@_fwd.register_fake
def _(q, k, v, kv_end, perm, scale):
    batch, tokens, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(batch, heads, tokens, dtype=torch.float32)


@torch.library.custom_op("avatar_kernels::frame_causal_bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
         lse: torch.Tensor, kv_end: torch.Tensor, q_begin: torch.Tensor, perm: torch.Tensor,
         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().frame_causal_bwd(do, q, k, v, o, lse, kv_end, q_begin, perm, scale)


@_bwd.register_fake
def _(do, q, k, v, o, lse, kv_end, q_begin, perm, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


class FrameCausalAttentionFunction(torch.autograd.Function):
    """Triton frame-causal attention. q, k, v [B, N, H, D] with unit stride in D; frame_ids
    [B', N] int32/int64; ``permute`` False only if the ids are sorted along N."""

    @staticmethod
    def forward(ctx, q, k, v, frame_ids, permute, rope_theta, scale):
        kv_end, q_begin, perm = _meta(frame_ids, permute)
        if rope_theta is not None:
            q = _rope(q, frame_ids, rope_theta, False)
            k = _rope(k, frame_ids, rope_theta, False)
        o, lse = _fwd(q, k, v, kv_end, perm, scale)
        ctx.save_for_backward(q, k, v, o, lse, kv_end, q_begin, perm, frame_ids)
        ctx.rope_theta, ctx.scale = rope_theta, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_end, q_begin, perm, frame_ids = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = _bwd(do, q, k, v, o, lse, kv_end, q_begin, perm, ctx.scale)
        if ctx.rope_theta is not None:  # q, k were rotated: pull the gradients back, R^T = R(-f)
            dq = _rope(dq, frame_ids, ctx.rope_theta, True)
            dk = _rope(dk, frame_ids, ctx.rope_theta, True)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Backend implementations: fn(q, k, v, frame_ids [B', N], rope_theta, scale, permute)


def _frame_causal_triton(q, k, v, frame_ids, rope_theta, scale, permute):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FrameCausalAttentionFunction.apply(q, k, v, frame_ids, permute, rope_theta, scale)


def _head_dim_limit(call: CallInfo) -> list[str]:
    d = call.facts.get("D", 0)
    return [] if d <= 256 else [f"head dim D={d} exceeds the Triton limit D <= 256"]


registry.register(OP, "ref", frame_causal_attention_ref, devices=("cpu", "cuda"))
registry.register(OP, "triton", _frame_causal_triton, devices=("cpu", "cuda"), needs_triton=True,
                  check=_head_dim_limit)


# ----------------------------------------------------------------------------------------------
# Validation helpers


def _check_frame_ids(frame_ids: object, batch: int, tokens: int,
                     device: torch.device) -> torch.Tensor:
    """-> [B', N] int32/int64 contiguous, B' in {1, B}."""
    if not isinstance(frame_ids, torch.Tensor):
        raise TypeError(f"frame_ids must be a torch.Tensor, got {type(frame_ids).__name__}")
    if frame_ids.dtype not in ID_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in ID_DTYPES)
        raise TypeError(f"frame_ids must have an integer dtype in ({names}), got "
                        f"{str(frame_ids.dtype).removeprefix('torch.')}")
    if frame_ids.dim() not in (1, 2):
        raise ValueError(f"frame_ids must be 1-D [N] or 2-D [B, N], got {frame_ids.dim()}-D "
                         f"with shape {list(frame_ids.shape)}")
    if frame_ids.dim() == 1:
        check_shape("frame_ids", frame_ids, (tokens,), " ([N], N = q.shape[1])")
    else:
        check_shape("frame_ids", frame_ids, (batch, tokens), " ([B, N] of q)")
    if frame_ids.device != device:
        raise ValueError(f"frame_ids must be on the same device as q ({device}), got "
                         f"{frame_ids.device}")
    ids = frame_ids if frame_ids.dim() == 2 else frame_ids[None]
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    return ids.contiguous()


def _check_float(name: str, value: object, *, positive: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {want}, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Public function


def frame_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           frame_ids: torch.Tensor, rope_theta: float | None = None,
                           scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention where token i sees token j iff ``frame_ids[j] <= frame_ids[i]``.

    ``out[b, i, h] = sum_j softmax_j(scale * <q'_i, k'_j> over visible j) v[b, j, h]``: tokens of a
    frame see each other and every earlier frame (LaVieID's temporal autoregressive module,
    Self-Forcing-style chunked causal video DiTs). Frame ids need not be sorted, contiguous or
    start at 0. With ``rope_theta``, q' and k' are q and k rotated by 1D rotate-half RoPE over the
    whole head dim with position = frame id (angles fp32; the same rotation as
    ``kernels.rope3d`` with rope_dims=(D, 0, 0)); otherwise q' = q, k' = k.

    The Triton path never builds the [N, N] mask: it sorts tokens by frame (a no-op for sorted
    ids), derives per-tile visibility from O(N) metadata, skips fully masked key tiles and masks
    only the partial ones. Softmax statistics are fp32.

    Args:
        q, k, v: [B, N, H, D], float32/float16/bfloat16, same shape, dtype and device; D a
            multiple of 8 up to 256. Any strides (a non-unit stride in D costs a copy).
        frame_ids: integer tensor, [N] (shared by the batch) or [B, N]; any values (negative
            ids order before 0 and rotate by negative angles). Never read on the host.
        rope_theta: RoPE base (e.g. 10000.0), or None for no rotary embedding.
        scale: softmax scale, default 1/sqrt(D).
        backend: "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, N, H, D] in q's dtype (contiguous). Differentiable in q, k and v.

    Raises:
        TypeError: non-tensor input, float or bool frame_ids, unsupported or mixed dtypes,
            non-numeric rope_theta/scale.
        ValueError: wrong rank or shape, frame_ids of the wrong length or batch, tensors on
            different devices, bad head dim, rope_theta <= 0, non-finite scale.

    No host synchronisation: the Triton path sorts the ids on the device (a no-op permutation
    for sorted ids), so a call can be captured in a CUDA graph.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_shape("k", k, tuple(q.shape), " (same as q: [B, N, H, D])")
    check_shape("v", v, tuple(q.shape), " (same as q: [B, N, H, D])")
    check_same(("q", "k", "v"), (q, k, v))
    batch, tokens, _, head_dim = q.shape
    if q.numel() == 0:
        raise ValueError(f"q must be non-empty, got shape {list(q.shape)}")
    check_head_dim("q", head_dim)
    ids = _check_frame_ids(frame_ids, batch, tokens, q.device)
    rope_theta = _check_float("rope_theta", rope_theta, positive=True)
    scale = _check_float("scale", scale, positive=False)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    impl = resolve(OP, q, backend, D=head_dim)
    # Always through the (stable) sort: deciding that the ids are already sorted would need
    # their values on the host, a sync per call that also breaks CUDA-graph capture.
    return impl.fn(q, k, v, ids, rope_theta, scale, True)
