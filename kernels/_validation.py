"""Input checks shared by every public op. Each raises ValueError/TypeError whose message names the
argument, the expected value and the received value; ops call these once, in the public function,
so kernels never see malformed input (no asserts, no illegal addresses)."""

from __future__ import annotations

import math
import numbers
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


# ----------------------------------------------------------------------------------------------
# Scalar, device and dtype arguments. numpy scalars (np.int64, np.float32, ...) are accepted where
# Python ones are: numpy registers its integer and floating types with numbers.Integral/Real.


def _describe_value(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def check_int(name: str, value: object, *, min: int | None = None,
              max: int | None = None) -> int:
    """``value`` must be an integer (Python or numpy; not bool) in [min, max]; returns an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe_value(value)}")
    value = int(value)
    if min is not None and value < min:
        raise ValueError(f"{name} must be >= {min}, got {value}")
    if max is not None and value > max:
        raise ValueError(f"{name} must be <= {max}, got {value}")
    return value


def check_float(name: str, value: object, *, finite: bool = True,
                positive: bool = False) -> float:
    """``value`` must be a real number (int or float, Python or numpy; not bool), finite unless
    ``finite=False`` and > 0 when ``positive``; returns a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe_value(value)}")
    value = float(value)
    if math.isnan(value) or (finite and not math.isfinite(value)) or (positive and value <= 0):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number"
                         f"{' > 0' if positive else ''}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe_value(value)}")
    return bool(value)


def check_device(name: str, value: object) -> torch.device:
    """``value`` (a torch.device, a string such as "cpu" or "cuda:1", or a CUDA index) must name
    a device this process can use; returns it as a torch.device."""
    if isinstance(value, bool) or not isinstance(value, (torch.device, str, numbers.Integral)):
        raise TypeError(f"{name} must be a torch.device or a device string such as 'cpu' or "
                        f"'cuda', got {_describe_value(value)}")
    try:
        device = torch.device(f"cuda:{int(value)}" if isinstance(value, numbers.Integral)
                              else value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:0', got "
                         f"{value!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(value)!r} needs a CUDA device, but "
                             f"torch.cuda.is_available() is False here; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={str(value)!r}: there are only "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def check_dtype(name: str, value: object, allowed: Sequence[torch.dtype]) -> torch.dtype:
    """``value`` must be one of the torch dtypes ``allowed`` (a string like "float32" is not)."""
    want = ", ".join(f"torch.{_dtype_name(d)}" for d in allowed)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, one of ({want}), got "
                        f"{_describe_value(value)}")
    if value not in allowed:
        raise TypeError(f"{name} must be one of ({want}), got torch.{_dtype_name(value)}")
    return value
