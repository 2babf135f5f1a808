"""Test utilities shared by the project's tests and usable downstream (like ``torch.testing``).

The tolerance rule (from flash-attention): an implementation's max error against a high-precision
reference must be at most ``factor`` times (2 for outputs, 3 for gradients) the error plain PyTorch
makes when it computes the same thing in the same low precision. A small absolute ``floor`` covers
the case where the baseline is exact (fp32 elementwise math), so the rule never demands 0 error.
"""

from __future__ import annotations

import torch

from kernels.registry import interpreter_enabled


def nan_empty(*shape: int, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """A fresh tensor filled with NaN: any element a kernel forgets to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item()


def assert_within_tolerance(actual: torch.Tensor, reference: torch.Tensor,
                            baseline: torch.Tensor, *, factor: float = 2.0,
                            floor: float = 1e-5, name: str = "output") -> None:
    """``actual`` (the implementation under test) may be at most ``factor`` times as far from
    ``reference`` (fp64/fp32 math) as ``baseline`` (plain PyTorch in the low precision), plus
    ``floor``. NaN or inf where the reference is finite always fails."""
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference "
                             f"{tuple(reference.shape)}")
    finite = torch.isfinite(reference)
    if not torch.isfinite(actual[finite]).all():
        raise AssertionError(f"{name}: non-finite values where the reference is finite")
    err = max_abs_error(actual[finite], reference[finite])
    base = max_abs_error(baseline[finite], reference[finite])
    bound = factor * base + floor
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3e} exceeds {factor}x the plain-PyTorch "
                             f"error {base:.3e} + floor {floor:.1e} (bound {bound:.3e})")


def triton_test_device() -> tuple[str | None, str]:
    """(device, reason): where Triton kernels can be tested here, or None with the reason."""
    if torch.cuda.is_available():
        return "cuda", ""
    if interpreter_enabled():
        return "cpu", ""
    return None, "no CUDA device and TRITON_INTERPRET is not set (run `make test`)"


def compile_for_gpu(kernel, types: dict[str, str], constexprs: dict, *, arch: int = 90,
                    num_warps: int = 4, num_stages: int = 3, aligned: tuple[str, ...] = ()):
    """Compile a ``@triton.jit`` kernel ahead of time for an NVIDIA target, with no GPU present.

    It runs the real compiler pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through ptxas), so
    it catches compiled-path errors the interpreter cannot see (type errors in the lowered IR,
    layouts, shared-memory overflow) and lets tests inspect the IR (``compiled.asm["ttgir"]``,
    ``["ptx"]``). Must run in a process without TRITON_INTERPRET, since the interpreter replaces
    ``triton.jit`` at decoration time.

    Args:
        kernel: the JITFunction (``triton_impl._x_kernel``), or an autotuned one (its
            ``triton.Config`` is then given by ``num_warps``/``num_stages``).
        types: argument name -> Triton type string ("*fp16", "*fp32", "i32", "i64", "fp32");
            arguments not named default to "*fp16" for ``*_ptr`` names and "i32" otherwise.
        constexprs: values of the ``tl.constexpr`` arguments.
        arch: compute capability as an int (80 = A100, 90 = H100/H200).
        aligned: integer arguments to compile as multiples of 16, as the JIT specialises them
            at run time when they are (strides and sizes of aligned shapes); pointers always are.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        kernel = kernel.fn
    unknown = (set(constexprs) | set(aligned)) - set(kernel.arg_names)
    if unknown:  # (types may name arguments of several kernels: they are not checked)
        raise ValueError(f"{kernel.fn.__name__} has no argument(s) {sorted(unknown)}")
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        default = "*fp16" if name.endswith("_ptr") else "i32"
        signature[name] = types.get(name, default)
        if name.endswith("_ptr") or name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT specialises for aligned tensors
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def run_compiled_mode(script: str, *args: str, timeout: float = 600):
    """Run ``python -c script *args`` in a subprocess with TRITON_INTERPRET=0 and the repository
    on sys.path: the interpreter replaces ``triton.jit`` at decoration time, so ahead-of-time
    compile checks (:func:`compile_for_gpu`) cannot run inside an interpreter test process.
    Returns the ``subprocess.CompletedProcess`` (text mode, output captured)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, cwd=root, timeout=timeout, check=False)


def forbid_host_syncs(package: str = "kernels"):
    """Context manager: inside it, code of ``package`` (not torch, triton or the test itself)
    that reads tensor values on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
    ``int(t)``, ``float(t)``, ``bool(t)``) or builds a tensor from Python data
    (``torch.tensor``) raises AssertionError naming the call. Such calls stall the stream on
    every launch and break CUDA-graph capture; on CPU tensors this catches them without a GPU."""
    import contextlib
    import sys

    @contextlib.contextmanager
    def guard():
        def from_package() -> str | None:
            name = sys._getframe(2).f_globals.get("__name__", "")
            return name if name == package or name.startswith(package + ".") else None

        def wrap(owner, attr):
            original = getattr(owner, attr)

            def checked(*args, **kwargs):
                caller = from_package()
                if caller is not None:
                    raise AssertionError(f"host sync: {attr} called from {caller}")
                return original(*args, **kwargs)

            return original, checked

        methods = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__")
        saved = [(torch.Tensor, m, *wrap(torch.Tensor, m)) for m in methods]
        saved.append((torch, "tensor", *wrap(torch, "tensor")))
        for owner, attr, _, checked in saved:
            setattr(owner, attr, checked)
        try:
            yield
        finally:
            for owner, attr, original, _ in saved:
                setattr(owner, attr, original)

    return guard()


def eager_and_graph_replay(step):
    """Run ``step()`` (a function returning a tuple of CUDA tensors) once eagerly on a side
    stream (warm-up: autotuning and one-time caches happen outside the capture), then capture it
    in a CUDA graph and replay it. Returns (eager outputs, replayed outputs). Capture fails if
    ``step`` synchronises with the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured
