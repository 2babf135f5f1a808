"""The shared scalar, device and dtype validators of kernels/_validation.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels._validation import check_bool, check_device, check_dtype, check_float, check_int


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_check_int_accepts_python_and_numpy_integers(value):
    out = check_int("length", value, min=1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value, error, match", [
    (True, TypeError, "length must be an int, got bool True"),
    (3.0, TypeError, "length must be an int, got float 3.0"),
    ("3", TypeError, "length must be an int, got str '3'"),
    (np.float64(3), TypeError, "length must be an int, got float64"),
    (torch.tensor(3), TypeError, "length must be an int, got Tensor"),
    (0, ValueError, "length must be >= 1, got 0"),
    (9, ValueError, "length must be <= 8, got 9"),
])
def test_check_int_rejects_with_the_argument_name(value, error, match):
    with pytest.raises(error, match=match):
        check_int("length", value, min=1, max=8)


@pytest.mark.parametrize("value", [1e-6, 1, np.float32(1e-6), np.float64(1e-6), np.int64(1)])
def test_check_float_accepts_python_and_numpy_reals(value):
    out = check_float("eps", value, positive=True)
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value, kwargs, error, match", [
    ("a", {}, TypeError, "eps must be a real number, got str 'a'"),
    (None, {}, TypeError, "eps must be a real number, got NoneType"),
    (True, {}, TypeError, "eps must be a real number, got bool"),
    (1j, {}, TypeError, "eps must be a real number, got complex"),
    (float("inf"), {}, ValueError, "eps must be a finite number, got inf"),
    (float("nan"), {"finite": False}, ValueError, "eps must be a number, got nan"),
    (0.0, {"positive": True}, ValueError, "eps must be a finite number > 0, got 0.0"),
    (-1, {"positive": True}, ValueError, "eps must be a finite number > 0, got -1.0"),
])
def test_check_float_rejects_with_the_argument_name(value, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_float("eps", value, **kwargs)


def test_check_float_allows_inf_only_when_asked():
    assert check_float("scale", float("inf"), finite=False) == float("inf")


def test_check_bool():
    assert check_bool("causal", True) is True
    with pytest.raises(TypeError, match="causal must be a bool, got int 1"):
        check_bool("causal", 1)


def test_check_device():
    assert check_device("device", "cpu") == torch.device("cpu")
    assert check_device("device", torch.device("meta")).type == "meta"
    with pytest.raises(TypeError, match="device must be a torch.device or a device string"):
        check_device("device", 1.5)
    with pytest.raises(ValueError, match="device must be a device such as 'cpu'.*got 'gpu0'"):
        check_device("device", "gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:0", torch.device("cuda"), 0])
def test_check_device_without_cuda_names_the_argument(value):
    with pytest.raises(ValueError, match=r"device=.* needs a CUDA device, but "
                                         r"torch.cuda.is_available\(\) is False"):
        check_device("device", value)


def test_check_dtype():
    allowed = (torch.float32, torch.float16)
    assert check_dtype("dtype", torch.float16, allowed) is torch.float16
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype, one of \(torch.float32, "
                                        r"torch.float16\), got str 'float32'"):
        check_dtype("dtype", "float32", allowed)
    with pytest.raises(TypeError, match=r"dtype must be one of .*got torch.int64"):
        check_dtype("dtype", torch.int64, allowed)
