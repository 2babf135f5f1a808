"""Public adaLN ops: validation, dispatch, autograd and torch.library registration.

The Triton path is exposed as four opaque custom ops (``avatar_kernels::adaln_modulate_fwd`` ...)
with fake (meta) implementations, wrapped in an ``autograd.Function``, so ``torch.compile`` traces
through the Function and treats the kernels as single graph nodes. The reference path is plain
PyTorch and needs neither.
"""

from __future__ import annotations

import torch

from kernels._validation import check_same, check_shape, check_tensor, modulation_frames
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
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().adaln_modulate_fwd(x, shift, scale, eps)


@_modulate_fwd.register_fake
def _(x, shift, scale, eps):
    rows = x.shape[0] * x.shape[1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("avatar_kernels::adaln_modulate_bwd", mutates_args=())
def _modulate_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().adaln_modulate_bwd(dy, x, scale, mean, rstd)


@_modulate_bwd.register_fake
def _(dy, x, scale, mean, rstd):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


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
    """Triton adaLN: inputs x [B, N, C], shift/scale [B, T, C], all contiguous."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = _modulate_fwd(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = _modulate_bwd(dy.contiguous(), x, scale, mean, rstd)
        return dx, dshift, dscale, None


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


def _modulate_triton(x, shift, scale, eps):
    y = AdaLNModulateFunction.apply(x.contiguous(), _as_frames(shift), _as_frames(scale), eps)
    return y


def _gated_triton(x, y, gate):
    frames = _as_frames(gate)
    out = GatedResidualFunction.apply(x.contiguous(), y.contiguous(), frames)
    return out


def _channel_limit(call: CallInfo) -> list[str]:
    from kernels.adaln.triton_impl import MAX_C

    c = call.facts.get("C", 0)
    return [] if c <= MAX_C else [f"C={c} exceeds the single-block limit C <= {MAX_C}"]


for _op, _ref, _tri in ((OP_MODULATE, adaln_modulate_ref, _modulate_triton),
                        (OP_GATED, gated_residual_ref, _gated_triton)):
    registry.register(_op, "ref", _ref, devices=("cpu", "cuda"))
    registry.register(_op, "triton", _tri, devices=("cpu", "cuda"), needs_triton=True,
                      check=_channel_limit)


# ----------------------------------------------------------------------------------------------
# Public functions


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *,
                   eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """Fused adaLN modulation: ``LayerNorm(x) * (1 + scale) + shift``.

    LayerNorm runs over the last dim without affine parameters; statistics in fp32.

    Args:
        x: [B, N, C] tokens; float32, float16 or bfloat16.
        shift, scale: [B, C] (one vector per sample) or [B, T, C] (one per frame: N must be a
            multiple of T, and frame t owns tokens [t*N/T, (t+1)*N/T)). Same dtype and device as x.
        eps: added to the variance.
        backend: "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, N, C] in x's dtype. Differentiable in x, shift and scale.

    Raises:
        TypeError: non-tensor input, unsupported dtype, dtypes that differ.
        ValueError: wrong rank or shape, N not a multiple of T, tensors on different devices.
    """
    check_tensor("x", x, ndim=3)
    batch, tokens, channels = x.shape
    t_shift = modulation_frames("shift", shift, batch, tokens, channels)
    t_scale = modulation_frames("scale", scale, batch, tokens, channels)
    if shift.shape != scale.shape:
        raise ValueError(f"shift and scale must have the same shape, got shift {list(shift.shape)}"
                         f" and scale {list(scale.shape)} (T={t_shift} vs T={t_scale})")
    check_same(("x", "shift", "scale"), (x, shift, scale))
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    impl = resolve(OP_MODULATE, x, backend, C=channels)
    return impl.fn(x, shift, scale, float(eps))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                   backend: str | None = None) -> torch.Tensor:
    """Fused gated residual: ``x + gate * y`` (the adaLN-Zero block output).

    Args:
        x, y: [B, N, C]; float32, float16 or bfloat16, same dtype and device.
        gate: [B, C] or [B, T, C], broadcast over tokens exactly like ``shift`` in
            :func:`adaln_modulate`.
        backend: "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, N, C] in x's dtype. Differentiable in x, y and gate.

    Raises:
        TypeError / ValueError: as :func:`adaln_modulate`.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("y", y, ndim=3)
    check_shape("y", y, tuple(x.shape), " (same as x)")
    batch, tokens, channels = x.shape
    modulation_frames("gate", gate, batch, tokens, channels)
    check_same(("x", "y", "gate"), (x, y, gate))
    impl = resolve(OP_GATED, x, backend, C=channels)
    return impl.fn(x, y, gate)
