"""Input checks shared by every public op. Each raises ValueError/TypeError whose message names the
argument, the expected value and the received value; ops call these once, in the public function,
so kernels never see malformed input (no asserts, no illegal addresses)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.registry import FLOAT_DTYPES


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(name: str, value: object, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES) -> torch.Tensor:
    """``value`` must be a tensor of rank ``ndim`` with a dtype in ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name} must be {want}, got {value.dim()}-D with shape "
                             f"{tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        want = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({want}), got {_dtype_name(value.dtype)}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int | None],
                what: str = "") -> None:
    """``value.shape`` must match ``expected`` (None entries match anything)."""
    shape = tuple(value.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}{what}, got {list(shape)}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], *, dtype: bool = True,
               device: bool = True) -> None:
    """All tensors share device (and dtype) with the first one."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if device and t.device != first.device:
            raise ValueError(f"{name} must be on the same device as {first_name} "
                             f"({first.device}), got {t.device}")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} must have the same dtype as {first_name} "
                            f"({_dtype_name(first.dtype)}), got {_dtype_name(t.dtype)}")


def check_head_dim(name: str, head_dim: int, *, multiple: int = 8, maximum: int = 256) -> None:
    if head_dim % multiple != 0 or not 0 < head_dim <= maximum:
        raise ValueError(f"{name}: head dim D must be a positive multiple of {multiple} up to "
                         f"{maximum}, got D={head_dim}")


def modulation_frames(name: str, mod: torch.Tensor, batch: int, tokens: int,
                      channels: int) -> int:
    """Per-sample ([B, C]) or per-frame ([B, T, C]) modulation of x [B, N, C]; returns T.

    Frame t owns tokens [t*N/T, (t+1)*N/T), so N must be a multiple of T.
    """
    check_tensor(name, mod, ndim=(2, 3))
    if mod.dim() == 2:
        check_shape(name, mod, (batch, channels), " (per-sample: [B, C] of x)")
        return 1
    check_shape(name, mod, (batch, None, channels), " (per-frame: [B, T, C] of x)")
    frames = mod.shape[1]
    if frames < 1 or tokens % frames != 0:
        raise ValueError(f"{name}: the token count N of x must be a multiple of the frame count T, "
                         f"got N={tokens} and T={frames} ({name} shape {list(mod.shape)})")
    return frames
