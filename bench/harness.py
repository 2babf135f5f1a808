"""Shared benchmark harness: timing, FLOP/byte accounting, roofline percentages, result files.

Every ``bench_<op>.py`` declares named workloads (shapes from the papers), the names of its
``QUICK`` workloads, and ``providers(device)`` (the registry's usable backends plus the outside
baselines); :func:`run_op` runs them and :func:`write_results` stores
``<results root>/<device-slug>/<op>.json`` in the DESIGN.md schema.

Timing on CUDA: ``triton.testing.do_bench`` (median, p20, p80; it zeroes a buffer larger than L2
before every repetition, so every call starts from a cold L2). A call whose median is under
``GRAPH_BELOW_MS`` is timed again as a CUDA-graph replay, each replay after an L2 flush, because
below ~50 us the host's launch overhead, not the kernel, is what ``do_bench`` would measure. The
harness sleeps ``cooldown_s`` (1 s) between providers so one provider's clock and thermal state
does not leak into the next one's numbers.

Every row reports % of the measured roofline (copy bandwidth and bf16 GEMM rate measured at start
on this device) and % of the datasheet roofline (``DATASHEET``): the roofline time of a call is
``max(flops / peak_flops, bytes / peak_bandwidth)``, and the percentage is that time over the
measured median.

Without a GPU, timings prove nothing about GPU kernels: the harness then runs the workloads at
smoke size (wiring only, no FLOP/byte figures), names the device ``cpu-<machine>``, and
:func:`write_results` refuses to put such a file anywhere but a ``cpu-*`` folder.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
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
GRAPH_BELOW_MS = 0.05
CPU_SLUG_PREFIX = "cpu-"
CPU_NOTICE = ("CPU run: smoke-sized shapes, wiring only. These timings are not evidence for any "
              "GPU performance claim; claims need GPU numbers (`make gpu-evidence` on a GPU).")

# Dense tensor-core bf16/fp16 TFLOP/s (no sparsity) and HBM GB/s from NVIDIA's datasheets. First
# match of the regex on the lower-cased device name wins, so the specific names come first.
DATASHEET: list[tuple[str, dict]] = [
    (r"h200 nvl", {"name": "H200 NVL", "bf16_tflops": 835.0, "hbm_gbps": 4800.0}),
    (r"h200", {"name": "H200 SXM", "bf16_tflops": 989.0, "hbm_gbps": 4800.0}),
    (r"h100 nvl", {"name": "H100 NVL", "bf16_tflops": 835.0, "hbm_gbps": 3900.0}),
    (r"h100 pcie", {"name": "H100 PCIe", "bf16_tflops": 756.0, "hbm_gbps": 2000.0}),
    (r"h100", {"name": "H100 SXM", "bf16_tflops": 989.0, "hbm_gbps": 3350.0}),
    (r"a100.*80gb.*pcie", {"name": "A100 80GB PCIe", "bf16_tflops": 312.0, "hbm_gbps": 1935.0}),
    (r"a100.*80gb", {"name": "A100 80GB SXM", "bf16_tflops": 312.0, "hbm_gbps": 2039.0}),
    (r"a100", {"name": "A100 40GB", "bf16_tflops": 312.0, "hbm_gbps": 1555.0}),
]

ROW_KEYS = ("workload", "shape", "dtype", "mode", "provider")
TIMED_KEYS = ("ms_p50", "ms_p20", "ms_p80", "tflops", "gbps", "pct_of_peak",
              "pct_of_datasheet_peak", "peak_mem_mib", "timing")
DOC_KEYS = ("device", "device_slug", "torch", "triton", "cuda", "commit", "date", "peaks",
            "datasheet", "smoke", "rows")


@dataclass
class Workload:
    """A named shape from a paper. ``make_inputs(dtype, device, smoke)`` returns the keyword
    inputs of the op (tensors that need gradients already have ``requires_grad``); ``flops`` and
    ``bytes`` count the analytic work of one call in a mode (FLOPs: unmasked work only; bytes:
    compulsory traffic only)."""

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
    """torch.compile of an eager composite, compiled lazily on first use (per shape). Skipped off
    CUDA: inductor's CPU compile of one shape takes a minute or more and says nothing about GPUs."""
    compiled = torch.compile(fn, dynamic=False)
    return Provider(name, compiled, notes={"torch_compile": True})


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


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    ordered = torch.tensor(times, dtype=torch.float64)
    p50, p20, p80 = torch.quantile(ordered, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(p50), float(p20), float(p80)


def _l2_flush_buffer() -> torch.Tensor:
    # Twice the L2 size, so zeroing it evicts every line the timed call could reuse.
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
    return torch.empty(2 * l2, dtype=torch.int8, device="cuda")


def time_cuda_graph(fn: Callable[[], object], replays: int = 100) -> tuple[float, float, float]:
    """(p50, p20, p80) ms of one CUDA-graph replay of ``fn``, each replay after an L2 flush."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = _l2_flush_buffer()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_ms(fn: Callable[[], object], device: str, warmup_ms: float = 25.0,
            rep_ms: float = 100.0) -> tuple[float, float, float, str]:
    """(p50, p20, p80) in milliseconds and how they were measured."""
    if device == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8],
                                                warmup=warmup_ms, rep=rep_ms)
        if p50 >= GRAPH_BELOW_MS:
            return float(p50), float(p20), float(p80), "do_bench"
        try:
            return (*time_cuda_graph(fn), "cuda_graph")
        except Exception as exc:  # e.g. a baseline that syncs with the host cannot be captured
            torch.cuda.synchronize()
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            return float(p50), float(p20), float(p80), f"do_bench (graph capture failed: {reason})"
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[1], times[0], times[-1], "perf_counter (CPU, 3 calls)"


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated during one call, inputs included (None off CUDA)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


# ----------------------------------------------------------------------------------------------
# device facts


def device_slug(device: str) -> str:
    """``nvidia-h200`` for "NVIDIA H200"; ``cpu-<machine>`` off CUDA (never a GPU folder)."""
    if device != "cuda":
        return CPU_SLUG_PREFIX + re.sub(r"[^a-z0-9]+", "-", platform.machine().lower()).strip("-")
    name = torch.cuda.get_device_name().lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def datasheet_peaks(device_name: str) -> dict:
    """The DATASHEET entry for a device name ({} when the device is not in the table)."""
    lowered = device_name.lower()
    for pattern, spec in DATASHEET:
        if re.search(pattern, lowered):
            return dict(spec)
    return {}


def measure_peaks(device: str) -> dict:
    """Measured ceilings on this device: copy bandwidth (GB/s, read+write) and bf16 matmul
    TFLOP/s. The measured-roofline percentages use these."""
    if device != "cuda":
        return {}
    peaks = {"copy_gbps": round(_copy_gbps(), 1), "bf16_matmul_tflops": round(_gemm_tflops(), 1)}
    torch.cuda.empty_cache()
    return peaks


def _copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()  # 2 GiB >> L2
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), "cuda")[0]
    return 2 * src.numel() * src.element_size() / ms / 1e6  # bytes read + written


def _gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: a @ b, "cuda")[0]
    return 2 * n**3 / ms / 1e9


def roofline_pct(flops: float, nbytes: float, ms: float, peak_tflops: float | None,
                 peak_gbps: float | None) -> float | None:
    """100 * roofline time / measured time; the roofline time is the larger of the compute time
    at ``peak_tflops`` and the memory time at ``peak_gbps`` (terms with no peak are left out)."""
    bound_ms = 0.0
    if flops and peak_tflops:
        bound_ms = max(bound_ms, flops / (peak_tflops * 1e9))
    if nbytes and peak_gbps:
        bound_ms = max(bound_ms, nbytes / (peak_gbps * 1e6))
    return round(100 * bound_ms / ms, 1) if bound_ms else None


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
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {
        "device": name,
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cuda_extension": module is not None,
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "datasheet": datasheet_peaks(name) if device == "cuda" else {},
    }


# ----------------------------------------------------------------------------------------------
# driver


@dataclass
class RunOptions:
    """What to run: ``smoke`` shapes (forced off CUDA), modes, dtypes (None: each workload's own),
    a wall-clock ``budget_s`` after which the remaining rows are recorded as skipped, the
    ``cooldown_s`` pause between providers on CUDA, and do_bench's windows."""

    smoke: bool = False
    modes: Sequence[str] = MODES
    dtypes: Sequence[str] | None = None
    budget_s: float | None = None
    cooldown_s: float = 1.0
    warmup_ms: float = 25.0  # do_bench's warm-up and repetition windows
    rep_ms: float = 100.0


def _throughput_fields(wl: Workload, mode: str, dtype: str, ms: float, smoke: bool,
                       peaks: dict, datasheet: dict) -> dict:
    # Smoke shapes are not the workload's: counting its FLOPs would lie.
    flops, nbytes = (0.0, 0.0) if smoke else (wl.flops(mode), wl.bytes(mode))
    # The measured GEMM and the datasheet rate are tensor-core bf16/fp16 figures: an fp32 row is
    # held against the bandwidth roof only.
    tc = dtype in ("bf16", "fp16")
    return {
        "tflops": flops / ms / 1e9 if flops else None,
        "gbps": nbytes / ms / 1e6 if nbytes else None,
        "pct_of_peak": roofline_pct(flops if tc else 0.0, nbytes, ms,
                                    peaks.get("bf16_matmul_tflops"), peaks.get("copy_gbps")),
        "pct_of_datasheet_peak": roofline_pct(flops if tc else 0.0, nbytes, ms,
                                              datasheet.get("bf16_tflops"),
                                              datasheet.get("hbm_gbps")),
    }


def run(op: str, workloads: Iterable[Workload], providers: Iterable[Provider], *,
        device: str, options: RunOptions, peaks: dict, datasheet: dict | None = None) -> list[dict]:
    """Time every (workload, dtype, provider, mode); failures and skips are rows too."""
    rows: list[dict] = []
    providers = list(providers)
    datasheet = datasheet or {}
    started = time.monotonic()
    for wl in workloads:
        for dname in options.dtypes or wl.dtypes:
            inputs = wl.make_inputs(DTYPES[dname], device, options.smoke)
            previous = None  # the last provider that timed a row
            for prov in providers:
                for mode in options.modes:
                    if mode not in prov.modes:
                        continue
                    row = {"workload": wl.name, "shape": wl.shape, "dtype": dname, "mode": mode,
                           "provider": prov.name}
                    spent = time.monotonic() - started
                    reason = prov.skip(wl, dname)
                    if reason is None and device != "cuda" and prov.notes.get("torch_compile"):
                        reason = "torch.compile baseline: GPU runs only"
                    if reason is None and options.budget_s is not None and \
                            spent > options.budget_s:
                        reason = f"time budget of {options.budget_s:.0f} s spent"
                    if reason:
                        rows.append({**row, "skipped": reason})
                        continue
                    if device == "cuda" and previous not in (None, prov.name):
                        time.sleep(options.cooldown_s)
                    previous = prov.name
                    try:
                        fn = make_timed_callable(prov, inputs, mode)
                        p50, p20, p80, how = time_ms(fn, device, options.warmup_ms,
                                                     options.rep_ms)
                        peak = peak_memory_mib(fn, device)
                    except Exception as exc:  # a baseline that cannot run this shape is a row too
                        rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                        if device == "cuda":
                            torch.cuda.synchronize()
                        continue
                    rows.append({**row, "ms_p50": p50, "ms_p20": p20, "ms_p80": p80,
                                 **_throughput_fields(wl, mode, dname, p50, options.smoke, peaks,
                                                      datasheet),
                                 "peak_mem_mib": peak, "timing": how})
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    head = ("| workload | dtype | mode | provider | ms p50 [p20, p80] | TFLOP/s | GB/s | "
            "% roofline (measured) | % roofline (datasheet) | peak MiB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "ms_p50" in r:
            ms = f"{r['ms_p50']:.4g} [{r['ms_p20']:.4g}, {r['ms_p80']:.4g}]"
        else:
            ms = r.get("skipped") or r.get("error", "")
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['mode']} | {r['provider']} | {ms} | "
                     f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('gbps'), '.0f')} | "
                     f"{_fmt(r.get('pct_of_peak'), '.1f')} | "
                     f"{_fmt(r.get('pct_of_datasheet_peak'), '.1f')} | "
                     f"{_fmt(r.get('peak_mem_mib'), '.0f')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# result files


def validate_result(doc: dict) -> None:
    """Raise ValueError unless ``doc`` follows the result schema (DESIGN.md, Benchmarks)."""
    missing = [k for k in DOC_KEYS if k not in doc]
    if missing:
        raise ValueError(f"result document is missing keys {missing}; expected all of "
                         f"{list(DOC_KEYS)}")
    if not isinstance(doc["rows"], list):
        raise ValueError(f"result 'rows' must be a list, got {type(doc['rows']).__name__}")
    for i, row in enumerate(doc["rows"]):
        lacking = [k for k in ROW_KEYS if k not in row]
        outcome = [k for k in ("ms_p50", "skipped", "error") if k in row]
        if lacking or len(outcome) != 1:
            raise ValueError(f"result row {i} must have {list(ROW_KEYS)} and exactly one of "
                             f"ms_p50 / skipped / error, got keys {sorted(row)}")
        if "ms_p50" in row:
            absent = [k for k in TIMED_KEYS if k not in row]
            if absent:
                raise ValueError(f"timed result row {i} is missing {absent}")
            if not (row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]):
                raise ValueError(f"result row {i}: need ms_p20 <= ms_p50 <= ms_p80, got "
                                 f"{row['ms_p20']}, {row['ms_p50']}, {row['ms_p80']}")
        if row["mode"] not in MODES:
            raise ValueError(f"result row {i}: mode must be one of {MODES}, got {row['mode']!r}")


def is_cpu_result(doc: dict) -> bool:
    return doc.get("device") == "cpu" or bool(doc.get("smoke"))


def write_results(doc: dict, folder: Path, op: str) -> Path:
    """Write ``folder/<op>.json`` after checking the schema. CPU (or smoke) timings go only to a
    ``cpu-*`` folder, and GPU timings never to one: a GPU result folder holds GPU evidence only."""
    validate_result(doc)
    folder = Path(folder)
    cpu_folder = folder.name.startswith(CPU_SLUG_PREFIX)
    if is_cpu_result(doc) and not cpu_folder:
        raise ValueError(f"refusing to write CPU/smoke timings of {op!r} to {folder}: GPU results "
                         f"belong there. Write them under a '{CPU_SLUG_PREFIX}*' folder.")
    if not is_cpu_result(doc) and cpu_folder:
        raise ValueError(f"refusing to write GPU timings of {op!r} to the CPU folder {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{op}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def run_op(op: str, workloads: Sequence[Workload], providers: Callable[[str], list[Provider]],
           *, options: RunOptions, results_root: Path | None = RESULTS_DIR,
           peaks: dict | None = None, device: str | None = None) -> tuple[list[dict], Path | None]:
    """Run one op's workloads on every provider; print the table; write the result file under
    ``results_root/<device-slug>/`` (not when ``results_root`` is None)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda":
        options = RunOptions(**{**options.__dict__, "smoke": True})
    peaks = measure_peaks(device) if peaks is None else peaks
    env = environment(device)
    rows = run(op, workloads, providers(device), device=device, options=options, peaks=peaks,
               datasheet=env["datasheet"])
    print(f"\n## {op} on {env['device']}\n")
    print(markdown_table(rows))
    if device != "cuda":
        print(f"\n# {CPU_NOTICE}")
    if results_root is None:
        return rows, None
    doc = {**env, "peaks": peaks, "smoke": options.smoke, "rows": rows}
    path = write_results(doc, Path(results_root) / env["device_slug"], op)
    print(f"wrote {path}")
    return rows, path


def parse_args(argv: Sequence[str] | None, op: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Benchmark {op}")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="dtypes to run (default: each workload's own list)")
    p.add_argument("--mode", action="append", choices=MODES, help="modes (default: all)")
    p.add_argument("--workload", default="", help="regex filter on workload names")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (always on without a GPU); checks wiring, proves nothing")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="results root; the file goes to <root>/<device-slug>/<op>.json")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p.parse_args(argv)


def main(op: str, workloads: Sequence[Workload],
         providers: Callable[[str], list[Provider]], argv: Sequence[str] | None = None) -> list:
    """``python -m bench.bench_<op>``: one op, every workload matching ``--workload``."""
    args = parse_args(argv, op)
    selected = [w for w in workloads if re.search(args.workload, w.name)]
    options = RunOptions(smoke=args.smoke, modes=args.mode or MODES, dtypes=args.dtype)
    rows, _ = run_op(op, selected, providers, options=options,
                     results_root=None if args.no_write else args.out)
    return rows
