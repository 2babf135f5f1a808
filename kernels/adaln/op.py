"""Public adaLN ops: validation, dispatch, autograd and torch.library registration.

The Triton path is exposed as four opaque custom ops (``avatar_kernels::adaln_modulate_fwd`` ...)
with fake (meta) implementations, wrapped in an ``autograd.Function``, so ``torch.compile`` traces
through the Function and treats the kernels as single graph nodes. The reference path is plain
PyTorch and needs neither.
"""

from __future__ import annotations

import math
import numbers

import torch

from kernels._validation import (
    _dtype_name,
    check_same,
    check_shape,
    check_tensor,
    modulation_frames,
)
from kernels.adaln.ref import adaln_modulate_ref, gated_residual_ref
from kernels.registry import CallInfo, registry, resolve

OP_MODULATE = "adaln_modulate"
OP_GATED = "gated_residual"


def _triton():
    # Imported on first Triton call only, so the ref path never pays for importing triton.
    from kernels.adaln import triton_impl

    return triton_impl


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (the units torch.compile sees)


@torch.library.custom_op("avatar_kernels::adaln_modulate_fwd", mutates_args=())
def _modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().adaln_modulate_fwd(x, shift, scale, weight, bias, eps)


@_modulate_fwd.register_fake
def _(x, shift, scale, weight, bias, eps):
    rows = x.shape[0] * x.shape[1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("avatar_kernels::adaln_modulate_bwd", mutates_args=())
def _modulate_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                  weight: torch.Tensor | None, mean: torch.Tensor,
                  rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().adaln_modulate_bwd(dy, x, scale, weight, mean, rstd)


@_modulate_bwd.register_fake
def _(dy, x, scale, weight, mean, rstd):
    sums = scale.new_empty(scale.shape, dtype=torch.float32)
    return torch.empty_like(x), sums, torch.empty_like(sums)


@torch.library.custom_op("avatar_kernels::gated_residual_fwd", mutates_args=())
def _gated_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _triton().gated_residual_fwd(x, y, gate)


@_gated_fwd.register_fake
def _(x, y, gate):
    return torch.empty_like(x)


@torch.library.custom_op("avatar_kernels::gated_residual_bwd", mutates_args=())
def _gated_bwd(dout: torch.Tensor, y: torch.Tensor,
               gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton().gated_residual_bwd(dout, y, gate)


@_gated_bwd.register_fake
def _(dout, y, gate):
    return torch.empty_like(y), torch.empty_like(gate)


class AdaLNModulateFunction(torch.autograd.Function):
    """Triton adaLN: x [B, N, C], shift/scale [B, T, C], weight/bias [C] or None, contiguous."""

    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, eps):
        y, mean, rstd = _modulate_fwd(x, shift, scale, weight, bias, eps)
        ctx.save_for_backward(x, scale, weight, bias, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, weight, bias, mean, rstd = ctx.saved_tensors
        dx, sum_dy, sum_dy_xhat = _modulate_bwd(dy.contiguous(), x, scale, weight, mean, rstd)
        # Per frame, with h = x_hat * w + b and y = h * (1 + scale) + shift:
        #   d shift = sum dy,  d scale = sum dy * h = w * sum(dy x_hat) + b * sum(dy),
        #   d w = sum over frames of (1 + scale) * sum(dy x_hat), d b likewise with sum(dy).
        # The kernel only accumulates the two sums; the rest is [B, T, C]-sized.
        one_plus_scale = 1.0 + scale.float()
        dscale = sum_dy_xhat if weight is None else weight.float() * sum_dy_xhat
        if bias is not None:
            dscale = dscale + bias.float() * sum_dy
        dweight = dbias = None
        if weight is not None:
            dweight = (one_plus_scale * sum_dy_xhat).sum(dim=(0, 1)).to(weight.dtype)
        if bias is not None:
            dbias = (one_plus_scale * sum_dy).sum(dim=(0, 1)).to(bias.dtype)
        return dx, sum_dy.to(ctx.shift_dtype), dscale.to(scale.dtype), dweight, dbias, None


class GatedResidualFunction(torch.autograd.Function):
    """Triton gated residual: x, y [B, N, C], gate [B, T, C], all contiguous."""

    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        return _gated_fwd(x, y, gate)

    @staticmethod
    def backward(ctx, dout):
        y, gate = ctx.saved_tensors
        dout = dout.contiguous()
        dy, dgate = _gated_bwd(dout, y, gate)
        return dout, dy, dgate


# ----------------------------------------------------------------------------------------------
# Backend implementations (registered with the registry)


def _as_frames(mod: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, 1, C]; [B, T, C] unchanged; contiguous either way."""
    return (mod[:, None, :] if mod.dim() == 2 else mod).contiguous()


def _modulate_triton(x, shift, scale, eps, weight, bias):
    return AdaLNModulateFunction.apply(
        x.contiguous(), _as_frames(shift), _as_frames(scale),
        None if weight is None else weight.contiguous(),
        None if bias is None else bias.contiguous(), eps)


def _gated_triton(x, y, gate):
    return GatedResidualFunction.apply(x.contiguous(), y.contiguous(), _as_frames(gate))


def _channel_limit(call: CallInfo) -> list[str]:
    from kernels.adaln.triton_impl import MAX_C

    c = call.facts.get("C", 0)
    return [] if c <= MAX_C else [f"C={c} exceeds the register-tile limit C <= {MAX_C}"]


for _op, _ref, _tri in ((OP_MODULATE, adaln_modulate_ref, _modulate_triton),
                        (OP_GATED, gated_residual_ref, _gated_triton)):
    registry.register(_op, "ref", _ref, devices=("cpu", "cuda"))
    registry.register(_op, "triton", _tri, devices=("cpu", "cuda"), needs_triton=True,
                      check=_channel_limit)


# ----------------------------------------------------------------------------------------------
# Public functions


def _check_eps(eps: object) -> float:
    """eps must be a real number (not bool), finite and > 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number (float), got {type(eps).__name__} {eps!r}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be a finite number > 0, got {value}")
    return value


def _check_modulation_dtype(name: str, mod: torch.Tensor, x: torch.Tensor) -> None:
    if mod.dtype not in (x.dtype, torch.float32):
        want = ("float32 (that of x)" if x.dtype == torch.float32
                else f"the dtype of x ({_dtype_name(x.dtype)}) or float32")
        raise TypeError(f"{name} must have {want}, got {_dtype_name(mod.dtype)}")


def _check_affine(name: str, value: torch.Tensor | None, x: torch.Tensor) -> None:
    if value is None:
        return
    check_tensor(name, value, ndim=1)
    check_shape(name, value, (x.shape[-1],), " ([C] of x)")
    check_same(("x", name), (x, value), dtype=False)
    _check_modulation_dtype(name, value, x)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *,
                   eps: float = 1e-6, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Fused adaLN modulation: ``(LayerNorm(x) * weight + bias) * (1 + scale) + shift``.

    LayerNorm runs over the last dim with biased variance; statistics in fp32, overflow-safe
    (rows of any finite fp32 magnitude normalise correctly). ``weight``/``bias`` are LayerNorm's
    optional affine parameters (CogVideoX); without them it is DiT's affine-free LayerNorm.

    Args:
        x: [B, N, C] tokens; float32, float16 or bfloat16.
        shift, scale: [B, C] (one vector per sample) or [B, T, C] (one per frame: N must be a
            multiple of T, and frame t owns tokens [t*N/T, (t+1)*N/T)). Same device as x; x's
            dtype or float32 (Wan keeps its modulation in fp32), both the same.
        eps: added to the variance; a finite number > 0.
        weight, bias: [C] or None; x's dtype or float32.
        backend: "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, N, C] in x's dtype (empty for zero-size x). Differentiable in x, shift, scale,
        weight and bias; each gradient comes back in its input's dtype.

    Raises:
        TypeError: non-tensor input, unsupported dtype, dtypes that differ, non-numeric eps.
        ValueError: wrong rank or shape, N not a multiple of T, tensors on different devices,
            eps not finite or not > 0.
    """
    check_tensor("x", x, ndim=3)
    batch, tokens, channels = x.shape
    t_shift = modulation_frames("shift", shift, batch, tokens, channels)
    t_scale = modulation_frames("scale", scale, batch, tokens, channels)
    if shift.shape != scale.shape:
        raise ValueError(f"shift and scale must have the same shape, got shift {list(shift.shape)}"
                         f" and scale {list(scale.shape)} (T={t_shift} vs T={t_scale})")
    check_same(("x", "shift", "scale"), (x, shift, scale), dtype=False)
    _check_modulation_dtype("shift", shift, x)
    check_same(("shift", "scale"), (shift, scale), device=False)
    _check_affine("weight", weight, x)
    _check_affine("bias", bias, x)
    eps = _check_eps(eps)
    impl = resolve(OP_MODULATE, x, backend, C=channels)
    return impl.fn(x, shift, scale, eps, weight, bias)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                   backend: str | None = None) -> torch.Tensor:
    """Fused gated residual: ``x + gate * y`` (the adaLN-Zero block output).

    Args:
        x, y: [B, N, C]; float32, float16 or bfloat16, same dtype and device.
        gate: [B, C] or [B, T, C], broadcast over tokens exactly like ``shift`` in
            :func:`adaln_modulate`; x's dtype or float32.
        backend: "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, N, C] in x's dtype (empty for zero-size x). Differentiable in x, y and gate.

    Raises:
        TypeError / ValueError: as :func:`adaln_modulate`.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("y", y, ndim=3)
    check_shape("y", y, tuple(x.shape), " (same as x)")
    batch, tokens, channels = x.shape
    modulation_frames("gate", gate, batch, tokens, channels)
    check_same(("x", "y"), (x, y))
    check_same(("x", "gate"), (x, gate), dtype=False)
    _check_modulation_dtype("gate", gate, x)
    impl = resolve(OP_GATED, x, backend, C=channels)
    return impl.fn(x, y, gate)
