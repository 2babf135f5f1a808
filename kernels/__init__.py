"""avatar-kernels: fused GPU kernels for long-video avatar diffusion.

Import one op and nothing else: ``from kernels import attention3d``. Every public op dispatches
through :mod:`kernels.registry` (``backend=`` argument, ``with kernels.backend(name):``, the
``AVATAR_KERNELS_BACKEND`` environment variable, then priority). Op modules are imported lazily on
first use, so ``import kernels`` stays cheap and never touches Triton or the CUDA extension.
"""

from __future__ import annotations

import importlib

from kernels.registry import (
    BackendUnavailableError,
    available_backends,
    backend,
    registry,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "adaln_modulate": "kernels.adaln.op",
    "gated_residual": "kernels.adaln.op",
    "attention3d": "kernels.attention.op",
    "Anchor": "kernels.attention.op",
    "rope3d": "kernels.attention.op",
    "warp_occlusion": "kernels.flow_warp.op",
    "warp": "kernels.flow_warp.op",
    "orthogonal_features": "kernels.performer.op",
    "performer_attention": "kernels.performer.op",
    "frame_causal_attention": "kernels.frame_causal.op",
}

__all__ = ["BackendUnavailableError", "available_backends", "backend", "registry", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
