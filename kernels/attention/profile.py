"""Compile-only static profile of the attention3d kernels for sm_90 (no GPU needed, no timings).

    TRITON_INTERPRET=0 python -m kernels.attention.profile [module] [--arch 90]

``module`` defaults to ``kernels.attention.triton_impl`` (pass another module path, e.g. a copy
of an older version, to compare). For each kernel variant the launchers use on GPU it compiles
through ptxas and prints: registers, spill stack bytes (``cuobjdump -res-usage``), local-memory
stores in the SASS (``STL``), tensor-core instructions (HGMMA / HMMA), shared memory, and the
number of ``math.sin`` / ``math.cos`` ops inside ``scf.for`` loops of the TTGIR (and in total).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FP32_ARGS = ("lse_ptr", "delta_ptr", "q_pos_ptr", "k_pos_ptr", "pos_ptr", "freq_ptr",
             "cos_ptr", "sin_ptr", "q_cos_ptr", "q_sin_ptr", "k_cos_ptr", "k_sin_ptr",
             "dq_acc_ptr")
FIXED = {**{n: "*fp32" for n in FP32_ARGS}, "meta_ptr": "*i32", "tiles_ptr": "*i32",
         "starts_ptr": "*i32", "qk_scale": "fp32", "sm_scale": "fp32", "scale": "fp32"}


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def trig_in_loops(ttgir: str) -> tuple[int, int]:
    """(sin/cos ops nested in an scf.for, all sin/cos ops) of a TTGIR module."""
    depth_stack, in_loop, total = [], 0, 0
    for line in ttgir.splitlines():
        is_trig = bool(re.search(r"math\.(sin|cos)\b", line))
        total += is_trig
        if is_trig and any(depth_stack):
            in_loop += 1
        for ch in line:
            if ch == "{":
                depth_stack.append("scf.for" in line)
            elif ch == "}" and depth_stack:
                depth_stack.pop()
    return in_loop, total


def profile(compiled) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    loop_trig, all_trig = trig_in_loops(compiled.asm["ttgir"])
    return {"regs": regs, "stack": stack, "stl": len(re.findall(r"\bSTL(\.\w+)*\b", sass)),
            "hgmma": len(re.findall(r"\bHGMMA\.", sass)), "hmma": len(re.findall(r"\bHMMA\.",
                                                                               sass)),
            "smem": compiled.metadata.shared, "trig_in_loop": loop_trig, "trig": all_trig}


def variants(ti, dtype: str = "fp16"):
    """(label, kernel, constexprs, num_warps, num_stages) for the launchers' GPU block sizes."""
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    fwd_params = ti._attention3d_fwd_kernel.fn.arg_names
    bwd_params = ti._attention3d_bwd_kernel.fn.arg_names
    for dim in (128, 72):
        for rope, anchor in ((True, True), (False, False)):
            flags = {"HAS_ROPE": rope, "HAS_ANCHOR": anchor, "DOT_PRECISION": "tf32",
                     "ALIGNED_8": True}
            extra = {"INTERLEAVED": False} if "INTERLEAVED" in fwd_params else {}
            bm, bn = ti.fwd_blocks(dim, torch_dtype)
            consts = {"BLOCK_M": bm, "BLOCK_D": ti.block_d(dim), **flags, **extra}
            if "BLOCK_N" in fwd_params:
                consts["BLOCK_N"] = bn
            yield f"fwd D={dim} rope={int(rope)} anchor={int(anchor)}", \
                ti._attention3d_fwd_kernel, consts, 8, 3
            names = [n for n in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
                     if n in bwd_params]
            blocks = dict(zip(names, ti.bwd_blocks(dim, torch_dtype)))
            extra = {"INTERLEAVED": False} if "INTERLEAVED" in bwd_params else {}
            yield f"bwd D={dim} rope={int(rope)} anchor={int(anchor)}", \
                ti._attention3d_bwd_kernel, {**blocks, "BLOCK_D": ti.block_d(dim), **flags,
                                             **extra}, 8, 2


def main(argv: list[str]) -> None:
    from kernels.testing import compile_for_gpu

    module = next((a for a in argv if not a.startswith("--")), "kernels.attention.triton_impl")
    arch = int(argv[argv.index("--arch") + 1]) if "--arch" in argv else 90
    ti = importlib.import_module(module)
    print(f"compile-only static profile, sm_{arch}, fp16, {module}")
    print("| variant | regs | spill stack B | STL | HGMMA | HMMA | smem B | sin/cos in loop | "
          "sin/cos total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, kernel, consts, warps, stages in variants(ti):
        dim = 72 if "D=72" in label else 128
        aligned = tuple(n for n in kernel.fn.arg_names if dim % 16 == 0 and (
            n == "head_dim" or re.fullmatch(r"stride_(q|k|v|o|dk|x|y)_[bnh]", n)))
        c = compile_for_gpu(kernel, FIXED, consts, arch=arch, num_warps=warps,
                            num_stages=stages, aligned=aligned)
        p = profile(c)
        print(f"| {label} | {p['regs']} | {p['stack']} | {p['stl']} | {p['hgmma']} | "
              f"{p['hmma']} | {p['smem']} | {p['trig_in_loop']} | {p['trig']} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
