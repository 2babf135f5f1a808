"""Dispatch order, reason strings, the context manager and the env var."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kernels
from kernels.registry import BackendUnavailableError, CallInfo, Registry


def _toy_registry():
    reg = Registry()
    reg.register("toy", "ref", lambda: "ref", devices=("cpu", "cuda"))
    reg.register("toy", "triton", lambda: "triton", devices=("cpu", "cuda"), needs_triton=True,
                 check=lambda call: [] if call.facts.get("D", 0) <= 64 else ["D too large"])
    return reg


def test_priority_prefers_triton_on_cuda_and_ref_on_plain_cpu(monkeypatch):
    reg = _toy_registry()
    assert reg.resolve("toy", CallInfo(torch.device("cuda"), torch.float16)).name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert reg.resolve("toy", CallInfo(torch.device("cpu"), torch.float16)).name == "ref"


def test_explicit_request_that_cannot_run_lists_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reg = _toy_registry()
    call = CallInfo(torch.device("cpu"), torch.float32, {"D": 128})
    with pytest.raises(BackendUnavailableError) as info:
        reg.resolve("toy", call, backend="triton")
    msg = str(info.value)
    assert "TRITON_INTERPRET is not set" in msg and "D too large" in msg and "ref: usable" in msg
    with pytest.raises(BackendUnavailableError, match="has no 'cuda' backend"):
        reg.resolve("toy", call, backend="cuda")


def test_automatic_selection_falls_back_on_reasons():
    reg = _toy_registry()
    call = CallInfo(torch.device("cuda"), torch.float16, {"D": 128})
    assert reg.resolve("toy", call).name == "ref"


def test_context_manager_is_scoped_and_restored(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reg = _toy_registry()
    call = CallInfo(torch.device("cpu"), torch.float32)
    assert reg.resolve("toy", call).name == "ref"  # CPU tensors: the reference unless asked
    with kernels.backend("triton"):
        assert reg.resolve("toy", call).name == "triton"
        with kernels.backend("ref"):
            assert reg.resolve("toy", call).name == "ref"
        assert reg.resolve("toy", call).name == "triton"
        assert reg.resolve("toy", call, backend="ref").name == "ref"  # argument wins
    assert reg.resolve("toy", call).name == "ref"


def test_bad_backend_names_raise():
    with pytest.raises(ValueError, match="backend name must be one of"):
        with kernels.backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="backend= must be one of"):
        kernels.adaln_modulate(torch.randn(1, 2, 8), torch.randn(1, 8), torch.randn(1, 8),
                               backend="fast")


def test_unknown_op_name():
    with pytest.raises(ValueError, match="op_name must be one of"):
        kernels.available_backends("no_such_op")


def test_available_backends_reports_reasons():
    table = kernels.available_backends("adaln_modulate", device="cpu")
    assert table["ref"] == []
    assert set(table) == {"ref", "triton"}


def test_env_var_selects_backend():
    code = ("import torch, kernels; x = torch.randn(1, 2, 8); s = torch.randn(1, 8)\n"
            "try:\n    kernels.adaln_modulate(x, s, s)\nexcept kernels.BackendUnavailableError"
            " as e:\n    print('RAISED', 'AVATAR_KERNELS_BACKEND' in str(e))\n")
    env = {"AVATAR_KERNELS_BACKEND": "cuda", "TRITON_INTERPRET": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert "RAISED True" in out.stdout


def test_import_kernels_does_not_import_triton_or_extension():
    code = ("import sys, kernels; print('triton' in sys.modules, 'kernels._cuda' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_info_prints_table():
    out = subprocess.run([sys.executable, "-m", "kernels.info"], capture_output=True, text=True,
                         check=True)
    assert "adaln_modulate" in out.stdout and "ref" in out.stdout


def test_automatic_dispatch_traces_under_torch_compile_fullgraph():
    """resolve() with no explicit backend (ContextVar, env var, priority) must not break the
    graph: every op calls it on each invocation."""
    x = torch.randn(2, 8, 16, requires_grad=True)
    s = torch.randn(2, 16)
    expected = kernels.adaln_modulate(x, s, s, backend="ref").sum()
    f = torch.compile(lambda a: kernels.adaln_modulate(a, s, s).sum(), backend="aot_eager",
                      fullgraph=True)
    torch.testing.assert_close(f(x), expected)
    with kernels.backend("ref"):
        g = torch.compile(lambda a: kernels.adaln_modulate(a, s, s).sum(), backend="aot_eager",
                          fullgraph=True)
        torch.testing.assert_close(g(x), expected)


def test_compiled_function_follows_the_backend_context():
    """A function compiled once and called inside and outside `kernels.backend(...)` dispatches
    according to the block it is called in (dynamo guards on the mirrored choice)."""
    x = torch.randn(1, 4, 8)
    s = torch.randn(1, 8)
    f = torch.compile(lambda a: kernels.adaln_modulate(a, s, s), backend="eager", fullgraph=True)
    f(x)
    # fullgraph wraps the error in dynamo's Unsupported; the message is the registry's
    with pytest.raises(Exception, match="requested through kernels.backend"):
        with kernels.backend("cuda"):
            f(x)
    torch.testing.assert_close(f(x), kernels.adaln_modulate(x, s, s, backend="ref"))


# ----------------------------------------------------------------------------------------------
# bf16 tl.dot under Triton's interpreter (issue 13 item 1), aliases and non-dispatched names

DOT_OPS = ("attention3d", "frame_causal_attention", "performer_attention")
NON_DOT_OPS = ("adaln_modulate", "gated_residual", "rope3d", "warp_occlusion", "warp")


@pytest.mark.parametrize("op", DOT_OPS)
def test_interpreter_refuses_bf16_for_ops_using_tl_dot(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    table = kernels.available_backends(op, device="cpu", dtype=torch.bfloat16)
    assert table["ref"] == []
    assert any("bfloat16 tl.dot" in r and "TRITON_INTERPRET=1" in r for r in table["triton"])
    for dtype in (torch.float32, torch.float16):  # only bf16 is refused
        assert kernels.available_backends(op, device="cpu", dtype=dtype)["triton"] == []
    # automatic selection on a device where Triton would be preferred falls back to ref
    assert kernels.registry.resolve(op, CallInfo(torch.device("cuda"), torch.bfloat16)).name \
        == "ref"
    with pytest.raises(BackendUnavailableError, match="bfloat16 tl.dot"):
        kernels.registry.resolve(op, CallInfo(torch.device("cpu"), torch.bfloat16),
                                 backend="triton")
    with kernels.backend("triton"), pytest.raises(BackendUnavailableError, match="tl.dot"):
        kernels.registry.resolve(op, CallInfo(torch.device("cpu"), torch.bfloat16))


@pytest.mark.parametrize("op", NON_DOT_OPS)
def test_interpreter_keeps_bf16_for_ops_without_tl_dot(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.available_backends(op, device="cpu", dtype=torch.bfloat16)["triton"] == []


def test_compiled_triton_keeps_bf16_for_ops_using_tl_dot(monkeypatch):
    """Without the interpreter (a GPU), bf16 Triton is the normal fast path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for op in DOT_OPS:
        call = CallInfo(torch.device("cuda"), torch.bfloat16)
        assert not any("tl.dot" in r for r in kernels.registry.why_not(op, call)["triton"])


def test_explicit_bf16_triton_call_raises_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 16, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="bfloat16 tl.dot"):
        kernels.attention3d(q, q, q, backend="triton")
    ids = torch.zeros(16, dtype=torch.int64)
    with pytest.raises(BackendUnavailableError, match="bfloat16 tl.dot"):
        kernels.frame_causal_attention(q, q, q, frame_ids=ids, backend="triton")
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="bfloat16 tl.dot"):
        kernels.performer_attention(q, q, q, w, backend="triton")
    out = kernels.attention3d(q, q, q)  # automatic: the reference, which is right
    expected = kernels.attention3d(q.float(), q.float(), q.float(), backend="ref")
    assert (out.float() - expected).abs().max() < 0.05


def test_the_interpreter_still_gets_bf16_tl_dot_wrong():
    """The reason the refusal exists. If this fails, Triton's interpreter computes bf16 tl.dot
    correctly now: drop TL_DOT_OPS's refusal in kernels/registry.py."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 at import (run `make test`)")
    import triton
    import triton.language as tl

    @triton.jit
    def _dot16(a_ptr, b_ptr, c_ptr):
        idx = tl.arange(0, 16)
        a = tl.load(a_ptr + idx[:, None] * 16 + idx[None, :])
        b = tl.load(b_ptr + idx[:, None] * 16 + idx[None, :])
        tl.store(c_ptr + idx[:, None] * 16 + idx[None, :], tl.dot(a, b))

    a, b = (torch.randn(16, 16).bfloat16() for _ in range(2))
    c = torch.zeros(16, 16)
    _dot16[(1,)](a, b, c)
    assert (c - a.float() @ b.float()).abs().max() > 1.0


def test_available_backends_accepts_the_warp_alias():
    assert kernels.available_backends("warp", device="cpu") == \
        kernels.available_backends("warp_occlusion", device="cpu")
    assert kernels.available_backends("warp", device="cpu")["ref"] == []


@pytest.mark.parametrize("name", ["Anchor", "orthogonal_features"])
def test_public_names_without_backends_say_so(name):
    with pytest.raises(ValueError, match=f"op_name '{name}' has no backends"):
        kernels.available_backends(name)


def test_every_public_op_name_is_known_to_the_registry():
    for name in kernels.__all__:
        if name[0].islower() and name not in ("available_backends", "backend", "registry"):
            try:
                kernels.available_backends(name, device="cpu")
            except ValueError as exc:
                assert "has no backends" in str(exc), exc
