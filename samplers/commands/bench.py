"""``avatar-kernels bench OP [harness options]``: runs ``bench/bench_<OP>.py``.

Benchmarks live in the source checkout (``bench/``), not in the installed wheel: run this from a
clone. Without a GPU only ``--smoke`` runs (CPU timings are not evidence).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

BENCHES = ("adaln", "attention3d", "warp", "performer", "frame_causal")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("op", choices=BENCHES, help="which benchmark")
    parser.add_argument("harness_args", nargs=argparse.REMAINDER,
                        help="passed to the harness (--dtype, --mode, --workload, --smoke, --out)")


def run(args: argparse.Namespace) -> int:
    name = f"bench.bench_{args.op}"
    if importlib.util.find_spec("bench") is None:
        raise SystemExit("bench/ is part of the source checkout: run `avatar-kernels bench` from "
                         "the repository root (or `python -m bench.bench_<op>` there)")
    module = importlib.import_module(name)
    module.main(module.OP, module.WORKLOADS, module.providers, args.harness_args)
    return 0
