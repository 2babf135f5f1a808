"""Host-side overhead of the public ops: the Python path (validation, registry resolution,
autograd wrapping, the torch.library dispatch and the launcher's own Python: output allocation,
grid) with every Triton launch replaced by a no-op, so no kernel runs and only host time is left.

Measured by ``tests/test_bench_host_overhead.py`` with pytest-benchmark (``make bench-host``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from triton.runtime.jit import KernelInterface

TARGET_US = 15.0  # issue 16: at most 15 us of host time per call


class LaunchCounter:
    """Counts the launches that were swallowed."""

    def __init__(self) -> None:
        self.launches = 0

    def __call__(self, *args, **kwargs) -> None:
        self.launches += 1


@contextlib.contextmanager
def no_launch() -> Iterator[LaunchCounter]:
    """Inside the block ``kernel[grid](...)`` does nothing (for compiled, interpreted and
    autotuned Triton kernels alike: they all launch through ``KernelInterface.__getitem__``);
    everything before the launch runs as usual. Yields the launch counter."""
    counter = LaunchCounter()
    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: counter
    try:
        yield counter
    finally:
        KernelInterface.__getitem__ = original
