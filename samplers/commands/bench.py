"""``avatar-kernels bench OP [harness options]``: runs ``bench/bench_<OP>.py``.

Benchmarks live in the source checkout (``bench/``), not in the installed wheel: run this from a
clone. Without a GPU only ``--smoke`` runs (CPU timings are not evidence).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from samplers.commands.validation import OptionError

BENCHES = ("adaln", "attention3d", "warp", "performer", "frame_causal")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("op", choices=BENCHES, help="which benchmark")
    parser.add_argument("harness_args", nargs=argparse.REMAINDER,
                        help="passed to the harness (--dtype, --mode, --workload, --smoke, --out)")


def find_bench_root() -> Path:
    """The source checkout holding ``bench/``: the one this package was imported from, else the
    working directory (an installed console script has neither on ``sys.path``)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "bench" / "harness.py").is_file():
            return root
    raise OptionError("bench/ is part of the source checkout: run `avatar-kernels bench` from "
                      "the repository root (or `python -m bench.bench_<op>` there)")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("bench") is None:
        sys.path.insert(0, str(find_bench_root()))
    module = importlib.import_module(f"bench.bench_{args.op}")
    module.main(module.OP, module.WORKLOADS, module.providers, args.harness_args)
    return 0
