"""Public flow-warp ops: validation, dispatch, autograd and torch.library registration.

Each compiled backend (Triton, CUDA C++) is exposed as two opaque custom ops
(``avatar_kernels::warp_occlusion_fwd`` / ``_bwd`` and ``avatar_kernels::warp_occlusion_cuda_fwd``
/ ``_bwd``) with fake implementations, wrapped in one ``autograd.Function``, so ``torch.compile``
traces through the Function and treats each kernel as a single graph node. The reference path is
plain PyTorch and needs neither.
"""

from __future__ import annotations

import torch

from kernels._validation import check_same, check_shape, check_tensor
from kernels.flow_warp.plan import MAX_KEYS, footprint_count
from kernels.flow_warp.ref import warp_occlusion_ref
from kernels.registry import CallInfo, registry, resolve

OP = "warp_occlusion"
MAX_PIXELS = 2**31 - 1  # B*H*W: int32 pixel indices in both compiled backends and the plan


def _triton():
    # Imported on first Triton call only, so the ref path never pays for importing triton.
    from kernels.flow_warp import triton_impl

    return triton_impl


def _cuda():
    from kernels.flow_warp import cuda_impl

    return cuda_impl


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (the units torch.compile sees)


def _fake_fwd(h, flow, occlusion, residual):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _fake_bwd(dout, h, flow, occlusion, residual, deterministic):
    batch, height, width, _ = h.shape
    docc_dtype = h.dtype if occlusion is None else occlusion.dtype
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            flow.new_empty(batch, height, width, 2),
            h.new_empty(batch, height, width, 1, dtype=docc_dtype))


@torch.library.custom_op("avatar_kernels::warp_occlusion_fwd", mutates_args=())
def _triton_fwd(h: torch.Tensor, flow: torch.Tensor, occlusion: torch.Tensor | None,
                residual: bool) -> torch.Tensor:
    return _triton().warp_occlusion_fwd(h, flow, occlusion, residual)


@torch.library.custom_op("avatar_kernels::warp_occlusion_bwd", mutates_args=())
def _triton_bwd(dout: torch.Tensor, h: torch.Tensor, flow: torch.Tensor,
                occlusion: torch.Tensor | None, residual: bool, deterministic: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton().warp_occlusion_bwd(dout.contiguous(), h, flow, occlusion, residual,
                                        deterministic)


@torch.library.custom_op("avatar_kernels::warp_occlusion_cuda_fwd", mutates_args=())
def _cuda_fwd(h: torch.Tensor, flow: torch.Tensor, occlusion: torch.Tensor | None,
              residual: bool) -> torch.Tensor:
    return _cuda().warp_occlusion_fwd(h, flow, occlusion, residual)


@torch.library.custom_op("avatar_kernels::warp_occlusion_cuda_bwd", mutates_args=())
def _cuda_bwd(dout: torch.Tensor, h: torch.Tensor, flow: torch.Tensor,
              occlusion: torch.Tensor | None, residual: bool, deterministic: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cuda().warp_occlusion_bwd(dout, h, flow, occlusion, residual, deterministic)


for _op in (_triton_fwd, _cuda_fwd):
    _op.register_fake(_fake_fwd)
for _op in (_triton_bwd, _cuda_bwd):
    _op.register_fake(_fake_bwd)

_KERNELS = {"triton": (_triton_fwd, _triton_bwd), "cuda": (_cuda_fwd, _cuda_bwd)}


class WarpOcclusionFunction(torch.autograd.Function):
    """Compiled warp: h [B, H, W, C] contiguous, flow [B, H, W, 2], occlusion [B, H, W, 1] or
    None; ``kind`` picks the kernel pair ("triton" or "cuda")."""

    @staticmethod
    def forward(ctx, h, flow, occlusion, residual, deterministic, kind):
        fwd, _ = _KERNELS[kind]
        ctx.save_for_backward(h, flow, occlusion)
        ctx.residual, ctx.deterministic, ctx.kind = residual, deterministic, kind
        return fwd(h, flow, occlusion, residual)

    @staticmethod
    def backward(ctx, dout):
        h, flow, occlusion = ctx.saved_tensors
        _, bwd = _KERNELS[ctx.kind]
        dh, dflow, docc = bwd(dout, h, flow, occlusion, ctx.residual, ctx.deterministic)
        return dh, dflow, (None if occlusion is None else docc), None, None, None


# ----------------------------------------------------------------------------------------------
# Backend implementations (registered with the registry)


def _warp_ref(h, flow, occlusion, residual, deterministic):
    return warp_occlusion_ref(h, flow, occlusion, residual)


def _warp_triton(h, flow, occlusion, residual, deterministic):
    return WarpOcclusionFunction.apply(h, flow, occlusion, residual, deterministic, "triton")


def _warp_cuda(h, flow, occlusion, residual, deterministic):
    return WarpOcclusionFunction.apply(h, flow, occlusion, residual, deterministic, "cuda")


def _pixel_limit(call: CallInfo) -> list[str]:
    pixels = call.facts.get("pixels", 0)
    footprints = call.facts.get("footprints", 0)
    reasons = [] if pixels <= MAX_PIXELS else [
        f"B*H*W={pixels} exceeds the int32 pixel-index limit {MAX_PIXELS}"]
    if footprints > MAX_KEYS:
        reasons.append(f"B*(H+1)*(W+1)={footprints} exceeds the int32 footprint-key limit "
                       f"{MAX_KEYS} of the backward plan")
    return reasons


registry.register(OP, "ref", _warp_ref, devices=("cpu", "cuda"))
registry.register(OP, "triton", _warp_triton, devices=("cpu", "cuda"), needs_triton=True,
                  check=_pixel_limit)
registry.register(OP, "cuda", _warp_cuda, devices=("cuda",), needs_cuda_ext=True,
                  check=_pixel_limit)


# ----------------------------------------------------------------------------------------------
# Validation and public functions

_LAYOUT = ("h must be channels-last [B, H, W, C] and contiguous (channel stride 1), the layout "
           "WarpCA gets when it reshapes its tokens; a channels-first x [B, C, H, W] "
           "becomes one with x.permute(0, 2, 3, 1).contiguous()")


def _validate(h, flow, occlusion, residual, deterministic) -> None:
    check_tensor("h", h, ndim=4)
    check_tensor("flow", flow, ndim=4)
    batch, height, width, channels = h.shape
    if flow.shape[-1] != 2:
        raise ValueError(f"flow must have shape [B, H, W, 2] with (dx, dy) in its last dim, got "
                         f"last dim {flow.shape[-1]} (shape {list(flow.shape)})")
    if tuple(flow.shape[:3]) != (batch, height, width):
        hint = ""
        if tuple(h.shape[2:]) == tuple(flow.shape[1:3]):
            hint = (f"; h {list(h.shape)} looks channels-first [B, C, H, W] with C={h.shape[1]}: "
                    + _LAYOUT)
        raise ValueError(f"flow must have shape [{batch}, {height}, {width}, 2] (B, H, W of h "
                         f"[B, H, W, C] = {list(h.shape)}), got {list(flow.shape)}{hint}")
    if not h.is_contiguous():
        raise ValueError(f"{_LAYOUT}; got h of shape {list(h.shape)} with strides "
                         f"{list(h.stride())} (contiguous would be "
                         f"{[height * width * channels, width * channels, channels, 1]})")
    check_same(("h", "flow"), (h, flow), dtype=False)
    if flow.dtype not in (h.dtype, torch.float32):
        raise TypeError(f"flow must have the dtype of h ({str(h.dtype).removeprefix('torch.')}) "
                        f"or float32, got {str(flow.dtype).removeprefix('torch.')}")
    if occlusion is not None:
        check_tensor("occlusion", occlusion, ndim=4)
        check_shape("occlusion", occlusion, (batch, height, width, 1),
                    " (B, H, W of h, one channel)")
        check_same(("h", "occlusion"), (h, occlusion))
    for name, value in (("residual", residual), ("deterministic", deterministic)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def warp_occlusion(h: torch.Tensor, flow: torch.Tensor, occlusion: torch.Tensor | None = None,
                   *, residual: bool = True, deterministic: bool = False,
                   backend: str | None = None) -> torch.Tensor:
    """Flow warping with occlusion, WarpCA's ``H' = H + O * W(H, F)`` (WarpFace, Eq. 10).

    Output pixel (y, x) samples ``h`` bilinearly at ``(x + dx, y + dy)``: pixel centres at
    integer coordinates, taps outside the image contribute zero, coordinates computed in fp32
    whatever the input dtype. A non-finite displacement makes that pixel's sample zero, its flow
    gradient zero and its contribution to ``dh`` zero. See kernels/flow_warp/README.md.

    Args:
        h: [B, H, W, C] features, channels-last and contiguous; float32, float16 or bfloat16.
        flow: [B, H, W, 2] displacement in pixels, (dx, dy); h's dtype or float32.
        occlusion: [B, H, W, 1] in h's dtype, or None (ones).
        residual: True returns ``h + occlusion * warp(h, flow)``, False ``occlusion * warp``.
        deterministic: bitwise-reproducible gradients (a sorted gather instead of float
            atomics for ``dh``) on the triton and cuda backends.
        backend: "cuda", "triton" or "ref" to force one; default per :mod:`kernels.registry`.

    Returns:
        [B, H, W, C] in h's dtype, contiguous. Differentiable in h, flow and occlusion.

    Raises:
        TypeError: non-tensor input, unsupported dtype, dtypes that differ, non-bool flags.
        ValueError: wrong rank or shape, non-contiguous or channels-first h, mixed devices.
    """
    _validate(h, flow, occlusion, residual, deterministic)
    batch, height, width, channels = h.shape
    impl = resolve(OP, h, backend, C=channels, pixels=batch * height * width,
                   footprints=footprint_count(batch, height, width))
    return impl.fn(h, flow, occlusion, residual, deterministic)


def warp(h: torch.Tensor, flow: torch.Tensor, *, deterministic: bool = False,
         backend: str | None = None) -> torch.Tensor:
    """Bilinear flow warp of ``h`` [B, H, W, C] by ``flow`` [B, H, W, 2]:
    ``warp_occlusion(h, flow, None, residual=False)``. Same conventions and errors."""
    return warp_occlusion(h, flow, None, residual=False, deterministic=deterministic,
                          backend=backend)
