"""Public Performer (FAVOR+) ops: validation, dispatch, autograd and torch.library registration.

The Triton path is two opaque custom ops (``avatar_kernels::performer_fwd`` / ``_bwd``) with fake
implementations, wrapped in an ``autograd.Function``, so ``torch.compile`` traces through the
Function and sees each kernel launch as one graph node. The reference path is plain PyTorch.
"""

from __future__ import annotations

import torch

from kernels._validation import check_device, check_int, check_same, check_shape, check_tensor
from kernels.performer.ref import orthogonal_features_ref, performer_attention_ref
from kernels.registry import FLOAT_DTYPES, CallInfo, registry, resolve

OP = "performer_attention"
REF_DTYPES = (*FLOAT_DTYPES, torch.float64)


def _triton():
    from kernels.performer import triton_impl

    return triton_impl


# ----------------------------------------------------------------------------------------------
# torch.library custom ops


@torch.library.custom_op("avatar_kernels::performer_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: torch.Tensor,
         causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    return _triton().performer_fwd(q, k, v, features, causal)


@_fwd.register_fake
def _(q, k, v, features, causal):
    batch, seq_len, heads, head_dim = q.shape
    n_features, keep = features.shape[0], 0 if causal else batch * heads
    f32 = torch.float32
    return (q.new_empty(q.shape), q.new_empty(batch, heads, seq_len, dtype=f32),
            q.new_empty(keep, n_features, head_dim, dtype=f32),
            q.new_empty(2, keep, n_features, dtype=f32),
            q.new_empty(2 if causal else 0, batch * heads, seq_len, dtype=f32))


@torch.library.custom_op("avatar_kernels::performer_bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         features: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, state: torch.Tensor,
         feature_stats: torch.Tensor, row_max: torch.Tensor, causal: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().performer_bwd(do, q, k, v, features, out, lse, state, feature_stats,
                                   row_max, causal)


@_bwd.register_fake
def _(do, q, k, v, features, out, lse, state, feature_stats, row_max, causal):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class PerformerFunction(torch.autograd.Function):
    """Triton FAVOR+: q, k, v [B, N, H, D] with unit last stride, features [M, D] contiguous.
    Saves q, k, v, out, the fp32 row log-normaliser lse [B, H, N] and O(M D + N) fp32 per head:
    non-causal the key state S [B*H, M, D] with z, c [2, B*H, M]; causal the per-row logit
    maxima [2, B*H, N]. No feature map and no per-chunk state is saved."""

    @staticmethod
    def forward(ctx, q, k, v, features, causal):
        out, *saved = _fwd(q, k, v, features, causal)
        ctx.save_for_backward(q, k, v, features, out, *saved)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = _bwd(_unit_last_stride(dout), *ctx.saved_tensors, ctx.causal)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------
# Backend implementations


def _performer_triton(q, k, v, features, causal):
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return PerformerFunction.apply(q, k, v, features.detach().contiguous(), causal)


def _head_dim_limit(call: CallInfo) -> list[str]:
    from kernels.performer.triton_impl import MAX_D

    d = call.facts.get("D", 0)
    return [] if d <= MAX_D else [f"head dim D={d} exceeds the Triton kernel's limit D <= {MAX_D}"]


registry.register(OP, "ref", performer_attention_ref, devices=("cpu", "cuda"), dtypes=REF_DTYPES)
registry.register(OP, "triton", _performer_triton, devices=("cpu", "cuda"), needs_triton=True,
                  check=_head_dim_limit)


# ----------------------------------------------------------------------------------------------
# Public functions


def orthogonal_features(num_features: int, head_dim: int, *,
                        generator: torch.Generator | None = None,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian orthogonal random features for :func:`performer_attention`.

    Rows come in blocks of ``head_dim`` mutually orthogonal directions (the Q factor of the QR
    decomposition of a Gaussian matrix, sign-corrected so it is Haar-distributed); the last block
    is truncated to reach ``num_features`` rows. Each row is then scaled to the norm of an
    independent standard Gaussian ``head_dim``-vector, so every row is marginally N(0, I) while
    rows of a block stay orthogonal (FAVOR+'s variance reduction). Drawn in float64 on the
    generator's device (CPU when no generator is given), then cast.

    Args:
        num_features: M >= 1. FAVOR+'s usual choice is round(D * ln(D)).
        head_dim: D >= 1.
        generator: source of randomness; pass a new (or re-seeded) one to redraw the features.
            None uses torch's global generator.
        device: where the result lives (default: the generator's device, else CPU).
        dtype: float32 (default), float16, bfloat16 or float64.

    Returns:
        [M, D] tensor.

    Raises:
        TypeError: non-int counts, a generator that is not a torch.Generator, a non-float dtype.
        ValueError: counts < 1.
    """
    num_features = check_int("num_features", num_features, min=1)
    head_dim = check_int("head_dim", head_dim, min=1)
    if device is not None:
        device = check_device("device", device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    names = ", ".join(str(d) for d in REF_DTYPES)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, one of ({names}), got "
                        f"{type(dtype).__name__} {dtype!r}")
    if dtype not in REF_DTYPES:
        raise TypeError(f"dtype must be one of ({names}), got {dtype}")
    return orthogonal_features_ref(num_features, head_dim, generator=generator, device=device,
                                   dtype=dtype)


def performer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        features: torch.Tensor, *, causal: bool = False,
                        backend: str | None = None) -> torch.Tensor:
    """Performer fast attention (FAVOR+ with positive random features), linear in N.

    With qh = q * D^(-1/4), kh = k * D^(-1/4) and phi(x) = exp(features @ x - |x|^2 / 2) / sqrt(M):

        out_i = sum_j (phi(qh_i) . phi(kh_j)) v_j / sum_j (phi(qh_i) . phi(kh_j))

    over all j, or over j <= i when ``causal``. Computed without ever forming phi(q) or phi(k)
    in global memory: the sequence is scanned in chunks carrying the state sum_j phi(k_j) v_j^T
    [M, D] and sum_j phi(k_j) [M] in fp32. Internally stabilised by running maxima of the
    exponents (they cancel exactly in the ratio), so fp16/bf16 inputs with large row norms do not
    overflow; in the causal case output i is bitwise independent of every token after i, also
    when a later token holds NaN or inf (a non-finite v_j makes outputs i >= j non-finite).

    Args:
        q, k, v: [B, N, H, D]; float32, float16 or bfloat16 (float64 on the ref backend); same
            shape, dtype and device. Any strides (a unit last stride avoids a copy).
        features: [M, D] random features (see :func:`orthogonal_features`), same dtype and device
            as q. Treated as constants: no gradient flows to them.
        causal: attend to j <= i only.
        backend: "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, N, H, D] in q's dtype. Differentiable in q, k and v.

    Raises:
        TypeError: non-tensor input, unsupported or mismatched dtypes, non-bool ``causal``.
        ValueError: wrong rank, k or v shaped unlike q, features not [M, D] with q's D, M < 1,
            tensors on different devices.
    """
    check_tensor("q", q, ndim=4, dtypes=REF_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=REF_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=REF_DTYPES)
    check_shape("k", k, tuple(q.shape), " (same as q: [B, N, H, D])")
    check_shape("v", v, tuple(q.shape), " (same as q: [B, N, H, D])")
    check_tensor("features", features, ndim=2, dtypes=REF_DTYPES)
    head_dim = q.shape[-1]
    if features.shape[1] != head_dim:
        raise ValueError(f"features must have shape [M, D] with D = {head_dim} (the last dim of "
                         f"q), got {list(features.shape)}")
    if features.shape[0] < 1:
        raise ValueError(f"features must have at least one row (M >= 1), got M=0 "
                         f"(shape {list(features.shape)})")
    check_same(("q", "k", "v", "features"), (q, k, v, features))
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if q.numel() == 0:  # nothing to attend over: an empty result still connected to the inputs
        return q * 0 + k * 0 + v * 0
    impl = resolve(OP, q, backend, D=head_dim, M=features.shape[0], causal=causal)
    return impl.fn(q, k, v, features, causal)
