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
