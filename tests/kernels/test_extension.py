"""The optional CUDA extension: importable or not, it must become a reason string, never a crash."""

from __future__ import annotations

import torch

from kernels.registry import CallInfo, Registry, cuda_extension


def test_extension_state_is_a_reason_or_a_module():
    module, reason = cuda_extension()
    assert (module is None) != (reason is None)
    if module is None:
        assert "kernels._cuda" in reason and "make build-cuda" in reason
    else:
        assert isinstance(module.has_device(), bool)
        if not torch.cuda.is_available():
            assert not module.has_device()
            assert module.device_error()  # e.g. "error 35 (CUDA driver version is insufficient"


def test_cuda_backend_reason_without_device():
    reg = Registry()
    reg.register("toy", "ref", lambda: None, devices=("cpu", "cuda"))
    reg.register("toy", "cuda", lambda: None, devices=("cuda",), needs_cuda_ext=True)
    reasons = reg.why_not("toy", CallInfo(torch.device("cpu"), torch.float32))
    assert reasons["ref"] == []
    assert any("does not run on cpu tensors" in r for r in reasons["cuda"])
    if not torch.cuda.is_available():
        assert any("kernels._cuda" in r or "no CUDA device" in r for r in reasons["cuda"])
