"""Generate ``docs/PERFORMANCE.md`` and the per-op plots from the result files, never by hand.

    python -m bench.report                 # bench/results/*/*.json -> PNGs + docs/PERFORMANCE.md
    python -m bench.report --check         # exit 1 when docs/PERFORMANCE.md is out of date
    python -m bench.report import DIR      # file a `make gpu-evidence` folder, then regenerate

Only GPU result folders count: ``cpu-*`` folders (reduced CPU sweeps, dry runs) are listed as
such and never enter a table. "Ours" is the fastest of the library's own providers on a row
(the compiled backends ``triton`` / ``cuda`` and their variants, and ``fused_*`` model paths);
every other provider is a baseline, and the table gives ours' speed-up over it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.harness import CPU_SLUG_PREFIX, RESULTS_DIR, validate_result

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "PERFORMANCE.md"
STATIC_DIR = Path(__file__).resolve().parent / "static"
OURS_PREFIXES = ("triton", "cuda", "fused")
EVIDENCE_LOGS = ("summary.json", "sanitizer.log", "tests.log")
HOST_DIR = "host-overhead"  # pytest-benchmark storage of `make bench-host`


def is_ours(provider: str) -> bool:
    return provider.startswith(OURS_PREFIXES)


def load_results(results_root: Path) -> dict[str, dict[str, dict]]:
    """{device slug: {op: result document}} for every ``<slug>/<op>.json`` (schema-checked)."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(Path(results_root).glob("*/*.json")):
        doc = json.loads(path.read_text())
        try:
            validate_result(doc)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        found.setdefault(path.parent.name, {})[path.stem] = doc
    return found


# ----------------------------------------------------------------------------------------------
# plots


def _size_and_throughput(row: dict) -> tuple[float, float, str] | None:
    """(problem size, achieved throughput, unit) of a timed row, or None without counters."""
    ms = row["ms_p50"]
    if row.get("tflops"):
        return row["tflops"] * ms * 1e9, row["tflops"], "TFLOP/s"
    if row.get("gbps"):
        return row["gbps"] * ms * 1e6, row["gbps"], "GB/s"
    return None


def plot_result(path: Path | None) -> Path | None:
    """Draw ``<op>.png`` beside ``<op>.json``: throughput against problem size per provider (one
    panel per mode), with the measured and datasheet rooflines; rows without FLOP/byte counters
    (CPU smoke runs, model steps) are drawn as latency per workload. None without matplotlib."""
    if path is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    doc = json.loads(Path(path).read_text())
    rows = [r for r in doc["rows"] if "ms_p50" in r]
    modes = [m for m in ("fwd", "bwd", "fwd_bwd") if any(r["mode"] == m for r in rows)] or ["fwd"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    peaks, sheet = doc.get("peaks") or {}, doc.get("datasheet") or {}
    for ax, mode in zip(axes[0], modes):
        mode_rows = [r for r in rows if r["mode"] == mode]
        counted = [(r, _size_and_throughput(r)) for r in mode_rows]
        if counted and all(c is not None for _, c in counted):
            unit = counted[0][1][2]
            several_dtypes = len({r["dtype"] for r, _ in counted}) > 1
            by_provider: dict[tuple, list] = defaultdict(list)
            for r, (size, thr, _) in counted:
                by_provider[(r["provider"], r["dtype"])].append((size, thr))
            for (provider, dtype), points in sorted(by_provider.items()):
                points.sort()
                ours = is_ours(provider)
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-" if ours else "s--",
                        label=f"{provider} {dtype}" if several_dtypes else provider,
                        linewidth=2 if ours else 1)
            # roofline: the throughput the measured (and datasheet) ceilings allow at each size
            for ceiling, style, label in ((peaks, "k-", "roofline (measured)"),
                                          (sheet, "k:", "roofline (datasheet)")):
                roof = _roofline_points(counted, ceiling, unit)
                if roof:
                    ax.plot(*zip(*roof), style, label=label, linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("problem size (" + ("FLOP" if unit == "TFLOP/s" else "bytes") + ")")
            ax.set_ylabel(unit)
        else:
            names = sorted({r["workload"] for r in mode_rows})
            for provider in sorted({r["provider"] for r in mode_rows}):
                ms = {r["workload"]: r["ms_p50"] for r in mode_rows if r["provider"] == provider}
                ax.plot([n for n in names if n in ms], [ms[n] for n in names if n in ms],
                        "o" if is_ours(provider) else "s", label=provider)
            ax.set_ylabel("ms (median)")
            ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        ax.set_title(f"{Path(path).stem} {mode}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    title = doc["device"] + (" (CPU smoke run: wiring only, not evidence)" if doc.get("smoke")
                             else "")
    fig.suptitle(f"{title}; commit {doc['commit']}, {doc['date'][:10]}", fontsize=9)
    fig.tight_layout()
    png = Path(path).with_suffix(".png")
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def _roofline_points(counted: list, ceiling: dict, unit: str) -> list[tuple[float, float]]:
    """(size, attainable throughput) per timed workload under ``ceiling``: the roofline time is
    max(FLOPs / peak FLOP rate, bytes / peak bandwidth), the attainable rate the work over it."""
    peak_tflops = ceiling.get("bf16_matmul_tflops") or ceiling.get("bf16_tflops")
    peak_gbps = ceiling.get("copy_gbps") or ceiling.get("hbm_gbps")
    points = set()
    for r, (size, _, _) in counted:
        flops = (r.get("tflops") or 0.0) * r["ms_p50"] * 1e9
        nbytes = (r.get("gbps") or 0.0) * r["ms_p50"] * 1e6
        bound_ms = max(flops / (peak_tflops * 1e9) if flops and peak_tflops else 0.0,
                       nbytes / (peak_gbps * 1e6) if nbytes and peak_gbps else 0.0)
        if bound_ms:
            points.add((size, size / bound_ms / (1e9 if unit == "TFLOP/s" else 1e6)))
    return sorted(points)


# ----------------------------------------------------------------------------------------------
# markdown


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ms(row: dict) -> str:
    if "ms_p50" not in row:
        return "skipped: " + row["skipped"] if "skipped" in row else "error: " + row["error"]
    return f"{row['ms_p50']:.4g} [{row['ms_p20']:.4g}, {row['ms_p80']:.4g}]"


def op_section(op: str, doc: dict, slug: str, doc_path: Path, results_root: Path) -> list[str]:
    lines = [f"### {op}", ""]
    png = results_root / slug / f"{op}.png"
    if png.exists():
        lines += [f"![{op} on {doc['device']}]({os.path.relpath(png, doc_path.parent)})", ""]
    lines += [f"Commit `{doc['commit']}`, {doc['date']}, torch {doc['torch']}, triton "
              f"{doc['triton']}, CUDA {doc['cuda']}.", ""]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in doc["rows"]:
        groups[(row["workload"], row["dtype"], row["mode"])].append(row)
    lines += ["| workload | dtype | mode | provider | ms p50 [p20, p80] | TFLOP/s | GB/s | "
              "% roofline (measured) | % roofline (datasheet) | peak MiB | ours' speed-up |",
              "|" + "---|" * 11]
    for (workload, dtype, mode), rows in groups.items():
        ours = [r["ms_p50"] for r in rows if is_ours(r["provider"]) and "ms_p50" in r]
        best = min(ours) if ours else None
        for r in rows:
            speedup = ""
            if best and not is_ours(r["provider"]) and "ms_p50" in r:
                speedup = f"{r['ms_p50'] / best:.2f}x"
            name = f"**{r['provider']}**" if is_ours(r["provider"]) else r["provider"]
            lines.append(f"| {workload} | {dtype} | {mode} | {name} | {_ms(r)} | "
                         f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('gbps'), '.0f')} | "
                         f"{_fmt(r.get('pct_of_peak'), '.1f')} | "
                         f"{_fmt(r.get('pct_of_datasheet_peak'), '.1f')} | "
                         f"{_fmt(r.get('peak_mem_mib'), '.0f')} | {speedup} |")
    return lines + [""]


def host_overhead_section(storage: Path, doc_path: Path) -> list[str]:
    """The newest `make bench-host` run: per public op, the host time of its Python path (launch
    swallowed) against ``torch.empty_like`` on the same tensor, and the 15 us target."""
    from bench.host_overhead import TARGET_US

    runs = sorted(storage.glob("*/*.json"), key=lambda p: json.loads(p.read_text())["datetime"])
    lines = ["## Host-side overhead per call", ""]
    if not runs:
        return lines + ["Not measured yet: `make bench-host`.", ""]
    run = json.loads(runs[-1].read_text())
    ours: dict[str, dict] = {}
    bare: dict[str, dict] = {}
    for bench in run["benchmarks"]:
        table = bare if bench["name"].startswith("test_bare_torch_call") else ours
        table[bench["group"]] = bench["stats"]
    machine = run["machine_info"]
    device = sorted({b["extra_info"].get("device", "?") for b in run["benchmarks"]})
    lines += [f"`make bench-host` on {machine.get('cpu', {}).get('brand_raw', '?')} "
              f"({machine.get('machine', '?')}, Python {machine.get('python_version', '?')}), "
              f"tensors on {', '.join(device)}, {run['datetime'][:19]} UTC, commit "
              f"`{run['commit_info'].get('id', '?')[:7]}` "
              f"([raw]({os.path.relpath(runs[-1], doc_path.parent)})). The public function on "
              "the Triton backend with every kernel launch swallowed: validation, registry "
              "resolution, autograd wrapping, torch.library dispatch and the launcher's Python. "
              "This is host time, which a CPU measures as well as a GPU machine's host does; a "
              f"GPU idles through it unless CUDA graphs hide it. Target: <= {TARGET_US:.0f} us.",
              "",
              "| op | public path median [IQR] (us) | min (us) | torch.empty_like median (us) | "
              "ratio | within target |", "|---|---|---|---|---|---|"]
    for op, stats in sorted(ours.items()):
        median, iqr = stats["median"] * 1e6, stats["iqr"] * 1e6
        base = bare.get(op, {}).get("median")
        ratio = f"{stats['median'] / base:.0f}x" if base else ""
        base_us = f"{base * 1e6:.1f}" if base else ""
        lines.append(f"| {op} | {median:.1f} [{iqr:.1f}] | {stats['min'] * 1e6:.1f} | "
                     f"{base_us} | {ratio} | "
                     f"{'yes' if median <= TARGET_US else '**no**'} |")
    return lines + [""]


def render(results_root: Path = RESULTS_DIR, static_dir: Path = STATIC_DIR,
           doc_path: Path = DOC) -> str:
    results = load_results(results_root)
    gpu = {slug: ops for slug, ops in results.items() if not slug.startswith(CPU_SLUG_PREFIX)}
    lines = ["# Performance", "",
             "Generated by `python -m bench.report` from `bench/results/<device>/<op>.json`; do "
             "not edit by hand (`make import-evidence DIR=...` files a GPU run and regenerates "
             "it). A performance claim without a row here does not exist.", "",
             "Each row: median [p20, p80] of `triton.testing.do_bench` with an L2 flush before "
             "every call (CUDA-graph replay, still L2-flushed, for calls under 50 us), 1 s between "
             "providers. % roofline = roofline time / measured time, the roofline time being "
             "max(FLOPs / peak FLOP rate, compulsory bytes / peak bandwidth), with the peaks "
             "measured at the start of the run (copy bandwidth, 8192^3 bf16 GEMM) or taken from "
             "the datasheet. FLOPs count unmasked work only. **Bold** providers are this "
             "library's; the last column is how many times faster the best of them is.", ""]
    if not gpu:
        lines += ["**No GPU results have been committed yet, so no performance claim of this "
                  "project stands.** Run `make gpu-evidence` on a GPU, then `make "
                  "import-evidence DIR=<its output>` (see `bench/README.md`).", ""]
    for slug, ops in sorted(gpu.items()):
        any_doc = next(iter(ops.values()))
        peaks, sheet = any_doc.get("peaks") or {}, any_doc.get("datasheet") or {}
        lines += [f"## {any_doc['device']} (`{slug}`)", "",
                  f"Measured: copy {peaks.get('copy_gbps', '?')} GB/s, bf16 GEMM "
                  f"{peaks.get('bf16_matmul_tflops', '?')} TFLOP/s. Datasheet "
                  f"({sheet.get('name', 'not in the table')}): "
                  f"{sheet.get('hbm_gbps', '?')} GB/s, {sheet.get('bf16_tflops', '?')} TFLOP/s "
                  "dense bf16.", ""]
        for name in ("summary.json", "sanitizer.log"):
            path = results_root / slug / "evidence" / name
            if path.exists():
                lines.append(f"- evidence: [{name}]({os.path.relpath(path, doc_path.parent)})")
        lines.append("")
        for op, doc in sorted(ops.items()):
            lines += op_section(op, doc, slug, doc_path, results_root)
    lines += ["Reduced CPU sweeps (`bench/results/cpu-*`, ignored by git) check the wiring only "
              "and never appear here.", ""]
    lines += host_overhead_section(Path(results_root) / HOST_DIR, doc_path)
    statics = sorted(Path(static_dir).glob("*.md")) if Path(static_dir).exists() else []
    lines += ["## Static profiles (compile-only)", ""]
    if statics:
        lines += ["Register, shared-memory and occupancy figures of every kernel variant, read "
                  "from the compiled code without running it (`bench/static/`).", ""]
        for md in statics:
            lines += [f"### {md.stem}", "", md.read_text().strip(), ""]
    else:
        lines += ["No static profile in `bench/static/` yet.", ""]
    return "\n".join(lines).rstrip() + "\n"


def regenerate(results_root: Path = RESULTS_DIR, static_dir: Path = STATIC_DIR,
               doc_path: Path = DOC, plots: bool = True) -> Path:
    if plots:
        for path in sorted(Path(results_root).glob("*/*.json")):
            plot_result(path)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render(results_root, static_dir, doc_path))
    return doc_path


def import_evidence(folder: Path, results_root: Path = RESULTS_DIR) -> list[Path]:
    """Copy a gpu-evidence folder's results (``results.tar.gz`` or ``results/``) into
    ``results_root/<slug>/``, with its summary and sanitizer log under ``<slug>/evidence/``.
    Refuses CPU (dry-run) results: those never land beside GPU evidence."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix="import-evidence-"))
    try:
        archive = folder / "results.tar.gz"
        if archive.exists():
            with tarfile.open(archive) as tar:
                # the "data" filter (no absolute paths, links or devices) where Python has it
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, **safe)
            source = staging / "results"
        else:
            source = folder / "results"
        slugs = sorted(p for p in source.glob("*") if p.is_dir()) if source.exists() else []
        if not slugs:
            raise ValueError(f"DIR must hold results.tar.gz or results/<device>/ from `make "
                             f"gpu-evidence`, found neither in {folder}")
        copied = []
        for slug_dir in slugs:
            if slug_dir.name.startswith(CPU_SLUG_PREFIX):
                raise ValueError(f"refusing to import {slug_dir.name!r}: CPU (dry-run) results "
                                 "are not evidence")
            target = Path(results_root) / slug_dir.name
            for src in sorted(slug_dir.glob("*")):
                if src.suffix in (".json", ".png"):
                    target.mkdir(parents=True, exist_ok=True)
                    copied.append(Path(shutil.copy2(src, target / src.name)))
            for name in EVIDENCE_LOGS:
                if (folder / name).exists():
                    (target / "evidence").mkdir(parents=True, exist_ok=True)
                    copied.append(Path(shutil.copy2(folder / name, target / "evidence" / name)))
        return copied
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("action", nargs="?", choices=("generate", "import"), default="generate")
    p.add_argument("folder", nargs="?", type=Path, help="for `import`: the gpu-evidence folder")
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.add_argument("--static", type=Path, default=STATIC_DIR)
    p.add_argument("--out", type=Path, default=DOC)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when the document differs from what the results give")
    args = p.parse_args(argv)
    if args.action == "import":
        if args.folder is None:
            p.error("import needs the gpu-evidence folder: python -m bench.report import DIR")
        for path in import_evidence(args.folder, args.results):
            print(f"imported {path}")
    if args.check:
        expected = render(args.results, args.static, args.out)
        current = args.out.read_text() if args.out.exists() else ""
        if current != expected:
            print(f"{args.out} is out of date: run `python -m bench.report`", file=sys.stderr)
            return 1
        return 0
    print(f"wrote {regenerate(args.results, args.static, args.out, plots=not args.no_plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
