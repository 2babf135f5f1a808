"""``python -m kernels.info``: which backend can run which op here, and why not.

Prints one table per probe device (CUDA if present, and the CPU) with every op x backend and the
reason strings the registry gives, plus the environment facts behind them.
"""

from __future__ import annotations

import sys

import torch

from kernels.registry import (
    OP_MODULES,
    CallInfo,
    _import_all_ops,
    cuda_extension,
    env_backend,
    interpreter_enabled,
    registry,
    triton_import_error,
)


def environment_lines() -> list[str]:
    module, err = cuda_extension()
    ext = err or ("loaded; device: " + ("yes" if module.has_device() else module.device_error()))
    return [
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"cuda available: {torch.cuda.is_available()}",
        f"triton: {triton_import_error() or 'importable'}; "
        f"TRITON_INTERPRET: {'on' if interpreter_enabled() else 'off'}",
        f"kernels._cuda: {ext}",
        f"AVATAR_KERNELS_BACKEND: {env_backend() or '(unset: automatic)'}",
    ]


def table(device: torch.device, dtype: torch.dtype = torch.float16) -> str:
    lines = [f"### tensors on {device}, dtype {str(dtype).removeprefix('torch.')}", "",
             "| op | backend | status |", "|---|---|---|"]
    for op in registry.ops():
        for name, reasons in registry.why_not(op, CallInfo(device, dtype)).items():
            status = "usable" if not reasons else "; ".join(reasons)
            lines.append(f"| {op} | {name} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    _import_all_ops(OP_MODULES)
    print("\n".join(environment_lines()))
    print()
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    for device in devices + [torch.device("cpu")]:
        print(table(device))
        print()
    if interpreter_enabled():  # the interpreter refuses bf16 for ops whose kernels use tl.dot
        print(table(torch.device("cpu"), torch.bfloat16))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
