"""Shared benchmark harness: timing, FLOP/byte accounting, providers, result files.

Every ``bench_<op>.py`` declares named workloads (shapes from the papers) and providers (the
registry's usable backends plus outside baselines) and calls :func:`main`. On CUDA, timing is
``triton.testing.do_bench`` (median, p20, p80 over many repeats, after warm-up); results go to
``bench/results/<device-slug>/<op>.json`` in the format DESIGN.md fixes, and a markdown table is
printed.

Without a GPU the harness refuses to write results (CPU timings are not evidence for GPU claims);
``--smoke`` runs every provider once on tiny shapes to check the wiring, writes nothing unless
``--out`` is given, and labels the device as the CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kernels
from kernels.registry import cuda_extension

MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Workload:
    """A named shape from a paper. ``make_inputs(dtype, device, smoke)`` returns the keyword
    inputs of the op (tensors that need gradients already have ``requires_grad``); ``flops`` and
    ``bytes`` count the analytic work of one call in a mode (bytes: compulsory traffic only)."""

    name: str
    shape: dict
    make_inputs: Callable[[torch.dtype, str, bool], dict]
    flops: Callable[[str], float] = lambda mode: 0.0
    bytes: Callable[[str], float] = lambda mode: 0.0
    dtypes: Sequence[str] = ("bf16",)


@dataclass
class Provider:
    """Something that computes the op: ``fn(**inputs) -> Tensor``. ``skip(workload, dtype)``
    may return a reason string to leave a row out (e.g. a baseline that needs too much memory)."""

    name: str
    fn: Callable[..., torch.Tensor]
    modes: Sequence[str] = MODES
    skip: Callable[[Workload, str], str | None] = lambda workload, dtype: None
    notes: dict = field(default_factory=dict)


def registry_providers(op: str, call: Callable[..., torch.Tensor], device: str,
                       dtype: torch.dtype = torch.float16) -> list[Provider]:
    """One provider per backend of ``op`` that can run on ``device`` (``call(backend=...)``)."""
    providers = []
    for name, reasons in kernels.available_backends(op, device=device, dtype=dtype).items():
        if reasons:
            print(f"# {op}: backend {name!r} skipped: {'; '.join(reasons)}", file=sys.stderr)
            continue
        providers.append(Provider(name, lambda _b=name, **kw: call(backend=_b, **kw)))
    return providers


def compiled_provider(name: str, fn: Callable[..., torch.Tensor]) -> Provider:
    """torch.compile of an eager composite, compiled lazily on first use (per shape)."""
    compiled = torch.compile(fn, dynamic=False)
    return Provider(name, compiled)


# ----------------------------------------------------------------------------------------------
# timing


def _grads_of(inputs: dict) -> list[torch.Tensor]:
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def make_timed_callable(provider: Provider, inputs: dict, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return provider.fn(**inputs)
        return run
    leaves = _grads_of(inputs)
    if not leaves:
        raise ValueError(f"mode {mode!r} needs inputs with requires_grad")
    if mode == "bwd":
        out = provider.fn(**inputs)
        grad = torch.randn_like(out)

        def run():
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)
        return run

    def run():
        out = provider.fn(**inputs)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def time_ms(fn: Callable[[], object], device: str) -> tuple[float, float, float]:
    """(p50, p20, p80) in milliseconds."""
    if device == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return float(p50), float(p20), float(p80)
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[1], times[0], times[-1]


# ----------------------------------------------------------------------------------------------
# device facts


def device_slug(device: str) -> str:
    if device != "cuda":
        return "cpu-smoke"
    name = torch.cuda.get_device_name().lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")  # "NVIDIA H200" -> "nvidia-h200"


def measure_peaks(device: str) -> dict:
    """Measured ceilings on this device: copy bandwidth (GB/s, read+write) and bf16 matmul
    TFLOP/s. Percent-of-peak uses these, not datasheet numbers."""
    if device != "cuda":
        return {}
    n = 1 << 28  # 512 MiB of bf16: far beyond L2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    copy_gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms_mm, _, _ = time_ms(lambda: a @ a, device)
    mm_tflops = 2 * 8192**3 / ms_mm / 1e9
    return {"copy_gbps": round(copy_gbps, 1), "bf16_matmul_tflops": round(mm_tflops, 1)}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    module, _ = cuda_extension()
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cuda_extension": module is not None,
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------
# driver


def run(op: str, workloads: Iterable[Workload], providers: Iterable[Provider], *,
        device: str, dtypes: Sequence[str] | None, modes: Sequence[str], smoke: bool,
        peaks: dict) -> list[dict]:
    rows = []
    providers = list(providers)
    for wl in workloads:
        for dname in dtypes or wl.dtypes:
            dtype = DTYPES[dname]
            for mode in modes:
                inputs = wl.make_inputs(dtype, device, smoke)
                for prov in providers:
                    if mode not in prov.modes:
                        continue
                    row = {"workload": wl.name, "shape": wl.shape, "dtype": dname, "mode": mode,
                           "provider": prov.name}
                    reason = prov.skip(wl, dname)
                    if reason:
                        rows.append({**row, "skipped": reason})
                        continue
                    try:
                        fn = make_timed_callable(prov, inputs, mode)
                        p50, p20, p80 = time_ms(fn, device)
                    except Exception as exc:  # a baseline that cannot run this shape is a row too
                        rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                        continue
                    # Smoke shapes are not the workload's: counting its FLOPs would lie.
                    flops, nbytes = (0.0, 0.0) if smoke else (wl.flops(mode), wl.bytes(mode))
                    tflops = flops / p50 / 1e9 if flops else None
                    gbps = nbytes / p50 / 1e6 if nbytes else None
                    pct = None
                    if peaks:
                        fracs = []
                        if tflops:
                            fracs.append(tflops / peaks["bf16_matmul_tflops"])
                        if gbps:
                            fracs.append(gbps / peaks["copy_gbps"])
                        pct = round(100 * max(fracs), 1) if fracs else None
                    rows.append({**row, "ms_p50": p50, "ms_p20": p20, "ms_p80": p80,
                                 "tflops": tflops, "gbps": gbps, "pct_of_peak": pct})
                del inputs
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| workload | dtype | mode | provider | ms p50 | TFLOP/s | GB/s | % peak |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        def fmt(v, spec=".3f"):
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
        ms = fmt(r.get("ms_p50")) or r.get("skipped") or r.get("error", "")
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['mode']} | {r['provider']} | {ms} | "
                     f"{fmt(r.get('tflops'), '.1f')} | {fmt(r.get('gbps'), '.0f')} | "
                     f"{fmt(r.get('pct_of_peak'), '.1f')} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None, op: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Benchmark {op}")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="dtypes to run (default: each workload's own list)")
    p.add_argument("--mode", action="append", choices=MODES, help="modes (default: all)")
    p.add_argument("--workload", default="", help="regex filter on workload names")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, one repeat, CPU allowed; checks wiring, proves nothing")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results/<device-slug>; smoke: none)")
    return p.parse_args(argv)


def main(op: str, workloads: Sequence[Workload],
         providers: Callable[[str], list[Provider]], argv: Sequence[str] | None = None) -> list:
    args = parse_args(argv, op)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit(f"bench {op}: no CUDA device. Benchmarks time GPU kernels; CPU numbers "
                         "are not evidence. Use --smoke to check the wiring on a CPU.")
    if device == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        print("# no GPU and TRITON_INTERPRET unset: Triton rows are skipped", file=sys.stderr)
    selected = [w for w in workloads if re.search(args.workload, w.name)]
    peaks = {} if args.smoke else measure_peaks(device)
    rows = run(op, selected, providers(device), device=device, dtypes=args.dtype,
               modes=args.mode or MODES, smoke=args.smoke, peaks=peaks)
    print(markdown_table(rows))
    out_dir = args.out or (None if args.smoke else RESULTS_DIR / device_slug(device))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{op}.json"
        doc = {**environment(device), "peaks": peaks, "smoke": args.smoke, "rows": rows}
        path.write_text(json.dumps(doc, indent=1))
        print(f"wrote {path}")
    return rows
