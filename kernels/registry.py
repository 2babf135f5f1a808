"""The one place that decides which implementation of an op runs.

Every implementation declares what it supports (devices, dtypes, whether it needs Triton or the
compiled extension, plus an optional per-call check such as a head-dim limit) and answers
"why not" as a list of human-readable reason strings. Resolution for one call:

    explicit ``backend=`` argument
      > ``with kernels.backend("triton"):``   (a ContextVar, restored on exit)
      > ``AVATAR_KERNELS_BACKEND`` env var     (read once, at first use)
      > priority order: cuda ext / triton on CUDA tensors, ``ref`` on CPU tensors (also under
        TRITON_INTERPRET=1, where Triton accepts CPU tensors but only when asked for).

A request made by any of the first three that cannot run raises ``BackendUnavailableError`` listing
every backend's reasons. Automatic selection falls back to the next usable backend (ultimately the
always-available ``ref``) and logs once per (op, backend, reason set).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger("kernels")

BACKEND_NAMES = ("cuda", "triton", "ref")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENV_VAR = "AVATAR_KERNELS_BACKEND"

# Ops whose Triton kernels multiply tiles with tl.dot. Triton 3.6's interpreter computes tl.dot on
# bfloat16 operands wrongly (a plain 16x16 product is off by ~1e10), so under TRITON_INTERPRET=1
# these refuse bf16 inputs instead of returning garbage. Compiled kernels on a GPU are unaffected.
TL_DOT_OPS = frozenset({"attention3d", "frame_causal_attention", "performer_attention"})
INTERPRETER_BF16_DOT_REASON = (
    "bfloat16 tl.dot is computed wrongly by Triton's interpreter (TRITON_INTERPRET=1), and this "
    "op's kernels use tl.dot: run bfloat16 on a GPU, or use float32/float16 or the ref backend")

# Public names that dispatch as another registered op: warp(h, flow) is
# warp_occlusion(h, flow, None, residual=False).
OP_ALIASES = {"warp": "warp_occlusion"}
# Public names of kernels/__init__.py that have no backends to choose from.
NOT_DISPATCHED = {
    "Anchor": "it is the argument type of attention3d(anchor=...); ask about 'attention3d'",
    "orthogonal_features": "it draws random features with plain PyTorch on every device",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message lists every reason."""


# ----------------------------------------------------------------------------------------------
# Environment probes, each cached: they answer "why can't this family of backends run here".


def _memo(fn: Callable) -> Callable:
    """Cache a zero-argument probe. A plain dict rather than functools.lru_cache, which
    torch.compile warns about when the dispatch code is traced."""
    cache: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapper():
        if "value" not in cache:
            cache["value"] = fn()
        return cache["value"]

    wrapper.cache_clear = cache.clear  # type: ignore[attr-defined]
    return wrapper


def interpreter_enabled() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@_memo
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # any failure (missing, broken install) becomes a reason string
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


@_memo
def cuda_extension() -> tuple[object | None, str | None]:
    """Import ``kernels._cuda`` once. Returns (module, None) or (None, reason)."""
    try:
        from kernels import _cuda  # compiled from csrc/ by setup.py; absent in pure-Python installs
    except Exception as exc:
        return None, (
            "the compiled extension kernels._cuda is not available "
            f"({type(exc).__name__}: {exc}); build it with `make build-cuda`"
        )
    return _cuda, None


@_memo
def cuda_device_error() -> str | None:
    """Why the compiled extension sees no CUDA device (None when it sees one or is absent)."""
    module, err = cuda_extension()
    if err or module.has_device():  # type: ignore[union-attr]
        return None
    return module.device_error()  # type: ignore[union-attr]


def _device_reasons_triton(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    if device.type == "cpu" and interpreter_enabled():
        return []
    if device.type == "cpu":
        return ["tensors are on the CPU and TRITON_INTERPRET is not set (Triton needs a GPU "
                "or its interpreter)"]
    return [f"Triton does not run on device type {device.type!r}"]


def _interpreter_reasons(op: str, dtype: torch.dtype) -> list[str]:
    if dtype == torch.bfloat16 and op in TL_DOT_OPS and interpreter_enabled():
        return [INTERPRETER_BF16_DOT_REASON]
    return []


# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """What the registry knows about one call: where and in which dtype it runs, plus op-specific
    facts (head dim, feature count, ...) that an implementation's ``check`` can inspect."""

    device: torch.device
    dtype: torch.dtype
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Implementation:
    op: str
    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    needs_triton: bool = False
    needs_cuda_ext: bool = False
    check: Callable[[CallInfo], list[str]] | None = None
    priority: int = 0  # higher runs first under automatic selection

    def environment_reasons(self) -> list[str]:
        """Reasons independent of the call's tensors (missing triton, missing extension)."""
        reasons: list[str] = []
        if self.needs_triton and (err := triton_import_error()):
            reasons.append(err)
        if self.needs_cuda_ext:
            module, err = cuda_extension()
            if err:
                reasons.append(err)
            elif err := cuda_device_error():
                reasons.append(f"no CUDA device: {err}")
        return reasons

    def reasons(self, call: CallInfo) -> list[str]:
        reasons = self.environment_reasons()
        if call.device.type not in self.devices:
            reasons.append(f"does not run on {call.device.type} tensors (supports "
                           f"{', '.join(self.devices)})")
        elif self.needs_triton:
            reasons += _device_reasons_triton(call.device)
        if self.needs_triton:
            reasons += _interpreter_reasons(self.op, call.dtype)
        if call.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(call.dtype).removeprefix('torch.')} is not supported "
                           f"(supports {names})")
        if self.check is not None:
            reasons += self.check(call)
        return reasons


class Registry:
    def __init__(self) -> None:
        self._impls: dict[str, dict[str, Implementation]] = {}
        self._logged: set[tuple] = set()

    # registration -----------------------------------------------------------------------------
    def register(self, op: str, name: str, fn: Callable, *, devices: Sequence[str],
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, needs_triton: bool = False,
                 needs_cuda_ext: bool = False, check: Callable[[CallInfo], list[str]] | None = None,
                 priority: int | None = None) -> Implementation:
        if name not in BACKEND_NAMES:
            raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
        if priority is None:  # compiled ext first, then Triton, then the reference
            priority = {"cuda": 20, "triton": 10, "ref": 0}[name]
        impl = Implementation(op, name, fn, tuple(devices), tuple(dtypes), needs_triton,
                              needs_cuda_ext, check, priority)
        self._impls.setdefault(op, {})[name] = impl
        return impl

    def implementation(self, op: str, name: str, **kwargs) -> Callable[[Callable], Callable]:
        """Decorator form of :meth:`register`."""
        def wrap(fn: Callable) -> Callable:
            self.register(op, name, fn, **kwargs)
            return fn
        return wrap

    # queries ----------------------------------------------------------------------------------
    def ops(self) -> list[str]:
        return sorted(self._impls)

    def implementations(self, op: str) -> dict[str, Implementation]:
        impls = self._impls.get(OP_ALIASES.get(op, op))
        if impls is None:
            if op in NOT_DISPATCHED:
                raise ValueError(f"op_name {op!r} has no backends: {NOT_DISPATCHED[op]}")
            names = sorted({*self.ops(), *(a for a, o in OP_ALIASES.items() if o in self._impls)})
            raise ValueError(f"op_name must be one of {names}, got {op!r}")
        return impls

    def why_not(self, op: str, call: CallInfo) -> dict[str, list[str]]:
        return {name: impl.reasons(call) for name, impl in self.implementations(op).items()}

    def resolve(self, op: str, call: CallInfo, backend: str | None = None) -> Implementation:
        impls = self.implementations(op)
        requested, source = backend, "backend="
        if requested is None:
            requested, source = context_backend(), "kernels.backend(...)"
        if requested is None:
            requested, source = env_backend(), f"${ENV_VAR}"
        if requested is not None:
            if requested not in BACKEND_NAMES:
                raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {requested!r}")
            impl = impls.get(requested)
            reasons = impl.reasons(call) if impl else [f"op {op!r} has no {requested!r} backend"]
            if reasons:
                table = {requested: reasons, **self.why_not(op, call)}
                raise BackendUnavailableError(
                    f"{op}: backend {requested!r} requested through {source} cannot run this call "
                    f"({_describe(call)}).\n" + _format_reasons(table))
            return impl
        # CPU tensors run the reference first: Triton accepts them only under its interpreter,
        # which is a test vehicle (orders of magnitude slower), never the automatic choice.
        on_cpu = call.device.type == "cpu"
        ranked = sorted(impls.values(), key=lambda i: (not (on_cpu and i.name == "ref"),
                                                       -i.priority))
        skipped: dict[str, list[str]] = {}
        for impl in ranked:
            reasons = impl.reasons(call)
            if not reasons:
                self._log_fallback(op, impl.name, call, skipped)
                return impl
            skipped[impl.name] = reasons
        raise BackendUnavailableError(f"{op}: no backend can run this call ({_describe(call)}).\n"
                                      + _format_reasons(skipped))

    def _log_fallback(self, op: str, chosen: str, call: CallInfo,
                      skipped: dict[str, list[str]]) -> None:
        # Only worth a message when a faster backend was skipped on a device where it could
        # matter: CPU tensors running the reference is the expected path, not a fallback.
        if not skipped or call.device.type == "cpu":
            return
        key = (op, chosen, tuple((k, tuple(v)) for k, v in skipped.items()))
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s: falling back to %r backend.\n%s", op, chosen, _format_reasons(skipped))


def _describe(call: CallInfo) -> str:
    facts = "".join(f", {k}={v}" for k, v in call.facts.items())
    return f"device={call.device}, dtype={str(call.dtype).removeprefix('torch.')}{facts}"


def _format_reasons(reasons: dict[str, list[str]]) -> str:
    lines = []
    for name, why in reasons.items():
        lines.append(f"  {name}: " + ("usable" if not why else "; ".join(why)))
    return "\n".join(lines)


registry = Registry()

# ----------------------------------------------------------------------------------------------
# User-facing selection controls.

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "avatar_kernels_backend", default=None)


# torch.compile cannot trace ContextVar.get, so the context manager mirrors its value into a
# module global, which dynamo reads (and guards on: a different backend recompiles). The mirror is
# process-wide, so threads that compile under different `kernels.backend(...)` blocks at the same
# time may see each other's choice; eager code always reads the ContextVar.
_backend_for_compile: str | None = None


def context_backend() -> str | None:
    """The backend set by the innermost ``with kernels.backend(...)`` (None: not set)."""
    if torch.compiler.is_compiling():
        return _backend_for_compile
    return _context_backend.get()


@_memo
def env_backend() -> str | None:
    """``AVATAR_KERNELS_BACKEND``, read once (empty or unset means automatic)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    return value or None


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Run every op inside the block on backend ``name`` ("cuda", "triton", "ref"); None restores
    automatic selection. An op that cannot run on that backend raises with the reasons."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES} or None, got {name!r}")
    global _backend_for_compile
    token = _context_backend.set(name)
    outer, _backend_for_compile = _backend_for_compile, name
    try:
        yield
    finally:
        _context_backend.reset(token)
        _backend_for_compile = outer


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_backends(op_name: str, *, device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.float32) -> dict[str, list[str]]:
    """Backend name -> reasons it cannot run ``op_name`` (empty list: usable), for tensors on
    ``device`` (default: CUDA when present, else CPU) in ``dtype``."""
    _import_all_ops()
    dev = torch.device(device) if device is not None else _default_device()
    return registry.why_not(op_name, CallInfo(dev, dtype))


def resolve(op: str, tensor: torch.Tensor, backend: str | None = None,
            **facts) -> Implementation:
    """Pick the implementation for a call whose main input is ``tensor``."""
    return registry.resolve(op, CallInfo(tensor.device, tensor.dtype, facts), backend)


OP_MODULES: tuple[str, ...] = (
    "kernels.adaln.op",
    "kernels.attention.op",
    "kernels.flow_warp.op",
    "kernels.performer.op",
    "kernels.frame_causal.op",
)


def _import_all_ops(modules: Iterable[str] = OP_MODULES) -> None:
    import importlib
    import importlib.util

    for name in modules:
        # An op folder not yet present in this checkout is simply not listed.
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) is not None:
            importlib.import_module(name)
