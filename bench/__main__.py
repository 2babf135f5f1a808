"""``python -m bench [--op NAME] [--quick] [--out DIR]``: run the benchmarks of every op (or the
named ones) and the end-to-end model rows, write ``<out>/<device-slug>/<op>.json``, print a
markdown table per op and draw one PNG per op (when matplotlib is importable).

On a GPU: every workload (``--quick``: each op's QUICK workloads), bf16/fp16 as each workload
lists, forward, backward and forward+backward. Without a GPU: a reduced sweep (QUICK workloads at
smoke size, a time budget per op) under a ``cpu-<machine>`` folder, which checks the wiring and
proves nothing about GPU performance.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from pathlib import Path

import torch

from bench import harness

BENCHES = {
    "adaln": "bench.bench_adaln",
    "gated_residual": "bench.bench_gated_residual",
    "attention3d": "bench.bench_attention3d",
    "warp": "bench.bench_warp",
    "performer": "bench.bench_performer",
    "frame_causal": "bench.bench_frame_causal",
    "models": "bench.bench_models",
}
CPU_BUDGET_S = 15.0  # per op on a CPU: the whole reduced sweep stays within 2 minutes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", action="append", default=None,
                   help=f"op to run (repeatable or comma-separated; default all: "
                        f"{', '.join(BENCHES)})")
    p.add_argument("--quick", action="store_true",
                   help="only each op's QUICK workloads (what `make gpu-evidence` runs)")
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR,
                   help="results root: files go to <out>/<device-slug>/<op>.json "
                        "(default bench/results)")
    p.add_argument("--dtype", action="append", choices=sorted(harness.DTYPES),
                   help="dtypes (default: each workload's own list)")
    p.add_argument("--mode", action="append", choices=harness.MODES, help="modes (default all)")
    p.add_argument("--workload", default="", help="regex filter on workload names")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"per-op wall-clock budget; rows after it are recorded as skipped "
                        f"(default: none on a GPU, {CPU_BUDGET_S:.0f} s on a CPU)")
    p.add_argument("--total-budget-s", type=float, default=None,
                   help="wall-clock budget of the whole sweep, shared out as it goes: each op "
                        "gets the time left divided by the ops left (overrides --budget-s)")
    p.add_argument("--cooldown-s", type=float, default=1.0,
                   help="pause between providers on a GPU (default 1 s)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNGs")
    args = p.parse_args(argv)
    names = [n for item in (args.op or list(BENCHES)) for n in item.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"--op must be among {list(BENCHES)}, got {unknown}")
    args.op = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device != "cuda"
    budget = args.budget_s if args.budget_s is not None else (
        CPU_BUDGET_S if device != "cuda" else None)
    if device != "cuda":
        print(f"# {harness.CPU_NOTICE}\n# Reduced sweep: QUICK workloads at smoke size, "
              f"{budget:.0f} s per op.", file=sys.stderr)
    peaks = harness.measure_peaks(device)
    if peaks:
        print(f"# measured peaks: {peaks}")
    # A quick sweep times bf16 only (every workload lists it): the dtype the targets are set in.
    dtypes = args.dtype or (["bf16"] if quick else None)
    # A quick sweep shortens do_bench's windows (10 ms warm-up, 40 ms of repetitions).
    windows = {"warmup_ms": 10.0, "rep_ms": 40.0} if quick else {}
    options = harness.RunOptions(smoke=device != "cuda", modes=args.mode or harness.MODES,
                                 dtypes=dtypes, budget_s=budget, cooldown_s=args.cooldown_s,
                                 **windows)
    written = []
    started = time.monotonic()
    for index, name in enumerate(args.op):
        if args.total_budget_s is not None:
            left = args.total_budget_s - (time.monotonic() - started)
            options.budget_s = max(left, 0.0) / (len(args.op) - index)
        module = importlib.import_module(BENCHES[name])
        workloads = [w for w in module.WORKLOADS if re.search(args.workload, w.name)
                     and (not quick or w.name in module.QUICK)]
        t0 = time.monotonic()
        _, path = harness.run_op(module.OP, workloads, module.providers, options=options,
                                 results_root=args.out, peaks=peaks, device=device)
        print(f"# {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
        written.append(path)
    if not args.no_plots:
        from bench import report

        for path in written:
            png = report.plot_result(path)
            print(f"drew {png}" if png else f"# no plot for {path} (matplotlib not importable)")
    print(f"# bench: {len(written)} ops in {time.monotonic() - started:.1f} s")
    if device != "cuda":
        print(f"# {harness.CPU_NOTICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
