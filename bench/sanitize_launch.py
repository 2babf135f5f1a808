"""One small launch of every kernel of every compiled backend (Triton and the CUDA extension):
forward and backward of each entry of :data:`bench.public_ops.PUBLIC_OPS`, checked against the
reference so a launch that silently writes nothing fails here too. `make gpu-evidence` runs it
under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck``.

    python -m bench.sanitize_launch [--dtype fp16]

On a CPU it runs the Triton backend in Triton's interpreter (``TRITON_INTERPRET=1``), which is
how the gpu-evidence dry run checks this script.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

import kernels
from bench.public_ops import PUBLIC_OPS, differentiable

COMPILED_BACKENDS = ("triton", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def launch_all(device: str, dtype: torch.dtype, only: str = "") -> list[str]:
    """Run every (entry, compiled backend) that can run here (entries matching the regex
    ``only``); returns one line per launch."""
    lines = []
    for entry in (e for e in PUBLIC_OPS if re.search(only, e.name)):
        usable = kernels.available_backends(entry.op, device=device, dtype=dtype)
        for backend in COMPILED_BACKENDS:
            reasons = usable.get(backend)
            if reasons is None:
                continue  # the op has no such backend
            if reasons:
                lines.append(f"skip {entry.name} [{backend}]: {'; '.join(reasons)}")
                continue
            torch.manual_seed(0)
            inputs = entry.make(device, dtype)
            out = entry.call(backend, inputs)
            grads = torch.autograd.grad(out, differentiable(inputs), torch.ones_like(out),
                                        allow_unused=True)  # `warp` ignores the occlusion
            expected = entry.call("ref", inputs)
            tol = 1e-2 if dtype == torch.float32 else 6e-2
            torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
            if not all(torch.isfinite(g).all() for g in grads if g is not None):
                raise AssertionError(f"{entry.name} [{backend}]: non-finite gradient")
            lines.append(f"ok   {entry.name} [{backend}] fwd+bwd {list(out.shape)}")
    if device == "cuda":
        torch.cuda.synchronize()
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--only", default="", help="regex on entry names (default: every entry)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = launch_all(device, DTYPES[args.dtype], args.only)
    print("\n".join(lines))
    launched = sum(line.startswith("ok") for line in lines)
    print(f"sanitize_launch: {launched} launches on {device} ({args.dtype})")
    # On a GPU the Triton backend always runs, so no launch is a failure; on a CPU without the
    # interpreter nothing compiled can run, and the skip lines above say why.
    return 1 if device == "cuda" and not launched else 0


if __name__ == "__main__":
    sys.exit(main())
