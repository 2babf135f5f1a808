"""Public 3D attention (anchor override + in-kernel 3D RoPE) and standalone 3D RoPE: validation,
dispatch, autograd and torch.library registration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels._validation import check_head_dim, check_same, check_shape, check_tensor
from kernels.attention.ref import attention3d_ref, default_rope_dims, rope3d_ref
from kernels.registry import registry, resolve

OP_ATTENTION = "attention3d"
OP_ROPE = "rope3d"

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_POS_DTYPES = _INT_DTYPES + (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class Anchor:
    """The anchor frame of every sequence in the batch (Anchored Diffusion, Eq. 3).

    Args:
        starts: first token of the anchor frame in each sequence: a list of B ints or an integer
            tensor [B] (read on the host once per call).
        length: number of tokens of one frame (> 0).
        source: the sequence whose anchor frame every other sequence reads (0 <= source < B).

    Validated against the tensors when passed to :func:`attention3d`.
    """

    starts: Sequence[int] | torch.Tensor
    length: int
    source: int = 0


# ----------------------------------------------------------------------------------------------
# Validation and normalisation (once, in the public functions)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype in _INT_DTYPES:
            return int(value.item())
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_rope_dims(rope_dims: object, head_dim: int) -> tuple[int, int, int]:
    if rope_dims is None:
        return default_rope_dims(head_dim)
    if not isinstance(rope_dims, (tuple, list)) or len(rope_dims) != 3:
        raise ValueError(f"rope_dims must be a tuple (dt, dy, dx) of 3 ints, got {rope_dims!r}")
    dims = tuple(_check_int("rope_dims", d) for d in rope_dims)
    if any(d < 0 or d % 2 for d in dims) or sum(dims) > head_dim:
        raise ValueError(f"rope_dims must be 3 non-negative even ints with sum <= D={head_dim}, "
                         f"got {dims}")
    return dims  # type: ignore[return-value]


def _check_positions(name: str, pos: object, batch: int, tokens: int,
                     device: torch.device) -> torch.Tensor:
    """[N, 3] or [B, N, 3], int or float -> [B, N, 3] (a broadcast view, dtype kept)."""
    check_tensor(name, pos, ndim=(2, 3), dtypes=_POS_DTYPES)
    if pos.dim() == 2:
        check_shape(name, pos, (tokens, 3), " ([N, 3] of (t, y, x) per token)")
        pos = pos[None].expand(batch, tokens, 3)
    else:
        check_shape(name, pos, (batch, tokens, 3), " ([B, N, 3] of (t, y, x) per token)")
    if pos.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {pos.device}")
    return pos


def _check_scalar(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        want = "a finite float > 0" if positive else "a finite float"
        raise ValueError(f"{name} must be {want}, got {value}")
    return value


def _check_anchor(anchor: object, batch: int, nq: int, nk: int) -> tuple[list[int], int, int]:
    if not isinstance(anchor, Anchor):
        raise TypeError(f"anchor must be a kernels.Anchor or None, got {type(anchor).__name__}")
    if nq != nk:
        raise ValueError(f"anchor requires self-attention (Nq == Nk), got Nq={nq} and Nk={nk}")
    length = _check_int("anchor.length", anchor.length)
    source = _check_int("anchor.source", anchor.source)
    if length <= 0:
        raise ValueError(f"anchor.length must be > 0, got {length}")
    if length > nk:
        raise ValueError(f"anchor.length must be <= N={nk}, got {length}")
    if not 0 <= source < batch:
        raise ValueError(f"anchor.source must be in [0, B={batch}), got {source}")
    starts = anchor.starts
    if isinstance(starts, torch.Tensor):
        check_tensor("anchor.starts", starts, ndim=1, dtypes=_INT_DTYPES)
        starts = starts.tolist()
    elif isinstance(starts, (list, tuple)):
        starts = [_check_int("anchor.starts", s) for s in starts]
    else:
        raise TypeError(f"anchor.starts must be a list of ints or an integer tensor [B], got "
                        f"{type(starts).__name__}")
    if len(starts) != batch:
        raise ValueError(f"anchor.starts must have B={batch} entries, got {len(starts)}")
    for b, s in enumerate(starts):
        if not 0 <= s <= nk - length:
            raise ValueError(f"anchor.starts[{b}] must be in [0, N - length] = [0, {nk - length}]"
                             f" (N={nk}, length={length}), got {s}")
    return starts, length, source


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (the units torch.compile sees). The anchor travels as
# (starts: list[int], length, source) with an empty starts list meaning "no anchor".


def _triton():
    # Imported on first Triton call only, so the ref path never pays for importing triton.
    from kernels.attention import triton_impl

    return triton_impl


def _anchor_tuple(starts: list[int], length: int, source: int):
    return (list(starts), length, source) if starts else None


@torch.library.custom_op("avatar_kernels::attention3d_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None,
                   k_pos: torch.Tensor | None, rope_dims: list[int], rope_theta: float,
                   starts: list[int], length: int, source: int, scale: float,
                   interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton().attention3d_fwd(q, k, v, q_pos, k_pos, rope_dims, rope_theta,
                                     _anchor_tuple(starts, length, source), scale, interleaved)


@_attention_fwd.register_fake
def _(q, k, v, q_pos, k_pos, rope_dims, rope_theta, starts, length, source, scale, interleaved):
    batch, n_q, heads, head_dim = q.shape
    return (q.new_empty(batch, n_q, heads, head_dim),
            q.new_empty(batch, heads, n_q, dtype=torch.float32))


@torch.library.custom_op("avatar_kernels::attention3d_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, q_pos: torch.Tensor | None,
                   k_pos: torch.Tensor | None, rope_dims: list[int], rope_theta: float,
                   starts: list[int], length: int, source: int, scale: float,
                   interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().attention3d_bwd(dout, q, k, v, out, lse, q_pos, k_pos, rope_dims,
                                     rope_theta, _anchor_tuple(starts, length, source), scale,
                                     interleaved)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, q_pos, k_pos, rope_dims, rope_theta, starts, length, source,
      scale, interleaved):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


@torch.library.custom_op("avatar_kernels::rope3d_fwd", mutates_args=())
def _rope_fwd(x: torch.Tensor, positions: torch.Tensor, rope_dims: list[int], rope_theta: float,
              inverse: bool, interleaved: bool) -> torch.Tensor:
    return _triton().rope3d_fwd(x, positions, rope_dims, rope_theta, inverse, interleaved)


@_rope_fwd.register_fake
def _(x, positions, rope_dims, rope_theta, inverse, interleaved):
    return x.new_empty(x.shape)


class Attention3DFunction(torch.autograd.Function):
    """Triton attention3d: q [B, Nq, H, D], k/v [B, Nk, H, D] with a unit head-dim stride."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, rope_dims, rope_theta, starts, length, source, scale,
                interleaved):
        k_pos = q_pos if k_pos is None else k_pos  # None: the same positions as q
        out, lse = _attention_fwd(q, k, v, q_pos, k_pos, rope_dims, rope_theta, starts, length,
                                  source, scale, interleaved)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.args = (rope_dims, rope_theta, starts, length, source, scale, interleaved)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, q_pos, k_pos, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


class Rope3DFunction(torch.autograd.Function):
    """Triton rope3d: x [B, N, H, D], positions [B, N, 3]."""

    @staticmethod
    def forward(ctx, x, positions, rope_dims, rope_theta, interleaved):
        ctx.save_for_backward(positions)
        ctx.args = (rope_dims, rope_theta)
        ctx.interleaved = interleaved
        return _rope_fwd(x, positions, rope_dims, rope_theta, False, interleaved)

    @staticmethod
    def backward(ctx, dy):
        (positions,) = ctx.saved_tensors
        return _rope_fwd(dy, positions, *ctx.args, True, ctx.interleaved), None, None, None, None


# ----------------------------------------------------------------------------------------------
# Backend implementations. Signature: (q, k, v, q_pos, k_pos, rope_dims, theta, anchor, scale,
# interleaved) with q_pos/k_pos [B, N, 3] or None and anchor (starts list, length, source) or None.


def _attention_ref(q, k, v, q_pos, k_pos, rope_dims, rope_theta, anchor, scale, interleaved):
    return attention3d_ref(q, k, v, q_pos=q_pos, k_pos=k_pos, rope_dims=rope_dims,
                           rope_theta=rope_theta, anchor=anchor, scale=scale,
                           interleaved=interleaved)


def _attention_triton(q, k, v, q_pos, k_pos, rope_dims, rope_theta, anchor, scale, interleaved):
    starts, length, source = anchor if anchor is not None else ([], 0, 0)
    # autograd.Function under torch.compile rejects one tensor passed as two inputs
    k = k.view_as(k) if k is q else k
    v = v.view_as(v) if v is q or v is k else v
    k_pos = None if k_pos is q_pos else k_pos
    return Attention3DFunction.apply(q, k, v, q_pos, k_pos, list(rope_dims), rope_theta,
                                     list(starts), length, source, scale, interleaved)


def _rope_ref(x, positions, rope_dims, rope_theta, interleaved):
    return rope3d_ref(x, positions, rope_dims, rope_theta, interleaved)


def _rope_triton(x, positions, rope_dims, rope_theta, interleaved):
    return Rope3DFunction.apply(x, positions, list(rope_dims), rope_theta, interleaved)


registry.register(OP_ATTENTION, "ref", _attention_ref, devices=("cpu", "cuda"))
registry.register(OP_ATTENTION, "triton", _attention_triton, devices=("cpu", "cuda"),
                  needs_triton=True)
registry.register(OP_ROPE, "ref", _rope_ref, devices=("cpu", "cuda"))
registry.register(OP_ROPE, "triton", _rope_triton, devices=("cpu", "cuda"), needs_triton=True)


# ----------------------------------------------------------------------------------------------
# Public functions


def attention3d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                rope_dims: Sequence[int] | None = None, rope_theta: float = 10000.0,
                anchor: Anchor | None = None, scale: float | None = None,
                interleaved: bool = False, backend: str | None = None) -> torch.Tensor:
    """Full (unmasked) multi-head attention with optional in-kernel 3D RoPE and anchor override.

    ``out = softmax(RoPE(q) RoPE(k)^T * scale) v`` per (batch, head); statistics in fp32.

    Args:
        q: [B, Nq, H, D]; float32, float16 or bfloat16. D a multiple of 8, at most 256.
        k, v: [B, Nk, H, D], same dtype and device as q. Nk may differ from Nq (cross-attention).
        positions: None (no RoPE), or (t, y, x) per token as an int or float tensor [N, 3] (shared
            by the batch) or [B, N, 3]; for Nq != Nk a tuple (q_positions, k_positions). The head
            dim splits into contiguous parts of sizes rope_dims = (dt, dy, dx); in a part of size d
            with coordinate p, for i < d/2, angle = p * rope_theta^(-2i/d) (fp32) and the pair
            (x_i, x_{i+d/2}) becomes (x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin).
            Positions may be fractional and arbitrarily large (e.g. t = 10000).
        rope_dims: (dt, dy, dx), non-negative even ints with sum <= D (columns past the sum are
            not rotated); default (D - 4*(D//6), 2*(D//6), 2*(D//6)).
        rope_theta: RoPE base, > 0.
        anchor: :class:`Anchor` (self-attention only). For every b != anchor.source, the anchor-
            frame rows [starts[b], starts[b]+length) of k and v are replaced by source's anchor
            rows before RoPE (RoPE still uses b's positions), attention runs, then the anchor-frame
            output rows of every b != source are copied from source. Gradients follow: replaced
            rows of b get zero gradient, source's rows accumulate every reader's gradient.
        scale: softmax scale, default 1/sqrt(D).
        interleaved: False (default): rotate-half pairs (x_i, x_{i+d/2}) within each part.
            True: adjacent pairs (x_{2i}, x_{2i+1}) within each part, the convention of diffusers'
            Wan, CogVideoX and HunyuanVideo (``apply_rotary_emb(..., use_real_unbind_dim=-1)``);
            the frequencies are the same, theta^(-2i/d) for pair i.
        backend: "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, Nq, H, D] in q's dtype. Differentiable in q, k and v.

    Raises:
        TypeError: non-tensor input, unsupported dtype, dtypes that differ, anchor not an Anchor.
        ValueError: wrong rank or shape, D not a multiple of 8 or above 256, positions of the wrong
            shape or device, bad rope_dims / rope_theta / scale, anchor with Nq != Nk, anchor
            starts out of range or running past the end, length <= 0, source outside [0, B).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    batch, nq, heads, head_dim = q.shape
    nk = k.shape[1]
    check_head_dim("q", head_dim)
    check_shape("k", k, (batch, None, heads, head_dim), " ([B, Nk, H, D] with B, H, D of q)")
    check_shape("v", v, tuple(k.shape), " (same as k)")
    check_same(("q", "k", "v"), (q, k, v))
    if nq == 0 or nk == 0:
        raise ValueError(f"q and k must have at least one token, got Nq={nq} and Nk={nk}")
    dims = _check_rope_dims(rope_dims, head_dim)
    theta = _check_scalar("rope_theta", rope_theta, positive=True)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else _check_scalar("scale", scale,
                                                                           positive=False)
    q_pos = k_pos = None
    if isinstance(positions, (tuple, list)):
        if len(positions) != 2:
            raise ValueError(f"positions must be a tensor or a tuple (q_positions, k_positions), "
                             f"got a {type(positions).__name__} of length {len(positions)}")
        q_pos = _check_positions("q_positions", positions[0], batch, nq, q.device)
        k_pos = _check_positions("k_positions", positions[1], batch, nk, q.device)
    elif positions is not None:
        if nq != nk:
            raise ValueError(f"positions must be a tuple (q_positions, k_positions) for cross-"
                             f"attention (Nq={nq} != Nk={nk}), got a single "
                             f"{type(positions).__name__}")
        q_pos = k_pos = _check_positions("positions", positions, batch, nq, q.device)
    anchor_n = None if anchor is None else _check_anchor(anchor, batch, nq, nk)
    inter = _check_bool("interleaved", interleaved)
    impl = resolve(OP_ATTENTION, q, backend, D=head_dim)
    return impl.fn(q, k, v, q_pos, k_pos, dims, theta, anchor_n, scale, inter)


def rope3d(x: torch.Tensor, positions: torch.Tensor, *, rope_dims: Sequence[int] | None = None,
           rope_theta: float = 10000.0, interleaved: bool = False,
           backend: str | None = None) -> torch.Tensor:
    """3D rotary embedding of x, exactly the rotation :func:`attention3d` applies on load.

    Args:
        x: [B, N, H, D]; float32, float16 or bfloat16; D a multiple of 8, at most 256.
        positions: (t, y, x) per token, int or float, [N, 3] or [B, N, 3], on x's device.
        rope_dims, rope_theta, interleaved: as :func:`attention3d`.
        backend: "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, N, H, D] in x's dtype (angles and rotation in fp32). Differentiable in x.

    Raises:
        TypeError / ValueError: naming the argument, as :func:`attention3d`.
    """
    check_tensor("x", x, ndim=4)
    batch, tokens, _, head_dim = x.shape
    check_head_dim("x", head_dim)
    pos = _check_positions("positions", positions, batch, tokens, x.device)
    dims = _check_rope_dims(rope_dims, head_dim)
    theta = _check_scalar("rope_theta", rope_theta, positive=True)
    inter = _check_bool("interleaved", interleaved)
    impl = resolve(OP_ROPE, x, backend, D=head_dim)
    return impl.fn(x, pos, dims, theta, inter)
