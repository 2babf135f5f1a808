"""Static profile of every Triton kernel variant the launchers use on GPU, with no GPU present.

How the variants are found (so the tool follows the launchers when their configs change): each
op's public function runs forward and backward with ``backend="triton"`` on CPU tensors while
every ``@triton.jit`` / ``@triton.autotune`` kernel of ``kernels.<op>.triton_impl`` is replaced by
a recorder. A recorded launch is specialised exactly as Triton's JIT would specialise it on a GPU
(its own binder: dtypes, integer arguments equal to 1 or multiples of 16, aligned pointers) and
expanded over the autotuner's configs (after its ``early_config_prune``). Nothing runs: outputs
stay uninitialised, which only the launchers' host code sees.

Each distinct compile is built for the target (TTIR -> PTX -> cubin through ptxas) in a pool of
worker processes and analysed:
- registers, spill bytes and ptxas warnings (C7515 "wgmma serialized" ...) from ``ptxas -v``;
- shared memory from the compiled metadata, and CTAs per SM from registers, shared memory and
  warps on that architecture;
- tensor-core instruction kind and count (HGMMA = wgmma, HMMA = mma.sync) from the SASS
  (``cuobjdump -sass``); ``tl.dot`` count from the TTIR;
- vector / async (cp.async) / TMA (cp.async.bulk) loads, fences and atomics with their semantics,
  from the PTX;
- loops from the SASS backward branches: instructions of each innermost loop body (per thread
  per iteration), its tensor-core and trigonometric instructions; trigonometric ops inside
  ``scf.for`` in the TTIR (``tl.sin``/``tl.cos`` compile to polynomial libdevice code, which the
  SASS does not show as such).

Results are cached per compile (source hash of the kernel and its dependencies, signature,
constexprs, options, target) under ``$AVATAR_KERNELS_CACHE`` or ``~/.cache/avatar-kernels``.

    python -m bench.static_profile [--arch 90 80] [--ops attention3d ...] [--quick]
                                   [--out bench/static] [--jobs 2]

writes ``<out>/sm_90a.json`` and ``<out>/sm_90a.md`` (``sm_80`` likewise). A variant that fails to
record or to compile becomes a row with its ``error``; the tool itself does not stop.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OP_MODULES = {
    "adaln": "kernels.adaln.triton_impl",
    "attention3d": "kernels.attention.triton_impl",
    "frame_causal": "kernels.frame_causal.triton_impl",
    "performer": "kernels.performer.triton_impl",
    "warp": "kernels.flow_warp.triton_impl",
}
ARCH_NAMES = {80: "sm_80", 90: "sm_90a"}

# Per-SM limits of the targets (CUDA occupancy calculator data for A100 / H100-H200).
ARCH_LIMITS = {
    80: {"regs": 65536, "smem": 167936, "smem_per_cta_max": 166912, "warps": 64, "ctas": 32},
    90: {"regs": 65536, "smem": 233472, "smem_per_cta_max": 232448, "warps": 64, "ctas": 32},
}
REG_ALLOC_UNIT = 256        # registers are allocated per warp in units of 256 (8 per thread)
SMEM_RESERVED_PER_CTA = 1024  # the driver reserves 1 KB of shared memory per CTA (sm_80+)


# ----------------------------------------------------------------------------------------------
# Occupancy and the analysis of one compiled kernel (pure functions, tested without compiling)


def ctas_per_sm(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident CTAs per SM allowed by registers, shared memory, warps and the CTA cap."""
    limits = ARCH_LIMITS[arch]
    if shared_bytes > limits["smem_per_cta_max"]:
        return 0
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = limits["regs"] // (regs_per_warp * num_warps)
    by_smem = limits["smem"] // (shared_bytes + SMEM_RESERVED_PER_CTA)
    by_warps = limits["warps"] // num_warps
    return max(0, min(by_regs, by_smem, by_warps, limits["ctas"]))


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill bytes and warnings from ``ptxas -v`` output."""
    def grab(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0
    warnings = []
    for line in log.splitlines():
        # ptxas -v prints wgmma serialisation (C7510..C7515) as "info" lines, not warnings
        if "warning" in line.lower() or re.search(r"\(C75\d\d\)", line):
            # drop the temporary file name: "ptxas /tmp/x.ptx, line 12; warning : ..."
            warnings.append(re.sub(r"^ptxas\s+\S+,\s*(line \d+;\s*)?", "", line.strip()))
    return {"registers": grab(r"Used (\d+) registers"),
            "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
            "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
            "warnings": sorted(set(warnings))}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TRIG_SASS = ("MUFU.SIN", "MUFU.COS")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """[(address, opcode with modifiers, operands)] of every instruction."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(sass)]


def mma_kind(opcode: str) -> str | None:
    if opcode.startswith("HGMMA"):
        return "wgmma"
    if opcode.startswith(("HMMA", "IMMA", "DMMA")):
        return "mma.sync"
    return None


def sass_loops(instructions: list[tuple[int, str, str]]) -> list[dict]:
    """The kernel's innermost hot loops. A backward branch ``BRA target`` at address a with
    target < a spans a loop body [target, a]. When some loops hold tensor-core instructions, the
    loops reported are those that hold some while no loop nested inside them does (a small nested
    loop, e.g. libdevice's slow-path argument reduction of sin/cos, does not hide the main loop);
    otherwise the innermost loops. Each has its instruction count (per thread per iteration,
    nested loops' bodies counted once), tensor-core and MUFU.SIN/COS instruction counts."""
    spans = set()
    for addr, opcode, operands in instructions:
        if opcode.split(".")[0] in ("BRA", "JMP"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            # (target == addr is the BRA-to-itself padding after EXIT, not a loop)
            if target and int(target.group(1), 16) < addr:
                spans.add((int(target.group(1), 16), addr))

    def body(span):
        ops = [op for addr, op, _ in instructions if span[0] <= addr <= span[1]]
        return {"instructions": len(ops), "mma": sum(mma_kind(op) is not None for op in ops),
                "trig": sum(op.startswith(_TRIG_SASS) for op in ops)}

    stats = {span: body(span) for span in sorted(spans)}

    def innermost(candidates):
        return [s for s in candidates
                if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in candidates)]

    with_mma = [s for s in stats if stats[s]["mma"]]
    return [stats[s] for s in innermost(with_mma or list(stats))]


def trig_in_sass_loops(instructions: list[tuple[int, str, str]]) -> int:
    """MUFU.SIN/COS instructions inside any loop (approximate sin/cos; the precise libdevice
    versions are polynomials and show up in the TTIR count instead)."""
    spans = []
    for addr, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.split(".")[0] in ("BRA", "JMP") and target and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    return sum(op.startswith(_TRIG_SASS) and any(lo <= addr <= hi for lo, hi in spans)
               for addr, op, _ in instructions)


def hot_loop(loops: list[dict]) -> dict | None:
    """The loop the kernel's time goes to: the one with the most tensor-core instructions, then
    the longest."""
    return max(loops, key=lambda lp: (lp["mma"], lp["instructions"])) if loops else None


_TRIG_IR = re.compile(r"\b(math\.(sin|cos|tan)|tt\.extern_elementwise[^\n]*\"__nv_(sin|cos|tan)"
                      r"|tt\.precise_sin|tt\.precise_cos)")


def trig_in_scf_loops(ir: str) -> int:
    """Trigonometric ops inside ``scf.for``/``scf.while`` regions of an MLIR module."""
    stack: list[bool] = []
    count = 0
    for line in ir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            if stack:
                stack.pop()
        if any(stack) and _TRIG_IR.search(text):
            count += 1
        if text.endswith("{"):
            stack.append(bool(re.search(r"\bscf\.(for|while)\b", text)))
    return count


def _mnemonics(ptx: str, pattern: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in re.finditer(pattern, ptx, flags=re.M):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return dict(sorted(counts.items()))


def analyse_ptx(ptx: str) -> dict:
    """Load kinds, fences and atomics (with their .sem / .scope qualifiers) from PTX."""
    return {
        "vector_loads": len(re.findall(r"^\s*(@%p\d+\s+)?ld\.global[\w.:]*\.v[248]\.", ptx,
                                       flags=re.M)),
        "scalar_loads": len(re.findall(r"^\s*(@%p\d+\s+)?ld\.global(?![\w.:]*\.v[248]\.)", ptx,
                                       flags=re.M)),
        "async_copies": len(re.findall(r"^\s*(@%p\d+\s+)?cp\.async\.c[ag]\.", ptx, flags=re.M)),
        "tma": len(re.findall(r"^\s*(@%p\d+\s+)?cp\.async\.bulk\.", ptx, flags=re.M)),
        "fences": _mnemonics(ptx, r"^\s*(?:@%p\d+\s+)?((?:fence|membar)[\w.:]*)"),
        "atomics": _mnemonics(ptx, r"^\s*(?:@%p\d+\s+)?((?:atom|red)\.[\w.:]*)"),
    }


def analyse_sass(sass: str) -> dict:
    instructions = parse_sass(sass)
    kinds = {mma_kind(op) for _, op, _ in instructions} - {None}
    loops = sass_loops(instructions)
    hot = hot_loop(loops)
    return {
        "mma_kind": "wgmma" if "wgmma" in kinds else ("mma.sync" if kinds else "none"),
        "mma_count": sum(mma_kind(op) is not None for _, op, _ in instructions),
        # mma.sync beside wgmma: some product of a wgmma kernel fell back (e.g. an M side < 64)
        "mma_sync_count": sum(mma_kind(op) == "mma.sync" for _, op, _ in instructions),
        "sass_instructions": len(instructions),
        "sass_fences": _mnemonics("\n".join(op for _, op, _ in instructions),
                                  r"^((?:MEMBAR|FENCE|CCTL)[\w.]*)"),
        "sass_trig_in_loop": trig_in_sass_loops(instructions),
        "loop_instructions": hot["instructions"] if hot else None,
        "loop_mma": hot["mma"] if hot else None,
        "loops": loops,
    }


# ----------------------------------------------------------------------------------------------
# Compiling one job (runs in a worker process)


@dataclass
class Job:
    """One distinct compile: which kernel, specialised how, and where the variant came from."""
    op: str
    module: str
    kernel: str
    variant: str
    dtype: str
    signature: dict
    constexprs: list      # [(path, value)] as Triton's binder produced them
    attrs: list           # [(path, attributes)]
    options: dict
    constexpr_names: dict = field(default_factory=dict)

    def key(self, arch: int, as_dtype: dict[str, str] | None = None) -> str:
        """Hash of everything the compile depends on; ``as_dtype`` ({"fp16": "bf16"}) spells
        the pointer element types of the signature as another dtype (to find twins)."""
        signature = self.signature
        if as_dtype:
            signature = {k: re.sub(r"\b(\w+)$", lambda m: as_dtype.get(m.group(1), m.group(1)),
                                   v) if isinstance(v, str) else v
                         for k, v in signature.items()}
        text = json.dumps([self.module, self.kernel, signature, self.constexprs, self.attrs,
                           sorted(self.options.items()), arch], default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def _tool(name: str) -> str:
    from triton import knobs
    return getattr(knobs.nvidia, name).path


# Bumped when parse_ptxas_log changes: cached entries hold parsed values, not the log.
_PTXAS_LOG_VERSION = 2
_PTXAS_KEYS = ("registers", "spill_store_bytes", "spill_load_bytes", "warnings",
               "compile_seconds")


def _cache_dir() -> Path:
    base = os.environ.get("AVATAR_KERNELS_CACHE") or Path.home() / ".cache" / "avatar-kernels"
    path = Path(base) / "static-profile"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _unwrap(kernel):
    """The JITFunction under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_job(job: Job, arch: int) -> dict:
    """Compile and analyse one job; errors become the row's ``error``."""
    import importlib

    row = {"op": job.op, "kernel": job.kernel, "variant": job.variant, "dtype": job.dtype,
           "num_warps": job.options.get("num_warps"), "num_stages": job.options.get("num_stages"),
           "constexprs": job.constexpr_names}
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = _unwrap(getattr(importlib.import_module(job.module), job.kernel))
        source = ASTSource(kernel, job.signature, {tuple(p): v for p, v in job.constexprs},
                           {tuple(p): a for p, a in job.attrs})
        # ptxas -v output exists only when ptxas runs: the first compile of a job runs afresh with
        # the log captured, and its values are cached per source hash; later runs take the
        # kernel from Triton's own cache and re-analyse it (so the analysis may change freely)
        cache_file = (_cache_dir()
                      / f"v{_PTXAS_LOG_VERSION}-{arch}-{source.hash()}-{job.key(arch)[:24]}.json")
        cached = json.loads(cache_file.read_text()) if cache_file.exists() else None
        log = io.StringIO()
        start = time.perf_counter()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = cached is None
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options=job.options)
        if cached is None:
            cached = {**parse_ptxas_log(log.getvalue()),
                      "compile_seconds": round(time.perf_counter() - start, 2)}
            cache_file.write_text(json.dumps(cached))
        ptxas = {k: cached[k] for k in _PTXAS_KEYS}
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                                  text=True, check=True).stdout
        shared = int(compiled.metadata.shared)
        result = {
            **ptxas,
            "shared_bytes": shared,
            "ctas_per_sm": ctas_per_sm(arch, ptxas["registers"], shared, job.options["num_warps"]),
            "dot_ops": len(re.findall(r"\btt\.dot\b", compiled.asm["ttir"])),
            **analyse_sass(sass),
            **analyse_ptx(compiled.asm["ptx"]),
            "trig_in_loop": trig_in_scf_loops(compiled.asm["ttir"]),
        }
        result["trig_in_loop"] += result.pop("sass_trig_in_loop")
        return {**row, **result}
    except Exception as exc:  # one failing variant must not stop the profile
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}


def _compile_job_star(args):
    return compile_job(*args)


# ----------------------------------------------------------------------------------------------
# Recording the launches of the public ops


@dataclass
class Launch:
    op: str
    variant: str
    dtype: str
    module: str
    name: str
    kernel: object       # the Autotuner or JITFunction as the launcher called it
    args: tuple
    kwargs: dict
    all_configs: bool    # every autotune config, or the first only


@contextlib.contextmanager
def recording(ops: list[str], sink: list, context: dict):
    """Replace every kernel of the ops' triton_impl modules by a recorder appending a Launch to
    ``sink`` (labelled with ``context``'s current op/variant/dtype), and let the registry run the
    triton backend on CPU tensors."""
    import importlib

    from triton.runtime.jit import KernelInterface

    registry = importlib.import_module("kernels.registry")  # (kernels.registry is also an object)

    patched = []
    for op in ops:
        module = importlib.import_module(OP_MODULES[op])
        for name, obj in vars(module).items():
            if isinstance(obj, KernelInterface):
                def record(*args, _name=name, _module=module.__name__, _obj=obj, **kwargs):
                    kwargs.pop("grid", None)
                    kwargs.pop("warmup", None)
                    sink.append(Launch(context["op"], context["variant"], context["dtype"],
                                       _module, _name, _obj, args, kwargs,
                                       context["all_configs"]))
                patched.append((obj, obj.__dict__.get("run")))
                obj.run = record
    original = registry._device_reasons_triton
    registry._device_reasons_triton = lambda device: []
    try:
        yield
    finally:
        registry._device_reasons_triton = original
        for obj, run in patched:
            if run is None:
                del obj.run
            else:
                obj.run = run


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", arch, 32))


def launch_jobs(launch: Launch, arch: int, all_configs: bool = True) -> list[Job]:
    """The compiles one recorded launch stands for: one per autotune config (after the
    autotuner's own pruning; only the first unless ``all_configs``), specialised by Triton's
    binder as the JIT would on a GPU."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    configs = [None]
    if hasattr(kernel, "configs"):
        named = dict(zip(kernel.arg_names, launch.args))
        configs = list(kernel.configs)
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, named, **launch.kwargs) or configs
        configs = configs if all_configs else configs[:1]
    jit = _unwrap(kernel)
    backend = _backend(arch)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    jobs = []
    for config in configs:
        kwargs = {**launch.kwargs, **(config.all_kwargs() if config else {})}
        kwargs.setdefault("debug", jit.debug or knobs.runtime.debug)
        kwargs.setdefault("instrumentation_mode", knobs.compilation.instrumentation_mode)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound,
                                                                specialization, options)
        names = {jit.arg_names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
        flags = {k: v for k, v in names.items() if k.isupper()}
        jobs.append(Job(op=launch.op, module=launch.module, kernel=launch.name,
                        variant=launch.variant, dtype=launch.dtype, signature=signature,
                        constexprs=sorted((list(p), v) for p, v in constexprs.items()),
                        attrs=sorted((list(p), a) for p, a in attrs.items()),
                        options=dict(options.__dict__), constexpr_names=flags))
    return jobs


# ----------------------------------------------------------------------------------------------
# The variants: each op's public function, forward and backward, over dtypes, shapes and flags.
# A scenario is (variant label, dtype name, function(torch dtype) running fwd + bwd, whether its
# launches compile every autotune config or the first only).

DTYPE_NAMES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Selection:
    """Which variants to record: ``quick`` is the CI subset (bf16, the largest head dim, fewer
    shapes and flags, the first autotune config only); ``dtypes`` / ``head_dims`` restrict the
    full set (None: every one). Every autotune config is compiled for bf16, the dtype the GPU
    runs, at the op's largest head dim; other dtypes and head dims (fp16 is the same schedule with
    another element type) take the first config of each flag combination unless ``exhaustive``,
    to keep the run near 10 minutes on 2 cores."""
    quick: bool = False
    dtypes: tuple[str, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    exhaustive: bool = False

    def all_configs(self, dtype: str, largest_dim: bool = True) -> bool:
        return not self.quick and (self.exhaustive or (dtype == "bf16" and largest_dim))

    def dtype_names(self) -> tuple[str, ...]:
        chosen = ("bf16",) if self.quick else DTYPE_NAMES
        return tuple(d for d in chosen if self.dtypes is None or d in self.dtypes)

    def dims(self, defaults: tuple[int, ...]) -> tuple[int, ...]:
        chosen = defaults[-1:] if self.quick else defaults
        return tuple(d for d in chosen if self.head_dims is None or d in self.head_dims)


def _torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _backward(out, *inputs):
    import torch
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)


def _leaf(*shape, dtype, scale=1.0):
    import torch
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _grid_positions(frames: int, height: int, width: int):
    import torch
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width),
                             indexing="ij")
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)


def attention3d_scenarios(sel: Selection):
    import kernels
    frames, grid, batch, heads = 2, (8, 8), 2, 2
    per_frame = grid[0] * grid[1]
    n = frames * per_frame
    positions = _grid_positions(frames, *grid)
    interleaved = [False, True] if _accepts(kernels.attention3d, "interleaved") else [False]
    quick = sel.quick
    for dt in sel.dtype_names():
        for dim in sel.dims((64, 72, 128)):
            for rope in ((False,) if quick else (False, True)):
                for anchor in ((False,) if quick else (False, True)):
                    for inter in (interleaved if rope else [False]):
                        label = (f"D={dim}" + (" rope" if rope else "")
                                 + (" interleaved" if inter else "")
                                 + (" anchor" if anchor else ""))
                        extra = {"interleaved": True} if inter else {}

                        def run(dtype, dim=dim, rope=rope, anchor=anchor, extra=extra):
                            q, k, v = (_leaf(batch, n, heads, dim, dtype=dtype) for _ in "qkv")
                            out = kernels.attention3d(
                                q, k, v, positions=positions if rope else None,
                                anchor=kernels.Anchor([0, per_frame], per_frame, 0)
                                if anchor else None, backend="triton", **extra)
                            _backward(out, q, k, v)
                        yield label, dt, run, sel.all_configs(dt, dim == 128)
            if quick:
                continue

            def unaligned(dtype, dim=dim):
                # head-dim slices of a wider tensor: row strides not multiples of 8 elements
                base = [_leaf(batch, n, heads, dim + 4, dtype=dtype) for _ in "qkv"]
                q, k, v = (t[..., :dim] for t in base)
                out = kernels.attention3d(q, k, v, positions=positions, backend="triton")
                _backward(out, *base)
            yield f"D={dim} rope unaligned", dt, unaligned, sel.all_configs(dt, dim == 128)

            for inter in interleaved:
                def rope_only(dtype, dim=dim, inter=inter):
                    x = _leaf(batch, n, heads, dim, dtype=dtype)
                    extra = {"interleaved": True} if inter else {}
                    _backward(kernels.rope3d(x, positions, backend="triton", **extra), x)
                yield (f"rope3d D={dim}" + (" interleaved" if inter else ""), dt, rope_only,
                       False)


def frame_causal_scenarios(sel: Selection):
    import torch

    import kernels
    heads, per_frame, frames = 2, 64, 3
    ids_sorted = torch.arange(frames).repeat_interleave(per_frame)[None]
    ids_shuffled = ids_sorted[:, torch.randperm(ids_sorted.shape[1], generator=torch.Generator()
                                                .manual_seed(0))]
    for dt in sel.dtype_names():
        for dim in sel.dims((64, 72, 128)):
            for rope in (None, 10000.0):
                for order, ids in (("sorted", ids_sorted), ("unsorted", ids_shuffled)):
                    if sel.quick and order == "unsorted":
                        continue

                    def run(dtype, dim=dim, rope=rope, ids=ids):
                        q, k, v = (_leaf(1, ids.shape[1], heads, dim, dtype=dtype) for _ in "qkv")
                        out = kernels.frame_causal_attention(q, k, v, frame_ids=ids,
                                                             rope_theta=rope, backend="triton")
                        _backward(out, q, k, v)
                    yield (f"D={dim} {order}" + (" rope" if rope else ""), dt, run,
                           sel.all_configs(dt, dim == 128))


def performer_scenarios(sel: Selection):
    import math

    import kernels
    seq = 7200  # MCDM's longest sequence (the launcher's tiles depend on N)
    for dt in sel.dtype_names():
        for dim in sel.dims((40, 64)):
            for n_features in sorted({round(dim * math.log(dim)), 64, 256}):
                for causal in (False, True):
                    def run(dtype, dim=dim, m=n_features, causal=causal):
                        q, k, v = (_leaf(1, seq, 1, dim, dtype=dtype) for _ in "qkv")
                        w = kernels.orthogonal_features(m, dim, dtype=dtype)
                        out = kernels.performer_attention(q, k, v, w, causal=causal,
                                                          backend="triton")
                        _backward(out, q, k, v)
                    yield (f"D={dim} M={n_features}" + (" causal" if causal else ""), dt, run,
                           sel.all_configs(dt, dim == 64))
                if sel.quick:
                    break


def adaln_scenarios(sel: Selection):
    import kernels
    shapes = ((2, 4 * 256, 4, 1152),) if sel.quick else (
        (2, 4 * 256, 4, 1152), (1, 4 * 390, 4, 3072), (2, 4 * 64, 4, 320))
    for dt in sel.dtype_names():
        for batch, tokens, frames, channels in shapes:
            for per_frame in (False, True):
                label = f"C={channels} N={tokens}" + (" per-frame" if per_frame else "")

                def run(dtype, b=batch, n=tokens, t=frames, c=channels, per_frame=per_frame):
                    mod = (b, t, c) if per_frame else (b, c)
                    x = _leaf(b, n, c, dtype=dtype)
                    shift, scale, gate = (_leaf(*mod, dtype=dtype) for _ in range(3))
                    y = kernels.adaln_modulate(x, shift, scale, backend="triton")
                    out = kernels.gated_residual(x, y, gate, backend="triton")
                    _backward(out, x, shift, scale, gate)
                yield label, dt, run, sel.all_configs(dt)


def warp_scenarios(sel: Selection):
    import torch

    import kernels
    shapes = ((2, 32, 32, 320),) if sel.quick else (
        (2, 8, 8, 1280), (2, 64, 64, 320), (1, 32, 32, 4))
    for dt in sel.dtype_names():
        for batch, height, width, channels in shapes:
            for occlusion in (False, True):
                for deterministic in (False, True):
                    label = (f"{height}x{width}x{channels}" + (" occ" if occlusion else "")
                             + (" deterministic" if deterministic else ""))

                    def run(dtype, shape=(batch, height, width, channels), occ=occlusion,
                            det=deterministic):
                        h = _leaf(*shape, dtype=dtype)
                        flow = _leaf(*shape[:3], 2, dtype=torch.float32, scale=3.0)
                        o = _leaf(*shape[:3], 1, dtype=dtype) if occ else None
                        out = kernels.warp_occlusion(h, flow, o, residual=occ, deterministic=det,
                                                     backend="triton")
                        _backward(out, h, flow, o)
                    yield label, dt, run, sel.all_configs(dt)


SCENARIOS = {"adaln": adaln_scenarios, "attention3d": attention3d_scenarios,
             "frame_causal": frame_causal_scenarios, "performer": performer_scenarios,
             "warp": warp_scenarios}


def record_launches(ops: list[str], sel: Selection) -> tuple[list[Launch], list[dict]]:
    """Run every scenario with recording kernels; (launches, error rows of failed scenarios)."""
    import torch

    launches: list[Launch] = []
    errors = []
    context: dict = {}
    torch.manual_seed(0)
    with recording(ops, launches, context):
        for op in ops:
            for variant, dt, run, all_configs in SCENARIOS[op](sel):
                context.update(op=op, variant=variant, dtype=dt, all_configs=all_configs)
                before = len(launches)
                try:
                    run(_torch_dtype(dt))
                except Exception as exc:  # the host code after a recorded launch may fail on
                    # uninitialised outputs; what was recorded stands, the error is kept
                    errors.append({"op": op, "kernel": None, "variant": variant, "dtype": dt,
                                   "error": f"scenario stopped after {len(launches) - before} "
                                            f"launches: {type(exc).__name__}: {exc}"[:2000]})
    return launches, errors


# ----------------------------------------------------------------------------------------------
# Driver


def _git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    return done.stdout.strip() or "unknown"


def _cuda_version() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        return get_ptxas_version().strip().splitlines()[-1]
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def plan(arch: int, ops: list[str], sel: Selection,
         kernels: tuple[str, ...] | None = None) -> tuple[list[Job], list[dict]]:
    """The distinct compiles of the selection (only kernels whose name contains one of
    ``kernels``, when given), and error rows of what could not be recorded."""
    launches, rows = record_launches(ops, sel)
    unique: dict[str, Job] = {}
    for launch in launches:
        if kernels and not any(part in launch.name for part in kernels):
            continue
        try:
            for job in launch_jobs(launch, arch, all_configs=launch.all_configs):
                unique.setdefault(job.key(arch), job)
        except Exception as exc:
            rows.append({"op": launch.op, "kernel": launch.name, "variant": launch.variant,
                         "dtype": launch.dtype, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    return list(unique.values()), rows


def fp16_twins(todo: list[Job], arch: int) -> tuple[list[Job], list[Job]]:
    """(jobs to compile, fp16 jobs left out): an fp16 compile whose launch equals a bf16 one in
    everything but the element type (same flags, tiles, warps, stages, specialisation) is the
    same schedule with f16 instead of bf16 operands, so it is not compiled again; its numbers
    are the bf16 row's. fp16 launches that differ (e.g. performer's fp32 feature products) are
    compiled. ``--exhaustive`` compiles every one."""
    bf16 = {job.key(arch) for job in todo if job.dtype == "bf16"}
    twins = [job for job in todo
             if job.dtype == "fp16" and job.key(arch, {"fp16": "bf16"}) in bf16]
    left_out = {id(job) for job in twins}
    return [job for job in todo if id(job) not in left_out], twins


def profile(arch: int, ops: list[str], sel: Selection, jobs: int,
            commit: str | None = None, kernels: tuple[str, ...] | None = None) -> dict:
    import triton

    todo, rows = plan(arch, ops, sel, kernels)
    twins: list[Job] = []
    if not sel.exhaustive:
        todo, twins = fp16_twins(todo, arch)
    work = [(job, arch) for job in todo]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            rows += list(pool.map(_compile_job_star, work))
    else:
        rows += [compile_job(*w) for w in work]
    rows.sort(key=lambda r: (r["op"], r.get("kernel") or "", r["dtype"], r["variant"],
                             r.get("num_warps") or 0, r.get("num_stages") or 0))
    return {"arch": ARCH_NAMES[arch], "triton": triton.__version__, "cuda": _cuda_version(),
            "commit": commit or _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "fp16_as_bf16": sorted({f"{j.op} {j.kernel} {j.variant}" for j in twins}),
            "rows": rows}


_MD_COLUMNS = [("op", "op"), ("kernel", "kernel"), ("variant", "variant"), ("dtype", "dtype"),
               ("blocks", "blocks"), ("num_warps", "w"), ("num_stages", "s"),
               ("registers", "regs"), ("spill", "spill st/ld B"), ("shared_bytes", "smem B"),
               ("ctas_per_sm", "CTA/SM"), ("mma", "mma"), ("dot_ops", "dots"),
               ("loop_instructions", "loop instr"), ("loads", "v4/async/tma"),
               ("fences", "fences"), ("atomics", "atomics"), ("trig_in_loop", "trig in loop"),
               ("warnings", "ptxas warnings")]


def _md_cell(row: dict, key: str) -> str:
    if key == "blocks":
        flags = row.get("constexprs") or {}
        return " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in flags.items()
                        if k.startswith("BLOCK_") or k.startswith("ROWS"))
    if key == "variant":
        flags = row.get("constexprs") or {}
        on = [k for k, v in flags.items() if v is True]
        return row["variant"] + (f" [{' '.join(on)}]" if on else "")
    if key == "spill":
        return f"{row['spill_store_bytes']}/{row['spill_load_bytes']}"
    if key == "mma":
        if not row["mma_count"]:
            return "none"
        mixed = row["mma_kind"] == "wgmma" and row.get("mma_sync_count")
        return f"{row['mma_kind']} x{row['mma_count']}" + (
            f" (mma.sync x{row['mma_sync_count']})" if mixed else "")
    if key == "loads":
        return f"{row['vector_loads']}/{row['async_copies']}/{row['tma']}"
    if key in ("fences", "atomics"):
        return " ".join(f"{k} x{v}" for k, v in row[key].items()) or "-"
    if key == "warnings":
        return " ".join(sorted({w.split(":")[0].strip() if "C7" not in w else
                                re.search(r"C7\d+", w).group(0) for w in row[key]})) or "-"
    value = row.get(key)
    return "-" if value is None else str(value)


def markdown(report: dict) -> str:
    lines = [f"# Static profile, {report['arch']}",
             "",
             f"triton {report['triton']}, {report['cuda']}, commit {report['commit']}, "
             f"{report['date']}. Compile-only (no GPU): registers/spills/warnings from ptxas, "
             "CTA/SM from registers + shared memory + warps, mma and loop instructions from the "
             "SASS (loop instr = instructions per thread in one iteration of the innermost loop "
             "with the most tensor-core instructions), loads/fences/atomics from the PTX, trig "
             "= sin/cos inside loops (TTIR scf.for + SASS MUFU).",
             "",
             *([f"fp16 launches identical to a bf16 launch but for the element type are not "
                f"compiled again (their numbers are the bf16 rows'): "
                f"{len(report['fp16_as_bf16'])} variants, "
                f"{', '.join(sorted({v.split()[1] for v in report['fp16_as_bf16']}))}.", ""]
               if report.get("fp16_as_bf16") else []),
             "## Per kernel",
             "",
             *[f"- {line}" for line in summary(report).splitlines()],
             "",
             "## Every variant",
             "",
             "| " + " | ".join(h for _, h in _MD_COLUMNS) + " |",
             "|" + "---|" * len(_MD_COLUMNS)]
    errors = []
    for row in report["rows"]:
        if "error" in row:
            errors.append(row)
            continue
        lines.append("| " + " | ".join(_md_cell(row, k).replace("|", "/")
                                       for k, _ in _MD_COLUMNS) + " |")
    if errors:
        lines += ["", "## Variants that failed", ""]
        lines += [f"- {r['op']} {r.get('kernel') or ''} {r['variant']} {r['dtype']}: "
                  f"{r['error'].splitlines()[0][:300]}" for r in errors]
    return "\n".join(lines) + "\n"


def summary(report: dict) -> str:
    """Per op and kernel: variants, worst spills, mma kinds, C7515 warnings, trig in loops."""
    groups: dict[tuple, list] = {}
    for row in report["rows"]:
        groups.setdefault((row["op"], row.get("kernel") or "-"), []).append(row)
    out = []
    for (op, kernel), rows in sorted(groups.items()):
        ok = [r for r in rows if "error" not in r]
        if not ok:
            out.append(f"{op} {kernel}: {len(rows)} errors")
            continue
        kinds = sorted({r["mma_kind"] for r in ok})
        out.append(
            f"{op} {kernel}: {len(ok)} variants ({len(rows) - len(ok)} errors), "
            f"max regs {max(r['registers'] for r in ok)}, "
            f"spilling {sum(r['spill_store_bytes'] > 0 for r in ok)} "
            f"(max {max(r['spill_store_bytes'] for r in ok)} B), mma {'/'.join(kinds)}, "
            f"C7515 in {sum(any('C7515' in w for w in r['warnings']) for r in ok)}, "
            f"trig in loop {sum(r['trig_in_loop'] > 0 for r in ok)}, "
            f"max loop instr {max((r['loop_instructions'] or 0) for r in ok)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCH_NAMES))
    parser.add_argument("--ops", nargs="+", default=list(OP_MODULES), choices=list(OP_MODULES))
    parser.add_argument("--quick", action="store_true",
                        help="bf16 and the largest head dim only (the CI subset)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES,
                        help="only these dtypes (default: every one)")
    parser.add_argument("--head-dims", type=int, nargs="+",
                        help="only these head dims of the attention-like ops (default: every one)")
    parser.add_argument("--kernels", nargs="+",
                        help="only kernels whose name contains one of these (e.g. rope fwd)")
    parser.add_argument("--exhaustive", action="store_true",
                        help="every autotune config in every dtype (default: bf16 only)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "static")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
    parser.add_argument("--commit", help="commit to record (default: git HEAD of this checkout)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only count the distinct compiles per op and kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run without TRITON_INTERPRET: the interpreter replaces triton.jit")
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        start = time.perf_counter()
        sel = Selection(args.quick, args.dtypes and tuple(args.dtypes),
                        args.head_dims and tuple(args.head_dims), args.exhaustive)
        if args.dry_run:
            todo, errors = plan(arch, args.ops, sel, args.kernels and tuple(args.kernels))
            if not sel.exhaustive:
                todo, twins = fp16_twins(todo, arch)
                print(f"{ARCH_NAMES[arch]}: {len(twins)} fp16 compiles left out as bf16 twins")
            counts: dict[tuple, int] = {}
            for job in todo:
                counts[job.op, job.kernel] = counts.get((job.op, job.kernel), 0) + 1
            for (op, kernel), n in sorted(counts.items()):
                print(f"{ARCH_NAMES[arch]} {op} {kernel}: {n} compiles")
            print(f"{ARCH_NAMES[arch]}: {len(todo)} compiles, {len(errors)} recording errors")
            for row in errors:
                print("  ", row["op"], row["variant"], row["dtype"], row["error"][:300])
            continue
        report = profile(arch, args.ops, sel, args.jobs, args.commit,
                         args.kernels and tuple(args.kernels))
        stem = args.out / ARCH_NAMES[arch]
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        print(f"{ARCH_NAMES[arch]}: {len(report['rows'])} rows in "
              f"{time.perf_counter() - start:.0f} s -> {stem}.json/.md")
        print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
