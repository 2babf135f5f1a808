"""Host-side overhead of every public op (pytest-benchmark), against a bare torch call.

Each op is called through its public function on the Triton backend with every launch swallowed
(:func:`bench.host_overhead.no_launch`): what is timed is validation, registry resolution, the
autograd wrapping and the launcher's Python, i.e. the time a GPU would idle per call if nothing
hid it (CUDA graphs do). The baseline is ``torch.empty_like`` on the op's first input: one trip
through the torch dispatcher plus an allocation, the least any torch call costs.

In `make test` each benchmark runs a few rounds (it checks that the path runs and reaches the
launch); `make bench-host` runs them long enough to be numbers and saves the JSON for
``--benchmark-compare``. On a CPU machine this is a real measurement of host time (the Triton
interpreter is never entered: its launches are swallowed too).
"""

from __future__ import annotations

import os

import pytest
import torch

import kernels
from bench.host_overhead import no_launch
from bench.public_ops import PUBLIC_OPS
from kernels.testing import triton_test_device

ROUNDS = int(os.environ.get("BENCH_HOST_ROUNDS", "3"))
ITERATIONS = int(os.environ.get("BENCH_HOST_ITERATIONS", "20"))


@pytest.fixture(scope="module")
def device() -> str:
    found, reason = triton_test_device()
    if found is None:
        pytest.skip(reason)
    return found


def _first_tensor(inputs: dict) -> torch.Tensor:
    return next(v for v in inputs.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("entry", PUBLIC_OPS, ids=[e.name for e in PUBLIC_OPS])
def test_public_op_host_path(benchmark, entry, device):
    inputs = entry.make(device, torch.float16)
    assert kernels.available_backends(entry.op, device=device, dtype=torch.float16)["triton"] == []
    with no_launch() as launches:
        out = entry.call("triton", inputs)  # first call: lazy imports, caches
        first = launches.launches
        benchmark.group = entry.name
        benchmark.extra_info.update(op=entry.op, device=device, path="public op, launch no-op")
        benchmark.pedantic(entry.call, args=("triton", inputs), rounds=ROUNDS,
                           iterations=ITERATIONS, warmup_rounds=1)
    assert first >= 1, f"{entry.name}: the public call never reached a Triton launch"
    # every timed call reached the same launches, and none of them ran a kernel
    timed = launches.launches - first
    assert timed >= first and timed % first == 0, (first, launches.launches)
    assert out.requires_grad and out.grad_fn is not None  # autograd wrapping was on the path
    assert out.shape[0] == _first_tensor(inputs).shape[0]


@pytest.mark.parametrize("entry", PUBLIC_OPS, ids=[e.name for e in PUBLIC_OPS])
def test_bare_torch_call(benchmark, entry, device):
    x = _first_tensor(entry.make(device, torch.float16))
    benchmark.group = entry.name
    benchmark.extra_info.update(op=entry.op, device=device, path="torch.empty_like baseline")
    out = benchmark.pedantic(torch.empty_like, args=(x,), rounds=ROUNDS, iterations=ITERATIONS,
                             warmup_rounds=1)
    assert out.shape == x.shape and out.data_ptr() != x.data_ptr()
